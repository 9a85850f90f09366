"""The teacher against transformers' own pipeline, with a tiny random Depth Anything saved to disk."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from datagen.teachers.runner import (  # noqa: E402
    DepthTeacher,
    OracleTeacher,
    TeacherUnavailable,
    make_teacher,
    resolve_teacher,
    save_random_teacher,
)

# sizes chosen so that the processor (56 px target, multiples of 14, aspect kept) gives several tensor
# sizes, and two images of different sizes share one tensor size (37x61 and 40x64 -> 28x56)
SIZES = [(37, 61), (40, 64), (56, 56), (30, 90), (61, 37), (37, 61), (23, 29)]


@pytest.fixture(scope="module")
def tiny_da(tmp_path_factory):
    """A tiny randomly initialised Depth Anything plus a V2-style processor, saved with save_pretrained."""
    return Path(save_random_teacher(tmp_path_factory.mktemp("tiny_da")))


@pytest.fixture(scope="module")
def teacher(tiny_da):
    return DepthTeacher(str(tiny_da), device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    out = []
    for h, w in SIZES:
        # smooth ramps plus noise: something with structure for the model to respond to
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
        out.append(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_output_shape_dtype_finite(teacher, images):
    out = teacher.predict(images)
    assert len(out) == len(images)
    for img, d in zip(images, out, strict=True):
        assert d.shape == img.shape[:2]
        assert d.dtype == np.float32
        assert np.isfinite(d).all()
        assert d.std() > 1e-3 * np.abs(d).max()  # not a constant map: the model saw the image
    assert teacher.predict([]) == []


def test_batched_equals_one_by_one(tiny_da, teacher, images):
    single = DepthTeacher(str(tiny_da), device="cpu", batch_size=1)
    one_by_one = [single.predict([img])[0] for img in images]
    # batch_size 2: the 28x56 group (three images, two image sizes) runs one full batch and one leftover
    batched = teacher.predict(images)
    for a, b in zip(batched, one_by_one, strict=True):
        assert a.shape == b.shape
        assert rel_diff(a, b) < 1e-5
    # different images give different maps: guards against results landing at the wrong index
    assert rel_diff(batched[0], batched[5]) > 1e-3


def test_equals_transformers_pipeline(tiny_da, teacher, images):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, pipeline

    pipe = pipeline("depth-estimation", model=AutoModelForDepthEstimation.from_pretrained(tiny_da),
                    image_processor=AutoImageProcessor.from_pretrained(tiny_da), device="cpu")
    ours = teacher.predict(images)
    for img, d in zip(images, ours, strict=True):
        ref = pipe(Image.fromarray(img))["predicted_depth"]  # already resized to the image by the pipeline
        ref = ref.detach().float().numpy()
        assert ref.shape == img.shape[:2]
        assert rel_diff(d, ref) < 1e-4


def test_processor_is_v2_like(teacher, images):
    # the net really runs at a multiple-of-14 size with the aspect ratio kept, then comes back to the image
    assert teacher.transforms.input_size(30, 90) == (14, 56)  # 30x90 -> 56 px wide, 18.7 -> 14 rows
    assert teacher.transforms.resize(images[3]).shape == (3, 14, 56)


def test_info(teacher, tiny_da):
    info = teacher.info()
    assert info["model"] == str(tiny_da.resolve())
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert (info["output"], info["output_source"], info["model_type"]) == ("disparity", "config", "depth_anything")
    assert info["license"]["license"] == "unknown"  # a folder without a model card, not a known hub id
    assert teacher.model_id == info["model"] and teacher.revision == info["revision"]


def test_rejects_bad_images(teacher):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        teacher.predict([np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        teacher.predict([np.zeros((8, 8, 3), np.float32)])


def test_unknown_hub_id_offline_fails_fast_with_instructions():
    t0 = time.perf_counter()
    with pytest.raises(TeacherUnavailable) as e:
        resolve_teacher("some-org-that-does-not-exist/nonexistent-depth-model")
    msg = str(e.value)
    assert "download some-org-that-does-not-exist/nonexistent-depth-model" in msg  # hf / huggingface-cli
    assert "--teacher" in msg
    assert time.perf_counter() - t0 < 10  # generous: a network probe would hang far longer offline


def test_constructor_checks_before_loading():
    with pytest.raises(TeacherUnavailable, match="--teacher"):
        DepthTeacher("some-org-that-does-not-exist/nonexistent-depth-model", device="cpu")


def test_local_dir_without_config_names_the_path(tmp_path):
    empty = tmp_path / "my_weights"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(TeacherUnavailable) as e:
        resolve_teacher(str(empty))
    assert str(empty) in str(e.value) and "config.json" in str(e.value)


def test_missing_local_path_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(TeacherUnavailable, match=str(missing)):
        resolve_teacher(str(missing))


def test_resolve_local_dir_and_oracle(tiny_da):
    assert resolve_teacher(str(tiny_da)) == str(tiny_da.resolve())
    assert resolve_teacher("oracle") == "oracle"


def test_make_teacher_dispatch(tiny_da):
    oracle = make_teacher("oracle", device="cpu", batch_size=2)
    assert isinstance(oracle, OracleTeacher)
    assert oracle.info()["model"] == "oracle"
    with pytest.raises(TypeError):
        oracle.predict([np.zeros((4, 4, 3), np.uint8)])
    assert isinstance(make_teacher(str(tiny_da), device="cpu"), DepthTeacher)


def test_oracle_teacher_delegates_to_the_oracle(monkeypatch):
    import datagen.teachers.runner

    calls = []

    def fake_oracle(depth_m, rng, **scene):
        calls.append((depth_m, rng, scene))
        return (1.0 / depth_m).astype(np.float32)

    # a stand-in for datagen.teachers.oracle.oracle_teacher (tested in test_oracle.py): the class only passes through
    monkeypatch.setattr(datagen.teachers.runner, "oracle_teacher", fake_oracle)
    depth_m = np.full((3, 4), 2.0)
    rng = np.random.default_rng(1)
    out = OracleTeacher().predict_from_depth(depth_m, rng, family="street")
    assert calls and calls[0][0] is depth_m and calls[0][1] is rng and calls[0][2] == {"family": "street"}
    np.testing.assert_array_equal(out, np.full((3, 4), 0.5, np.float32))


def fake_hub_cache(root, repo_id: str, src, files) -> str:
    """Lay `files` from `src` out as huggingface_hub's cache does for `repo_id`; returns the commit hash."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_bytes((src / name).read_bytes())
    return commit


def test_cached_hub_id_loads_offline_with_revision(tiny_da, teacher, images, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    files = ["config.json", "preprocessor_config.json", "model.safetensors"]
    commit = fake_hub_cache(tmp_path, "tiny-org/tiny-da", tiny_da, files)
    assert resolve_teacher("tiny-org/tiny-da") == "tiny-org/tiny-da"
    cached = DepthTeacher("tiny-org/tiny-da", device="cpu")
    assert cached.info()["model"] == "tiny-org/tiny-da" and cached.revision == commit
    np.testing.assert_array_equal(cached.predict(images[:2])[1], teacher.predict(images[:2])[1])


def test_partly_cached_hub_id_is_unavailable(tiny_da, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    fake_hub_cache(tmp_path, "tiny-org/no-weights", tiny_da, ["config.json", "preprocessor_config.json"])
    with pytest.raises(TeacherUnavailable, match="download tiny-org/no-weights"):
        resolve_teacher("tiny-org/no-weights")
