"""The height-field caster against Open3D on the same triangles, and on analytic surfaces."""

import numpy as np
import pytest

from shared.camera import make_K
from shared.scan.heightfield import cast_surface, grid_surface
from shared.scan.lidar import cast_rays
from shared.scan.mesh import grid_mesh

H, W = 30, 40
K = make_K(40.0, 40.0, 19.5, 14.5)


def _plane_depth(n, c):
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    r = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    return (c / (r @ np.asarray(n, np.float64))).astype(np.float32)


def _rays_into_view(rng, n, origin):
    """Directions from origin towards random points in front of the camera, inside and around its view."""
    u = rng.uniform(-5, W + 5, n)
    v = rng.uniform(-5, H + 5, n)
    z = rng.uniform(0.5, 15.0, n)
    target = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], 1)
    d = target - origin
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _random_depth(rng, holes=0.05):
    """Smooth surfaces at several depths with sharp steps (cut by the grid rules) and invalid pixels."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    z = 4.0 + 1.5 * np.sin(u / 6.0 + rng.uniform(0, 6)) + 0.8 * np.cos(v / 5.0)
    for _ in range(4):  # boxes in front, some far behind
        i0, j0 = rng.integers(0, H - 5), rng.integers(0, W - 5)
        z[i0:i0 + rng.integers(3, 12), j0:j0 + rng.integers(3, 15)] *= rng.choice([0.4, 0.7, 2.5])
    z += 0.05 * rng.random((H, W))
    z[rng.random((H, W)) < holes] = 0
    return z.astype(np.float32)


def _compare(surface, origin, d):
    t_fast, n_fast = cast_surface(surface, origin, d)
    t_ref = cast_rays(surface.to_mesh(), origin, d)
    hit_fast, hit_ref = np.isfinite(t_fast), np.isfinite(t_ref)
    both = hit_fast & hit_ref
    return t_fast, n_fast, t_ref, hit_fast != hit_ref, both


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("origin", [(0.0, 0.0, 0.0), (0.06, -0.08, -0.27), (0.4, -0.5, 1.0), (-0.3, 0.2, 2.5)])
def test_equals_open3d_on_random_depth_maps_both_layers(seed, origin):
    rng = np.random.default_rng(seed)
    depth = _random_depth(rng)
    hidden = np.where(rng.random((H, W)) < 0.3, depth * rng.uniform(1.3, 3.0), 0).astype(np.float32)
    surf = grid_surface(depth, K, hidden)
    assert surf.layers[1].n_triangles > 50
    origin = np.asarray(origin)
    d = _rays_into_view(rng, 4000, origin)
    t_fast, n_fast, t_ref, differ, both = _compare(surf, origin, d)
    assert both.sum() > 1000
    # Hits agree to float32 rounding (Open3D casts in float32).
    np.testing.assert_allclose(t_fast[both], t_ref[both], rtol=2e-5)
    # Hit/miss differs only for rays that graze a triangle edge within rounding: at most 1 in 1000.
    assert differ.sum() <= 4
    # Normals are unit, face the ray, and are perpendicular to the hit triangle's plane (checked on a plane below).
    np.testing.assert_allclose(np.linalg.norm(n_fast[np.isfinite(t_fast)], axis=1), 1.0, atol=1e-9)
    assert (np.einsum("ij,ij->i", n_fast, d)[np.isfinite(t_fast)] <= 1e-12).all()


def test_one_layer_equals_grid_mesh_and_open3d_on_a_street_scene():
    from datagen.world.scenes import render_scene

    s = render_scene(4, "street", 160, 120)
    surf = grid_surface(s.depth_m, s.K)
    ref = grid_mesh(s.depth_m, s.K)
    m = surf.to_mesh()
    assert m.vertices.tobytes() == ref.vertices.tobytes() and m.triangles.tobytes() == ref.triangles.tobytes()
    rng = np.random.default_rng(0)
    origin = np.array([0.06, -0.08, -0.27])
    d = rng.normal(size=(20000, 3)) * [0.5, 0.3, 0.0] + [0, 0, 1]
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    t_fast, _, t_ref, differ, both = _compare(surf, origin, d)
    np.testing.assert_allclose(t_fast[both], t_ref[both], rtol=2e-5)
    assert both.sum() > 10000 and differ.sum() <= 20  # 1 in 1000: rays along edges


def test_tilted_plane_exact_ranges_and_normals():
    n = np.array([0.2, -0.4, 1.0])
    n /= np.linalg.norm(n)
    surf = grid_surface(_plane_depth(n, 5.0), K)
    origin = np.array([0.1, -0.2, -0.3])
    d = _rays_into_view(np.random.default_rng(1), 2000, origin)
    t, nrm = cast_surface(surf, origin, d)
    hit = np.isfinite(t)
    assert hit.sum() > 1000
    np.testing.assert_allclose(t[hit], (5.0 - n @ origin) / (d[hit] @ n), rtol=1e-5)
    np.testing.assert_allclose(np.abs(nrm[hit] @ n), 1.0, atol=1e-5)
    # t_max: hits beyond it are misses
    t2, _ = cast_surface(surf, origin, d, t_max=float(np.median(t[hit])))
    assert np.isinf(t2[t > np.median(t[hit])]).all() and (t2[t <= np.median(t[hit])] == t[t <= np.median(t[hit])]).all()


def test_empty_and_degenerate_inputs():
    surf = grid_surface(np.zeros((H, W), np.float32), K)
    t, n = cast_surface(surf, np.zeros(3), np.array([[0.0, 0.0, 1.0]]))
    assert np.isinf(t).all() and (n == 0).all()
    t, _ = cast_surface(grid_surface(np.full((H, W), 3.0, np.float32), K), np.zeros(3), np.zeros((0, 3)))
    assert t.shape == (0,)
    with pytest.raises(ValueError):
        grid_surface(np.ones((H, W), np.float32), K, np.ones((H, W + 1), np.float32))
