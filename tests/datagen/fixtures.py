"""Tiny fake data set trees in each data set's REAL on-disk layout (see docs/datasets.md).

Every builder writes a few small images under `root` and returns a dict with at least
    root   the folder to pass as --root
    count  how many inputs the matching source lists (with its default options)
    paths  the input files, sorted by their path relative to root (what the source lists)
plus what a test needs to check the source (intrinsics written, depths written, ...).
Images are deterministic (seeded), so two builds of the same tree are byte-identical.
Import with `from fixtures import make_coco` from a test in tests/datagen (pytest puts the test's
folder on sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from shared.camera import make_K
from shared.depth import encode_depth_png

SIZE = (64, 48)  # W, H of the fake images


def _image(seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    """A smooth gradient with a little noise: compresses well, yet every image differs."""
    w, h = size
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = np.stack([u, v, 1 - u * v], axis=-1) * rng.uniform(100, 255, 3)
    arr = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _write(path: Path, seed: int, size: tuple[int, int] = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _image(seed, size)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=90)
    else:
        img.save(path)
    return path


def _result(root: Path, paths: list[Path], **extra) -> dict:
    paths = sorted(paths, key=lambda p: p.relative_to(root).as_posix())
    return {"root": root, "count": len(paths), "paths": paths, **extra}


# ---------------------------------------------------------------------------------------------------
# Unlabelled image sets


def make_coco(root: str | Path, n: int = 3, splits=("train2017", "val2017")) -> dict:
    """<root>/<split>/000000xxxxxx.jpg, n per split; annotations/ present but never read."""
    root = Path(root)
    paths = []
    for si, split in enumerate(splits):
        for i in range(n):
            paths.append(_write(root / split / f"{(si * 1000 + i * 7 + 9):012d}.jpg", seed=si * 100 + i))
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_val2017.json").write_text("{}")
    return _result(root, paths, splits=list(splits))


def make_landmarks(root: str | Path, n: int = 5, csv_keep: int = 3) -> dict:
    """<root>/train/a/b/c/<id>.jpg with 16-hex-digit ids, and train.csv (id,url,landmark_id) listing the
    first `csv_keep` ids plus one id that is not on disk."""
    root = Path(root)
    rng = np.random.default_rng(7)
    ids = sorted("".join(rng.choice(list("0123456789abcdef"), 16)) for _ in range(n))
    paths = [_write(root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg", seed=k) for k, i in enumerate(ids)]
    listed = ids[:csv_keep]
    lines = ["id,url,landmark_id"] + [f"{i},http://example.invalid/{i}.jpg,{k}" for k, i in enumerate(listed)]
    lines.append("ffffffffffffffff,http://example.invalid/missing.jpg,99")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    csv_paths = [p for p in paths if p.stem in set(listed)]
    return _result(root, paths, ids=ids, csv_ids=listed, csv_paths=sorted(csv_paths))


NUSC_CAMERAS = ("CAM_FRONT", "CAM_BACK", "CAM_FRONT_LEFT")


def make_nuscenes(root: str | Path, n: int = 2, cameras=NUSC_CAMERAS, version: str = "v1.0-mini",
                  unlisted: bool = False) -> dict:
    """<root>/samples/CAM_*/<log>__CAM_*__<timestamp>.jpg and <root>/<version>/ tables (sensor,
    calibrated_sensor, sample_data; one LIDAR_TOP row too, whose camera_intrinsic is empty).
    Each camera gets its own K; `K` maps relative filename -> 3x3 list. With unlisted=True one extra
    image has no sample_data row."""
    root = Path(root)
    log = "n015-2018-07-24-11-22-45+0800"
    sensors, calib, rows, K_by_file, paths = [], [], [], {}, []
    for ci, cam in enumerate(cameras):
        K = make_K(1266.417 - 10 * ci, 1266.417 - 10 * ci + 0.5, 816.267 + ci, 491.507 - ci)
        sensors.append({"token": f"sensor{ci}", "channel": cam, "modality": "camera"})
        calib.append({"token": f"calib{ci}", "sensor_token": f"sensor{ci}", "translation": [1.7, 0.0, 1.5],
                      "rotation": [0.5, -0.5, 0.5, -0.5], "camera_intrinsic": K.tolist()})
        for i in range(n):
            ts = 1532402927612460 + 50000 * i + ci
            rel = f"samples/{cam}/{log}__{cam}__{ts}.jpg"
            paths.append(_write(root / rel, seed=ci * 10 + i))
            K_by_file[rel] = K.tolist()
            rows.append({"token": f"sd{ci}_{i}", "sample_token": f"s{i}", "ego_pose_token": f"ep{ci}_{i}",
                         "calibrated_sensor_token": f"calib{ci}", "timestamp": ts, "fileformat": "jpg",
                         "is_key_frame": True, "height": SIZE[1], "width": SIZE[0], "filename": rel,
                         "prev": "", "next": ""})
    sensors.append({"token": "sensorL", "channel": "LIDAR_TOP", "modality": "lidar"})
    calib.append({"token": "calibL", "sensor_token": "sensorL", "translation": [0.9, 0.0, 1.8],
                  "rotation": [0.7, 0.0, 0.0, 0.7], "camera_intrinsic": []})
    rows.append({"token": "sdL", "sample_token": "s0", "ego_pose_token": "epL", "calibrated_sensor_token": "calibL",
                 "timestamp": 1532402927647951, "fileformat": "pcd", "is_key_frame": True, "height": 0, "width": 0,
                 "filename": f"samples/LIDAR_TOP/{log}__LIDAR_TOP__1532402927647951.pcd.bin", "prev": "", "next": ""})
    if unlisted:
        paths.append(_write(root / "samples" / cameras[0] / f"{log}__{cameras[0]}__1532402999999999.jpg", seed=999))
    vdir = root / version
    vdir.mkdir(parents=True, exist_ok=True)
    (vdir / "sensor.json").write_text(json.dumps(sensors, indent=0))
    (vdir / "calibrated_sensor.json").write_text(json.dumps(calib, indent=0))
    (vdir / "sample_data.json").write_text(json.dumps(rows, indent=0))
    return _result(root, paths, K=K_by_file, version=version)


def make_cityscapes(root: str | Path, splits=("train", "val"), cities=("aachen", "bochum"), n: int = 2,
                    camera: bool = True) -> dict:
    """<root>/leftImg8bit/<split>/<city>/<city>_000000_0000NN_leftImg8bit.png and, with camera=True,
    <root>/camera/<split>/<city>/<same stem>_camera.json. `K` maps image path -> 3x3 list."""
    root = Path(root)
    paths, K_by_path = [], {}
    for si, split in enumerate(splits):
        for ci, city in enumerate(cities):
            for i in range(n):
                stem = f"{city}_{si:06d}_{19 + i:06d}"
                p = _write(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=si * 100 + ci * 10 + i)
                paths.append(p)
                fx, fy, u0, v0 = 2262.52 + ci + i, 2265.30 + ci, 1096.98 - si, 513.137 + i
                K_by_path[str(p)] = make_K(fx, fy, u0, v0).tolist()
                if camera:
                    cam = root / "camera" / split / city / f"{stem}_camera.json"
                    cam.parent.mkdir(parents=True, exist_ok=True)
                    cam.write_text(json.dumps({
                        "baseline": 0.209313,
                        "extrinsic": {"baseline": 0.209313, "pitch": 0.038, "roll": 0.0, "x": 1.7, "y": 0.1,
                                      "yaw": -0.0195, "z": 1.22},
                        "intrinsic": {"fx": fx, "fy": fy, "u0": u0, "v0": v0}}, indent=4))
    return _result(root, paths, K=K_by_path)


def make_davis(root: str | Path, sequences=("bear", "blackswan"), frames: int = 3,
               resolutions=("480p",)) -> dict:
    """<root>/JPEGImages/<res>/<sequence>/00000.jpg ... and ImageSets/2017/{train,val}.txt (first sequence
    in train). `paths` lists the first resolution's frames."""
    root = Path(root)
    by_res = {}
    for ri, res in enumerate(resolutions):
        by_res[res] = [_write(root / "JPEGImages" / res / s / f"{f:05d}.jpg", seed=ri * 100 + si * 10 + f)
                       for si, s in enumerate(sequences) for f in range(frames)]
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text(sequences[0] + "\n")
    (sets / "val.txt").write_text("\n".join(sequences[1:]) + "\n")
    return _result(root, by_res[resolutions[0]], by_resolution=by_res, sequences=list(sequences))


def make_folder(root: str | Path) -> dict:
    """A messy tree: nested folders, mixed extensions and case, a hidden file, a non-image file, and two
    names that clean to the same key (x.jpg / x.png, 'a b.jpg' / 'a_b.jpg')."""
    root = Path(root)
    paths = [
        _write(root / "a" / "one.jpg", 1),
        _write(root / "a" / "b" / "two.PNG", 2),
        _write(root / "c" / "three.jpeg", 3),
        _write(root / "four.webp", 4),
        _write(root / "dup" / "x.jpg", 5),
        _write(root / "dup" / "x.png", 6),
        _write(root / "dup" / "a b.jpg", 7),
        _write(root / "dup" / "a_b.jpg", 8),
    ]
    _write(root / ".hidden" / "skip.jpg", 9)
    _write(root / "a" / ".skip.jpg", 10)
    (root / "notes.txt").write_text("not an image")
    return _result(root, paths)


# ---------------------------------------------------------------------------------------------------
# Labelled sets

KITTI_DATES = ("2011_09_26", "2011_09_28")
# K of cameras 2 and 3 per date (the real 1242x375 values, scaled by 1/12 to fit the tiny images)
_KITTI_P = {
    "2011_09_26": ((721.5377, 609.5593, 172.854, 44.85728), (721.5377, 609.5593, 172.854, -339.5242)),
    "2011_09_28": ((707.0493, 604.0814, 180.5066, 45.75831), (707.0493, 604.0814, 180.5066, -334.1081)),
}


def _kitti_P(date: str, cam: int) -> np.ndarray:
    f, cx, cy, tx = _KITTI_P[date][cam - 2]
    s = 1 / 12
    return np.array([[f * s, 0, cx * s, tx * s], [0, f * s, cy * s, 0.0], [0, 0, 1, 0.0027]])


def _calib_text(date: str) -> str:
    lines = ["calib_time: 09-Jan-2012 13:57:47", "corner_dist: 9.950000e-02"]
    for c in range(4):
        P = _kitti_P(date, c) if c >= 2 else _kitti_P(date, 2) * [1, 1, 1, 0]  # grey cameras: no baseline
        lines += [f"S_0{c}: 1.392000e+03 5.120000e+02",
                  f"K_0{c}: " + " ".join(f"{x:e}" for x in np.eye(3).ravel() * 9.8e2),
                  f"D_0{c}: -3.7e-01 2.0e-01 2.2e-03 1.4e-03 -7.2e-02",
                  f"R_0{c}: " + " ".join(f"{x:e}" for x in np.eye(3).ravel()),
                  f"T_0{c}: 0.000000e+00 0.000000e+00 0.000000e+00",
                  f"S_rect_0{c}: 1.242000e+03 3.750000e+02",
                  f"R_rect_0{c}: " + " ".join(f"{x:e}" for x in np.eye(3).ravel()),
                  f"P_rect_0{c}: " + " ".join(f"{x:e}" for x in P.ravel())]
    return "\n".join(lines) + "\n"


def _kitti_depths(seed: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A sparse scan (~5% of pixels) and a semi-dense GT (~30%), in metres, exact multiples of 1/256."""
    w, h = size
    rng = np.random.default_rng(seed)
    depth = np.round(rng.uniform(2.0, 80.0, (h, w)) * 256) / 256
    sparse = np.where(rng.random((h, w)) < 0.05, depth, 0.0).astype(np.float32)
    gt = np.where(rng.random((h, w)) < 0.3, depth, 0.0)
    gt[: h // 3] = 0.0  # accumulated LiDAR sees nothing in the upper part
    return sparse, gt.astype(np.float32)


def _write_depth(path: Path, depth_m: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_depth_png(depth_m))


def make_kitti(root: str | Path, drives: int = 1, frames: int = 2, size: tuple[int, int] = (96, 64),
               splits=("train", "val"), cameras=("image_02", "image_03"), selection: int = 2, test: int = 2,
               raw_under_root: bool = False, missing_gt: int = 0) -> dict:
    """The KITTI depth-completion tree (data_depth_velodyne, data_depth_annotated, raw drives with
    calib_cam_to_cam.txt, depth_selection/{val_selection_cropped,test_depth_completion_anonymous}).

    Drives alternate between the dates 2011_09_26 and 2011_09_28 (different K); frames start at
    0000000005 as in the real set. raw_under_root=True puts the dates directly under root instead of
    root/raw/. missing_gt deletes the GT of the last `missing_gt` train frames (their load must fail).
    Returns per split: items (dicts with key parts, paths, sparse, gt, K) and counts."""
    root = Path(root)
    raw = root if raw_under_root else root / "raw"
    out: dict = {"root": root, "splits": {}}
    drive_no = 1
    written_dates = set()
    for split in splits:
        recs = []
        for _ in range(drives):
            date = KITTI_DATES[(drive_no - 1) % len(KITTI_DATES)]
            drive = f"{date}_drive_{drive_no:04d}_sync"
            drive_no += 1
            if date not in written_dates:
                (raw / date).mkdir(parents=True, exist_ok=True)
                (raw / date / "calib_cam_to_cam.txt").write_text(_calib_text(date))
                written_dates.add(date)
            for cam in cameras:
                K = _kitti_P(date, int(cam[-1]))[:, :3]
                for f in range(frames):
                    frame = f"{5 + f:010d}"
                    seed = len(recs) + 1000 * drive_no
                    rgb = _write(raw / date / drive / cam / "data" / f"{frame}.png", seed, size)
                    sparse, gt = _kitti_depths(seed, size)
                    velo = root / "data_depth_velodyne" / split / drive / "proj_depth" / "velodyne_raw" / cam / f"{frame}.png"
                    gtp = root / "data_depth_annotated" / split / drive / "proj_depth" / "groundtruth" / cam / f"{frame}.png"
                    _write_depth(velo, sparse)
                    _write_depth(gtp, gt)
                    recs.append({"id": f"{split}/{drive}/{cam}/{frame}", "velodyne": velo, "gt_path": gtp,
                                 "rgb": rgb, "sparse": sparse, "gt": gt, "K": K, "date": date, "drive": drive,
                                 "camera": cam, "frame": frame})
        recs.sort(key=lambda r: r["id"])
        if missing_gt and split == "train":
            for r in recs[-missing_gt:]:
                r["gt_path"].unlink()
                r["gt_missing"] = True
        out["splits"][split] = {"items": recs, "count": len(recs)}
    if selection:
        sel = root / "depth_selection" / "val_selection_cropped"
        recs = []
        for i in range(selection):
            drive, cam, frame = "2011_09_26_drive_0002_sync", ("image_02", "image_03")[i % 2], f"{5 + i:010d}"
            stem = f"{drive}_image_{frame}_{cam}"
            rgb = _write(sel / "image" / f"{stem}.png", 5000 + i, size)
            sparse, gt = _kitti_depths(5000 + i, size)
            _write_depth(sel / "velodyne_raw" / f"{drive}_velodyne_raw_{frame}_{cam}.png", sparse)
            _write_depth(sel / "groundtruth_depth" / f"{drive}_groundtruth_depth_{frame}_{cam}.png", gt)
            K = make_K(60.1 + i, 60.2 + i, 50.3, 20.4 + i)
            (sel / "intrinsics").mkdir(parents=True, exist_ok=True)
            (sel / "intrinsics" / f"{stem}.txt").write_text(" ".join(f"{x:e}" for x in K.ravel()) + "\n")
            recs.append({"id": f"val_selection_cropped/{stem}", "rgb": rgb, "sparse": sparse, "gt": gt, "K": K})
        out["splits"]["val_selection_cropped"] = {"items": recs, "count": len(recs)}
    if test:
        tdir = root / "depth_selection" / "test_depth_completion_anonymous"
        recs = []
        for i in range(test):
            name = f"{i:010d}"
            rgb = _write(tdir / "image" / f"{name}.png", 6000 + i, size)
            sparse, _ = _kitti_depths(6000 + i, size)
            _write_depth(tdir / "velodyne_raw" / f"{name}.png", sparse)
            K = make_K(61.0 + i, 61.0 + i, 48.0, 22.0)
            (tdir / "intrinsics").mkdir(parents=True, exist_ok=True)
            (tdir / "intrinsics" / f"{name}.txt").write_text(" ".join(f"{x:.6f}" for x in K.ravel()))
            recs.append({"id": f"test_depth_completion_anonymous/{name}", "rgb": rgb, "sparse": sparse,
                         "gt": None, "K": K})
        out["splits"]["test"] = {"items": recs, "count": len(recs)}
    out["count"] = out["splits"][splits[0]]["count"] if splits else 0
    return out


def make_nyu(root: str | Path, splits=("train", "val"), scenes: int = 1, frames: int = 2,
             size: tuple[int, int] = SIZE, invalid_fraction: float = 0.2) -> dict:
    """Ma & Karaman's nyudepthv2 tree: <root>/train/<scene>/<frame>.h5 and <root>/val/official/<frame>.h5,
    each with 'rgb' (3 x H x W uint8) and 'depth' (H x W float32 metres, ~invalid_fraction zeros).
    size defaults to a tiny 64x48 (the source scales the 640x480 Kinect K); use (640, 480) for the real
    size. Returns per split: items (paths, rgb H x W x 3, depth)."""
    import h5py

    root = Path(root)
    w, h = size
    out: dict = {"root": root, "splits": {}}
    for si, split in enumerate(splits):
        names = ["official"] if split == "val" else [f"scene_{s:04d}a" for s in range(scenes)]
        recs = []
        for sc, scene in enumerate(names):
            for f in range(frames):
                rng = np.random.default_rng(si * 1000 + sc * 100 + f)
                rgb = np.asarray(_image(int(rng.integers(1 << 30)), size))
                depth = rng.uniform(0.5, 9.5, (h, w)).astype(np.float32)
                depth[rng.random((h, w)) < invalid_fraction] = 0.0
                path = root / split / scene / f"{f + 1:05d}.h5"
                path.parent.mkdir(parents=True, exist_ok=True)
                with h5py.File(path, "w") as hf:
                    hf.create_dataset("rgb", data=rgb.transpose(2, 0, 1))
                    hf.create_dataset("depth", data=depth)
                recs.append({"path": path, "rgb": rgb, "depth": depth})
        recs.sort(key=lambda r: r["path"].relative_to(root).as_posix())
        out["splits"][split] = {"items": recs, "count": len(recs)}
    out["count"] = out["splits"][splits[0]]["count"] if splits else 0
    return out


# ---------------------------------------------------------------------------------------------------
# Bad inputs


def make_bad_images(dir: str | Path) -> dict:
    """The bad-input zoo, written into `dir` (flat, so it can sit in a COCO split folder or a folder tree).

    Returns name -> {"path", "expect"}: expect "ok" (must load as H x W x 3 uint8, converted) or "error"
    (must raise InputError with a reason).
    """
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    zoo: dict[str, dict] = {}

    def add(name: str, expect: str) -> Path:
        zoo[name] = {"path": d / name, "expect": expect}
        return d / name

    good = _image(42, (64, 48))
    full = d / "_tmp_full.jpg"
    good.save(full, quality=90)
    data = full.read_bytes()
    full.unlink()
    add("truncated.jpg", "error").write_bytes(data[: len(data) // 2])
    add("empty.jpg", "error").write_bytes(b"")
    add("text.jpg", "error").write_text("this is not a JPEG, just text with a .jpg name\n")
    good.convert("L").save(add("gray.png", "ok"))
    rgba = good.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(good.size))
    rgba.save(add("rgba.png", "ok"))
    a16 = (np.asarray(good.convert("L"), dtype=np.uint16) * 257).astype("<u2")
    Image.frombuffer("I;16", good.size, a16.tobytes(), "raw", "I;16", 0, 1).save(add("sixteen_bit.png", "ok"))
    good.convert("CMYK").save(add("cmyk.jpg", "ok"), quality=90)
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(add("palette.png", "ok"))
    _image(3, (20, 20)).save(add("tiny_20x20.jpg", "error"), quality=90)
    # 9000 x 6000 = 54 Mpx, under PIL's decompression-bomb limit (89.5 Mpx): must load. Flat colour so
    # it encodes and decodes quickly.
    Image.new("RGB", (9000, 6000), (90, 120, 150)).save(add("huge_9000x6000.jpg", "ok"), quality=75)
    return zoo
