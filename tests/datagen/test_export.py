"""`datagen export`: shards -> KITTI DC and NYUv2-HDF5 layouts, read back by the project's own kitti and nyu
sources and by readers written here from BP-Net's and CompletionFormer's conventions (not the exporter's)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
from fixtures import make_kitti, make_nyu
from PIL import Image
from typer.testing import CliRunner

from datagen.cli import app
from datagen.export import MANIFEST, ExportError, export
from datagen.sources import get_source
from shared.camera import make_K
from shared.depth import decode_disparity_png
from shared.shard import Sample, ShardWriter, iter_samples

h5py = pytest.importorskip("h5py")

TEACHER = {"model": "depth-anything/Depth-Anything-V2-Large-hf", "revision": "abc", "dtype": "float32",
           "output": "disparity"}


def fake_teacher(rgb: np.ndarray) -> np.ndarray:
    """A disparity-like map from the image (any map will do; it must survive the export exactly)."""
    t = rgb.astype(np.float32).mean(axis=2) / 255.0 + 0.1
    t[0, 0] = 0.0  # an invalid pixel
    return t


def write_shards(folder: Path, samples: list[Sample], per_shard: int = 3, rgb_format: str = "png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(samples), per_shard):
        fmt = rgb_format if rgb_format != "mixed" else ("png", "jpg")[(i // per_shard) % 2]
        with ShardWriter(folder / f"test-{i // per_shard:06d}.tar", rgb_format=fmt) as w:
            for s in samples[i:i + per_shard]:
                w.write(s)
    return folder


def labelled_samples(root: Path, split: str) -> list[Sample]:
    """The project's kitti/nyu source over a fixture tree, as the labelled samples `datagen run` makes."""
    source = root.name
    src = get_source(source, root, split=split)
    out = []
    for item in src.items():
        r = src.load(item)
        meta = {"source": r.source, "source_path": r.source_path, **r.meta, "teacher": TEACHER}
        out.append(Sample(r.key, r.rgb, r.K, teacher=fake_teacher(r.rgb), sparse=r.sparse, gt=r.gt, meta=meta))
    return out


def unlabelled_samples(n: int = 3, size=(80, 48)) -> list[Sample]:
    """Samples as `datagen run` makes them from unlabelled images: dense pseudo depth, a scan, random K."""
    w, h = size
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        depth = rng.uniform(1.5, 60.0, (h, w)).astype(np.float32)
        sparse = np.where(rng.random((h, w)) < 0.1, depth, 0).astype(np.float32)
        # samples 0 and 1 share K; more digits than KITTI's files print (%e), which must not be lost
        K = make_K(70.0 + (i // 2) * np.pi, 71.0 + (i // 2) * np.e, w / 2 + 1 / 3, h / 2 - 1 / 7)
        out.append(Sample(f"coco-img_{i:03d}", rgb, K, teacher=fake_teacher(rgb), depth=depth, sparse=sparse,
                          meta={"source": "coco", "source_path": f"/data/coco/{i}.jpg", "teacher": TEACHER}))
    return out


def shard_samples(spec) -> list[Sample]:
    return list(iter_samples(str(spec)))


def by_rgb(samples) -> dict[bytes, object]:
    """Samples keyed by their image's bytes: matches read-back records to shard samples by content alone."""
    out = {np.ascontiguousarray(s.rgb).tobytes(): s for s in samples}
    assert len(out) == len(samples)
    return out


def assert_same(got, want, dense: str = "gt", K: bool = True) -> None:
    """A read-back record (or a dict of arrays) holds the shard sample's image, scan, dense target and K."""
    np.testing.assert_array_equal(got["rgb"], want.rgb)
    if got.get("sparse") is not None:
        np.testing.assert_array_equal(got["sparse"], want.sparse)
    np.testing.assert_array_equal(got["gt"], getattr(want, dense))
    if K:
        np.testing.assert_array_equal(got["K"], want.K)


def rec(r) -> dict:
    return {"rgb": r.rgb, "sparse": r.sparse, "gt": r.gt, "K": r.K}


@pytest.fixture(scope="module")
def kitti_shards(tmp_path_factory):
    """Labelled KITTI shards: train (one date's K) plus the selection frames (a K each) as one set, the val
    split (another date) as another; RGB as PNG in some shards and JPEG in others."""
    base = tmp_path_factory.mktemp("kitti")
    make_kitti(base / "kitti", frames=2, test=0)
    train = labelled_samples(base / "kitti", "train") + labelled_samples(base / "kitti", "val_selection_cropped")
    val = labelled_samples(base / "kitti", "val")
    return (write_shards(base / "shards_train", train, rgb_format="mixed"),
            write_shards(base / "shards_val", val, rgb_format="jpg"))


@pytest.fixture(scope="module")
def kitti_export(kitti_shards, tmp_path_factory):
    train, val = kitti_shards
    out = tmp_path_factory.mktemp("export") / "kitti"
    s1 = export(str(train), out, "kitti", progress="none", command="datagen export ...")
    s2 = export(str(val / "*.tar"), out, "kitti", split="val", val_selection=2, add=True, progress="none")
    return out, s1, s2


# ---------------------------------------------------------------------------------------------------------
# KITTI


def test_kitti_export_reads_back_through_the_kitti_source(kitti_shards, kitti_export):
    out, s1, s2 = kitti_export
    train, val = (shard_samples(s) for s in kitti_shards)
    assert (s1.samples, s1.groups, s1.groundtruth, s1.teacher_maps) == (6, 3, "gt", 6)  # 3 Ks: 3 dates, 1 drive each
    assert (s2.samples, s2.groups, s2.selection) == (4, 1, 2)
    for split, want in (("train", train), ("val", val)):
        src = get_source("kitti", out, split=split)
        records = [src.load(i) for i in src.items()]
        assert len(records) == len(want)
        shard = by_rgb(want)
        for r in records:  # same image (PNG lossless, JPEG shards decoded once), scan and GT at 1/256 m, K
            assert_same(rec(r), shard[r.rgb.tobytes()])
    sel = get_source("kitti", out, split="val_selection_cropped")
    records = [sel.load(i) for i in sel.items()]
    assert len(records) == 2
    assert sorted(r.rgb.tobytes() for r in records) == sorted(s.rgb.tobytes() for s in val[:2])  # the first two
    for r in records:
        assert_same(rec(r), by_rgb(val)[r.rgb.tobytes()])
    # KITTI's names: a fake but valid date per (K, size), drives and frames numbered as KITTI's are
    dates = sorted(p.name for p in (out / "raw").iterdir())
    assert dates == ["2000_01_01", "2000_01_02", "2000_01_03", "2000_01_04"]
    drives = sorted(p.name for p in (out / "data_depth_velodyne" / "val").iterdir())
    assert drives == ["2000_01_04_drive_0001_sync"]
    assert sorted(p.name for p in (out / "raw" / "2000_01_04" / drives[0] / "image_02" / "data").iterdir()) == [
        f"{i:010d}.png" for i in range(4)]


def test_kitti_manifest_names_every_frame_and_the_teacher(kitti_shards, kitti_export):
    out = kitti_export[0]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["format"] == "kitti"
    assert [e["split"] for e in manifest["exports"]] == ["train", "val"]
    assert manifest["exports"][0]["command"] == "datagen export ..."
    teacher = manifest["exports"][0]["teachers"][0]
    assert teacher["model"] == TEACHER["model"] and teacher["licence"]["license"].lower().startswith("cc-by-nc")
    assert manifest["exports"][0]["non_commercial"] is True
    samples = {s.key: s for spec in kitti_shards for s in shard_samples(spec)}
    assert sorted(f["key"] for f in manifest["frames"]) == sorted(samples)
    for f in manifest["frames"]:  # each key's files hold that key's sample
        s = samples[f["key"]]
        np.testing.assert_array_equal(np.asarray(Image.open(out / f["files"]["rgb"])), s.rgb)
        png = np.asarray(Image.open(out / f["files"]["velodyne_raw"])).astype(np.float32) / 256
        np.testing.assert_array_equal(png, s.sparse)
        # the teacher's map beside the GT: the shard's 16-bit PNG with its scaling in a JSON sidecar
        scaling = json.loads((out / f["files"]["teacher_scaling"]).read_text())
        assert scaling["output"] == "disparity" and scaling["key"] == s.key
        t = decode_disparity_png((out / f["files"]["teacher"]).read_bytes(), scaling)
        np.testing.assert_array_equal(t, s.teacher)
        assert f["files"]["teacher"].startswith(f"data_depth_teacher/{f['split']}/{f['drive']}/proj_depth/teacher/")


def read_calib_file(path: Path) -> dict:
    """KEY: numbers, as KITTI devkits and BP-Net parse calib_cam_to_cam.txt (a non-numeric value is skipped)."""
    data = {}
    for line in path.read_text().splitlines():
        key, value = line.split(":", 1)  # every line of a KITTI calib file has a colon
        try:
            data[key] = np.array([float(x) for x in value.split()])
        except ValueError:
            pass
    return data


def bpnet_style_kitti(root: Path, mode: str) -> list[dict]:
    """A KITTI loader written from BP-Net's conventions, independently of the exporter: glob the LiDAR PNGs,
    derive the GT path by string replacement, the RGB from raw/<date>/<drive>/image_0X/data, K from the
    date's P_rect_0X, depth = png / 256; the selection from its four folders."""
    out = []
    if mode in ("train", "val"):
        lidars = sorted(glob.glob(f"{root}/data_depth_velodyne/{mode}/**/*.png", recursive=True))
        depths = sorted(glob.glob(f"{root}/data_depth_annotated/{mode}/**/*.png", recursive=True))
        assert len(lidars) == len(depths)  # BP-Net zips the two sorted lists
        for lidar, depth in zip(lidars, depths, strict=True):
            assert depth == lidar.replace("data_depth_velodyne", "data_depth_annotated").replace(
                "velodyne_raw", "groundtruth")
            parts = depth.split(os.sep)
            drive, cam, name = parts[-5], parts[-2], parts[-1]
            date = drive.split("_drive")[0]
            calib = read_calib_file(root / "raw" / date / "calib_cam_to_cam.txt")
            P = np.reshape(calib["P_rect_02" if cam == "image_02" else "P_rect_03"], (3, 4))
            np.reshape(calib["P_rect_03"], (3, 4))  # BP-Net reads both
            out.append({"rgb": np.array(Image.open(root / "raw" / date / drive / cam / "data" / name).convert("RGB")),
                        "sparse": np.array(Image.open(lidar), dtype=int) / 256.0,
                        "gt": np.array(Image.open(depth), dtype=int) / 256.0, "K": P[:3, :3]})
    else:
        sel = root / "val_selection_cropped"
        depths = sorted(glob.glob(f"{sel}/groundtruth_depth/*.png"))
        lidars = sorted(glob.glob(f"{sel}/velodyne_raw/*.png"))
        images = sorted(glob.glob(f"{sel}/image/*.png"))
        for depth, lidar, image in zip(depths, lidars, images, strict=True):
            K = np.array((sel / "intrinsics" / (Path(image).stem + ".txt")).read_text().split(), dtype=np.float64)
            out.append({"rgb": np.array(Image.open(image).convert("RGB")), "K": K.reshape(3, 3),
                        "sparse": np.array(Image.open(lidar), dtype=int) / 256.0,
                        "gt": np.array(Image.open(depth), dtype=int) / 256.0})
    return out


def test_kitti_export_reads_back_through_an_independent_loader(kitti_shards, kitti_export):
    out = kitti_export[0]
    train, val = (shard_samples(s) for s in kitti_shards)
    for mode, want in (("train", train), ("val", val), ("selval", val[:2])):
        got = bpnet_style_kitti(out, mode)
        assert len(got) == len(want)
        shard = by_rgb(want)
        for g in got:
            assert_same(g, shard[g["rgb"].tobytes()])
    # CompletionFormer's split file: paths relative to the root; K from P_rect_02 (train/val) or the first line
    # of the intrinsics file (its "test" list, the selection)
    split = json.loads((out / "kitti_dc.json").read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [len(train), len(val), 2]
    everything = by_rgb(train + val)
    for entry in split["train"] + split["val"] + split["test"]:
        s = everything[np.array(Image.open(out / entry["rgb"])).tobytes()]
        np.testing.assert_array_equal(np.array(Image.open(out / entry["gt"])) / 256.0, s.gt)
        np.testing.assert_array_equal(np.array(Image.open(out / entry["depth"])) / 256.0, s.sparse)
        if entry["K"].endswith("calib_cam_to_cam.txt"):
            P = np.reshape(read_calib_file(out / entry["K"])["P_rect_02"], (3, 4))
            fx, fy, cx, cy = P[0, 0], P[1, 1], P[0, 2], P[1, 2]
        else:
            k = (out / entry["K"]).read_text().splitlines()[0].split(" ")
            fx, fy, cx, cy = float(k[0]), float(k[4]), float(k[2]), float(k[5])
        assert (fx, fy, cx, cy) == (s.K[0, 0], s.K[1, 1], s.K[0, 2], s.K[1, 2])


def test_unlabelled_kitti_export_puts_pseudo_depth_in_groundtruth(tmp_path):
    samples = unlabelled_samples()
    small = unlabelled_samples(1, size=(64, 40))[0]  # sample 0's K, another size: a date of its own
    samples.append(Sample("coco-small", small.rgb, samples[0].K, teacher=small.teacher, depth=small.depth,
                          sparse=small.sparse, meta=small.meta))
    shards = write_shards(tmp_path / "shards", samples, per_shard=2, rgb_format="jpg")
    out = tmp_path / "out"
    summary = export(str(shards), out, "kitti", progress="none")
    assert (summary.samples, summary.groundtruth, summary.groups) == (4, "depth", 3)  # 3 (K, size): 3 dates
    for date in ("2000_01_01", "2000_01_02", "2000_01_03"):
        calib = read_calib_file(out / "raw" / date / "calib_cam_to_cam.txt")
        drive = out / "raw" / date / f"{date}_drive_0001_sync" / "image_02" / "data"
        sizes = {Image.open(p).size for p in drive.iterdir()}
        assert sizes == {tuple(int(x) for x in calib["S_rect_02"])}  # one size per date, as its calib says
    stored = shard_samples(shards)
    src = get_source("kitti", out)
    records = [src.load(i) for i in src.items()]
    for r in records:
        s = by_rgb(stored)[r.rgb.tobytes()]
        assert_same(rec(r), s, dense="depth")  # the dense pseudo depth where a loader expects GT
        assert r.meta["drive"].startswith(("2000_01_01", "2000_01_02", "2000_01_03"))
    for g in bpnet_style_kitti(out, "train"):
        assert_same(g, by_rgb(stored)[g["rgb"].tobytes()], dense="depth")
    # the teacher's map beside it, outside the folders KITTI loaders glob
    teacher = sorted(glob.glob(f"{out}/data_depth_teacher/train/*/proj_depth/teacher/image_02/*.png"))
    assert len(teacher) == 4
    for png in teacher:
        drive, frame = Path(png).parts[-5], Path(png).stem
        rgb = np.array(Image.open(out / "raw" / drive[:10] / drive / "image_02" / "data" / f"{frame}.png"))
        scaling = json.loads(Path(png).with_suffix(".json").read_text())
        np.testing.assert_array_equal(decode_disparity_png(Path(png).read_bytes(), scaling),
                                      by_rgb(stored)[rgb.tobytes()].teacher)


# ---------------------------------------------------------------------------------------------------------
# NYU


def ma_style_nyu(root: Path, mode: str) -> list[dict]:
    """NYUv2 files read as Ma & Karaman's loaders (and BP-Net's) do: <mode>/*/*.h5, 'rgb' channels first,
    'depth' in metres."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, mode, "**/**.h5"))):
        with h5py.File(path, "r") as f:
            out.append({"rgb": f["rgb"][:].transpose(1, 2, 0), "gt": f["depth"][:], "K": f["K"][:],
                        "teacher": f["teacher"][:] if "teacher" in f else None})
    return out


def test_nyu_export_reads_back_through_the_nyu_source_and_h5py(tmp_path):
    make_nyu(tmp_path / "nyu", scenes=2, frames=2)
    train, val = labelled_samples(tmp_path / "nyu", "train"), labelled_samples(tmp_path / "nyu", "val")
    shards_train = write_shards(tmp_path / "shards_train", train, per_shard=2, rgb_format="jpg")
    shards_val = write_shards(tmp_path / "shards_val", val)
    out = tmp_path / "out"
    s1 = export(str(shards_train), out, "nyu-h5", progress="none")
    s2 = export(str(shards_val), out, "nyu-h5", split="val", add=True, progress="none")
    assert (s1.samples, s1.groups, s2.samples, s2.groups) == (4, 2, 2, 1)
    assert any("64 x 48" in w for w in s1.warnings)  # not NYUv2's 640 x 480: said, not refused
    assert sorted(p.name for p in (out / "train").iterdir()) == ["scene_0001", "scene_0002"]
    assert sorted(p.name for p in (out / "val" / "official").iterdir()) == ["00001.h5", "00002.h5"]
    for split, shards in (("train", shards_train), ("val", shards_val)):
        stored = by_rgb(shard_samples(shards))
        src = get_source("nyu", out, split=split)
        records = [src.load(i) for i in src.items()]
        assert len(records) == len(stored)
        for r in records:
            s = stored[r.rgb.tobytes()]
            assert_same({**rec(r), "sparse": None}, s)
            assert r.meta["K_from"] == "file"
            assert set(np.flatnonzero(r.sparse)) <= set(np.flatnonzero(s.gt))  # the source's draw from 'depth'
        got = ma_style_nyu(out, split)
        assert len(got) == len(stored)
        for g in got:
            s = stored[g["rgb"].tobytes()]
            assert_same(g, s)
            assert g["gt"].dtype == np.float32
            np.testing.assert_array_equal(g["teacher"], s.teacher)


def test_unlabelled_nyu_export_keeps_the_true_K(tmp_path):
    samples = unlabelled_samples()
    shards = write_shards(tmp_path / "shards", samples, per_shard=3)
    summary = export(str(shards), tmp_path / "out", "nyu-h5", progress="none")
    assert summary.groundtruth == "depth" and any("Kinect" in w for w in summary.warnings)
    stored = by_rgb(shard_samples(shards))
    src = get_source("nyu", tmp_path / "out")
    for item in src.items():
        r = src.load(item)
        assert_same({**rec(r), "sparse": None}, stored[r.rgb.tobytes()], dense="depth")


# ---------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_gives_clear_errors_and_leaves_nothing_behind(tmp_path):
    samples = unlabelled_samples(2)
    shards = write_shards(tmp_path / "shards", samples)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"busy is not empty .*notes\.txt.*--overwrite"):
        export(str(shards), busy, "kitti", progress="none")
    with pytest.raises(ExportError, match="not an export made by `datagen export`: refusing to delete"):
        export(str(shards), busy, "kitti", overwrite=True, progress="none")
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="unknown --format 'kitty'; expected one of kitti, nyu-h5"):
        export(str(shards), tmp_path / "new", "kitty")
    with pytest.raises(ExportError, match="--split val --val-selection"):
        export(str(shards), tmp_path / "new", "kitti", val_selection=2)
    (tmp_path / "no_shards").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards under directory"):
        export(str(tmp_path / "no_shards"), tmp_path / "new", "kitti")

    # shards without a scan: the kitti layout needs velodyne_raw (nyu-h5 does not)
    no_scan = [Sample(s.key, s.rgb, s.K, depth=s.depth, meta=s.meta) for s in samples]
    bad = write_shards(tmp_path / "no_scan", no_scan)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"shard .*test-000000\.tar, key coco-img_000: no sparse\.png"):
        export(str(bad), out, "kitti", progress="none")
    assert not any(out.iterdir())  # a failed export removes what it wrote
    export(str(bad), out, "nyu-h5", progress="none")

    # an earlier export: --add needs another split, --overwrite replaces it, a failed --add restores it
    with pytest.raises(ExportError, match="already holds split train"):
        export(str(bad), out, "nyu-h5", add=True, progress="none")
    with pytest.raises(ExportError, match="holds a nyu-h5 export, not kitti"):
        export(str(shards), out, "kitti", split="val", add=True, progress="none")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    manifest = (out / MANIFEST).read_bytes()
    labelled = Sample("kitti-x", samples[0].rgb[::-1].copy(), samples[0].K, sparse=samples[0].sparse,
                      gt=samples[0].depth, meta={})
    mixed = write_shards(tmp_path / "mixed", [*samples, labelled])
    with pytest.raises(ExportError, match="key kitti-x: the shards mix labelled and unlabelled samples"):
        export(str(mixed), out, "nyu-h5", split="val", add=True, progress="none")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (out / MANIFEST).read_bytes() == manifest
    summary = export(str(shards), out, "kitti", overwrite=True, progress="none")
    assert summary.samples == 2 and not (out / "train").exists()
    # a kitti --add that fails after writing into an earlier date (same K) leaves that export as it was
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    manifest = (out / MANIFEST).read_bytes()
    with pytest.raises(ExportError, match="key kitti-x: the shards mix"):
        export(str(mixed), out, "kitti", split="val", add=True, progress="none")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (out / MANIFEST).read_bytes() == manifest
    with pytest.raises(ExportError, match="--progress must be one of auto, bar, log, none"):
        export(str(shards), tmp_path / "new", "kitti", progress="quiet")


def test_kitti_export_warns_of_maps_kitti_loaders_refuse(tmp_path):
    """BP-Net's loader asserts each map's largest PNG value is over 255 (1 m): a table-top scene is not."""
    deep, shallow = unlabelled_samples(2)
    shallow = Sample(shallow.key, shallow.rgb, shallow.K, depth=shallow.depth / 80, sparse=shallow.sparse / 80,
                     meta=shallow.meta)
    shards = write_shards(tmp_path / "shards", [deep, shallow])
    summary = export(str(shards), tmp_path / "out", "kitti", progress="none")
    assert len(summary.warnings) == 1 and summary.warnings[0].startswith("1 frame(s) have a velodyne_raw")
    assert not export(str(write_shards(tmp_path / "deep", [deep])), tmp_path / "ok", "kitti",
                      progress="none").warnings


def test_export_reads_shards_from_object_storage(tmp_path, s3_bucket):
    import fsspec

    shards = write_shards(tmp_path / "shards", unlabelled_samples(3), per_shard=2)
    job = {"source": "coco", "teacher_about": {"license": {"license": "apache-2.0", "source": "model card",
                                                           "non_commercial": False}}}
    (shards / "job.json").write_text(json.dumps(job))
    fsspec.filesystem("s3", use_listings_cache=False).put(f"{shards}/", f"{s3_bucket[5:]}/shards", recursive=True)
    export(f"{s3_bucket}/shards/", tmp_path / "from_s3", "kitti", progress="none")
    export(str(shards), tmp_path / "local", "kitti", progress="none")
    files = {p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*") if p.is_file()}
    assert files == {p.relative_to(tmp_path / "from_s3").as_posix() for p in (tmp_path / "from_s3").rglob("*")
                     if p.is_file()}
    for f in files - {MANIFEST}:  # the same bytes; only the manifest names other shards
        assert (tmp_path / "from_s3" / f).read_bytes() == (tmp_path / "local" / f).read_bytes(), f
    manifest = json.loads((tmp_path / "from_s3" / MANIFEST).read_text())
    assert manifest["exports"][0]["datagen_jobs"] == {f"{s3_bucket}/shards": job}
    assert {f["shard"] for f in manifest["frames"]} == {f"{s3_bucket}/shards/test-00000{i}.tar" for i in (0, 1)}


def test_cli_export(tmp_path):
    shards = write_shards(tmp_path / "shards", unlabelled_samples(2))
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(shards), "--format", "kitti", "--out", str(tmp_path / "out"),
                              "--progress", "none"])
    assert res.exit_code == 0, res.output
    assert "exported 2 sample(s) from 1 shard(s)" in res.output and "NOT for commercial use" in res.output
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["exports"][0]["command"].startswith(f"datagen export {shards} --format kitti --out ")
    res = runner.invoke(app, ["export", str(shards), "--format", "kitti", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "is not empty" in res.output
    # the licence `datagen run` recorded beside its shards (job.json) wins over datagen's table, and the
    # run's settings go into the manifest
    job = {"source": "coco", "teacher": "my/fine-tuned-da", "teacher_about": {"license": {
        "license": "apache-2.0", "source": "model card", "non_commercial": False}}}
    (shards / "job.json").write_text(json.dumps(job))
    res = runner.invoke(app, ["export", str(shards), "--format", "nyu-h5", "--out", str(tmp_path / "nyu")])
    assert res.exit_code == 0, res.output
    assert "licence apache-2.0 (model card)" in res.output and "commercial" not in res.output
    manifest = json.loads((tmp_path / "nyu" / MANIFEST).read_text())
    assert manifest["exports"][0]["datagen_jobs"] == {str(shards): job}
    res = runner.invoke(app, ["export", str(shards), "--format", "tfrecord", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown --format 'tfrecord'" in res.output
