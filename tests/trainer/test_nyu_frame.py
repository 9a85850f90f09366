"""BP-Net's NYUv2 test frame (`--crop bpnet-nyu`): half size, 228 x 304 centre crop, 256 x 320 pad,
K halved and shifted, the same 500 sparse positions in every image. Facts from kakaxi314/BP-Net
datasets/nyu.py (val mode); see docs/finetune.md."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_shards

from shared.camera import make_K
from shared.shard import Sample
from trainer.data import bpnet_nyu_frame, eval_frame, parse_hw
from trainer.evaluate import iter_predictions
from trainer.model import build_model

KINECT = make_K(518.8579, 519.4696, 325.5824, 253.7362)


def nyu_sample(key: str = "nyu-0000", seed: int = 0) -> Sample:
    """A 640 x 480 frame whose GT is linear in the pixel coordinates, with a hole."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:480, 0:640].astype(np.float64)
    gt = (2.0 + 0.004 * v + 0.002 * u).astype(np.float32)
    gt[100:140, 200:260] = 0.0
    rgb = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    return Sample(key=key, rgb=rgb, K=KINECT.copy(), sparse=np.zeros((480, 640), np.float32), gt=gt,
                  meta={"source": "test"})


def test_frame_is_the_halved_centre_crop_padded_to_256x320():
    f = bpnet_nyu_frame(nyu_sample())
    assert f["rgb"].shape == (256, 320, 3) and f["gt"].shape == f["sparse"].shape == (256, 320)
    # halving a linear ramp with any symmetric filter samples it at the centre of each 2 x 2 block:
    # crop pixel (r, c) <- half-size pixel (r + 6, c + 8) <- full-size point (2 (r + 6) + 0.5, 2 (c + 8) + 0.5)
    r, c = np.mgrid[0:228, 0:304].astype(np.float64)
    expect = 2.0 + 0.004 * (2 * (r + 6) + 0.5) + 0.002 * (2 * (c + 8) + 0.5)
    inner = f["gt"][14:242, 8:312]
    far_from_hole = np.ones_like(inner, bool)
    far_from_hole[50 - 6 - 2:70 - 6 + 2, 100 - 8 - 2:130 - 8 + 2] = False
    np.testing.assert_allclose(inner[far_from_hole], expect[far_from_hole], atol=1e-4)
    assert (inner[50 - 6 + 1:70 - 6 - 1, 100 - 8 + 1:130 - 8 - 1] == 0).all()  # the hole stays a hole
    # the pad: zeros for the maps, edge replication for the RGB
    for m in ("gt", "sparse"):
        assert not f[m][:14].any() and not f[m][242:].any() and not f[m][:, :8].any() and not f[m][:, 312:].any()
    assert (f["rgb"][:14] == f["rgb"][14]).all() and (f["rgb"][:, :8] == f["rgb"][:, 8:9]).all()
    assert f["valid"].sum() == 228 * 304 and f["valid"][14:242, 8:312].all()
    assert not f["has_teacher"] and not f["has_depth"]
    assert list(f["box"]) == [0, 0, 256, 320] and list(f["full_hw"]) == [256, 320]


def test_intrinsics_follow_bpnet():
    K = bpnet_nyu_frame(nyu_sample())["K"]
    # BP-Net: K[:2] /= 2 (no half-pixel shift), then cx += 8 - 8 and cy += -6 + 14
    np.testing.assert_allclose(K, [[518.8579 / 2, 0, 325.5824 / 2], [0, 519.4696 / 2, 253.7362 / 2 + 8], [0, 0, 1]])


def test_sparse_input_is_the_same_500_positions_in_every_image():
    a, b = bpnet_nyu_frame(nyu_sample("a", 0)), bpnet_nyu_frame(nyu_sample("b", 1))
    where = np.random.RandomState(0).choice(228 * 304, 500, replace=False)
    rows, cols = where // 304 + 14, where % 304 + 8
    for f in (a, b):
        pattern = np.zeros((256, 320), bool)
        pattern[rows, cols] = True
        assert not f["sparse"][~pattern].any()
        np.testing.assert_array_equal(f["sparse"][pattern], f["gt"][pattern])
    assert 0 < np.count_nonzero(a["sparse"]) <= 500


def test_named_frame_through_the_options_and_clear_errors(tmp_path):
    assert parse_hw("bpnet-nyu") == "bpnet-nyu"
    with pytest.raises(ValueError, match="bpnet-nyu"):
        parse_hw("bpnet-kitti")
    small = Sample(key="tiny-7", rgb=np.zeros((64, 96, 3), np.uint8), K=KINECT.copy(),
                   gt=np.ones((64, 96), np.float32), meta={})
    with pytest.raises(ValueError, match="tiny-7.*640 x 480"):
        eval_frame(small, "bpnet-nyu")


def test_predictions_in_the_bpnet_frame(tmp_path):
    write_shards(tmp_path / "s", 1, 2, h=480, w=640)
    model = build_model("tiny").eval()
    preds = list(iter_predictions(model, str(tmp_path / "s"), crop="bpnet-nyu"))
    assert len(preds) == 2
    for p in preds:
        assert p.depth_m.shape == p.gt.shape == (256, 320) and np.isfinite(p.depth_m).all()
        assert not p.gt[:14].any() and p.gt[14:242, 8:312].any()
