import numpy as np
import pytest

from shared.camera import make_K
from shared.scan.lidar import (
    KITTI_MOUNT,
    Mount,
    project_scan,
    sample_mount,
    simulate_scan,
    simulate_sparse_depth,
)
from shared.scan.mesh import Mesh, grid_mesh, poisson_mesh
from shared.scan.patterns import LIDAR_PRESETS, LidarPattern, get_pattern
from shared.scan.spec import ScanSpec

W, H = 160, 120
K = make_K(100.0, 100.0, 79.5, 59.5)       # +-39 deg horizontally, +-31 vertically
K_WIDE = make_K(60.0, 60.0, 79.5, 59.5)    # +-53 / +-45 deg: every preset's rings are in view


def _plane_depth(n, c, K=K, h=H, w=W):
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    return c / (r @ np.asarray(n, np.float64))


def elevation_deg(p):
    return np.degrees(np.arcsin(-p[:, 1] / np.linalg.norm(p, axis=1)))


# ---------------------------------------------------------------------------------------------- patterns

def test_preset_geometry():
    hdl = LIDAR_PRESETS["hdl64"]
    assert hdl.n_rings == 64
    assert hdl.elevations_deg.max() == pytest.approx(2.0) and hdl.elevations_deg.min() == pytest.approx(-24.8)
    gaps = -np.diff(hdl.elevations_deg)
    assert (gaps > 0).all()
    assert gaps[:31].mean() == pytest.approx(1 / 3, abs=0.01) and gaps[32:].mean() == pytest.approx(0.515, abs=0.01)
    assert 0.15 < hdl.azimuth_step_deg < 0.2
    v32 = LIDAR_PRESETS["vlp32"].elevations_deg
    assert len(v32) == 32 and v32.max() == 15 and v32.min() == -25 and np.ptp(np.diff(v32)) > 5  # non-uniform
    np.testing.assert_allclose(np.diff(LIDAR_PRESETS["vlp16"].elevations_deg), -2.0)
    os = LIDAR_PRESETS["os128"].elevations_deg
    assert len(os) == 128 and os.max() == 22.5 and os.min() == -22.5


def test_custom_and_random_specs():
    p = get_pattern("custom:rings=32,vfov=10:-30,az=0.2")
    assert p.n_rings == 32 and p.azimuth_step_deg == 0.2
    np.testing.assert_allclose(p.elevations_deg[[0, -1]], [10, -30])
    q = get_pattern("custom:elev=2:0:-2.5,az=0.5")
    np.testing.assert_allclose(q.elevations_deg, [2, 0, -2.5])
    with pytest.raises(ValueError):
        get_pattern("custom:rings=8,bogus=1")
    with pytest.raises(ValueError):
        get_pattern("hdl65")
    with pytest.raises(ValueError):
        get_pattern("random")
    a, b = get_pattern("random", np.random.default_rng(3)), get_pattern("random", np.random.default_rng(3))
    assert a.elevations_deg.tobytes() == b.elevations_deg.tobytes() and a.azimuth_step_deg == b.azimuth_step_deg
    rng = np.random.default_rng(4)
    for _ in range(50):
        r = get_pattern("random", rng)
        assert 8 <= r.n_rings <= 128 and 0.1 <= r.azimuth_step_deg <= 0.4
        assert 15 - 1e-9 <= np.ptp(r.elevations_deg) <= 45 + 1e-9


def test_rays_follow_the_pattern():
    p = LIDAR_PRESETS["vlp16"]
    d, ring = p.rays(-10.0, 10.0, phase_deg=0.05)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0)
    np.testing.assert_allclose(elevation_deg(d), p.elevations_deg[ring], atol=1e-9)
    az = np.degrees(np.arctan2(d[:, 0], d[:, 2]))
    assert az.min() >= -10 and az.max() <= 10
    k = (az - 0.05) / 0.2
    np.testing.assert_allclose(k, np.round(k), atol=1e-6)
    assert len(d) == 16 * 100


def test_explicit_direction_pattern():
    dirs = np.array([[0, 0, 1], [0.1, -0.05, 1], [-0.2, 0.1, 1], [1, 0, -1]], float)
    p = LidarPattern("dirs", [], 1.0, directions=dirs, direction_ring=[0, 1, 2, 3])
    depth = np.full((H, W), 6.0, np.float32)
    scan = simulate_scan(grid_mesh(depth, K), p, Mount(), K, W, H, np.random.default_rng(0))
    assert sorted(scan.ring.tolist()) == [0, 1, 2]   # the backward ray is outside the camera's view
    np.testing.assert_allclose(scan.points_cam[:, 2], 6.0, atol=1e-3)


def test_mount_sampling():
    rng = np.random.default_rng(0)
    for _ in range(100):
        m = sample_mount(rng)
        R, t = m.R_cam_from_lidar, m.t_cam_from_lidar
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)
        angle = np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1)))
        assert angle <= np.sqrt(3) * 1.0 + 1e-9
        assert 0.02 <= abs(t[1]) <= 0.3 and abs(t[0]) <= 0.1 and -0.3 <= t[2] <= 0.05
    a, b = sample_mount(np.random.default_rng(5)), sample_mount(np.random.default_rng(5))
    assert a.to_dict() == b.to_dict()
    np.testing.assert_allclose(KITTI_MOUNT.t_cam_from_lidar, [0.06, -0.08, -0.27])


# ---------------------------------------------------------------------------------------------- exact geometry

@pytest.mark.parametrize("preset", ["hdl64", "vlp16"])
def test_fronto_parallel_plane_exact(preset):
    depth = np.full((H, W), 7.25, np.float32)
    sparse, info = simulate_sparse_depth(depth, K, np.random.default_rng(0), ScanSpec(lidar=preset, mount="none"))
    vals = sparse[sparse > 0]
    assert len(vals) > 300
    np.testing.assert_allclose(vals, 7.25, atol=1e-3)
    # the azimuth window reaches both image borders
    cols = np.flatnonzero((sparse > 0).any(0))
    assert cols.min() <= 3 and cols.max() >= W - 4


@pytest.mark.parametrize("mount", [Mount(), Mount(np.eye(3), [0.05, -0.2, -0.1])])
def test_tilted_plane_matches_analytic_ranges(mount):
    n = np.array([0.3, -0.2, 1.0])
    n /= np.linalg.norm(n)
    c = 6.0
    depth = _plane_depth(n, c).astype(np.float32)
    scan = simulate_scan(grid_mesh(depth, K), LIDAR_PRESETS["hdl64"], mount, K, W, H, np.random.default_rng(1))
    assert len(scan.range_m) > 1000
    o = mount.t_cam_from_lidar
    t_true = (c - n @ o) / (scan.directions_cam @ n)   # ray-plane intersection, written out
    np.testing.assert_allclose(scan.range_m, t_true, atol=1e-3)
    np.testing.assert_allclose(scan.points_cam @ n, c, atol=1e-3)
    # the sparse map holds exactly those depths at the projected pixels
    sparse = project_scan(scan.points_cam, K, W, H)
    u = np.floor(K[0, 0] * scan.points_cam[:, 0] / scan.points_cam[:, 2] + K[0, 2] + 0.5).astype(int)
    v = np.floor(K[1, 1] * scan.points_cam[:, 1] / scan.points_cam[:, 2] + K[1, 2] + 0.5).astype(int)
    ok = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    ref = np.zeros((H, W))
    for ui, vi, zi in zip(u[ok], v[ok], scan.points_cam[ok, 2], strict=True):  # plain reference: nearest wins
        if ref[vi, ui] == 0 or zi < ref[vi, ui]:
            ref[vi, ui] = zi
    np.testing.assert_allclose(sparse, ref, atol=1e-5)


ZW = 12.0  # the wall's depth


def _box_and_wall():
    """A box x in [-0.5, 0.5], y in [-1, 1], z in [4, 5] in front of a wall at z = ZW."""
    c = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-1.0, 1.0) for z in (4.0, 5.0)])
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    tb = [t for a, b, cc, d in faces for t in ((a, b, cc), (a, cc, d))]
    wall = np.array([[-30, -30, ZW], [30, -30, ZW], [30, 30, ZW], [-30, 30, ZW]])
    return Mesh.concat([Mesh(c, tb), Mesh(wall, [[0, 1, 2], [0, 2, 3]])])


def _first_hit(o, d):
    """Analytic first hit of rays o + t d with the box (slabs) and the wall plane."""
    lo, hi = np.array([-0.5, -1.0, 4.0]), np.array([0.5, 1.0, 5.0])
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - o) / d, (hi - o) / d
    tn, tf = np.minimum(t1, t2).max(1), np.maximum(t1, t2).min(1)
    t_box = np.where((tn <= tf) & (tn > 0), tn, np.inf)
    t_wall = (ZW - o[2]) / d[:, 2]
    return np.minimum(t_box, t_wall), t_box < t_wall


# The box's silhouette in the camera: u in 79.5 +- 12.5, v in 59.5 +- 25 (front face at z = 4).
SIL = (slice(int(59.5 - 25) + 2, int(59.5 + 25) - 1), slice(int(79.5 - 12.5) + 2, int(79.5 + 12.5) - 1))


def test_box_wall_zero_offset_zbuffer_has_no_wall_inside_the_box():
    mesh = _box_and_wall()
    scan = simulate_scan(mesh, LIDAR_PRESETS["os128"], Mount(), K, W, H, np.random.default_rng(0))
    t, on_box = _first_hit(scan.origin_cam, scan.directions_cam)
    np.testing.assert_allclose(scan.range_m, t, atol=1e-3)
    for occ in ("none", "zbuffer"):
        sparse = project_scan(scan.points_cam, K, W, H, occ, mesh=mesh)
        inside = sparse[SIL]
        assert (inside > 0).sum() > 50
        assert inside[inside > 0].max() <= 5.0 + 1e-3  # box depths only
    assert (project_scan(scan.points_cam, K, W, H) > ZW - 0.01).sum() > 100  # the wall is there elsewhere


def test_box_wall_vertical_offset_parallax_points_where_geometry_says():
    mesh = _box_and_wall()
    lift = 0.3  # the LiDAR 0.3 m above the camera sees over the box's top edge
    # Rings 1 deg (1.75 px) apart, so the wall points that pass over the box are not hidden in the
    # sparse map behind box points of a neighbouring ring on the same pixel.
    pat = get_pattern("custom:rings=21,vfov=10:-10,az=0.3")
    scan = simulate_scan(mesh, pat, Mount(np.eye(3), [0, -lift, 0]), K, W, H, np.random.default_rng(0))
    t, on_box = _first_hit(scan.origin_cam, scan.directions_cam)
    np.testing.assert_allclose(scan.range_m, t, atol=1e-3)  # every return where the geometry puts it
    p = scan.points_cam
    # Hidden from the camera: the segment camera -> point passes through the box.
    _, blocked = _first_hit(np.zeros(3), p / np.linalg.norm(p, axis=1, keepdims=True))
    hidden = blocked & ~on_box
    assert hidden.sum() > 10
    # Analytically, the camera sees the wall down to y_cam = -1 * ZW/4 above the box (its top front
    # edge), the LiDAR down to y_lid = -lift + (-1 + lift) * ZW/4: hidden points lie in that band,
    # behind the box laterally.
    y_cam, y_lid = -ZW / 4, -lift + (-1 + lift) * ZW / 4
    assert (p[hidden, 1] >= y_cam - 1e-3).all() and (p[hidden, 1] <= y_lid + 1e-3).all()
    assert (np.abs(p[hidden, 0]) <= 0.5 * ZW / 4 + 1e-3).all()
    assert (np.abs(p[hidden, 2] - ZW) < 1e-3).all()
    # The other way round: no wall point behind the box below the LiDAR's line of sight over it.
    wall = ~on_box & (np.abs(p[:, 0]) < 0.5)
    below_top = wall & (p[:, 1] > y_lid + 1e-3) & (p[:, 1] < 1.0)
    assert not below_top.any()
    none = project_scan(p, K, W, H, "none")
    zbuf = project_scan(p, K, W, H, "zbuffer", mesh=mesh)
    assert (none[SIL] > ZW - 0.01).sum() > 5     # parallax: wall depths inside the box's silhouette
    assert (zbuf[SIL] > 5.0 + 1e-3).sum() == 0  # removed when the camera's view is respected
    # zbuffer by the dense depth map agrees on this scene
    zbuf_map = project_scan(p, K, W, H, "zbuffer", depth_m=_camera_depth(mesh))
    assert (zbuf_map[SIL] > 5.0 + 1e-3).sum() == 0


@pytest.mark.parametrize("caster", ["heightfield", "open3d"])
def test_hidden_geometry_puts_the_wall_behind_the_box_edge(caster):
    """The LiDAR 0.3 m above the camera sees the wall over the box's top edge. From the depth map alone
    (the camera's view), the hidden layer gives those returns on the wall's plane, where the exact scene
    puts them; without it they are missing."""
    from shared.scan.heightfield import grid_surface
    from shared.scan.hidden import hidden_layer

    mesh = _box_and_wall()
    lift = 0.3
    mount = Mount(np.eye(3), [0, -lift, 0])
    pat = get_pattern("custom:rings=21,vfov=10:-10,az=0.3")
    depth = _camera_depth(mesh).astype(np.float32)
    layer1 = hidden_layer(depth, K, mount.t_cam_from_lidar)
    assert (layer1 > 0).any() and np.allclose(layer1[layer1 > 0], ZW, rtol=1e-5)  # the wall, extended
    y_cam, y_lid = -ZW / 4, -lift + (-1 + lift) * ZW / 4  # the band of wall only the LiDAR sees (see above)

    def behind_the_box(scan):
        p = scan.points_cam
        _, blocked = _first_hit(np.zeros(3), p / np.linalg.norm(p, axis=1, keepdims=True))
        return p[blocked & (p[:, 2] > 5.0 + 1e-3)]

    def scan(layer):
        surf = grid_surface(depth, K, layer)
        return simulate_scan(surf if caster == "heightfield" else surf.to_mesh(), pat, mount, K, W, H,
                             np.random.default_rng(0))

    with_hidden, without = scan(layer1), scan(None)
    truth = behind_the_box(simulate_scan(mesh, pat, mount, K, W, H, np.random.default_rng(0)))
    seen = behind_the_box(with_hidden)
    assert len(truth) > 10 and len(behind_the_box(without)) == 0
    np.testing.assert_allclose(seen[:, 2], ZW, atol=1e-3)                   # on the wall's plane
    assert (seen[:, 1] >= y_cam - 1e-3).all() and (seen[:, 1] <= y_lid + 1e-3).all()
    assert len(seen) >= 0.9 * len(truth)  # the band's pixel edges may lose a ray or two
    # the returns elsewhere are those of the plain grid mesh
    t_with, t_without = with_hidden.points_cam, without.points_cam
    assert len(t_with) == len(t_without) + len(seen)


def _camera_depth(mesh):
    from shared.scan.lidar import cast_rays
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    t = cast_rays(mesh, np.zeros(3), d + 1e-7)
    return np.where(np.isfinite(t), t, 0).reshape(H, W)


@pytest.mark.parametrize("preset", ["hdl64", "vlp32", "vlp16", "os128", "random"])
def test_rings_hit_a_scene_filling_the_view(preset):
    # With K_WIDE (+-45 deg vertically) every ring of every preset is inside the view, so all count.
    pat = get_pattern(preset, np.random.default_rng(2))
    assert pat.elevations_deg.max() < 45 and pat.elevations_deg.min() > -45
    depth = np.full((H, W), 10.0, np.float32)
    scan = simulate_scan(grid_mesh(depth, K_WIDE), pat, Mount(), K_WIDE, W, H, np.random.default_rng(0))
    el = elevation_deg(scan.points_cam - scan.origin_cam)
    distinct = np.unique(np.round(el, 2))
    assert len(distinct) <= pat.n_rings
    assert len(np.unique(scan.ring)) <= pat.n_rings
    np.testing.assert_allclose(el, pat.elevations_deg[scan.ring], atol=1e-3)
    assert len(distinct) >= 0.9 * pat.n_rings


def test_cull_changes_nothing():
    from datagen.world.scenes import render_scene
    s = render_scene(3, "street", W, H, K)
    m = grid_mesh(s.depth_m, K)
    mount = Mount(np.eye(3), [0.06, -0.25, -0.27])
    for preset in ("hdl64", "vlp16"):
        a = simulate_scan(m, LIDAR_PRESETS[preset], mount, K, W, H, np.random.default_rng(0), cull=True)
        b = simulate_scan(m, LIDAR_PRESETS[preset], mount, K, W, H, np.random.default_rng(0), cull=False)
        assert a.n_triangles < b.n_triangles
        np.testing.assert_array_equal(a.ring, b.ring)
        np.testing.assert_allclose(a.points_cam, b.points_cam, atol=1e-6)


# ---------------------------------------------------------------------------------------------- realism

def test_hdl64_density_on_kitti_like_street_scenes():
    from datagen.world.scenes import render_scene
    Kk = make_K(721.5, 721.5, 609.6, 172.9 - 23.0)  # KITTI cam 2 after the 1216 x 352 bottom crop
    dens = []
    for seed in (0, 1):
        s = render_scene(seed, "street", 1216, 352, Kk)
        _, info = simulate_sparse_depth(s.depth_m, Kk, np.random.default_rng(seed), ScanSpec(lidar="hdl64"),
                                        mount=KITTI_MOUNT)
        dens.append(info["density"])
    print("hdl64 KITTI-like density:", np.round(dens, 4))
    assert 0.04 <= np.mean(dens) <= 0.06  # real KITTI raw scans: ~4-6% of the crop


def test_poisson_and_grid_agree_on_a_smooth_scene():
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    depth = (_plane_depth([0.1, -0.15, 1.0], 8.0) * (1 + 0.05 * np.sin(u / 25.0) * np.cos(v / 30.0))).astype(np.float32)
    spec, mount = ScanSpec(lidar="hdl64"), Mount(np.eye(3), [0, -0.1, 0])
    g, _ = simulate_sparse_depth(depth, K, np.random.default_rng(0), spec, mount=mount)
    p, _ = simulate_sparse_depth(depth, K, np.random.default_rng(0), spec, mount=mount,
                                 surface=poisson_mesh(depth, K, depth=8))
    both = (g > 0) & (p > 0)
    assert both.sum() > 0.8 * (g > 0).sum()
    rel = np.abs(p[both] - g[both]) / g[both]
    assert np.median(rel) < 0.01


def test_noise_and_dropout_statistics():
    depth = np.full((H, W), 10.0, np.float32)
    m = grid_mesh(depth, K)
    pat = LIDAR_PRESETS["os128"]
    clean = simulate_scan(m, pat, Mount(), K, W, H, np.random.default_rng(0))
    noisy = simulate_scan(m, pat, Mount(), K, W, H, np.random.default_rng(0), noise_std_m=0.05)
    resid = noisy.range_m - 10.0 / noisy.directions_cam[:, 2]
    assert abs(resid.std() - 0.05) < 0.005 and abs(resid.mean()) < 0.005
    drop = simulate_scan(m, pat, Mount(), K, W, H, np.random.default_rng(0), dropout=0.3)
    assert abs(len(drop.range_m) / len(clean.range_m) - 0.7) < 0.03
    near = simulate_scan(m, pat, Mount(), K, W, H, np.random.default_rng(0), max_range_m=11.0)
    assert (near.range_m <= 11.0).all() and len(near.range_m) < len(clean.range_m)


def test_same_seed_same_bytes():
    depth = _plane_depth([0.1, -0.3, 1.0], 5.0).astype(np.float32)
    spec = ScanSpec(lidar="random", mount="random", noise_std_m=0.02, dropout=0.1)
    a, ia = simulate_sparse_depth(depth, K, np.random.default_rng(9), spec)
    b, ib = simulate_sparse_depth(depth, K, np.random.default_rng(9), spec)
    c, _ = simulate_sparse_depth(depth, K, np.random.default_rng(10), spec)
    assert a.tobytes() == b.tobytes() and ia == ib
    assert a.tobytes() != c.tobytes()
    assert ia["n_points"] == int((a > 0).sum()) and ia["rings"] == len(ia["pattern"]["elevations_deg"])
    assert np.asarray(ia["pose"]["R_cam_from_lidar"]).shape == (3, 3)


def test_project_scan_nearest_per_pixel_and_bounds():
    pts = np.array([[0.0, 0.0, 5.0], [0.0, 0.0, 3.0], [0.01, 0.0, 4.0], [0.0, 0.0, -2.0], [100.0, 0.0, 1.0]])
    out = project_scan(pts, K, W, H)
    assert out[60, 80] == pytest.approx(3.0)   # (79.5 + 0.5 rounds up to 80, 60)
    assert (out > 0).sum() == 1                 # 0.01 m at 4 m is 0.25 px: same pixel
    with pytest.raises(ValueError):
        project_scan(pts, K, W, H, "zbuffer")
