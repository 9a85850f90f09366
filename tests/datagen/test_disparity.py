import numpy as np
import pytest

from datagen.disparity import DEPTH_RANGES, disparity_to_depth


def _scene(rng, h=40, w=60):
    depth = rng.uniform(2.0, 60.0, (h, w))
    depth[:8] = 0  # sky rows
    return depth


def test_inverse_depth_is_affine_in_disparity_and_spans_near_far():
    rng = np.random.default_rng(0)
    true = _scene(rng)
    sky = true == 0
    disp = np.where(sky, 0.0, 3.7 / np.where(sky, 1, true) + 0.05)  # unknown scale and shift
    depth, info = disparity_to_depth(disp, np.random.default_rng(1), scene="outdoor")
    assert (depth[sky] == 0).all() and (depth[~sky] > 0).all()
    assert depth.dtype == np.float32
    np.testing.assert_allclose(depth[~sky].min(), info["near_m"], rtol=1e-6)
    np.testing.assert_allclose(depth[~sky].max(), info["far_m"], rtol=1e-6)
    # 1/depth = a * disp + b exactly (float32 output aside)
    A = np.stack([disp[~sky], np.ones((~sky).sum())], 1)
    coef, *_ = np.linalg.lstsq(A, 1.0 / depth[~sky].astype(np.float64), rcond=None)
    np.testing.assert_allclose(A @ coef, 1.0 / depth[~sky], rtol=1e-5)
    assert coef[0] > 0
    assert info["sky_fraction"] == pytest.approx(sky.mean())


@pytest.mark.parametrize("scene", ["outdoor", "indoor", "any"])
def test_near_far_come_from_the_documented_ranges(scene):
    rng = np.random.default_rng(3)
    disp = np.linspace(0.1, 1.0, 100).reshape(10, 10)
    for _ in range(50):
        _, info = disparity_to_depth(disp, rng, scene=scene)
        r = DEPTH_RANGES[info["scene"]]
        assert r.near_m[0] <= info["near_m"] <= r.near_m[1]
        assert r.far_m[0] <= info["far_m"] <= r.far_m[1]


def test_sky_threshold_and_non_finite_are_invalid():
    disp = np.array([[0.0, 0.01, 0.019, 0.5], [1.0, np.nan, np.inf, 0.25]])
    depth, info = disparity_to_depth(disp, np.random.default_rng(0), sky_threshold=0.02, near_m=1.0, far_m=10.0)
    assert (depth[0, :3] == 0).all() and depth[1, 1] == 0 and depth[1, 2] == 0
    assert depth[1, 0] == pytest.approx(1.0) and depth[0, 3] > depth[1, 0]
    # the smallest valid disparity (0.25) is the far plane
    assert depth[1, 3] == pytest.approx(10.0)


def test_same_seed_same_bytes():
    disp = np.random.default_rng(5).random((30, 40))
    a, ia = disparity_to_depth(disp, np.random.default_rng(11))
    b, ib = disparity_to_depth(disp, np.random.default_rng(11))
    c, _ = disparity_to_depth(disp, np.random.default_rng(12))
    assert a.tobytes() == b.tobytes() and ia == ib and a.tobytes() != c.tobytes()


def test_degenerate_inputs():
    d, info = disparity_to_depth(np.full((4, 4), np.nan), np.random.default_rng(0))
    assert (d == 0).all() and info["valid_fraction"] == 0
    d, _ = disparity_to_depth(np.ones((4, 4)), np.random.default_rng(0))
    assert (d == 0).all()
