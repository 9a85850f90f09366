import json

import numpy as np
import pytest

from shared.camera import make_K
from shared.scan.lidar import Mount, simulate_scan, simulate_sparse_depth
from shared.scan.mesh import Mesh
from shared.scan.patterns import (
    LIVOX_FOV_DEG,
    LidarPattern,
    density_pattern,
    fov_coverage,
    get_pattern,
    load_pattern,
    save_pattern,
)
from shared.scan.spec import ScanSpec


def _az_el(d):
    return np.degrees(np.arctan2(d[:, 0], d[:, 2])), np.degrees(np.arctan2(-d[:, 1], np.hypot(d[:, 0], d[:, 2])))


# ---------------------------------------------------------------------------------------------- rosette

def test_rosette_coverage_grows_with_time_and_stays_in_the_fov():
    cov = []
    for t in (0.05, 0.1, 0.5, 1.0):
        p = get_pattern(f"livox:t={t}")
        assert len(p.directions) == round(t * 240_000)
        az, el = _az_el(p.directions)
        # inside the stated 70.4 x 77.2 ellipse (hence inside the box)
        assert ((az / 35.2) ** 2 + (el / 38.6) ** 2).max() <= 1 + 1e-9
        assert np.abs(az).max() <= 35.2 + 1e-9 and np.abs(el).max() <= 38.6 + 1e-9
        cov.append(fov_coverage(p.directions, LIVOX_FOV_DEG))
    print("rosette coverage at 0.05/0.1/0.5/1 s:", np.round(cov, 3))
    assert all(a < b for a, b in zip(cov, cov[1:], strict=False))
    assert 0.15 <= cov[1] <= 0.25 and cov[3] >= 0.9      # Livox: ~20% at 0.1 s, > 90% at 1 s
    # a non-repetitive scan: it reaches the far edge of the field too (not only the centre)
    assert cov[3] > 0.9


def test_rosette_spec_options():
    p = get_pattern("livox:points=5000,fov=40x30")
    assert len(p.directions) == 5000
    az, el = _az_el(p.directions)
    assert np.abs(az).max() <= 20 + 1e-9 and np.abs(el).max() <= 15 + 1e-9 and np.ptp(az) > 35
    a, b = get_pattern("livox:t=0.01"), get_pattern("livox:t=0.01,start=0")
    np.testing.assert_array_equal(a.directions, b.directions)            # no rng: start 0
    r1 = get_pattern("livox:t=0.01", np.random.default_rng(1))
    r2 = get_pattern("livox:t=0.01", np.random.default_rng(1))
    np.testing.assert_array_equal(r1.directions, r2.directions)          # same seed, same scan
    assert not np.array_equal(r1.directions, a.directions)               # each scan starts elsewhere
    with pytest.raises(ValueError):
        get_pattern("livox:t=0.1,points=10")
    with pytest.raises(ValueError):
        get_pattern("livox:bogus=1")


# ---------------------------------------------------------------------------------------------- line scan

def test_linescan_has_n_lines_inside_its_field():
    p = get_pattern("lines:n=4,vfov=-10:10,az=0.1,hfov=120")
    az, el = _az_el(p.directions)
    lines = np.unique(np.round(el, 9))
    assert len(lines) == 4
    np.testing.assert_allclose(np.sort(lines), [-10, -10 / 3, 10 / 3, 10], atol=1e-9)
    assert az.min() >= -60 - 1e-9 and az.max() <= 60 + 1e-9 and np.ptp(az) == pytest.approx(120)
    k = az / 0.1
    np.testing.assert_allclose(k, np.round(k), atol=1e-6)
    assert len(p.directions) == 4 * 1201
    np.testing.assert_allclose(el, p.elevations_deg[p.direction_ring], atol=1e-9)
    q = get_pattern("lines:n=7,vfov=2:-3,hfov=30")
    assert len(np.unique(np.round(_az_el(q.directions)[1], 9))) == 7 and q.n_rings == 7


# ---------------------------------------------------------------------------------------------- files

def _density():
    az_e = np.arange(-30, 31, 1.0)
    el_e = np.arange(-15, 6, 1.0)
    counts = np.random.default_rng(0).integers(0, 5, size=(len(el_e) - 1, len(az_e) - 1))
    return density_pattern(az_e, el_e, counts, n_rays=3000, seed=7, name="dens")


@pytest.mark.parametrize("make", [
    lambda: get_pattern("vlp32"),
    lambda: get_pattern("random", np.random.default_rng(5)),
    lambda: get_pattern("livox:t=0.02", np.random.default_rng(3)),
    lambda: get_pattern("lines:n=3,vfov=-5:5,az=0.25,hfov=60"),
    _density,
], ids=["spinning", "random", "rosette", "lines", "density"])
def test_pattern_files_round_trip_exactly(tmp_path, make):
    p = make()
    path = tmp_path / "p.json"
    save_pattern(p, path)
    q = get_pattern(str(path))
    assert q.spinning == p.spinning
    for args in [(-180.0, 180.0, 0.0), (-20.0, 30.0, 0.07, -10.0, 4.0)]:
        dp, rp = p.rays(*args)
        dq, rq = q.rays(*args)
        assert len(dp) > 0
        np.testing.assert_array_equal(dp, dq)
        np.testing.assert_array_equal(rp, rq)
    np.testing.assert_array_equal(p.elevations_deg, q.elevations_deg)
    assert p.azimuth_step_deg == q.azimuth_step_deg
    kind = json.loads(path.read_text())["type"]
    assert kind == {True: "spinning", False: "density" if p.source else "directions"}[p.spinning]


def test_handwritten_files_and_density_sampling(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"type": "spinning", "elevations_deg": [1, 0, -1.5],
                                                  "azimuth_step_deg": 0.5}))
    s = load_pattern(tmp_path / "s.json")
    assert s.name == "s" and s.n_rings == 3 and s.azimuth_step_deg == 0.5
    (tmp_path / "d.json").write_text(json.dumps({"type": "directions", "directions": [[0, 0, 2], [1, 0, 1]]}))
    d = get_pattern(str(tmp_path / "d.json"))
    np.testing.assert_allclose(d.directions, [[0, 0, 1], [2 ** -0.5, 0, 2 ** -0.5]])
    # a density with mass in two cells only: every ray lands in one of them, in proportion
    counts = np.zeros((2, 3))
    counts[0, 0], counts[1, 2] = 1, 3
    p = density_pattern([-3, -1, 1, 3], [-2, 0, 2], counts, n_rays=4000, seed=1)
    az, el = _az_el(p.directions)
    a = (az >= -3) & (az <= -1) & (el >= -2) & (el <= 0)
    b = (az >= 1) & (az <= 3) & (el >= 0) & (el <= 2)
    assert (a | b).all() and abs(b.mean() - 0.75) < 0.03
    with pytest.raises(ValueError):
        get_pattern(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"type": "hologram"}))
    with pytest.raises(ValueError):
        get_pattern(str(tmp_path / "bad.json"))


# ---------------------------------------------------------------------------------------------- simulation

W, H = 200, 150
K = make_K(90.0, 90.0, 99.5, 74.5)   # +-48 x +-40 deg


@pytest.mark.parametrize("spec,fov", [
    ("livox:t=0.05", ((-35.2, 35.2), (-38.6, 38.6))),
    ("lines:n=4,vfov=-10:10,az=0.2,hfov=60", ((-30, 30), (-10, 10))),
    ("density", ((-30, 30), (-15, 5))),
])
def test_new_patterns_through_simulate_sparse_depth(tmp_path, spec, fov):
    from datagen.world.scenes import render_scene

    if spec == "density":
        spec = str(tmp_path / "dens.json")
        save_pattern(_density(), spec)
    s = render_scene(1, "street", W, H, K)
    sparse, info = simulate_sparse_depth(s.depth_m, K, np.random.default_rng(0), ScanSpec(lidar=spec, mount="none"),
                                         surface=s.mesh)
    assert sparse.shape == (H, W) and sparse.dtype == np.float32 and np.isfinite(sparse).all()
    assert info["n_points"] > 100 and (sparse >= 0).all()
    # every point back-projects (through its pixel centre) into the pattern's field, up to half a pixel
    v, u = np.nonzero(sparse)
    d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u, float)], 1)
    az, el = _az_el(d)
    tol = np.degrees(0.5 / 90.0) * 1.5
    assert az.min() >= fov[0][0] - tol and az.max() <= fov[0][1] + tol
    assert el.min() >= fov[1][0] - tol and el.max() <= fov[1][1] + tol
    # and the sparse depths are the scene's own where the camera sees the same surface
    ok = s.depth_m[v, u] > 0
    assert np.median(np.abs(sparse[v, u][ok] - s.depth_m[v, u][ok]) / s.depth_m[v, u][ok]) < 0.01


def test_line_scan_hits_keep_their_lines():
    wall = Mesh(np.array([[-50, -50, 8.0], [50, -50, 8.0], [50, 50, 8.0], [-50, 50, 8.0]]), [[0, 1, 2], [0, 2, 3]])
    p = get_pattern("lines:n=5,vfov=-20:20,az=0.5,hfov=80")
    scan = simulate_scan(wall, p, Mount(), K, W, H, np.random.default_rng(0))
    el = _az_el(scan.directions_cam)[1]
    assert len(np.unique(np.round(el, 6))) == 5 and set(scan.ring.tolist()) == set(range(5))
    np.testing.assert_allclose(scan.points_cam[:, 2], 8.0, atol=1e-3)


def test_big_triangles_do_not_limit_the_ray_window():
    # A floor of two triangles whose corners sit only a few degrees below the horizon: the rings far
    # below (looking down at the floor next to the sensor) must still hit it.
    floor = Mesh(np.array([[-20, 2.0, -20], [20, 2.0, -20], [20, 2.0, 40], [-20, 2.0, 40]]), [[0, 1, 2], [0, 2, 3]])
    p = LidarPattern("t", [-6.0, -10.0, -30.0], 0.5)   # the corners sit at -2.5 .. -4 deg
    scan = simulate_scan(floor, p, Mount(), K, W, H, np.random.default_rng(0))
    assert set(scan.ring.tolist()) == {0, 1, 2}
    np.testing.assert_allclose(scan.points_cam[:, 1], 2.0, atol=1e-3)
