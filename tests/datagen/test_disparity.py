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
    d, info = disparity_to_depth(np.zeros((4, 4)), np.random.default_rng(0))  # all sky
    assert (d == 0).all() and info["sky_fraction"] == 1
    d, _ = disparity_to_depth(-np.ones((4, 4)), np.random.default_rng(0))  # nothing in front of infinity
    assert (d == 0).all()
    d, info = disparity_to_depth(np.ones((4, 4)), np.random.default_rng(0), near_m=2.0, far_m=9.0)
    assert (d == 2.0).all() and info["valid_fraction"] == 1  # a constant map: one plane, at near


def _true_disparity_maps():
    """(name, relative disparity, has-surface mask) of sky-free and sky maps: affine maps of 1/depth."""
    from datagen.teachers.oracle import oracle_teacher
    from datagen.world.scenes import render_scene

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64] / np.array([47.0, 63.0])[:, None, None]
    room = 0.5 + 9.5 * (1 - yy) * (0.5 + 0.5 * xx)             # 0.5-10 m, the far wall at the top left
    street = 2.0 / (0.03 + yy)                                 # ground up to ~67 m, no sky in view
    out = []
    for name, depth, scale, shift in (("room", room, 3.1, 0.0), ("street-no-sky", street, 40.0, 0.2)):
        out.append((name, scale / depth + shift, np.ones(depth.shape, bool)))
    for fam in ("room", "street"):  # the synthetic world through the oracle teacher (its default errors)
        s = render_scene(5, fam, 96, 64)
        out.append((f"synthetic-{fam}", oracle_teacher(s.depth_m, rng), s.depth_m > 0))
    s = render_scene(5, "street", 96, 64)
    below = s.depth_m[40:]  # the rows below the horizon: a street photo without sky
    assert (below > 0).all()
    out.append(("synthetic-street-below-horizon", oracle_teacher(below, rng), np.ones(below.shape, bool)))
    return out


@pytest.mark.parametrize("case", range(5))
def test_sky_is_what_has_no_surface(case):
    """A sky-free map keeps every pixel (its farthest surface too); a map with sky drops exactly the sky.
    The old rule (the farthest 2% of the min-max range) deleted the far wall of every sky-free image."""
    name, disp, surface = _true_disparity_maps()[case]
    depth, info = disparity_to_depth(disp, np.random.default_rng(1), scene="any")
    np.testing.assert_array_equal(depth > 0, surface, err_msg=name)
    assert info["valid_fraction"] == pytest.approx(surface.mean())
    # the farthest surface is placed at `far`, whatever the map's own minimum
    assert depth[surface].max() == pytest.approx(info["far_m"], rel=1e-5)
