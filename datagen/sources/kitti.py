"""KITTI depth completion: real LiDAR, semi-dense GT and native K (always native: KITTI is calibrated).

train/val pair each data_depth_velodyne frame with its data_depth_annotated GT, the raw-drive RGB and
P_rect_0X of the drive date's calib_cam_to_cam.txt. The raw drives are looked up in the option `raw`
if given, else <root>/raw/ (the layout BP-Net uses), else directly under <root> (the layout KITTI's
raw-data download script leaves: <root>/2011_09_26/...). The selection sets carry their own K as nine
numbers per image.

Every sample records its scanner in meta["lidar"] (what `trainer eval --sparsity lines:N` reads): the
HDL-64E's nominal ring table and the Velodyne's pose in the frame's camera, from the drive date's
calib_velo_to_cam.txt and calib_cam_to_cam.txt when the raw folder has them (pose_from "calibration"),
else KITTI's nominal rig (pose_from "nominal": the offset of shared.scan.lidar.KITTI_MOUNT, no rotation).
The calibrated rotation matters: the Velodyne is turned about 0.6 deg in pitch and in roll against the
rectified camera (2011_09_26), enough to tilt a ring across one or two of its neighbours in the image.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from shared.depth import CodecError, decode_depth_png
from shared.scan.fit import read_pose
from shared.scan.lidar import KITTI_MOUNT
from shared.scan.patterns import LIDAR_PRESETS

from .base import InputError, Item, Record, Source, assign_keys, load_rgb

SPLITS = ("train", "val", "val_selection_cropped", "test")
CAMERAS = ("image_02", "image_03")
DATE_RE = re.compile(r"^\d{4}_\d{2}_\d{2}$")


@functools.lru_cache(maxsize=64)
def read_calib(path: str) -> dict[str, np.ndarray]:
    """The numeric entries of a KITTI calib file ("KEY: v1 v2 ..."); text entries (calib_time) skipped."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if ":" not in line:
            continue
        key, value = line.split(":", 1)
        try:
            out[key.strip()] = np.array([float(x) for x in value.split()], dtype=np.float64)
        except ValueError:
            pass
    return out


def K_from_calib(path: str | Path, camera: str) -> np.ndarray:
    """K of a rectified camera: the left 3x3 block of its 3x4 projection P_rect_0X."""
    name = "P_rect_" + camera[-2:]
    P = read_calib(str(path)).get(name)
    if P is None or P.size != 12:
        raise InputError(f"{path}: no 12-number {name} entry")
    return P.reshape(3, 4)[:, :3].copy()


# Camera 3's frame sits this far along x from camera 2's: (P_rect_03 - P_rect_02)[0, 3] / f on 2011_09_26,
# (-339.5242 - 44.85728) / 721.5377 m; for the nominal rig, when no calibration file is at hand.
CAM3_FROM_CAM2_X_M = -0.5327


@functools.lru_cache(maxsize=64)
def velodyne_pose(date_dir: str | None, camera: str | None) -> tuple[dict, str]:
    """(pose of the Velodyne in this rectified camera, as Mount.to_dict(); "calibration" or "nominal").

    With <date>/calib_velo_to_cam.txt and calib_cam_to_cam.txt: shared.scan.fit.read_pose gives the
    pose in rectified camera 2; camera 3 is moved by the difference of the two P_rect baselines.
    """
    velo = Path(date_dir) / "calib_velo_to_cam.txt" if date_dir else None
    c2c = velo.with_name("calib_cam_to_cam.txt") if velo else None
    if velo is not None and velo.is_file() and c2c.is_file():
        T = read_pose(velo)
        R, t, source = T[:3, :3], T[:3, 3].copy(), "calibration"
        if camera == "image_03":
            P2, P3 = (read_calib(str(c2c))[f"P_rect_0{c}"].reshape(3, 4) for c in (2, 3))
            t += np.linalg.solve(P3[:, :3], P3[:, 3]) - np.linalg.solve(P2[:, :3], P2[:, 3])
    else:
        R, t, source = KITTI_MOUNT.R_cam_from_lidar, KITTI_MOUNT.t_cam_from_lidar.copy(), "nominal"
        if camera == "image_03":
            t[0] += CAM3_FROM_CAM2_X_M
    return {"R_cam_from_lidar": R.tolist(), "t_cam_from_lidar": t.tolist()}, source


def lidar_meta(date_dir: str | None, camera: str | None) -> dict:
    """meta["lidar"] of a KITTI sample: the HDL-64E's ring table and the Velodyne's pose (velodyne_pose)."""
    pose, source = velodyne_pose(date_dir, camera)
    hdl64 = LIDAR_PRESETS["hdl64"]
    return {"preset": "hdl64", "rings": hdl64.n_rings, "pattern": hdl64.to_dict(), "pose": pose, "pose_from": source}


def read_K_txt(path: str | Path) -> np.ndarray:
    """K of the selection sets: a .txt of nine numbers (row-major 3x3)."""
    try:
        vals = np.array(Path(path).read_text().split(), dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read intrinsics {path} ({exc})") from exc
    if vals.size != 9:
        raise InputError(f"{path}: expected 9 numbers, found {vals.size}")
    return vals.reshape(3, 3)


def read_depth(path: str | Path, what: str) -> np.ndarray:
    try:
        return decode_depth_png(Path(path).read_bytes(), what=f"{path}")
    except FileNotFoundError as exc:
        raise InputError(f"{what} {path} is missing") from exc
    except (OSError, CodecError) as exc:
        raise InputError(f"{what} {path}: {exc}") from exc


class KittiSource(Source):
    name = "kitti"
    labelled = True
    has_native_intrinsics = True
    layout = """\
<root>/
  data_depth_velodyne/{train,val}/<drive>/proj_depth/velodyne_raw/image_0{2,3}/<frame>.png
  data_depth_annotated/{train,val}/<drive>/proj_depth/groundtruth/image_0{2,3}/<frame>.png
  raw/<date>/calib_cam_to_cam.txt                          (or <date>/ directly under <root>,
  raw/<date>/<drive>/image_0{2,3}/data/<frame>.png          or the option raw=<path>)
  depth_selection/val_selection_cropped/{image,velodyne_raw,groundtruth_depth,intrinsics}/
      <drive>_image_<frame>_image_0X.png, ..._velodyne_raw_..., ..._groundtruth_depth_..., intrinsics/<image stem>.txt
  depth_selection/test_depth_completion_anonymous/{image,velodyne_raw,intrinsics}/0000000000.png (.txt)
e.g. drive 2011_09_26_drive_0001_sync, date 2011_09_26, frame 0000000005. Option split (default train)."""
    option_defaults = {"split": "train", "raw": None}

    def __init__(self, root, intrinsics: str = "native", **options):
        # KITTI's geometry is calibrated: its K is used whatever --intrinsics says (see meta["intrinsics"])
        if intrinsics not in ("random", "native"):
            raise ValueError(f"--intrinsics must be 'random' or 'native', got {intrinsics!r}")
        super().__init__(root, "native", **options)
        self.requested_intrinsics = intrinsics
        if self.options["split"] not in SPLITS:
            raise ValueError(f"kitti: split must be one of {SPLITS}, got {self.options['split']!r}")

    # -- paths -------------------------------------------------------------------------------------

    def raw_root(self) -> Path:
        if self.options["raw"]:
            return Path(self.options["raw"])
        return self.root / "raw" if (self.root / "raw").is_dir() else self.root

    def selection_dir(self, name: str) -> Path:
        for cand in (self.root / "depth_selection" / name, self.root / name):
            if cand.is_dir():
                return cand
        return self.root / "depth_selection" / name

    def check_layout(self) -> None:
        super().check_layout()
        split = self.options["split"]
        if split in ("train", "val"):
            for d in (self.root / "data_depth_velodyne" / split, self.root / "data_depth_annotated" / split):
                if not d.is_dir():
                    raise self.layout_error(f"{d} is missing")
            raw = self.raw_root()
            if not raw.is_dir() or not any(DATE_RE.match(p.name) for p in raw.iterdir() if p.is_dir()):
                raise self.layout_error(f"no raw drive dates (<date>/ like 2011_09_26) in {raw}")
        else:
            sel = self.selection_dir("val_selection_cropped" if split == "val_selection_cropped"
                                     else "test_depth_completion_anonymous")
            subs = ("image", "velodyne_raw", "intrinsics") + (("groundtruth_depth",) if split != "test" else ())
            for s in subs:
                if not (sel / s).is_dir():
                    raise self.layout_error(f"{sel / s} is missing")

    # -- items -------------------------------------------------------------------------------------

    def items(self) -> list[Item]:
        self.check_layout()
        split = self.options["split"]
        items = self._drive_items(split) if split in ("train", "val") else self._selection_items(split)
        if not items:
            raise self.layout_error(f"no frames found for split {split}")
        return items

    def _drive_items(self, split: str) -> list[Item]:
        velo_root = self.root / "data_depth_velodyne" / split
        gt_root = self.root / "data_depth_annotated" / split
        raw = self.raw_root()
        rows = []
        for velo in sorted(velo_root.glob("*/proj_depth/velodyne_raw/image_0[23]/*.png")):
            rel = velo.relative_to(velo_root)
            drive, camera, frame = rel.parts[0], rel.parts[3], velo.stem
            date = drive[:10]
            rows.append((f"{split}/{drive}/{camera}/{frame}", str(velo), {
                "gt": str(gt_root / drive / "proj_depth" / "groundtruth" / camera / velo.name),
                "rgb": str(raw / date / drive / camera / "data" / velo.name),
                "calib": str(raw / date / "calib_cam_to_cam.txt"),
                "camera": camera, "drive": drive, "frame": frame, "split": split,
            }))
        rows.sort(key=lambda r: r[0])
        keys = assign_keys(self.name, [r[0] for r in rows])
        return [Item(k, self.name, path, extra) for k, (_, path, extra) in zip(keys, rows, strict=True)]

    def _selection_items(self, split: str) -> list[Item]:
        name = "val_selection_cropped" if split == "val_selection_cropped" else "test_depth_completion_anonymous"
        sel = self.selection_dir(name)
        rows = []
        for img in sorted((sel / "image").glob("*.png")):
            if split == "test":
                velo, gt = sel / "velodyne_raw" / img.name, None
            else:
                if "_image_" not in img.name:
                    continue
                velo = sel / "velodyne_raw" / img.name.replace("_sync_image_", "_sync_velodyne_raw_", 1)
                gt = sel / "groundtruth_depth" / img.name.replace("_sync_image_", "_sync_groundtruth_depth_", 1)
            m = re.search(r"(image_0[23])$", img.stem)
            rows.append((f"{name}/{img.stem}", str(velo), {
                "rgb": str(img), "gt": str(gt) if gt else None,
                "intrinsics": str(sel / "intrinsics" / (img.stem + ".txt")),
                "camera": m.group(1) if m else None, "split": split,
            }))
        keys = assign_keys(self.name, [r[0] for r in rows])
        return [Item(k, self.name, path, extra) for k, (_, path, extra) in zip(keys, rows, strict=True)]

    def _date_dir(self, item: Item) -> str | None:
        """The raw folder of the frame's drive date (its calibration files), when the name tells the date."""
        if item.extra.get("calib"):
            return str(Path(item.extra["calib"]).parent)
        date = Path(item.extra.get("rgb", "")).name[:10]
        return str(self.raw_root() / date) if DATE_RE.match(date) else None

    # -- load --------------------------------------------------------------------------------------

    def load(self, item: Item) -> Record:
        e = item.extra
        if e.get("calib"):
            try:
                K = K_from_calib(e["calib"], e["camera"])
            except OSError as exc:
                raise InputError(f"{item.path}: calibration {e['calib']} unreadable ({exc})") from exc
        else:
            K = read_K_txt(e["intrinsics"])
        if not (np.all(np.isfinite(K)) and K[0, 0] > 0 and K[1, 1] > 0):
            raise InputError(f"{item.path}: bad intrinsics {K.tolist()}")
        if not Path(e["rgb"]).is_file():
            raise InputError(f"{item.path}: RGB image {e['rgb']} is missing")
        rgb = load_rgb(e["rgb"])
        sparse = read_depth(item.path, "velodyne_raw")
        gt = read_depth(e["gt"], "ground truth") if e.get("gt") else None
        for name, d in (("velodyne_raw", sparse), ("ground truth", gt)):
            if d is not None and d.shape != rgb.shape[:2]:
                raise InputError(f"{item.path}: {name} is {d.shape[1]}x{d.shape[0]} but the image is "
                                 f"{rgb.shape[1]}x{rgb.shape[0]}")
        meta = {k: e[k] for k in ("split", "camera", "drive", "frame") if e.get(k)}
        meta["intrinsics"] = "native"
        meta["lidar"] = lidar_meta(self._date_dir(item), e.get("camera"))
        return Record(item.key, self.name, item.path, rgb, K=K, sparse=sparse, gt=gt, meta=meta)
