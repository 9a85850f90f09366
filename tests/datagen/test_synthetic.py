import numpy as np
import pytest

from datagen.world.scenes import _LAYOUTS, FAMILIES, MAX_DEPTH_M, default_K, render_scene
from shared.scan.lidar import cast_rays

W, H = 160, 120


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_bytes(family):
    a, b = render_scene(4, family, W, H), render_scene(4, family, W, H)
    c = render_scene(5, family, W, H)
    assert a.rgb.tobytes() == b.rgb.tobytes() and a.depth_m.tobytes() == b.depth_m.tobytes()
    assert a.mesh.vertices.tobytes() == b.mesh.vertices.tobytes() and a.object_id.tobytes() == b.object_id.tobytes()
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
    for family in FAMILIES:
        s = render_scene(1, family, W, H)
        v, u = np.mgrid[0:H, 0:W].astype(np.float64) + 1e-3
        d = np.stack([(u - s.K[0, 2]) / s.K[0, 0], (v - s.K[1, 2]) / s.K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
        t = cast_rays(s.mesh, np.zeros(3), d).reshape(H, W)
        t = np.where(np.isfinite(t), t, 0)
        agree = np.abs(t - s.depth_m) <= 1e-3 * np.maximum(s.depth_m, 1) + 1e-3
        assert agree.mean() > 0.995  # all but pixels on a depth edge, where the nudge changes the surface


def test_new_families_have_plausible_depths():
    for seed in range(3):
        n = render_scene(seed, "nature", W, H)
        np.testing.assert_array_equal(n.K, default_K("nature", W, H))
        valid = n.depth_m[n.depth_m > 0]
        assert 0.05 < (n.depth_m == 0).mean() < 0.7          # a sky above the terrain
        assert valid.min() >= 1.0 and valid.max() <= MAX_DEPTH_M["nature"]
        assert valid.max() > 40.0                             # the terrain reaches far
        assert (n.depth_m[-1] > 0).all()                      # the bottom row is ground
        t = render_scene(seed, "tabletop", W, H)
        assert (t.depth_m > 0).all()                          # a closed room: no sky
        assert t.depth_m.min() >= 0.1 and t.depth_m.max() <= 6.0 <= MAX_DEPTH_M["tabletop"]
        assert np.median(t.depth_m) < 1.5                     # a close-up
    with pytest.raises(ValueError, match="family"):
        render_scene(0, "forest", W, H)


@pytest.mark.parametrize("family", FAMILIES)
def test_object_ids_are_the_hit_objects_with_decals_on_their_carriers(family):
    s = render_scene(3, family, W, H)
    assert s.object_id.dtype == np.int32 and s.object_id.shape == (H, W)
    np.testing.assert_array_equal(s.object_id == -1, s.depth_m == 0)  # -1 is the sky, and only the sky
    objs, _ = _LAYOUTS[family](np.random.default_rng(3))  # the same draws as the render's
    assert s.object_id.max() < len(objs) and len(np.unique(s.object_id[s.object_id >= 0])) >= 3
    decals = [i for i, o in enumerate(objs) if o.carrier is not None]
    assert not np.isin(s.object_id, decals).any()        # lane marks, pictures: their carrier's id


def test_street_decals_exist_and_show():
    objs, _ = _LAYOUTS["street"](np.random.default_rng(0))
    road = [o.carrier for o in objs if o.carrier is not None]
    assert road and set(road) == {0}  # lane dashes, carried by the road (object 0)


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


def test_source_carries_object_ids_and_downscale_keeps_them_ids():
    """The synthetic source hands the oracle the scene's object ids; shrinking an unlabelled record shrinks
    them by nearest neighbour (ids are labels: never blended)."""
    from datagen.sample import downscale
    from datagen.sources import get_source
    from datagen.sources.synthetic import DEFAULT_SIZE

    assert set(DEFAULT_SIZE) == set(FAMILIES)
    src = get_source("synthetic", None, count=3, family="nature", width=W, height=H)
    rec = src.load(src.items()[0])
    scene = render_scene(rec.meta["scene_seed"], "nature", W, H)
    np.testing.assert_array_equal(rec.true_object_id, scene.object_id)
    small = downscale(rec, 48)
    assert small.true_object_id.shape == small.true_depth.shape == small.rgb.shape[:2] == (36, 48)
    assert small.true_object_id.dtype == scene.object_id.dtype
    assert set(np.unique(small.true_object_id)) <= set(np.unique(scene.object_id))
    np.testing.assert_array_equal(small.true_object_id == -1, small.true_depth == 0)
