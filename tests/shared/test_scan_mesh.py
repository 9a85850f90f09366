import numpy as np
import pytest

from shared.camera import backproject, make_K
from shared.scan.lidar import cast_rays
from shared.scan.mesh import Mesh, build_mesh, grid_mesh, poisson_mesh

H, W = 30, 40
K = make_K(40.0, 40.0, 19.5, 14.5)


def _plane_depth(n, c, K=K, h=H, w=W):
    """Depth of the plane n . X = c at every pixel: z = c / (n . K^-1 (u, v, 1))."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    return c / (r @ np.asarray(n, np.float64))


def test_full_grid_counts_and_vertices():
    depth = np.full((H, W), 5.0, np.float32)
    m = grid_mesh(depth, K)
    assert m.vertices.dtype == np.float32 and m.triangles.dtype == np.int32
    assert m.n_triangles == 2 * (H - 1) * (W - 1)
    np.testing.assert_allclose(m.vertices, backproject(depth, K).reshape(-1, 3), atol=1e-5)
    # every triangle faces the camera: normal . centroid < 0
    v = m.vertices.astype(np.float64)[m.triangles]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    assert (np.einsum("ij,ij->i", n, v.mean(1)) < 0).all()


def test_rays_from_camera_recover_the_depth_map():
    """The grid mesh passes through every pixel's point: casting pixel rays gives the depth back."""
    rng = np.random.default_rng(0)
    depth = _plane_depth([0.1, -0.3, 1.0], 6.0) + 0.05 * rng.random((H, W))
    m = grid_mesh(depth, K, max_grazing_deg=89.9)
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    # Rays exactly through a vertex can slip between its triangles (Embree is not watertight at
    # vertices), so aim 1/1000 px off each pixel centre: the depth there differs by < 1e-5 relative.
    u, v = u + 1e-3, v + 2e-3
    d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    t = cast_rays(m, np.zeros(3), d).reshape(H, W)  # direction z = 1: distance = depth
    np.testing.assert_allclose(t[:-1, :-1], depth[:-1, :-1], rtol=1e-4)


def test_invalid_pixel_removes_only_its_triangles():
    depth = np.full((H, W), 5.0, np.float32)
    depth[10, 10] = 0
    m = grid_mesh(depth, K)
    # the four blocks around the pixel each lose one triangle (the diagonal avoids the bad corner)
    assert m.n_triangles == 2 * (H - 1) * (W - 1) - 4
    assert len(m.vertices) == H * W - 1
    depth[10, 10] = np.nan
    assert grid_mesh(depth, K).n_triangles == 2 * (H - 1) * (W - 1) - 4


def test_depth_step_is_cut_exactly_at_the_step():
    depth = np.full((H, W), 4.0, np.float32)
    depth[:, 20:] = 4.0 * 1.2  # a 20% jump between columns 19 and 20
    m = grid_mesh(depth, K, max_rel_jump=0.1)
    assert m.n_triangles == 2 * (H - 1) * (W - 2)  # one column of blocks lost
    z = m.vertices[m.triangles][..., 2]
    assert (z.max(1) - z.min(1) < 1e-5).all()
    assert grid_mesh(depth, K, max_rel_jump=0.25, max_grazing_deg=89.99).n_triangles == 2 * (H - 1) * (W - 1)


def test_grazing_faces_are_dropped():
    # A narrow camera (+-1.1 deg) looking at a plane whose normal is 87 deg off the optical axis:
    # every face is seen at 87 +- 1.2 deg, so all go at a limit of 85 and all stay at 89.
    Kn = make_K(1000.0, 1000.0, 19.5, 14.5)
    n = np.array([0.0, np.sin(np.radians(87.0)), np.cos(np.radians(87.0))])
    depth = _plane_depth(n, 1.0, K=Kn)
    assert (depth > 0).all()
    full = 2 * (H - 1) * (W - 1)
    assert grid_mesh(depth, Kn, max_grazing_deg=85.0, max_rel_jump=10).n_triangles == 0
    assert grid_mesh(depth, Kn, max_grazing_deg=89.0, max_rel_jump=10).n_triangles == full


def test_stride_uses_true_pixel_coordinates():
    depth = _plane_depth([0.2, 0.1, 1.0], 5.0).astype(np.float32)
    m = grid_mesh(depth, K, stride=2)
    assert m.n_triangles == 2 * (len(range(0, H, 2)) - 1) * (len(range(0, W, 2)) - 1)
    np.testing.assert_allclose(m.vertices, backproject(depth, K)[::2, ::2].reshape(-1, 3), atol=1e-4)


def test_poisson_of_a_plane_lies_on_the_plane():
    depth = _plane_depth([0.0, 0.0, 1.0], 5.0)
    m = poisson_mesh(depth, K, depth=6)
    assert m.n_triangles > 100
    inside = (np.abs(m.vertices[:, 0]) < 1.5) & (np.abs(m.vertices[:, 1]) < 1.0)
    np.testing.assert_allclose(m.vertices[inside, 2], 5.0, atol=0.02)
    g = poisson_mesh(depth, K, depth=6, normals="grid")
    inside = (np.abs(g.vertices[:, 0]) < 1.5) & (np.abs(g.vertices[:, 1]) < 1.0)
    np.testing.assert_allclose(g.vertices[inside, 2], 5.0, atol=0.02)


def test_build_mesh_dispatch_and_concat():
    depth = np.full((H, W), 3.0, np.float32)
    assert build_mesh(depth, K, "grid").n_triangles == grid_mesh(depth, K).n_triangles
    with pytest.raises(ValueError):
        build_mesh(depth, K, "marching")
    a = grid_mesh(depth, K)
    c = Mesh.concat([a, a])
    assert c.n_triangles == 2 * a.n_triangles and c.triangles.max() == 2 * len(a.vertices) - 1


def test_deterministic():
    depth = np.random.default_rng(1).uniform(2, 9, (H, W)).astype(np.float32)
    a, b = grid_mesh(depth, K), grid_mesh(depth, K)
    assert a.vertices.tobytes() == b.vertices.tobytes() and a.triangles.tobytes() == b.triangles.tobytes()
