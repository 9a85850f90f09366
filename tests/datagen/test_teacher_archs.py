"""Every supported teacher architecture, as a tiny random model saved to disk and loaded like real weights:
the fast pre-processing equals transformers' processor, the maps equal transformers' pipeline, the output kind
is decided as documented, and each runs through the sample path into a shard whose pseudo depth honours it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from datagen.disparity import disparity_to_depth  # noqa: E402
from datagen.job.settings import RunConfig  # noqa: E402
from datagen.pseudo_depth import SATURATION, relative_depth_to_depth  # noqa: E402
from datagen.sample import make_sample, sample_rngs, sample_seed  # noqa: E402
from datagen.sources.base import Record  # noqa: E402
from datagen.teachers.prep import _pil_resize, load_transforms  # noqa: E402
from datagen.teachers.runner import DepthTeacher, TeacherFeed, save_random_teacher, teacher_profile  # noqa: E402
from datagen.teachers.tiny import ARCHS  # noqa: E402
from datagen.teachers.zoo import TeacherOutputUnknown, output_kind  # noqa: E402
from shared.depth import DEPTH_SCALE  # noqa: E402
from shared.scan.spec import ScanSpec  # noqa: E402
from shared.shard import ShardWriter, encode_sample, iter_samples, validate_shard  # noqa: E402

# (kind, where it is decided, pre/post-processing family)
EXPECTED = {"depth_anything": ("disparity", "config", "dpt"), "depth_anything_metric": ("metric", "config", "dpt"),
            "prompt_depth_anything": ("depth", "table", "dpt"), "dpt": ("disparity", "table", "dpt"),
            "zoedepth": ("metric", "table", "zoedepth"), "depth_pro": ("metric", "config", "depth_pro"),
            "glpn": ("metric", "table", "glpn")}
SIZES = [(40, 64), (37, 61), (64, 48), (120, 90)]  # aspect ratios either way, sizes that share a tensor size


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_teachers")
    return {arch: save_random_teacher(root / arch, arch=arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def teachers(saved) -> dict[str, DepthTeacher]:
    return {arch: DepthTeacher(path, device="cpu", batch_size=2) for arch, path in saved.items()}


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for h, w in SIZES:  # smooth ramps plus noise: structure for the model to respond to
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
        out.append(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def test_every_architecture_is_covered():
    assert set(EXPECTED) == set(ARCHS)


@pytest.mark.parametrize("arch", [a for a in EXPECTED if a != "depth_pro"])
def test_fast_preprocessing_equals_the_processor(arch, saved, images):
    """resize (PIL, uint8) in the task + one multiply-add where the batch is == transformers' PIL processor, to
    float32 rounding. The processors are the ones AutoImageProcessor gives without torchvision."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(saved[arch])
    transforms = load_transforms(saved[arch], local_files_only=True)
    for image in images:
        ref = processor(images=[image], return_tensors=None, input_data_format="channels_last")["pixel_values"][0]
        pixels = transforms.resize(image)
        assert pixels.shape[1:] == transforms.input_size(*image.shape[:2]) == ref.shape[1:]
        if transforms.family in ("dpt", "glpn"):
            assert pixels.dtype == np.uint8  # a quarter of the bytes to ship; the processor resizes uint8 too
        ours = transforms.normalise(torch.from_numpy(pixels)[None])[0].numpy()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)


def test_depth_pro_preprocessing_equals_its_processor_steps(saved, images):
    """DepthProImageProcessor needs torchvision (absent here); its steps, as transformers writes them: rescale
    and normalise first, then torchvision's resize without antialiasing (torch's interpolate). We resize first
    and normalise on the device: the resize is linear, so the two orders agree to float rounding."""
    transforms = load_transforms(saved["depth_pro"], local_files_only=True)
    for image in images:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        x = (x - 0.5) / 0.5
        ref = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)[0]
        ours = transforms.normalise(torch.from_numpy(transforms.resize(image))[None])[0]
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)


def test_resize_against_the_torchvision_backend():
    """With torchvision installed transformers resizes with torch's antialiased bicubic (then rounds to uint8)
    instead of PIL. The stated tolerance between the two on a photo-like image: under 0.3 grey levels on
    average, at most 4 (PIL clips to 0..255 between its two 1-D passes, torch does not)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:480, 0:640]
    image = np.stack([xx * 255 / 640, yy * 255 / 480, 128 + 100 * np.sin(xx / 7.0)], axis=-1)
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    ours = _pil_resize(image, (518, 686), 3).astype(np.float64)
    torch_aa = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(518, 686),
                                               mode="bicubic", antialias=True, align_corners=False)
    torch_aa = torch_aa.round().clamp(0, 255)[0].numpy()
    diff = np.abs(ours - torch_aa)
    assert diff.mean() < 0.3 and diff.max() <= 4


def _zoedepth_without_torchvision(monkeypatch):
    """ZoeDepth's PIL processor post-processes with torchvision's resize; on a float tensor without
    antialiasing that is torch's bicubic interpolate, which stands in for it here."""
    from transformers.models.zoedepth import image_processing_pil_zoedepth as zoe

    def resize(t, size, interpolation, antialias):
        return torch.nn.functional.interpolate(t[None], size=list(size), mode=interpolation, align_corners=False)[0]

    shim = SimpleNamespace(resize=resize, InterpolationMode=SimpleNamespace(BICUBIC="bicubic"))
    monkeypatch.setattr(zoe, "tvF", shim, raising=False)


@pytest.mark.parametrize("arch", [a for a in EXPECTED if a not in ("depth_pro", "depth_anything")])
def test_maps_equal_the_transformers_pipeline(arch, saved, teachers, images, monkeypatch):
    """(Depth Anything relative: tests/datagen/test_teacher.py.)"""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, pipeline

    if arch == "zoedepth":
        _zoedepth_without_torchvision(monkeypatch)
    pipe = pipeline("depth-estimation", model=AutoModelForDepthEstimation.from_pretrained(saved[arch]),
                    image_processor=AutoImageProcessor.from_pretrained(saved[arch]), device="cpu")
    ours = teachers[arch].predict(images)  # batched, in groups of tensor size
    for image, d in zip(images, ours, strict=True):
        ref = pipe(Image.fromarray(image))["predicted_depth"].detach().float().numpy()
        assert d.shape == ref.shape == image.shape[:2] and d.dtype == np.float32
        assert np.abs(d - ref).max() <= 1e-4 * np.abs(ref).max()
        assert d.std() > 1e-4 * np.abs(d).max()  # the map varies: the model saw the image


def test_depth_pro_metric_depth_from_its_field_of_view(saved, teachers, images):
    """Depth Pro's post-processing (transformers' DepthProImageProcessor, written out): the canonical inverse
    depth times W / f, f = W / 2 / tan(fov / 2) of the image's own width W, bilinear to the image, inverted."""
    teacher = teachers["depth_pro"]
    out = teacher.predict_with_info(images)
    for image, (d, info) in zip(images, out, strict=True):
        h, w = image.shape[:2]
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        x = torch.nn.functional.interpolate((x - 0.5) / 0.5, size=(64, 64), mode="bilinear", align_corners=False)
        with torch.no_grad():
            raw = teacher.model(pixel_values=x)
        fov = raw.field_of_view[0]
        focal = 0.5 * w / torch.tan(0.5 * torch.deg2rad(fov))
        inv = torch.nn.functional.interpolate((raw.predicted_depth[0] * w / focal)[None, None], size=(h, w),
                                              mode="bilinear", align_corners=False)[0, 0]
        ref = (1.0 / inv.clamp(1e-4, 1e4)).numpy()
        np.testing.assert_allclose(d, ref, rtol=1e-4)
        assert info["fov_deg"] == pytest.approx(float(fov), rel=1e-5)
        assert info["focal_px"] == pytest.approx(float(focal), rel=1e-5)
        assert 0 < d.min() and d.std() > 0


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_output_kind_and_profile(arch, saved, teachers):
    kind, source, family = EXPECTED[arch]
    info = teachers[arch].info()
    assert (info["output"], info["output_source"], info["transforms"]["family"]) == (kind, source, family)
    assert teacher_profile(saved[arch])["output"] == kind  # the cheap check before any work agrees
    if kind == "metric" and arch != "depth_pro":  # bounded heads: sigmoid x max_depth, or ZoeDepth's last bin
        assert info["ceiling_m"] == {"depth_anything_metric": 20.0, "glpn": 10.0, "zoedepth": 10.0}[arch]


def test_output_kind_rules():
    from transformers import DepthAnythingConfig, DepthProConfig, DPTConfig

    assert output_kind(DPTConfig(), "metric") == ("metric", "--teacher-output")  # the flag overrides the table
    with pytest.raises(TeacherOutputUnknown, match="contradicts the model's config"):
        output_kind(DepthAnythingConfig(), "metric")  # a config that says relative cannot be overridden
    assert output_kind(DepthAnythingConfig(), "disparity") == ("disparity", "config")
    assert output_kind(DepthProConfig(use_fov_model=False)) == ("depth", "config")  # no focal length: scale unknown
    unknown = SimpleNamespace(model_type="tipsv2_dpt")
    with pytest.raises(TeacherOutputUnknown) as e:
        output_kind(unknown)
    assert "tipsv2_dpt" in str(e.value) and "--teacher-output" in str(e.value)
    assert output_kind(unknown, "metric") == ("metric", "--teacher-output")
    with pytest.raises(TeacherOutputUnknown, match="use one of"):
        output_kind(unknown, "inverse")


def test_unknown_model_type_fails_before_loading_weights(tmp_path):
    from transformers import Tipsv2DptConfig

    Tipsv2DptConfig().save_pretrained(tmp_path)  # a depth model transformers has, datagen's table has not
    with pytest.raises(TeacherOutputUnknown, match="tipsv2_dpt.*--teacher-output"):
        teacher_profile(str(tmp_path))
    assert teacher_profile(str(tmp_path), "metric")["output"] == "metric"


def test_feed_for_a_cpu_model_normalises_and_finishes_in_the_task(teachers, images):
    """A CPU model process gets pixel values and returns maps at the network's size; an accelerator gets
    uint8 pixels and returns finished maps. Both give the same maps."""
    teacher = teachers["depth_anything"]
    info = teacher.info()
    cpu_feed = TeacherFeed(info, batch_size=8)
    packed = cpu_feed.pack(images)
    assert packed.normalised and all(p.dtype == np.float32 for _, p in packed.groups)
    answer = teacher.run(packed)
    assert all(extras is not None for *_, extras in answer)  # raw: the task upsamples
    gpu_feed = TeacherFeed({**info, "device": "cuda"}, batch_size=8)  # packing only: no GPU needed
    assert not gpu_feed.pack(images).normalised
    assert all(p.dtype == np.uint8 for _, p in gpu_feed.pack(images).groups)
    # images of different sizes with the same tensor size share a batch: 40x64 and 37x61 -> 28x56
    assert sorted(len(idx) for idx, _ in packed.groups) == [1, 1, 2]
    maps = cpu_feed.unpack(packed, answer)
    for (m, _), ref in zip(maps, teacher.predict(images), strict=True):
        np.testing.assert_array_equal(m, ref)


@pytest.mark.parametrize("arch", ["depth_anything", "zoedepth", "depth_pro"])
def test_accelerator_path_gives_the_same_maps(arch, teachers, images, monkeypatch):
    """What a GPU replica does (uint8 pixels in, normalisation, network, post-processing and one transfer back
    per batch in the model process), run here on the CPU: the same maps and facts as the CPU split."""
    import datagen.teachers.runner

    teacher = teachers[arch]
    cpu = teacher.predict_with_info(images)
    monkeypatch.setattr(datagen.teachers.runner, "accelerated", lambda device: True)
    feed = TeacherFeed(teacher.info())
    packed = feed.pack(images)
    assert not packed.normalised
    answer = teacher.run(packed)
    assert all(extras is None for *_, extras in answer)  # finished in the model process
    for (m, info), (ref, ref_info) in zip(feed.unpack(packed, answer), cpu, strict=True):
        np.testing.assert_allclose(m, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
        assert info.keys() == ref_info.keys()


def test_other_models_fall_back_to_their_own_processor(saved, images):
    """A model type without a tensor re-expression runs its own transformers processor in the shard task and its
    own post_process_depth_estimation: shown on the tiny Depth Anything, whose two paths must agree."""
    from datagen.teachers.prep import ProcessorTransforms

    teacher = DepthTeacher(saved["depth_anything"], device="cpu", batch_size=2)
    fast = teacher.predict(images)
    teacher.transforms = ProcessorTransforms(path=saved["depth_anything"], local_files_only=True)
    assert teacher.info()["transforms"]["family"] == "processor"
    for m, ref in zip(teacher.predict(images), fast, strict=True):
        np.testing.assert_allclose(m, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_feed_marks_an_image_it_cannot_prepare(teachers, images):
    feed = TeacherFeed(teachers["dpt"].info())
    packed = feed.pack([images[0], np.zeros((5, 5), np.uint8), images[1]])
    assert list(packed.errors) == [1] and "HxWx3 uint8" in packed.errors[1]
    out = feed.unpack(packed, teachers["dpt"].run(packed))
    assert isinstance(out[1], ValueError) and out[0][0].shape == (40, 64) and out[2][0].shape == (37, 61)


def _pseudo_depth_reference(kind: str, teacher_map: np.ndarray, ceiling_m, rng) -> np.ndarray:
    if kind == "disparity":
        return disparity_to_depth(teacher_map, rng, scene="any")[0]
    if kind == "depth":
        return relative_depth_to_depth(teacher_map, rng, scene="any")[0]
    ok = teacher_map < SATURATION * ceiling_m if ceiling_m else np.ones(teacher_map.shape, bool)
    return np.where(ok, teacher_map, 0.0)


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_each_architecture_into_a_shard(arch, teachers, images, tmp_path):
    """The sample path the shard task runs (teacher map -> pseudo depth -> K -> LiDAR -> encode), written into
    a shard and read back: teacher.png holds the teacher's own map, depth.png honours the output kind."""
    teacher, kind = teachers[arch], EXPECTED[arch][0]
    info = teacher.info()
    cfg = RunConfig(scan=ScanSpec(lidar="vlp16", mount="none"))
    results = teacher.predict_with_info(images[:2])
    writer = ShardWriter(tmp_path / "t-000000.tar")
    expected = {}
    for n, (image, (teacher_map, facts)) in enumerate(zip(images[:2], results, strict=True)):
        record = Record(key=f"t-{n}", source="folder", source_path=f"/x/{n}.jpg", rgb=image)
        seed = sample_seed(0, record.key)
        sample = make_sample(record, (teacher_map, facts), cfg, native_K=False, teacher_info=info)
        writer.write(encode_sample(sample))
        ref = _pseudo_depth_reference(kind, teacher_map, info["ceiling_m"], sample_rngs(seed)["depth"])
        expected[record.key] = (teacher_map, ref, facts)
    writer.close()
    assert validate_shard(str(tmp_path / "t-000000.tar")).ok
    samples = list(iter_samples(str(tmp_path)))
    assert len(samples) == 2
    for s in samples:
        teacher_map, ref, facts = expected[s.key]
        assert s.meta["teacher"]["output"] == kind and s.meta["teacher"]["model"] == info["model"]
        for k, v in facts.items():  # Depth Pro: its field of view and focal length, per image
            assert s.meta["teacher"][k] == pytest.approx(v)
        # teacher.png: the raw map, to its 16-bit quantisation
        span = float(teacher_map.max() - teacher_map.min())
        assert np.abs(s.teacher - teacher_map).max() <= span / 65534 + 1e-5 * abs(teacher_map).max()
        # depth.png: the documented conversion, to the depth PNG's 1/256 m
        assert np.abs(s.depth - ref).max() <= 0.5 / DEPTH_SCALE + 1e-4
        if kind == "metric":  # a metric teacher's depth is the pseudo depth
            on = s.depth > 0
            assert on.mean() > 0.5
            np.testing.assert_allclose(s.depth[on], teacher_map[on], atol=0.5 / DEPTH_SCALE + 1e-5)
            assert "near_m" not in s.meta["depth_range"] and s.meta["depth_range"]["scale"] == 1.0
        assert np.count_nonzero(s.sparse) > 0  # the simulated LiDAR hit the pseudo surface
    assert Path(tmp_path / "t-000000.tar").stat().st_size > 0
