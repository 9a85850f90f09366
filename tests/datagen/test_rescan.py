"""A shard's scan can be cast again from the shard alone: the trainer's loader code (trainer.data.rescan_frame)
with the spec and seed a sample records in meta.json gives the shard's own sparse.png, byte for byte, for every
kind of scan datagen makes (spinning presets, random patterns and mounts, Livox, line scans, pixel protocols,
pattern files, Poisson, realistic sensors that read the JPEG-stored image, noise and dropout overrides)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from datagen.job.pipeline import process_shard
from datagen.job.settings import RunConfig
from datagen.sources import get_source
from datagen.teachers.runner import OracleTeacher
from shared.depth import encode_depth_png
from shared.scan.patterns import get_pattern, save_pattern
from shared.scan.sensor import get_sensor
from shared.scan.spec import ScanSpec
from shared.seeds import sample_rngs
from shared.shard import iter_samples
from trainer.data import frame_sample, rescan_frame


def _pattern_file(path) -> str:
    pat = get_pattern("vlp32")
    pat.sensor = get_sensor("realistic:mixed_returns=0.5")
    save_pattern(pat, path)
    return str(path)


SPECS = {
    "default": {},
    "random-realistic": {"lidar": "random", "sensor": "realistic"},  # dark-surface dropout reads the image
    "livox-kitti": {"lidar": "livox:t=0.05", "mount": "kitti"},
    "lines-none-zbuffer": {"lidar": "lines:n=6,vfov=-15:5", "mount": "none", "occlusion": "zbuffer"},
    "noise-dropout": {"lidar": "vlp16", "noise_std_m": 0.05, "dropout": 0.2, "hidden": False},
    "points": {"lidar": "points:150"},
    "keypoints": {"lidar": "keypoints:40"},
    "file-own-sensor": {"lidar": "FILE"},
    "poisson": {"mesh": "poisson", "mount": "kitti"},
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_loader_casts_the_shards_own_scan_again(tmp_path, name):
    kw = dict(SPECS[name])
    if kw.get("lidar") == "FILE":
        kw["lidar"] = _pattern_file(tmp_path / "mine.json")
    spec = ScanSpec(**kw)
    n = 2 if name == "poisson" else 4
    items = get_source("synthetic", None, count=n, width=96, height=64, family="mixed", camera="random").items()
    cfg = RunConfig(source="synthetic", seed=5, scan=spec, progress="none",
                    source_options={"width": 96, "height": 64, "count": n, "family": "mixed", "camera": "random"})
    process_shard(cfg, 0, items, None, OracleTeacher().info(), str(tmp_path / "out"))
    samples = list(iter_samples(str(tmp_path / "out")))
    assert len(samples) == n
    for s in samples:
        lidar = s.meta["lidar"]
        assert ScanSpec.from_dict(lidar["spec"]) == spec
        frame = frame_sample(s, (s.height, s.width), 0, 0)  # the whole image: no crop, no padding
        again = rescan_frame(frame, ScanSpec.from_dict(lidar["spec"]), sample_rngs(lidar["seed"])["lidar"])
        assert np.count_nonzero(s.sparse) > 10
        assert encode_depth_png(again) == encode_depth_png(s.sparse), s.key
        # and another seed gives another scan (the comparison can fail)
        other = rescan_frame(frame, spec, sample_rngs(lidar["seed"] + 1)["lidar"])
        if name not in ("keypoints", "lines-none-zbuffer"):  # the image's corners; fixed rays, fixed mount, ideal
            assert encode_depth_png(other) != encode_depth_png(s.sparse), s.key
