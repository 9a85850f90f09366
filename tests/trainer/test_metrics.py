"""Metrics: hand-computed values and units, skipped images, the devkit's hole filling, scoring PNG folders."""

import math

import numpy as np
import pytest
from PIL import Image

from trainer.metrics import (
    PRED_FLOOR_M,
    MetricAccumulator,
    fill_invalid_like_devkit,
    format_table,
    kitti_metrics,
    nyu_metrics,
    read_depth_png,
    score_dirs,
)

# 3 valid pixels: errors +1 m, -2 m, 0 m
GT = np.array([[10.0, 20.0], [0.0, 40.0]])
PRED = np.array([[11.0, 18.0], [5.0, 40.0]])


def test_kitti_hand_computed_units():
    m = kitti_metrics(PRED, GT)
    assert m["mae_mm"] == pytest.approx(1000.0 * (1 + 2 + 0) / 3)            # mm, not m
    assert m["rmse_mm"] == pytest.approx(1000.0 * math.sqrt((1 + 4 + 0) / 3))
    # 1/km: 1000 / depth_m.  |1000/11 - 1000/10| = 100/11, |1000/18 - 1000/20| = 50/9
    assert m["imae_per_km"] == pytest.approx((100 / 11 + 50 / 9) / 3)
    assert m["irmse_per_km"] == pytest.approx(math.sqrt(((100 / 11) ** 2 + (50 / 9) ** 2) / 3))
    assert m["irmse_per_km"] == pytest.approx(6.15112, abs=1e-5)


def test_non_positive_prediction_is_floored():
    m = kitti_metrics(np.array([[0.0, -1.0]]), np.array([[2.0, 2.0]]))
    assert m["mae_mm"] == pytest.approx(1000.0 * (2.0 - PRED_FLOOR_M))
    assert m["imae_per_km"] == pytest.approx(1000.0 / PRED_FLOOR_M - 500.0)


def test_nyu_hand_computed():
    gt = np.array([1.0, 2.0, 4.0, 5.0, 0.0]).reshape(1, 5)
    pred = np.array([1.2, 2.0, 2.1, 7.0, 3.0]).reshape(1, 5)  # ratios 1.2, 1, 1.905, 1.4; last has no GT
    m = nyu_metrics(pred, gt)
    assert m["rmse_m"] == pytest.approx(math.sqrt((0.04 + 0 + 1.9**2 + 4.0) / 4))
    assert m["rel"] == pytest.approx((0.2 / 1 + 0 + 1.9 / 4 + 2 / 5) / 4)
    assert (m["delta1"], m["delta2"], m["delta3"]) == (0.5, 0.75, 1.0)


def test_all_invalid_gt_is_skipped_not_zero():
    assert kitti_metrics(PRED, np.zeros_like(GT)) is None
    assert nyu_metrics(PRED, np.zeros_like(GT)) is None
    acc = MetricAccumulator("kitti")
    acc.add(PRED, GT, "a")
    acc.add(PRED, np.zeros_like(GT), "empty")
    acc.add(GT, GT, "perfect")
    r = acc.result()
    assert (r["count"], r["skipped"]) == (2, 1)
    # per image, then the mean over images: the perfect image halves every error
    assert r["metrics"]["mae_mm"] == pytest.approx(1000.0 / 2)
    assert r["metrics"]["rmse_mm"] == pytest.approx(1000.0 * math.sqrt(5 / 3) / 2)
    assert acc.per_image[1] == {"name": "empty", "skipped": True}
    assert MetricAccumulator("nyu").result()["metrics"]["rmse_m"] is None


def _devkit_fill_loops(d):
    """Literal transcription of DepthImage::interpolateBackground (0 in, the devkit's -1 for invalid)."""
    d = np.where(d > 0, d, -1).astype(np.float32)
    h, w = d.shape
    ok = lambda u, v: d[v, u] > 0  # noqa: E731
    for v in range(h):
        count = 0
        for u in range(w):
            if ok(u, v):
                if count >= 1:
                    u1, u2 = u - count, u - 1
                    if u1 > 0 and u2 < w - 1:
                        d[v, u1:u2 + 1] = min(d[v, u1 - 1], d[v, u2 + 1])
                count = 0
            else:
                count += 1
        for u in range(w):
            if ok(u, v):
                d[v, :u] = d[v, u]
                break
        for u in range(w - 1, -1, -1):
            if ok(u, v):
                d[v, u + 1:] = d[v, u]
                break
    for u in range(w):
        for v in range(h):
            if ok(u, v):
                d[:v, u] = d[v, u]
                break
        for v in range(h - 1, -1, -1):
            if ok(u, v):
                d[v + 1:, u] = d[v, u]
                break
    return d


def test_fill_matches_devkit_loops():
    rng = np.random.default_rng(0)
    d = rng.uniform(1, 80, (14, 23)) * (rng.random((14, 23)) < 0.3)
    d[:2] = 0      # empty rows at the top,
    d[-3:] = 0     # at the bottom,
    d[7] = 0       # and in the middle (stays invalid, -1, as in the devkit)
    got = fill_invalid_like_devkit(d)
    np.testing.assert_array_equal(got, _devkit_fill_loops(d))
    assert (got[7] == -1).all() and (got[:7] > 0).all() and (got[8:] > 0).all()
    np.testing.assert_array_equal(fill_invalid_like_devkit(np.array([[10.0, 0.0, 0.0, 12.0]])), [[10, 10, 10, 12]])


def _write_png(path, depth_m):
    Image.fromarray(np.round(np.asarray(depth_m) * 256).astype(np.uint16)).save(path)


def test_score_dirs(tmp_path):
    rng = np.random.default_rng(1)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    expected = MetricAccumulator("kitti")
    for i in range(3):
        gt = rng.uniform(2, 60, (6, 9)) * (rng.random((6, 9)) < 0.4)
        if i == 1:
            gt[:] = 0  # no valid GT: skipped
        pred = rng.uniform(2, 60, (6, 9))
        _write_png(gt_dir / f"{i:04d}.png", gt)
        _write_png(pred_dir / f"{i:04d}.png", pred)
        expected.add(np.round(pred * 256) / 256, np.round(gt * 256) / 256, f"{i:04d}.png")
    _write_png(pred_dir / "extra.png", np.ones((6, 9)))
    r = score_dirs(pred_dir, gt_dir, "kitti")
    assert (r["count"], r["skipped"]) == (2, 1)
    assert r["unused_predictions"] == ["extra.png"]
    for k, v in expected.result()["metrics"].items():
        assert r["metrics"][k] == pytest.approx(v, rel=1e-6)
    assert [p["name"] for p in r["per_image"]] == ["0000.png", "0001.png", "0002.png"]
    assert score_dirs(pred_dir, gt_dir, "nyu")["metrics"]["delta3"] <= 1.0
    table = format_table(r)
    assert "RMSE [mm]" in table and "iRMSE [1/km]" in table and "| 2 | 1 |" in table
    assert len(table.splitlines()) == 3


def test_score_dirs_fills_holes_and_accepts_kitti_names(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    name = "2011_09_26_drive_0002_sync_groundtruth_depth_0000000005_image_02.png"
    _write_png(gt_dir / name, [[10.0, 10.0, 12.0]])
    _write_png(pred_dir / name.replace("groundtruth_depth", "velodyne_raw"), [[10.0, 0.0, 12.0]])
    r = score_dirs(pred_dir, gt_dir)
    assert r["metrics"]["mae_mm"] == 0.0  # the hole took min(10, 12), as the devkit fills it
    np.testing.assert_array_equal(read_depth_png(gt_dir / name), np.array([[10, 10, 12]], np.float32))


def test_score_dirs_scores_an_empty_middle_row_as_the_devkit(tmp_path):
    """Between LiDAR rings whole rows hold no point; the devkit's fill leaves them at -1 m and scores
    them so (not at the 1/256 m floor used for our own non-positive outputs)."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    _write_png(gt_dir / "a.png", [[10.0, 10.0], [11.0, 11.0], [12.0, 12.0]])
    _write_png(pred_dir / "a.png", [[10.0, 10.0], [0.0, 0.0], [12.0, 12.0]])
    m = score_dirs(pred_dir, gt_dir)["metrics"]
    assert m["mae_mm"] == pytest.approx(1000.0 * (2 * 12.0) / 6)  # |-1 - 11| on 2 of 6 pixels
    assert m["imae_per_km"] == pytest.approx((2 * abs(1000.0 / -1 - 1000.0 / 11)) / 6)


def test_score_dirs_errors_name_the_file(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    _write_png(gt_dir / "a.png", np.full((4, 5), 3.0))
    with pytest.raises(FileNotFoundError, match="a.png"):
        score_dirs(pred_dir, gt_dir)
    _write_png(pred_dir / "a.png", np.full((4, 6), 3.0))
    with pytest.raises(ValueError, match="a.png"):
        score_dirs(pred_dir, gt_dir)
    _write_png(pred_dir / "a.png", np.zeros((4, 5)))
    with pytest.raises(ValueError, match="a.png"):
        score_dirs(pred_dir, gt_dir)
