import numpy as np
import pytest

from datagen.disparity import disparity_to_depth
from datagen.lidar import cast_rays
from datagen.synthetic import default_K, oracle_teacher, render_scene

W, H = 160, 120


@pytest.mark.parametrize("family", ["street", "room"])
def test_same_seed_same_bytes(family):
    a, b = render_scene(4, family, W, H), render_scene(4, family, W, H)
    c = render_scene(5, family, W, H)
    assert a.rgb.tobytes() == b.rgb.tobytes() and a.depth_m.tobytes() == b.depth_m.tobytes()
    assert a.mesh.vertices.tobytes() == b.mesh.vertices.tobytes()
    assert a.depth_m.tobytes() != c.depth_m.tobytes()


def test_outputs_and_depth_ranges():
    for seed in range(3):
        s = render_scene(seed, "street", W, H)
        assert s.rgb.shape == (H, W, 3) and s.rgb.dtype == np.uint8
        assert s.depth_m.shape == (H, W) and s.depth_m.dtype == np.float32
        np.testing.assert_array_equal(s.K, default_K("street", W, H))
        valid = s.depth_m[s.depth_m > 0]
        assert 0.01 < (s.depth_m == 0).mean() < 0.6   # some sky, mostly scene
        assert valid.min() >= 1.0 and valid.max() <= 80.0
        assert (s.depth_m[-1] > 0).all()              # the bottom row is road
        r = render_scene(seed, "room", W, H)
        assert (r.depth_m > 0).all()                  # a closed room: no sky
        assert r.depth_m.min() >= 0.5 and r.depth_m.max() <= 10.0


def test_mesh_is_the_rendered_geometry():
    """Casting the camera's rays against SyntheticScene.mesh reproduces depth_m (a 1e-3 px nudge keeps
    rays off shared vertices)."""
    for family in ("street", "room"):
        s = render_scene(1, family, W, H)
        v, u = np.mgrid[0:H, 0:W].astype(np.float64) + 1e-3
        d = np.stack([(u - s.K[0, 2]) / s.K[0, 0], (v - s.K[1, 2]) / s.K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
        t = cast_rays(s.mesh, np.zeros(3), d).reshape(H, W)
        t = np.where(np.isfinite(t), t, 0)
        agree = np.abs(t - s.depth_m) <= 1e-3 * np.maximum(s.depth_m, 1) + 1e-3
        assert agree.mean() > 0.995  # all but pixels on a depth edge, where the nudge changes the surface


def test_image_and_depth_edges_partly_agree():
    s = render_scene(2, "street", W, H)
    gray = s.rgb.astype(np.float64).mean(-1)
    img_edge = np.abs(np.diff(gray, axis=1)) > 20
    d = s.depth_m.astype(np.float64)
    dep_edge = (np.abs(np.diff(d, axis=1)) > 0.05 * np.maximum(d[:, 1:], d[:, :-1])) & (d[:, 1:] > 0) & (d[:, :-1] > 0)
    assert (img_edge & ~dep_edge).sum() > 20     # texture and shadow edges
    assert (img_edge & dep_edge).sum() > 5       # object boundaries
    assert (dep_edge & ~img_edge).sum() > 0      # boundaries that the colours hide


def test_render_accepts_a_given_K():
    from shared.camera import make_K
    K = make_K(120.0, 120.0, 70.0, 50.0)
    s = render_scene(0, "room", W, H, K)
    np.testing.assert_array_equal(s.K, K)


def test_oracle_teacher_is_close_to_but_never_the_truth():
    s = render_scene(0, "street", W, H)
    sky = s.depth_m == 0
    disp = oracle_teacher(s.depth_m, np.random.default_rng(1))
    assert disp.dtype == np.float32 and (disp[sky] == 0).all() and (disp[~sky] > 0).all()
    true = 1.0 / s.depth_m[~sky].astype(np.float64)
    A = np.stack([true, np.ones_like(true)], 1)
    coef, *_ = np.linalg.lstsq(A, disp[~sky].astype(np.float64), rcond=None)
    rel = np.abs(A @ coef - disp[~sky]) / disp[~sky]
    assert coef[0] > 0
    assert np.median(rel) < 0.05   # an affine map of the truth up to a few percent
    assert rel.max() > 1e-3        # but not exactly one
    # no distortion and no blur: exactly affine
    exact = oracle_teacher(s.depth_m, np.random.default_rng(1), distortion=0.0, blur_sigma_px=0.0)
    coef, *_ = np.linalg.lstsq(A, exact[~sky].astype(np.float64), rcond=None)
    np.testing.assert_allclose(A @ coef, exact[~sky], rtol=1e-5)


def test_oracle_then_disparity_to_depth_keeps_the_sky_and_the_order():
    s = render_scene(3, "street", W, H)
    disp = oracle_teacher(s.depth_m, np.random.default_rng(2), blur_sigma_px=0.0, distortion=0.0)
    depth, info = disparity_to_depth(disp, np.random.default_rng(3), scene="outdoor")
    np.testing.assert_array_equal(depth == 0, s.depth_m == 0)
    valid = depth > 0
    # inverse depth stays an exact affine function of the true inverse depth
    A = np.stack([1 / s.depth_m[valid].astype(np.float64), np.ones(valid.sum())], 1)
    coef, *_ = np.linalg.lstsq(A, 1 / depth[valid].astype(np.float64), rcond=None)
    np.testing.assert_allclose(A @ coef, 1 / depth[valid], rtol=1e-4)


def test_oracle_same_seed_same_bytes():
    s = render_scene(0, "room", W, H)
    a = oracle_teacher(s.depth_m, np.random.default_rng(7))
    b = oracle_teacher(s.depth_m, np.random.default_rng(7))
    c = oracle_teacher(s.depth_m, np.random.default_rng(8))
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
