"""Sources against tiny fake trees in each data set's real layout (tests/datagen/fixtures.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures import (
    _kitti_P,
    make_bad_images,
    make_cityscapes,
    make_coco,
    make_davis,
    make_folder,
    make_kitti,
    make_landmarks,
    make_nuscenes,
    make_nyu,
)
from PIL import Image

from datagen.sources import SOURCES, InputError, LayoutError, get_source
from datagen.sources.base import assign_keys
from datagen.sources.kitti import K_from_calib, read_calib
from datagen.sources.nyu import NYU_K
from shared.camera import make_K, scale_K

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
IMAGE_SOURCES = {
    "coco": make_coco, "landmarks": make_landmarks, "nuscenes": make_nuscenes, "cityscapes": make_cityscapes,
    "davis": make_davis, "folder": make_folder,
}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Every fake tree, built once for the module (the tests only read them)."""
    base = tmp_path_factory.mktemp("trees")
    out = {name: make(base / name) for name, make in IMAGE_SOURCES.items()}
    out["kitti"] = make_kitti(base / "kitti")
    out["nyu"] = make_nyu(base / "nyu")
    return out


def rel(paths, root) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


# ---------------------------------------------------------------------------------------------------
# Registry and keys


def test_registry_names_and_attributes():
    assert set(SOURCES) == {"coco", "landmarks", "nuscenes", "cityscapes", "davis", "folder", "synthetic",
                            "kitti", "nyu"}
    for name, cls in SOURCES.items():
        assert cls.name == name and cls.layout.strip()
    assert SOURCES["kitti"].labelled and SOURCES["nyu"].labelled and not SOURCES["coco"].labelled
    assert {n for n, c in SOURCES.items() if c.has_native_intrinsics} == {"nuscenes", "cityscapes", "synthetic",
                                                                          "kitti", "nyu"}


def test_get_source_errors(tmp_path):
    with pytest.raises(ValueError, match="valid: .*coco.*kitti"):
        get_source("imagenet", tmp_path)
    with pytest.raises(ValueError, match="unknown option.*'split'.*valid: splits"):
        get_source("coco", tmp_path, split="val2017")
    with pytest.raises(ValueError, match="no native intrinsics"):
        get_source("coco", tmp_path, intrinsics="native")
    with pytest.raises(ValueError, match="random' or 'native"):
        get_source("kitti", tmp_path, intrinsics="exact")
    # None means "the default", so a CLI can forward unset flags
    assert get_source("nyu", tmp_path, split=None, points=None).options == {"split": "train", "points": 500, "seed": 0}


def test_assign_keys_disambiguates_by_path_not_order():
    ids = ["d/x.jpg", "d/x.png", "d/a b.jpg", "d/a_b.jpg", "d/solo.jpg"]
    keys = assign_keys("folder", ids)
    assert len(set(keys)) == 5 and keys[4] == "folder-d_solo"
    assert keys[0].startswith("folder-d_x_") and keys[2].startswith("folder-d_a_b_")
    shuffled = assign_keys("folder", ids[::-1])[::-1]
    assert shuffled == keys
    assert all(KEY_RE.match(k) for k in keys)


# ---------------------------------------------------------------------------------------------------
# Unlabelled image sources: the common contract


@pytest.mark.parametrize("name", sorted(IMAGE_SOURCES))
def test_image_source_lists_loads_and_keys_are_stable(name, trees):
    tree = trees[name]
    src = get_source(name, tree["root"])
    items = src.items()
    assert len(items) == tree["count"]
    assert [i.path for i in items] == [str(p) for p in tree["paths"]]
    assert rel([i.path for i in items], tree["root"]) == sorted(rel(tree["paths"], tree["root"]))
    keys = [i.key for i in items]
    assert len(set(keys)) == len(keys)
    assert all(KEY_RE.match(k) and k.startswith(f"{name}-") for k in keys)
    assert keys == [i.key for i in src.items()] == [i.key for i in get_source(name, tree["root"]).items()]
    for item in items:
        rec = src.load(item)
        assert rec.rgb.shape == (48, 64, 3) and rec.rgb.dtype == np.uint8
        assert rec.key == item.key and rec.source == name and rec.source_path == item.path
        assert rec.sparse is None and rec.gt is None and rec.K is None


@pytest.mark.parametrize("name", sorted(set(SOURCES) - {"synthetic"}))
def test_wrong_root_fails_at_once_naming_the_layout(name, trees, tmp_path):
    wrong = trees["coco"]["root"] if name != "coco" else trees["davis"]["root"]
    first_line = SOURCES[name].layout.splitlines()[0]
    roots = [tmp_path / "does-not-exist", tmp_path] + ([wrong] if name != "folder" else [])  # any tree is a folder
    for root in roots:
        src = get_source(name, root)
        with pytest.raises(LayoutError, match=f"Expected the {name} layout") as info:
            src.check_layout()
            src.items()
        assert first_line in str(info.value)


def test_coco_splits_option(trees):
    root = trees["coco"]["root"]
    items = get_source("coco", root, splits=["val2017"]).items()
    assert len(items) == 3 and all("val2017" in i.key for i in items)
    assert len(get_source("coco", root, splits="train2017,val2017").items()) == 6
    with pytest.raises(LayoutError, match="test2017"):
        get_source("coco", root, splits=["test2017"]).items()
    with pytest.raises(ValueError, match="unknown split"):
        get_source("coco", root, splits=["train2014"]).items()


def test_landmarks_csv_filter(trees, tmp_path):
    tree = trees["landmarks"]
    items = get_source("landmarks", tree["root"], csv=True).items()
    assert [i.path for i in items] == [str(p) for p in tree["csv_paths"]]
    assert len(items) == 3  # the csv id that is not on disk is not invented
    for p in tree["csv_paths"]:  # nested by the first three characters
        assert p.parent.relative_to(tree["root"]).parts == ("train", p.stem[0], p.stem[1], p.stem[2])
    other = tmp_path / "clean.csv"
    other.write_text("landmark_id,id\n7," + tree["ids"][-1] + "\n")
    assert [Path(i.path).stem for i in get_source("landmarks", tree["root"], csv=str(other)).items()] == [tree["ids"][-1]]
    copy = tmp_path / "lm"
    shutil.copytree(tree["root"] / "train", copy / "train")
    assert len(get_source("landmarks", copy).items()) == tree["count"]  # no csv needed by default
    with pytest.raises(LayoutError, match="train.csv"):
        get_source("landmarks", copy, csv=True).items()


def test_nuscenes_native_intrinsics_from_tables(tmp_path):
    tree = make_nuscenes(tmp_path / "nusc", unlisted=True)
    src = get_source("nuscenes", tree["root"], intrinsics="native")
    items = src.items()
    assert len(items) == tree["count"] == 7
    seen = 0
    for item in items:
        relname = Path(item.path).relative_to(tree["root"]).as_posix()
        if relname in tree["K"]:
            rec = src.load(item)
            np.testing.assert_array_equal(rec.K, np.array(tree["K"][relname]))
            assert rec.meta["camera"] == relname.split("/")[1]
            seen += 1
        else:
            with pytest.raises(InputError, match="no sample_data row"):
                src.load(item)
    assert seen == 6
    # random intrinsics: no tables needed, every image loads, keys unchanged
    for v in tree["root"].glob("v1.0-*"):
        shutil.rmtree(v)
    plain = get_source("nuscenes", tree["root"])
    assert [i.key for i in plain.items()] == [i.key for i in items]
    assert all(plain.load(i).K is None for i in plain.items())
    with pytest.raises(LayoutError, match="sample_data.json"):
        get_source("nuscenes", tree["root"], intrinsics="native").check_layout()
    front = get_source("nuscenes", tree["root"], cameras="CAM_FRONT").items()
    assert len(front) == 3 and all("CAM_FRONT" in i.path for i in front)


def test_cityscapes_native_intrinsics_from_camera_json(trees, tmp_path):
    tree = trees["cityscapes"]
    src = get_source("cityscapes", tree["root"], intrinsics="native")
    for item in src.items():
        rec = src.load(item)
        np.testing.assert_array_equal(rec.K, np.array(tree["K"][item.path]))
    assert len(get_source("cityscapes", tree["root"], splits=["val"]).items()) == 4
    nocam = make_cityscapes(tmp_path / "cs", camera=False)
    assert len(get_source("cityscapes", nocam["root"]).items()) == nocam["count"]
    with pytest.raises(LayoutError, match="camera/train"):
        get_source("cityscapes", nocam["root"], intrinsics="native").check_layout()
    (nocam["root"] / "camera" / "train").mkdir(parents=True)
    (nocam["root"] / "camera" / "val").mkdir(parents=True)
    item = get_source("cityscapes", nocam["root"], intrinsics="native").items()[0]
    with pytest.raises(InputError, match="_camera.json is missing"):
        get_source("cityscapes", nocam["root"], intrinsics="native").load(item)


def test_davis_resolution_and_imageset(tmp_path):
    tree = make_davis(tmp_path / "davis", resolutions=("Full-Resolution", "480p"), frames=2)
    default = get_source("davis", tree["root"]).items()
    assert [i.path for i in default] == [str(p) for p in sorted(tree["by_resolution"]["480p"])]
    full = get_source("davis", tree["root"], resolution="Full-Resolution").items()
    assert len(full) == 4 and all("Full-Resolution" in i.path for i in full)
    train = get_source("davis", tree["root"], imageset="2017/train").items()
    assert [get_source("davis", tree["root"]).load(i).meta["sequence"] for i in train] == ["bear", "bear"]


def test_folder_skips_hidden_and_non_images_and_disambiguates(trees):
    tree = trees["folder"]
    keys = [i.key for i in get_source("folder", tree["root"]).items()]
    assert not any("hidden" in k or "skip" in k or "notes" in k for k in keys)
    assert "folder-a_one" in keys and "folder-four" in keys
    dups = [k for k in keys if k.startswith("folder-dup_x") or k.startswith("folder-dup_a_b")]
    assert len(dups) == len(set(dups)) == 4


# ---------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("name", ["folder", "coco"])
def test_bad_image_zoo_loads_converted_or_raises_input_error(name, tmp_path):
    root = tmp_path / name
    zoo = make_bad_images(root / "train2017" if name == "coco" else root)
    src = get_source(name, root)
    items = {Path(i.path).name: i for i in src.items()}
    assert set(items) == set(zoo)
    for fname, spec in zoo.items():
        if spec["expect"] == "ok":
            rgb = src.load(items[fname]).rgb
            assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8, fname
        else:
            with pytest.raises(InputError) as info:
                src.load(items[fname])
            assert fname in str(info.value) and len(str(info.value)) > len(str(spec["path"])) + 5
    big = src.load(items["huge_9000x6000.jpg"]).rgb
    assert big.shape == (6000, 9000, 3)
    np.testing.assert_allclose(big[::1000, ::1000].reshape(-1, 3).mean(0), (90, 120, 150), atol=2)
    rgba = src.load(items["rgba.png"]).rgb  # alpha composited on grey, not dropped
    gray = src.load(items["gray.png"]).rgb
    assert (gray[..., 0] == gray[..., 1]).all() and rgba.shape == (48, 64, 3)


# ---------------------------------------------------------------------------------------------------
# KITTI


def test_kitti_calib_parse(tmp_path):
    calib = tmp_path / "calib_cam_to_cam.txt"
    calib.write_text("calib_time: 09-Jan-2012 13:57:47\ncorner_dist: 9.950000e-02\n"
                     "P_rect_02: 7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 "
                     "1.728540e+02 2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03\n")
    read_calib.cache_clear()
    assert "calib_time" not in read_calib(str(calib))
    np.testing.assert_array_equal(K_from_calib(calib, "image_02"), make_K(721.5377, 721.5377, 609.5593, 172.854))
    with pytest.raises(InputError, match="P_rect_03"):
        K_from_calib(calib, "image_03")


@pytest.mark.parametrize("split", ["train", "val", "val_selection_cropped", "test"])
def test_kitti_splits_decode_to_the_metres_written(split, trees):
    tree = trees["kitti"]
    want = tree["splits"][split]["items"]
    src = get_source("kitti", tree["root"], split=split)
    items = src.items()
    assert [i.key for i in items] == [f"kitti-{w['id'].replace('/', '_')}" for w in want]
    assert [i.key for i in items] == [i.key for i in get_source("kitti", tree["root"], split=split).items()]
    for item, w in zip(items, want, strict=True):
        rec = src.load(item)
        np.testing.assert_array_equal(rec.rgb, np.asarray(Image.open(w["rgb"]).convert("RGB")))
        np.testing.assert_array_equal(rec.sparse, w["sparse"])  # exact: multiples of 1/256 m
        if w["gt"] is None:
            assert rec.gt is None
        else:
            np.testing.assert_array_equal(rec.gt, w["gt"])
        np.testing.assert_allclose(rec.K, w["K"], rtol=1e-6)
        assert rec.sparse.dtype == np.float32 and (rec.sparse > 0).mean() > 0.02


def test_kitti_K_per_date_and_camera(trees):
    tree = trees["kitti"]
    src = get_source("kitti", tree["root"], intrinsics="random")  # KITTI is always native
    assert src.intrinsics == "native"
    Ks = {(i.extra["drive"][:10], i.extra["camera"]): src.load(i).K for i in src.items()}
    Ks.update({(i.extra["drive"][:10], i.extra["camera"]): get_source("kitti", tree["root"], split="val").load(i).K
               for i in get_source("kitti", tree["root"], split="val").items()})
    assert len(Ks) == 4
    for (date, cam), K in Ks.items():
        np.testing.assert_allclose(K, _kitti_P(date, int(cam[-1]))[:, :3], rtol=1e-6)
    assert not np.allclose(Ks[("2011_09_26", "image_02")], Ks[("2011_09_28", "image_02")])


def test_kitti_raw_under_root_and_missing_gt(tmp_path):
    tree = make_kitti(tmp_path / "k", frames=2, splits=("train",), selection=0, test=0, raw_under_root=True,
                      missing_gt=1)
    src = get_source("kitti", tree["root"])
    items = src.items()
    assert len(items) == 4 and not (tree["root"] / "raw").exists()
    src.load(items[0])
    with pytest.raises(InputError, match="ground truth .* is missing"):
        src.load(items[-1])
    (Path(items[0].extra["rgb"])).unlink()
    with pytest.raises(InputError, match="RGB image"):
        src.load(items[0])
    with pytest.raises(LayoutError, match="val_selection_cropped"):
        get_source("kitti", tree["root"], split="val_selection_cropped").items()


# ---------------------------------------------------------------------------------------------------
# NYU


def test_nyu_loads_h5_and_samples_500_valid_points(trees):
    tree = trees["nyu"]
    for split in ("train", "val"):
        want = tree["splits"][split]["items"]
        src = get_source("nyu", tree["root"], split=split)
        items = src.items()
        assert [i.path for i in items] == [str(w["path"]) for w in want]
        for item, w in zip(items, want, strict=True):
            rec = src.load(item)
            np.testing.assert_array_equal(rec.rgb, w["rgb"])
            np.testing.assert_array_equal(rec.gt, w["depth"])
            pts = rec.sparse > 0
            assert pts.sum() == 500 and (w["depth"][pts] > 0).all()
            np.testing.assert_array_equal(rec.sparse[pts], w["depth"][pts])
            np.testing.assert_allclose(rec.K, scale_K(NYU_K, 64 / 640, 48 / 480))
            again = get_source("nyu", tree["root"], split=split).load(item).sparse  # fresh instance
            np.testing.assert_array_equal(again, rec.sparse)
    item = get_source("nyu", tree["root"], split="val").items()[0]
    val0 = get_source("nyu", tree["root"], split="val").load(item).sparse
    np.testing.assert_array_equal(get_source("nyu", tree["root"], split="val", seed=5).load(item).sparse, val0)
    titem = get_source("nyu", tree["root"], split="train").items()[0]
    t0 = get_source("nyu", tree["root"], split="train").load(titem).sparse
    t5 = get_source("nyu", tree["root"], split="train", seed=5).load(titem).sparse
    assert (t0 > 0).sum() == (t5 > 0).sum() == 500 and not np.array_equal(t0 > 0, t5 > 0)
    assert (get_source("nyu", tree["root"], points=4000).load(titem).sparse > 0).sum() == (tree["splits"]["train"]["items"][0]["depth"] > 0).sum()


def test_nyu_full_size_K_and_bad_file(tmp_path):
    tree = make_nyu(tmp_path / "nyu", splits=("val",), frames=1, size=(640, 480))
    src = get_source("nyu", tree["root"], split="val")
    rec = src.load(src.items()[0])
    assert rec.rgb.shape == (480, 640, 3)
    np.testing.assert_array_equal(rec.K, make_K(518.8579011745019, 519.4696111212749, 325.58244941119034,
                                                253.73616633400465))
    bad = tree["root"] / "val" / "official" / "00002.h5"
    bad.write_text("not hdf5")
    with pytest.raises(InputError, match="HDF5"):
        src.load(src.items()[1])


def test_nyu_file_K_replaces_the_kinect_K(tmp_path):
    """A file with its own 'K' (as `datagen export --format nyu-h5` writes) keeps it; a malformed one is refused."""
    import h5py

    tree = make_nyu(tmp_path / "nyu", splits=("val",), frames=2)
    paths = [r["path"] for r in tree["splits"]["val"]["items"]]
    K = make_K(70.123456789, 71.5, 30.25, 22.75)
    with h5py.File(paths[0], "a") as f:
        f.create_dataset("K", data=K)
    with h5py.File(paths[1], "a") as f:
        f.create_dataset("K", data=np.eye(2))
    src = get_source("nyu", tree["root"], split="val")
    rec = src.load(src.items()[0])
    np.testing.assert_array_equal(rec.K, K)
    assert rec.meta["K_from"] == "file" and "K_scaled_from" not in rec.meta
    with pytest.raises(InputError, match=r"00002\.h5: 'K' must be a 3 x 3 pinhole matrix"):
        src.load(src.items()[1])


# ---------------------------------------------------------------------------------------------------
# Synthetic


SMALL = {"width": 96, "height": 64}


def test_synthetic_items_deterministic_and_seeded():
    pytest.importorskip("open3d")
    a = get_source("synthetic", None, count=4, **SMALL)
    keys = [i.key for i in a.items()]
    assert keys == [i.key for i in get_source("synthetic", "/ignored", count=4, **SMALL).items()]
    assert len(set(keys)) == 4 and all(KEY_RE.match(k) and k.startswith("synthetic-street_") for k in keys)
    assert all(i.path == f"synthetic://street/{i.extra['scene_seed']}" for i in a.items())
    assert [i.key for i in get_source("synthetic", None, count=2, **SMALL).items()] == keys[:2]  # --limit = prefix
    assert not set(keys) & {i.key for i in get_source("synthetic", None, count=4, seed=1, **SMALL).items()}
    mixed = get_source("synthetic", None, count=8, family="mixed", **SMALL).items()
    assert [i.extra["family"] for i in mixed] == ["street", "room", "nature", "tabletop"] * 2  # each in turn
    r1 = a.load(a.items()[0])
    r2 = get_source("synthetic", None, count=4, **SMALL).load(a.items()[0])
    assert r1.rgb.shape == (64, 96, 3) and r1.rgb.dtype == np.uint8
    assert r1.rgb.tobytes() == r2.rgb.tobytes() and r1.true_depth.tobytes() == r2.true_depth.tobytes()
    assert r1.sparse is None and r1.gt is None and r1.K.shape == (3, 3)
    assert a.intrinsics == "native" and not a.labelled  # the scene's K is the only true one
    assert a.load(a.items()[1]).rgb.tobytes() != r1.rgb.tobytes()
    with pytest.raises(ValueError, match="family"):
        get_source("synthetic", None, family="forest")


def test_synthetic_labelled_semi_and_dense():
    pytest.importorskip("open3d")
    semi = get_source("synthetic", None, count=2, labelled=True, **SMALL)
    assert semi.labelled
    for item in semi.items():
        rec = semi.load(item)
        again = get_source("synthetic", None, count=2, labelled=True, **SMALL).load(item)
        assert rec.sparse.tobytes() == again.sparse.tobytes() and rec.gt.tobytes() == again.gt.tobytes()
        top = rec.meta["gt_top_row"]
        assert 0.3 * 64 - 1 <= top <= 0.4 * 64 + 1
        assert not rec.gt[:top].any()  # no labels in the upper part
        assert rec.true_depth[:top].any()  # ... although the world is there
        lab = rec.gt > 0
        np.testing.assert_array_equal(rec.gt[lab], rec.true_depth[lab])  # exact where given
        below = rec.true_depth[top:] > 0
        assert (~lab[top:] & below).any()  # holes
        assert not (lab & (rec.true_depth == 0)).any()  # sky never labelled
        pts = rec.sparse > 0
        assert pts.sum() > 100 and rec.sparse.dtype == np.float32
        assert np.median(np.abs(rec.sparse[pts] - rec.true_depth[pts])) < 0.5
        assert rec.meta["lidar"]["preset"] == "hdl64"
        dense = get_source("synthetic", None, count=2, labelled=True, gt="dense", **SMALL).load(item)
        np.testing.assert_array_equal(dense.gt, rec.true_depth)
        assert dense.sparse.tobytes() == rec.sparse.tobytes()  # the scan does not depend on the GT mode
