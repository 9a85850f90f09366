"""Teacher map -> pseudo depth for each kind of teacher: disparity, relative depth, metric depth."""

import numpy as np
import pytest

from datagen.disparity import disparity_to_depth, sample_near_far
from datagen.pseudo_depth import SATURATION, metric_to_depth, relative_depth_to_depth, teacher_to_depth
from shared.depth import MAX_DEPTH_M


def ramp(h=24, w=32, lo=2.0, hi=30.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (lo + (hi - lo) * (xx + 2 * yy) / (w - 1 + 2 * (h - 1))).astype(np.float32)


def test_metric_is_used_as_it_is():
    d = ramp()
    depth, info = metric_to_depth(d, np.random.default_rng(0))
    np.testing.assert_array_equal(depth, d)  # no near/far draw, no rescaling
    assert info["scale"] == 1.0 and info["valid_fraction"] == 1.0


def test_metric_marks_no_surface():
    d = ramp()
    d[0, 0], d[0, 1], d[0, 2], d[0, 3] = np.nan, np.inf, 0.0, -1.0
    d[1, 0] = 19.7  # >= 0.98 x a 20 m head: the head's saturation, i.e. sky / beyond its range
    d[1, 1] = 19.5  # just below: a real surface
    d[2, 0] = MAX_DEPTH_M + 1  # beyond what depth.png can hold
    depth, info = metric_to_depth(d, np.random.default_rng(0), ceiling_m=20.0)
    assert np.all(depth[0, :4] == 0) and depth[1, 0] == 0 and depth[1, 1] == np.float32(19.5)
    assert SATURATION * 20.0 == pytest.approx(19.6)
    depth_free, _ = metric_to_depth(d, np.random.default_rng(0))  # no ceiling: only the format's limit
    assert depth_free[1, 0] == np.float32(19.7) and depth_free[2, 0] == 0
    assert 0 < info["valid_fraction"] < 1


def test_metric_scale_jitter_is_seeded_bounded_and_global():
    d = ramp()
    scales = []
    for seed in range(200):
        depth, info = metric_to_depth(d, np.random.default_rng(seed), scale_jitter=0.25)
        np.testing.assert_allclose(depth, d * np.float32(info["scale"]), rtol=1e-6)  # one factor per image
        scales.append(info["scale"])
    again, info = metric_to_depth(d, np.random.default_rng(7), scale_jitter=0.25)
    assert info["scale"] == scales[7]  # same seed, same factor
    assert 1 / 1.25 <= min(scales) < 0.85 and 1.15 < max(scales) <= 1.25  # spans the range, stays inside
    # log-uniform: as many factors above 1 as below
    assert abs(np.mean(np.log(scales))) < 0.05
    with pytest.raises(ValueError, match="scale_jitter"):
        metric_to_depth(d, np.random.default_rng(0), scale_jitter=-0.1)


def test_relative_depth_recovers_an_affine_depth_map():
    true = ramp(lo=3.0, hi=40.0)
    rel = (true - 1.7) / 5.3  # any positive affine map of the true depth
    depth, info = relative_depth_to_depth(rel, np.random.default_rng(0), near_m=3.0, far_m=40.0)
    np.testing.assert_allclose(depth, true, rtol=1e-5)  # affine in depth: the geometry comes back exactly
    assert info["valid_fraction"] == 1.0
    # disparity_to_depth would bend it: inverse depth affine in the map is another scene
    bent, _ = disparity_to_depth(1.0 / rel.clip(1e-3), np.random.default_rng(0), near_m=3.0, far_m=40.0,
                                 sky_threshold=0.0)
    assert np.abs(bent - true).max() > 1.0


def test_relative_depth_draws_near_far_as_disparity_does():
    rel = ramp()
    for scene in ("outdoor", "indoor", "any"):
        near, far, name = sample_near_far(np.random.default_rng(5), scene)
        depth, info = relative_depth_to_depth(rel, np.random.default_rng(5), scene=scene)
        assert (info["near_m"], info["far_m"], info["scene"]) == (near, far, name)
        assert depth.min() == pytest.approx(near, rel=1e-5) and depth.max() == pytest.approx(far, rel=1e-5)
    bad = rel.copy()
    bad[0, 0] = np.nan
    depth, info = relative_depth_to_depth(bad, np.random.default_rng(0))
    assert depth[0, 0] == 0 and info["valid_fraction"] == pytest.approx(1 - 1 / bad.size)
    flat, info = relative_depth_to_depth(np.ones((4, 4)), np.random.default_rng(0))
    assert not flat.any() and info["valid_fraction"] == 0.0


def test_dispatch():
    m = ramp()
    for kind, fn in (("disparity", disparity_to_depth), ("depth", relative_depth_to_depth)):
        a, ia = teacher_to_depth(m, kind, np.random.default_rng(3), scene="indoor")
        b, ib = fn(m, np.random.default_rng(3), scene="indoor")
        np.testing.assert_array_equal(a, b)
        assert ia == ib
    a, _ = teacher_to_depth(m, "metric", np.random.default_rng(3), scale_jitter=0.1, ceiling_m=25.0)
    b, _ = metric_to_depth(m, np.random.default_rng(3), scale_jitter=0.1, ceiling_m=25.0)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="disparity, depth or metric"):
        teacher_to_depth(m, "inverse", np.random.default_rng(0))
