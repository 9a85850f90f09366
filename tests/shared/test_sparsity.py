"""The sparse-input protocols (shared.sparsity) on hand-made inputs whose answer is known exactly."""

import numpy as np
import pytest

from shared import sparsity as sp
from shared.camera import make_K, project


def test_specs_parse_and_sweeps_expand():
    assert sp.parse_protocol(None) == sp.parse_protocol("full") == sp.Protocol("full", None, 0)
    assert sp.parse_protocol("Lines:16", seed=3) == sp.Protocol("lines", 16, 3)
    assert [p.name for p in sp.parse_sweep(["lines:64,32,16,8", "full,points:500,200", "lines:16"])] == [
        "lines:64", "lines:32", "lines:16", "lines:8", "full", "points:500", "points:200"]
    for bad in ("lines", "lines:0", "dots:5", "lines-uniform:5", "points:-1"):
        with pytest.raises(ValueError, match="protocol"):
            sp.parse_protocol(bad)
    with pytest.raises(ValueError, match="no kind"):
        sp.parse_sweep("16,8")


def test_points_are_an_exact_count_of_the_input_and_fixed_per_seed_and_key():
    rng = np.random.default_rng(0)
    sparse = np.where(rng.random((48, 64)) < 0.2, rng.uniform(1, 9, (48, 64)), 0).astype(np.float32)
    a = sp.apply("points:100", sparse, key="k-1")
    assert np.count_nonzero(a) == 100
    assert np.array_equal(a[a > 0], sparse[a > 0])  # a subset of the input, values untouched
    assert np.array_equal(a, sp.apply(sp.Protocol("points", 100, 0), sparse.copy(), key="k-1"))  # same draw again
    assert not np.array_equal(a, sp.apply("points:100", sparse, key="k-2"))  # another sample, other points
    assert not np.array_equal(a, sp.apply(sp.parse_protocol("points:100", seed=1), sparse, key="k-1"))
    n = np.count_nonzero(sparse)
    assert np.array_equal(sp.apply(f"points:{n + 50}", sparse, key="k-1"), sparse)  # fewer than N: all of them


def checkerboard(square: int, rows: int, cols: int, margin: int) -> np.ndarray:
    """A grey checkerboard inside a flat margin: inner corners at (margin + i s, margin + j s)."""
    v, u = np.mgrid[0:rows * square, 0:cols * square]
    board = ((u // square + v // square) % 2 * 200 + 27).astype(np.uint8)
    img = np.full((rows * square + 2 * margin, cols * square + 2 * margin), 127, np.uint8)
    img[margin:-margin, margin:-margin] = board
    return np.repeat(img[..., None], 3, axis=2)


def test_keypoints_land_on_the_corners_of_a_checkerboard():
    s, rows, cols, m = 12, 5, 7, 10
    rgb = checkerboard(s, rows, cols, m)
    depth = np.linspace(1, 5, rgb.shape[0] * rgb.shape[1], dtype=np.float32).reshape(rgb.shape[:2])
    kp = sp.keypoints(rgb, depth, n=(rows - 1) * (cols - 1))
    v, u = np.nonzero(kp)
    corners = np.array([(m + i * s, m + j * s) for i in range(1, rows) for j in range(1, cols)], float)  # (v, u)

    def off_corner(v, u):  # pixels from the nearest inner corner (a corner lies between pixels s-1 and s)
        return np.abs(np.stack([v, u], 1)[:, None, :] + 0.5 - corners[None]).max(-1).min(1)

    assert len(v) == len(corners) and off_corner(v, u).max() <= 1.0
    assert np.array_equal(kp[v, u], depth[v, u])
    # only pixels with a value can be keypoints: the same board, depth on its left part only; its 12
    # inner corners are found again (and the board's outer corners there, weaker, fill the count)
    half = np.where(np.arange(rgb.shape[1]) < m + 3 * s + 3, depth, 0).astype(np.float32)
    v2, u2 = np.nonzero(sp.keypoints(rgb, half, n=len(corners)))
    assert u2.max() <= m + 3 * s + 2
    left = corners[corners[:, 1] <= m + 3 * s]
    assert len(left) == 12
    assert (np.abs(np.stack([v2, u2], 1)[None] + 0.5 - left[:, None]).max(-1).min(1) <= 1.0).all()


def scan_points(elev_deg, az_deg, ranges, R, t):
    """Camera-frame points of rays (elevation, azimuth, range) from a LiDAR at pose (R, t)."""
    e, a = np.radians(elev_deg), np.radians(az_deg)
    d = np.stack([np.cos(e) * np.sin(a), -np.sin(e), np.cos(e) * np.cos(a)], -1)
    return (ranges[:, None] * d) @ R.T + t


def test_ring_assignment_on_a_hand_made_scan_from_a_tilted_offset_lidar():
    table = np.array([3.0, 1.0, -1.0, -3.0, -5.0, -7.0, -9.0, -11.0])  # 8 rings, 2 deg apart, top first
    c, s_ = np.cos(np.radians(2.0)), np.sin(np.radians(2.0))
    R = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1.0]])  # rolled 2 deg: rings cross image rows
    t = np.array([0.05, -0.3, -0.2])
    ring = np.repeat(np.arange(8), 40)
    rng = np.random.default_rng(1)
    pts = scan_points(table[ring], np.tile(np.linspace(-30, 30, 40), 8), rng.uniform(3, 40, len(ring)), R, t)
    K = make_K(500.0, 500.0, 320.0, 120.0)
    uv, z = project(pts, K)
    u, v = np.rint(uv).astype(int).T
    sparse = np.zeros((480, 640), np.float32)
    sparse[v, u] = z
    v_, u_, el = sp.lidar_elevations(sparse, K, R, t)
    truth = np.full(sparse.shape, -1)
    truth[v, u] = ring
    assert np.array_equal(sp.assign_rings(el, table), truth[v_, u_])
    # the scanner's own camera-frame view: the same rings, seen without the pose, are not the same
    assert np.mean(sp.assign_rings(sp.lidar_elevations(sparse, K)[2], table) == truth[v_, u_]) < 0.9
    kept = sp.lines(sparse, K, 4, table, R, t)  # rings 0, 2, 4, 6
    assert np.array_equal(kept > 0, np.isin(truth, [0, 2, 4, 6]))
    assert np.array_equal(sp.lines(sparse, K, 8, table, R, t), sparse)
    assert list(sp.assign_rings(np.array([4.05, 3.99, -11.99, -12.05]), table)) == [-1, 0, 7, -1]


def test_lines_uniform_keeps_every_kth_of_64_equal_pitch_bins():
    K = make_K(1000.0, 1000.0, 50.0, 40.0)
    sparse = np.zeros((80, 100), np.float32)
    rows = np.arange(65) + 8  # 65 rows straight ahead: pitches atan((v - cy) / f), equal to 1e-4 of a bin
    sparse[rows, 50] = 12.0
    for n, step in ((32, 2), (16, 4), (8, 8)):
        kept = np.flatnonzero(sp.lines_uniform(sparse, K, n)[:, 50])
        assert list(kept) == list(rows[::step])
    assert np.array_equal(sp.lines_uniform(sparse, K, 64), sparse)


def test_lines_needs_the_ring_table_and_says_so():
    with pytest.raises(ValueError, match="lidar.pattern.elevations_deg"):
        sp.apply("lines:16", np.ones((4, 4), np.float32), key="nyu-x", K=make_K(5, 5, 2, 2), lidar=None)


def test_simulate_picks_pixels_of_the_dense_depth():
    depth = np.full((32, 48), 4.0, np.float32)
    depth[:8] = 0  # sky
    sparse, info = sp.simulate("points:200", depth, np.random.default_rng(0))
    assert np.count_nonzero(sparse) == 200 and not sparse[:8].any() and info["n_points"] == 200
    assert info["preset"] == "points:200" and info["density"] == 200 / depth.size
    with pytest.raises(ValueError, match="image"):
        sp.simulate("keypoints:10", depth, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not a pixel protocol"):
        sp.simulate("lines:16", depth, np.random.default_rng(0))
