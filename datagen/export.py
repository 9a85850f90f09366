"""`datagen export`: shards written to the on-disk layouts that other depth-completion code reads.

Two formats (docs/datasets.md, "Exporting to other trainers' layouts", shows the trees and units):

kitti   the KITTI depth-completion layout as the benchmark and the raw data distribute it, under one root:
        data_depth_velodyne/ (the LiDAR input), data_depth_annotated/ (the GT, or the dense pseudo depth of
        unlabelled shards), raw/<date>/ (RGB and calib_cam_to_cam.txt), val_selection_cropped/ (an optional
        selection), plus data_depth_teacher/ (the teacher's map, which no KITTI loader globs) and
        kitti_dc.json (the split file CompletionFormer's loader reads). KITTI keeps one calibration per
        date, so frames are grouped by (K, image size): each group gets its own date folder, counted from
        2000_01_01, and a drive per split within it.
nyu-h5  Ma & Karaman's NYUv2 HDF5 files: train/<scene>/<frame>.h5 and val/official/<frame>.h5, each with
        'rgb' (3 x H x W uint8) and 'depth' (H x W float32 metres; the GT, or the pseudo depth of unlabelled
        shards). The format has no sparse input (its loaders draw points from 'depth') and no K (they use
        the Kinect's): each file also holds 'K' (which the project's nyu source reads) and, when the shard
        has one, 'teacher'; those loaders ignore both.

Depth maps are copied as the shard stores them (uint16 PNG, metres x 256), so an export reads back to the
same values; RGB becomes a PNG of the decoded shard image (a JPEG shard loses nothing more). Every export
writes dmd3c_export.json at its root: which shard and key became which files, the teacher and its licence,
the `datagen run` settings found beside the shards (their job.json), and the export's own command.
An output folder must be new or empty; `overwrite` replaces an earlier export, `add` writes another split
into one (train first, then val with a selection: KITTI's selection is a subset of its val drives).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datagen.sources.nyu import NYU_K
from shared import storage
from shared.camera import scale_K
from shared.depth import DEPTH_SCALE, encode_depth_png, encode_rgb
from shared.fsutil import atomic_write_bytes, write_json
from shared.shard import decode_sample, list_shards, make_error_handler, shard_dataset

log = logging.getLogger("datagen.export")

FORMATS = ("kitti", "nyu-h5")
SPLITS = ("train", "val")
PROGRESS = ("auto", "bar", "log", "none")
MANIFEST = "dmd3c_export.json"
MANIFEST_VERSION = 1
KITTI_CAMERA = "image_02"
KITTI_FIRST_DATE = datetime.date(2000, 1, 1)  # clearly not a KITTI recording day, yet a valid YYYY_MM_DD
KITTI_SELECTION = "val_selection_cropped"
# KITTI loaders (BP-Net's, CompletionFormer's) assert that a depth PNG's largest code exceeds 255 (1 m)
KITTI_MIN_MAX_CODE = 255
NYU_SIZE = (640, 480)  # W, H of NYUv2's frames, which its loaders' resize and crop assume
NYU_FRAME_DIGITS = 5  # Ma & Karaman's files are 00001.h5, ...


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the file or sample and what was expected."""


@dataclass
class ExportSummary:
    out: str
    format: str
    split: str
    samples: int = 0
    groups: int = 0  # KITTI drives or NYU scene folders written by this export
    selection: int = 0
    teacher_maps: int = 0
    groundtruth: str = ""  # "gt" (labelled shards) or "depth" (the dense pseudo depth of unlabelled ones)
    shards: int = 0
    seconds: float = 0.0
    licences: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def format_text(self) -> str:
        what = {"gt": "the ground truth", "depth": "the dense pseudo depth"}.get(self.groundtruth, "-")
        unit = "drive(s)" if self.format == "kitti" else "scene folder(s)"
        lines = [f"exported {self.samples} sample(s) from {self.shards} shard(s) to {self.out} "
                 f"({self.format}, split {self.split}) in {self.seconds:.1f} s",
                 f"  {self.groups} {unit}; dense target: {what}; teacher maps: {self.teacher_maps}"]
        if self.format == "kitti":
            lines.append(f"  {KITTI_SELECTION}: {self.selection} frame(s)")
        lines += [f"  {text}" for text in self.licences]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines.append(f"  what went where: {os.path.join(self.out, MANIFEST)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# helpers


def _num(x: float) -> str:
    """A number as KITTI's files write them (7.215377e+02), with every digit float() needs to get it back."""
    return np.format_float_scientific(float(x), unique=True, trim="0", exp_digits=2)


def _png_kind(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's header, or None for something else."""
    if len(data) < 26 or not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">BB", data[24:26])


def _depth_png(raw: dict, name: str, arr: np.ndarray) -> bytes:
    """A shard's depth PNG as it is (uint16 greyscale, metres x 256), else the decoded map written anew."""
    data = raw.get(f"{name}.png")
    return data if data is not None and _png_kind(data) == (16, 0) else encode_depth_png(arr)


def _rgb_png(raw: dict, rgb: np.ndarray) -> tuple[bytes, str]:
    """An 8-bit RGB PNG of the sample's image: the shard's own PNG when it is one, else the decoded image."""
    data = raw.get("rgb.png")
    if data is not None and _png_kind(data) == (8, 2):
        return data, "png"
    return encode_rgb(rgb, "png"), "png" if "rgb.png" in raw else "jpg"


def _max_code(data_m: np.ndarray) -> int:
    return int(np.rint(float(data_m.max(initial=0.0)) * DEPTH_SCALE))


def _key_of(sample_K: np.ndarray, width: int, height: int) -> tuple:
    return (*(float(x) for x in np.asarray(sample_K, np.float64).ravel()), int(width), int(height))


def _shard_dir(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if storage.is_url(url) else str(Path(url).parent)


def _read_job(url: str, cache: dict) -> dict | None:
    """The job.json `datagen run` leaves beside its shards (its settings and the teacher's licence)."""
    where = _shard_dir(url)
    if where not in cache:
        path = storage.join(where, "job.json")
        try:
            cache[where] = json.loads(storage.read_bytes(path)) if storage.is_file(path) else None
        except (OSError, ValueError):
            cache[where] = None
    return cache[where]


def _licence(model: str | None, job: dict | None) -> dict:
    """The teacher's licence: as the run recorded it in job.json, else as datagen knows the model."""
    lic = ((job or {}).get("teacher_about") or {}).get("license")
    if isinstance(lic, dict) and "license" in lic:
        return {**lic, "from": "job.json"}
    if model is None:
        return {"license": "unknown", "source": "the shards do not name their teacher", "non_commercial": False,
                "from": "datagen"}
    if model == "oracle":
        return {"license": "n/a", "source": "the synthetic world's own teacher", "non_commercial": False,
                "from": "datagen"}
    from datagen.teachers.zoo import teacher_license

    return {**teacher_license(model), "from": "datagen"}


class _Progress:
    """A tqdm bar on a terminal, a log line every 10 s otherwise, or nothing."""

    def __init__(self, mode: str, shards: int):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.shards, self.n, self.t0, self.last = mode, shards, 0, time.monotonic(), time.monotonic()
        self.bar = tqdm(unit="img", desc="export", dynamic_ncols=True) if mode == "bar" else None

    def update(self, shard_index: int) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.mode == "log" and time.monotonic() - self.last >= 10.0:
            self.last = time.monotonic()
            log.info("%d samples exported (shard %d/%d), %.1f samples/s", self.n, shard_index + 1, self.shards,
                     self.n / max(self.last - self.t0, 1e-9))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_manifest(out: Path, manifest: dict) -> None:
    """dmd3c_export.json: indented, but one line per frame (an export may hold a million frames)."""
    head = json.dumps({k: v for k, v in manifest.items() if k != "frames"}, indent=1)
    frames = ",\n".join("  " + json.dumps(f, separators=(", ", ": ")) for f in manifest.get("frames", []))
    atomic_write_bytes(out / MANIFEST, f'{head[:-2]},\n "frames": [\n{frames}\n ]\n}}\n'.encode())


# ---------------------------------------------------------------------------------------------------------
# the output folder


def _prepare_out(out: Path, fmt: str, split: str, overwrite: bool, add: bool) -> dict | None:
    """Check the output folder; returns the earlier export's manifest when adding to one."""
    if overwrite and add:
        raise ExportError("--overwrite and --add exclude each other: replace an export, or add a split to it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return None
    manifest_path = out / MANIFEST
    manifest = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise ExportError(f"{manifest_path}: not readable JSON ({exc}); remove {out} yourself") from exc
    if overwrite:
        if manifest is None:
            raise ExportError(f"--out {out} is not empty and holds no {MANIFEST}, so it is not an export made by "
                              f"`datagen export`: refusing to delete it (entries: {', '.join(entries[:5])})")
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return None
    if add:
        if manifest is None:
            raise ExportError(f"--add: {out} holds no {MANIFEST}, so it is not an export to add a split to")
        if manifest.get("format") != fmt:
            raise ExportError(f"--add: {out} holds a {manifest.get('format')} export, not {fmt}")
        if manifest.get("status") != "complete":
            raise ExportError(f"--add: the export in {out} did not complete ({MANIFEST} says "
                              f"{manifest.get('status')!r}); redo it with --overwrite")
        done = sorted({e["split"] for e in manifest.get("exports", [])})
        if split in done:
            raise ExportError(f"--add: {out} already holds split {split} ({', '.join(done)} exported); use another "
                              "--split, or --overwrite to start again")
        return manifest
    raise ExportError(f"--out {out} is not empty ({len(entries)} entries, e.g. {', '.join(entries[:3])}): choose a "
                      "new or empty folder, --overwrite to replace an earlier export, or --add to add a split to it")


class _Files:
    """The files this export writes, so that a failed export removes them and leaves the folder as it was."""

    def __init__(self, out: Path):
        self.out, self.created, self.dirs = out, [], set()

    def write(self, rel: str, data: bytes) -> str:
        path = self.out / rel
        if path.parent not in self.dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.dirs.add(path.parent)
        if path.exists():
            raise ExportError(f"{path} exists already: two samples would share one file")
        path.write_bytes(data)
        self.created.append(path)
        return rel

    def remove(self) -> None:
        for path in reversed(self.created):
            path.unlink(missing_ok=True)
        for d in sorted(self.dirs, key=lambda p: len(p.parts), reverse=True):  # the now empty folders
            while d != self.out and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
                d = d.parent


# ---------------------------------------------------------------------------------------------------------
# KITTI


def calib_text(K: np.ndarray, width: int, height: int) -> str:
    """calib_cam_to_cam.txt as KITTI writes it, for rectified cameras that all share K: P_rect_0X = K | 0
    (no stereo baseline: there is one camera), R_rect_00 = I, S_rect_0X = the image size."""
    K = np.asarray(K, np.float64)
    P = np.hstack([K, np.zeros((3, 1))])
    lines = ["calib_time: 01-Jan-2000 00:00:00", "corner_dist: 0.0e+00"]
    for c in range(4):
        lines += [f"S_0{c}: {_num(width)} {_num(height)}",
                  f"K_0{c}: " + " ".join(_num(x) for x in K.ravel()),
                  f"D_0{c}: " + " ".join(_num(0) for _ in range(5)),
                  f"R_0{c}: " + " ".join(_num(x) for x in np.eye(3).ravel()),
                  f"T_0{c}: " + " ".join(_num(0) for _ in range(3)),
                  f"S_rect_0{c}: {_num(width)} {_num(height)}",
                  f"R_rect_0{c}: " + " ".join(_num(x) for x in np.eye(3).ravel()),
                  f"P_rect_0{c}: " + " ".join(_num(x) for x in P.ravel())]
    return "\n".join(lines) + "\n"


def kitti_paths(split: str, date: str, drive: str, frame: str) -> dict[str, str]:
    """Where one frame's files go, relative to the export's root."""
    name = f"{frame}.png"
    cam = KITTI_CAMERA
    return {
        "velodyne_raw": f"data_depth_velodyne/{split}/{drive}/proj_depth/velodyne_raw/{cam}/{name}",
        "groundtruth": f"data_depth_annotated/{split}/{drive}/proj_depth/groundtruth/{cam}/{name}",
        "rgb": f"raw/{date}/{drive}/{cam}/data/{name}",
        "calib": f"raw/{date}/calib_cam_to_cam.txt",
        "teacher": f"data_depth_teacher/{split}/{drive}/proj_depth/teacher/{cam}/{name}",
        "teacher_scaling": f"data_depth_teacher/{split}/{drive}/proj_depth/teacher/{cam}/{frame}.json",
        "pseudo_depth": f"data_depth_pseudo/{split}/{drive}/proj_depth/pseudo_depth/{cam}/{name}",
    }


def selection_paths(drive: str, frame: str) -> dict[str, str]:
    """The selection's names, as KITTI's val_selection_cropped spells them."""
    cam, sel = KITTI_CAMERA, KITTI_SELECTION
    return {
        "image": f"{sel}/image/{drive}_image_{frame}_{cam}.png",
        "velodyne_raw": f"{sel}/velodyne_raw/{drive}_velodyne_raw_{frame}_{cam}.png",
        "groundtruth_depth": f"{sel}/groundtruth_depth/{drive}_groundtruth_depth_{frame}_{cam}.png",
        "intrinsics": f"{sel}/intrinsics/{drive}_image_{frame}_{cam}.txt",
        "teacher": f"{sel}/teacher/{drive}_teacher_{frame}_{cam}.png",
        "teacher_scaling": f"{sel}/teacher/{drive}_teacher_{frame}_{cam}.json",
    }


class _KittiWriter:
    def __init__(self, files: _Files, split: str, val_selection: int, earlier: dict | None):
        self.files, self.split, self.val_selection = files, split, val_selection
        # dates (one per K and size) carry over from an earlier export into the same root: same K, same date
        self.dates: list[dict] = copy.deepcopy((earlier or {}).get("dates", []))  # a failed --add restores earlier
        self.date_of = {tuple(d["group"]): i for i, d in enumerate(self.dates)}
        self.drive_of: dict[int, dict] = {}  # date index -> this split's drive in it
        self.selected = 0

    def _drive(self, K: np.ndarray, width: int, height: int) -> dict:
        group = _key_of(K, width, height)
        i = self.date_of.get(group)
        if i is None:
            i = len(self.dates)
            try:
                day = KITTI_FIRST_DATE + datetime.timedelta(days=i)
            except OverflowError as exc:
                raise ExportError(f"more than {i} different (K, image size) pairs: KITTI's date folders run "
                                  "out (one per pair)") from exc
            date = day.strftime("%Y_%m_%d")
            self.files.write(f"raw/{date}/calib_cam_to_cam.txt", calib_text(K, width, height).encode())
            self.dates.append({"date": date, "group": list(group), "K": np.asarray(K).tolist(),
                               "width": width, "height": height, "drives": []})
            self.date_of[group] = i
        if i not in self.drive_of:
            d = self.dates[i]
            drive = f"{d['date']}_drive_{len(d['drives']) + 1:04d}_sync"
            d["drives"].append({"drive": drive, "split": self.split})
            self.drive_of[i] = {"date": d["date"], "drive": drive, "frames": 0}
        return self.drive_of[i]

    def write(self, sample, raw: dict, gt_name: str) -> dict:
        drive = self._drive(sample.K, sample.width, sample.height)
        frame = f"{drive['frames']:010d}"
        drive["frames"] += 1
        paths = kitti_paths(self.split, drive["date"], drive["drive"], frame)
        w = self.files.write
        rgb, rgb_from = _rgb_png(raw, sample.rgb)
        sparse = _depth_png(raw, "sparse", sample.sparse)
        dense = _depth_png(raw, gt_name, getattr(sample, gt_name))
        files = {"rgb": w(paths["rgb"], rgb), "velodyne_raw": w(paths["velodyne_raw"], sparse),
                 "groundtruth": w(paths["groundtruth"], dense), "calib": paths["calib"]}
        if gt_name == "gt" and sample.depth is not None:
            files["pseudo_depth"] = w(paths["pseudo_depth"], _depth_png(raw, "depth", sample.depth))
        scaling = None
        if sample.teacher is not None:
            scaling = json.dumps(self._teacher_json(sample), indent=1).encode()
            files["teacher"] = w(paths["teacher"], raw["teacher.png"])
            files["teacher_scaling"] = w(paths["teacher_scaling"], scaling)
        entry = {"drive": drive["drive"], "date": drive["date"], "frame": frame, "files": files,
                 "rgb_from": rgb_from}
        if self.selected < self.val_selection:
            self.selected += 1
            sel = selection_paths(drive["drive"], frame)
            K_txt = (" ".join(_num(x) for x in np.ravel(sample.K)) + "\n").encode()  # 9 numbers, row-major
            sfiles = {"image": w(sel["image"], rgb), "velodyne_raw": w(sel["velodyne_raw"], sparse),
                      "groundtruth_depth": w(sel["groundtruth_depth"], dense), "intrinsics": w(sel["intrinsics"], K_txt)}
            if scaling is not None:
                sfiles["teacher"] = w(sel["teacher"], raw["teacher.png"])
                sfiles["teacher_scaling"] = w(sel["teacher_scaling"], scaling)
            entry["selection"] = sfiles
        return entry

    @staticmethod
    def _teacher_json(sample) -> dict:
        teacher = sample.meta.get("teacher") or {}
        scaling = sample.meta.get("teacher_scaling") or {}
        return {"key": sample.key, "model": teacher.get("model"), "output": teacher.get("output"),
                "min": scaling.get("min"), "max": scaling.get("max"),
                "decode": "value = min + (png - 1) / 65534 * (max - min) where png > 0 (min where max == min); "
                          "png 0 = no value"}

    def groups_written(self) -> int:
        return len(self.drive_of)

    def warnings(self, entries: list[dict], out: Path) -> list[str]:
        low = [e for e in entries if e.get("max_codes") and min(e["max_codes"]) <= KITTI_MIN_MAX_CODE]
        if not low:
            return []
        e = low[0]
        return [f"{len(low)} frame(s) have a velodyne_raw or groundtruth map that is empty or whose largest depth "
                f"is 1 m or less (e.g. {out / e['files']['velodyne_raw']}): BP-Net's KITTI loader asserts that it "
                "is over 1 m (PNG value > 255), CompletionFormer's that it is, or the map is empty"]


def write_kitti_dc_json(out: Path, frames: list[dict]) -> None:
    """kitti_dc.json, the split file CompletionFormer's KITTI loader reads (--split_json): paths relative to
    the export's root; "train" and "val" list the drive frames of each split, "test" the selection (its
    loader validates on "test")."""
    lists: dict[str, list] = {"train": [], "val": [], "test": []}
    for e in frames:
        f = e["files"]
        lists[e["split"]].append({"rgb": f["rgb"], "depth": f["velodyne_raw"], "gt": f["groundtruth"],
                                  "K": f["calib"]})
        if "selection" in e:
            s = e["selection"]
            lists["test"].append({"rgb": s["image"], "depth": s["velodyne_raw"], "gt": s["groundtruth_depth"],
                                  "K": s["intrinsics"]})
    write_json(out / "kitti_dc.json", lists)


# ---------------------------------------------------------------------------------------------------------
# NYU


class _NyuWriter:
    def __init__(self, files: _Files, split: str, earlier: dict | None):
        import h5py  # lazy: only this format needs HDF5

        self.h5py, self.files, self.split = h5py, files, split
        self.scene_base = len((earlier or {}).get("scenes", []))
        self.scenes: list[dict] = []
        self.scene_of: dict[str, dict] = {}  # input shard -> its scene folder (train)

    def _scene(self, shard: str) -> dict:
        if self.split == "val":  # Ma & Karaman's val set is one folder, official/
            shard = ""
        if shard not in self.scene_of:
            name = "official" if self.split == "val" else f"scene_{self.scene_base + len(self.scenes) + 1:04d}"
            self.scene_of[shard] = {"scene": name, "split": self.split, "shard": shard or None, "frames": 0}
            self.scenes.append(self.scene_of[shard])
        return self.scene_of[shard]

    def write(self, sample, raw: dict, gt_name: str, shard: str) -> dict:
        import io

        scene = self._scene(shard)
        scene["frames"] += 1
        frame = f"{scene['frames']:0{NYU_FRAME_DIGITS}d}"
        rel = f"{self.split}/{scene['scene']}/{frame}.h5"
        buf = io.BytesIO()
        with self.h5py.File(buf, "w") as f:
            f.create_dataset("rgb", data=np.ascontiguousarray(sample.rgb.transpose(2, 0, 1)))
            f.create_dataset("depth", data=getattr(sample, gt_name).astype(np.float32))
            f.create_dataset("K", data=np.asarray(sample.K, np.float64))
            if gt_name == "gt" and sample.depth is not None:
                f.create_dataset("pseudo_depth", data=sample.depth.astype(np.float32))
            if sample.teacher is not None:
                t = f.create_dataset("teacher", data=sample.teacher.astype(np.float32))
                teacher = sample.meta.get("teacher") or {}
                t.attrs["output"] = str(teacher.get("output"))
                t.attrs["model"] = str(teacher.get("model"))
            f.attrs["key"] = sample.key
        self.files.write(rel, buf.getvalue())
        return {"scene": scene["scene"], "frame": frame, "files": {"h5": rel}}

    def groups_written(self) -> int:
        return len(self.scenes)

    def warnings(self, entries: list[dict], out: Path) -> list[str]:
        other_size = [e for e in entries if (e["width"], e["height"]) != NYU_SIZE]
        other_K = [e for e in entries if not np.allclose(
            e["K"], scale_K(NYU_K, e["width"] / NYU_SIZE[0], e["height"] / NYU_SIZE[1]), rtol=1e-6)]
        out_w = []
        if other_size:
            out_w.append(f"{len(other_size)} frame(s) are not {NYU_SIZE[0]} x {NYU_SIZE[1]} (e.g. "
                         f"{other_size[0]['width']} x {other_size[0]['height']}): NYUv2 loaders resize to 240 rows "
                         "and crop 228 x 304, which may not fit them")
        if other_K:
            out_w.append(f"{len(other_K)} frame(s) have another K than the Kinect's (scaled to their size): "
                         "NYUv2 loaders assume the Kinect K; each file holds its true K as dataset 'K'")
        return out_w


# ---------------------------------------------------------------------------------------------------------
# the export


def export(shards, out: str | os.PathLike, fmt: str = "kitti", split: str = "train", val_selection: int = 0,
           overwrite: bool = False, add: bool = False, progress: str = "auto", command: str | None = None
           ) -> ExportSummary:
    """Write the samples of `shards` (any spec shared.shard.list_shards takes: a folder, a .tar, a glob, an
    object-store prefix) to the local folder `out` in layout `fmt` ("kitti" or "nyu-h5") as split `split`.

    val_selection (kitti, split val only): the first N samples also go to val_selection_cropped/, as KITTI's
    selection is a subset of its val drives. Raises ExportError for an unknown format or split, an output
    folder that is not empty (without overwrite/add), and samples that lack what the format needs (names
    the shard and key); ShardError for an unreadable shard. A failed export removes what it wrote.
    """
    t0 = time.monotonic()
    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise ExportError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if val_selection < 0:
        raise ExportError(f"--val-selection must be >= 0, got {val_selection}")
    if val_selection and fmt != "kitti":
        raise ExportError(f"--val-selection is KITTI's val_selection_cropped; format {fmt} has none")
    if val_selection and split != "val":
        raise ExportError("--val-selection takes its frames from the split written, and KITTI's selection is a "
                          "subset of its val drives: export held-out shards with --split val --val-selection N "
                          "(and --add them to the train export)")
    if progress not in PROGRESS:
        raise ExportError(f"--progress must be one of {', '.join(PROGRESS)}, got {progress!r}")
    if storage.is_url(str(out)):
        raise ExportError(f"--out {out}: exports are written to a local folder")
    urls = list_shards(shards)  # FileNotFoundError / StorageError for a spec that names nothing
    out = Path(out)
    earlier = _prepare_out(out, fmt, split, overwrite, add)
    fresh = earlier is None
    out.mkdir(parents=True, exist_ok=True)
    files = _Files(out)
    manifest = dict(earlier) if earlier else {"manifest_version": MANIFEST_VERSION, "format": fmt, "exports": [],
                                              "frames": []}
    write_manifest(out, {**manifest, "status": "writing"})
    try:
        summary, manifest = _export(urls, out, fmt, split, val_selection, progress, command, files, manifest,
                                    earlier, str(shards))
    except BaseException:
        files.remove()
        if fresh:
            (out / MANIFEST).unlink(missing_ok=True)
        else:
            write_manifest(out, earlier)
        raise
    write_manifest(out, {**manifest, "status": "complete"})
    summary.seconds = time.monotonic() - t0
    return summary


def _export(urls, out, fmt, split, val_selection, progress, command, files, manifest, earlier, spec):
    writer = _KittiWriter(files, split, val_selection, earlier) if fmt == "kitti" else _NyuWriter(files, split,
                                                                                                   earlier)
    summary = ExportSummary(out=str(out), format=fmt, split=split, shards=len(urls))
    index = {u: i for i, u in enumerate(urls)}
    jobs: dict = {}
    teachers: dict = {}
    entries: list[dict] = []
    bar = _Progress(progress, len(urls))
    try:
        for raw in shard_dataset(urls, make_error_handler(strict=True)):
            shard = raw.get("__url__") or "?"
            sample = decode_sample(raw)
            gt_name = "gt" if sample.gt is not None else "depth" if sample.depth is not None else None
            if gt_name is None:
                raise ExportError(f"shard {shard}, key {sample.key}: no gt.png or depth.png; the {fmt} layout needs "
                                  "a dense target (the GT, or the pseudo depth of unlabelled shards)")
            if fmt == "kitti" and sample.sparse is None:
                raise ExportError(f"shard {shard}, key {sample.key}: no sparse.png; the kitti layout needs the LiDAR "
                                  "input for data_depth_velodyne/.../velodyne_raw")
            if summary.groundtruth and gt_name != summary.groundtruth:
                raise ExportError(f"shard {shard}, key {sample.key}: the shards mix labelled and unlabelled samples "
                                  f"(this one's dense target would be {gt_name}.png, earlier ones' "
                                  f"{summary.groundtruth}.png): export them as separate splits")
            summary.groundtruth = gt_name
            if fmt == "kitti":
                entry = writer.write(sample, raw, gt_name)
                entry["max_codes"] = [_max_code(sample.sparse), _max_code(getattr(sample, gt_name))]
            else:
                entry = writer.write(sample, raw, gt_name, shard)
            job = _read_job(shard, jobs)
            teacher = sample.meta.get("teacher") or {}
            if sample.teacher is not None:
                summary.teacher_maps += 1
                model = teacher.get("model")
                if model not in teachers:
                    teachers[model] = {"model": model, "output": teacher.get("output"),
                                       "revision": teacher.get("revision"), "licence": _licence(model, job)}
            entries.append({"key": sample.key, "shard": shard, "split": split, "width": sample.width,
                            "height": sample.height, "K": np.asarray(sample.K).tolist(),
                            "groundtruth_from": gt_name, "source": sample.meta.get("source"),
                            "source_path": sample.meta.get("source_path"), **entry})
            bar.update(index.get(shard, 0))
    finally:
        bar.close()
    if not entries:
        raise ExportError(f"no samples in {spec}")
    summary.samples = len(entries)
    summary.groups = writer.groups_written()
    summary.selection = getattr(writer, "selected", 0)
    summary.warnings = writer.warnings(entries, out)
    if val_selection > summary.selection:
        summary.warnings.append(f"--val-selection {val_selection}: only {summary.selection} sample(s) to select")
    for t in teachers.values():
        lic = t["licence"]
        text = f"teacher {t['model']}: licence {lic.get('license')} ({lic.get('source')})"
        if lic.get("non_commercial"):
            text += "; NOT for commercial use: this export inherits the restriction"
        summary.licences.append(text)
    for e in entries:
        e.pop("max_codes", None)
    manifest["exports"] = [*manifest["exports"], {
        "split": split, "shards": spec, "shard_files": urls, "command": command, "samples": len(entries),
        "groundtruth_from": summary.groundtruth, "val_selection": summary.selection,
        "teachers": list(teachers.values()),
        "non_commercial": any(t["licence"].get("non_commercial") for t in teachers.values()),
        "datagen_jobs": {d: j for d, j in jobs.items() if j is not None}}]
    manifest["frames"] = [*manifest["frames"], *entries]
    if fmt == "kitti":
        manifest["dates"] = writer.dates
        write_kitti_dc_json(out, manifest["frames"])
    else:
        manifest["scenes"] = [*manifest.get("scenes", []), *writer.scenes]
    return summary, manifest


__all__ = ["FORMATS", "MANIFEST", "ExportError", "ExportSummary", "calib_text", "export",
           "kitti_paths", "selection_paths"]
