"""Each sensor effect changes the statistic it should and nothing else; presets round-trip."""

import dataclasses
import json

import numpy as np
import pytest

from shared.camera import make_K
from shared.scan.heightfield import grid_surface
from shared.scan.lidar import Mount, simulate_scan, simulate_sparse_depth
from shared.scan.patterns import LIDAR_PRESETS, get_pattern, load_pattern, save_pattern
from shared.scan.sensor import SENSOR_PRESETS, SensorModel, get_sensor
from shared.scan.spec import ScanSpec

W, H = 160, 120
K = make_K(60.0, 60.0, 79.5, 59.5)  # wide: +-53 / +-45 deg
PAT = LIDAR_PRESETS["os128"]
MOUNT = Mount(np.eye(3), [0.0, -0.1, 0.0])


def _floor(height_m=1.5):
    """A level floor below the camera: incidence and range both grow towards the horizon (its grid mesh
    ends near 14 m, where one pixel row spans more than the 10% depth jump)."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    ry = (v - K[1, 2]) / K[1, 1]
    return np.where(ry > 0.02, height_m / np.maximum(ry, 1e-9), 0).astype(np.float32)


def _scan(depth, sensor, rgb=None, seed=0, **kw):
    return simulate_scan(grid_surface(depth, K), PAT, MOUNT, K, W, H, np.random.default_rng(seed), sensor=sensor,
                         rgb=rgb, **kw)


def _paired(ideal, other):
    """For each return of `other`, the ideal scan's range on the same ray (both scans cast the same rays)."""
    assert ideal.n_rays == other.n_rays
    r = np.full(ideal.n_rays, np.nan)
    r[ideal.ray_index] = ideal.range_m
    return r[other.ray_index]


def _kept_share_by_bin(ideal, other, values, edges, p_keep):
    """Share of the ideal scan's returns that `other` keeps per bin of `values` (one per ideal return), and
    the mean of the expected keep probability p_keep over the same returns."""
    kept = np.isin(ideal.ray_index, other.ray_index)
    idx = np.digitize(values, edges)
    bins = range(1, len(edges))
    return np.array([kept[idx == b].mean() for b in bins]), np.array([p_keep[idx == b].mean() for b in bins])


def test_incidence_dropout_rises_with_incidence_and_changes_nothing_else():
    depth = _floor()
    ideal = _scan(depth, "ideal")
    sens = SensorModel("t", incidence_dropout=0.8)
    drop = _scan(depth, sens)
    n = np.array([0.0, -1.0, 0.0])  # the floor's normal, facing the sensor
    cos_inc = np.abs(ideal.directions_cam @ n)
    edges = np.array([0.1, 0.15, 0.2, 0.3, 0.4])
    share, expected = _kept_share_by_bin(ideal, drop, cos_inc, edges, 1 - 0.8 * (1 - cos_inc) ** 2)
    assert (np.diff(share) > 0).all()  # more grazing -> fewer returns
    np.testing.assert_allclose(share, expected, atol=0.04)  # the documented formula
    np.testing.assert_array_equal(drop.range_m, _paired(ideal, drop))  # survivors: ranges untouched


def test_range_dropout_rises_with_range():
    depth = _floor()
    ideal = _scan(depth, "ideal", max_range_m=15.0)
    drop = _scan(depth, SensorModel("t", range_dropout=1.0), max_range_m=15.0)
    edges = np.array([4.0, 6.0, 8.0, 10.0, 14.5])
    share, expected = _kept_share_by_bin(ideal, drop, ideal.range_m, edges, 1 - (ideal.range_m / 15.0) ** 2)
    assert (np.diff(share) < 0).all()
    np.testing.assert_allclose(share, expected, atol=0.04)
    np.testing.assert_array_equal(drop.range_m, _paired(ideal, drop))


def test_noise_grows_with_range_and_keeps_every_return():
    depth = _floor()
    ideal = _scan(depth, "ideal")
    noisy = _scan(depth, SensorModel("t", noise_rel=0.01))
    np.testing.assert_array_equal(noisy.ray_index, ideal.ray_index)  # no return lost or added
    r0 = _paired(ideal, noisy)
    rel = (noisy.range_m - r0) / r0
    near, far = r0 < 6, r0 > 10
    assert near.sum() > 300 and far.sum() > 300
    # relative noise is constant, so absolute noise grows with range
    assert abs(rel[near].std() - 0.01) < 0.002 and abs(rel[far].std() - 0.01) < 0.002
    assert (noisy.range_m - r0)[far].std() > 2 * (noisy.range_m - r0)[near].std()
    # the points stay on their rays
    np.testing.assert_allclose(noisy.points_cam, noisy.origin_cam + noisy.range_m[:, None] * noisy.directions_cam)


def test_dark_dropout_follows_brightness():
    depth = np.full((H, W), 6.0, np.float32)
    rgb = np.full((H, W, 3), 255, np.uint8)
    rgb[:, : W // 2] = 0  # left half black
    drop = _scan(depth, SensorModel("t", dark_dropout=0.6), rgb=rgb)
    ideal = _scan(depth, "ideal")
    left = lambda s: (s.points_cam[:, 0] / s.points_cam[:, 2] * K[0, 0] + K[0, 2]) < W / 2 - 2  # noqa: E731
    right = lambda s: (s.points_cam[:, 0] / s.points_cam[:, 2] * K[0, 0] + K[0, 2]) > W / 2 + 2  # noqa: E731
    assert right(drop).sum() == right(ideal).sum()  # white: nothing lost
    assert abs(left(drop).sum() / left(ideal).sum() - 0.4) < 0.04  # black: 1 - 0.6
    with pytest.raises(ValueError, match="camera image"):
        _scan(depth, SensorModel("t", dark_dropout=0.6))


def test_mixed_returns_only_at_depth_edges():
    depth = np.full((H, W), 12.0, np.float32)
    depth[30:90, 50:110] = 4.0  # a box 8 m in front of a wall
    # A beam 3 pixels wide (50 mrad at f = 60 px): its rim reaches past the one-pixel gap the grid mesh
    # leaves at the cut edge, so rim rays find the box and the wall on either side.
    sens = SensorModel("t", beam_divergence_mrad=50.0, mixed_returns=1.0)
    ideal, mixed = _scan(depth, "ideal"), _scan(depth, sens)
    np.testing.assert_array_equal(mixed.ray_index, ideal.ray_index)
    r0 = _paired(ideal, mixed)
    changed = np.abs(mixed.range_m - r0) > 1e-9
    assert changed.sum() > 20
    # every changed range lies between the box's and the wall's, and sits at the box's outline
    p0 = mixed.origin_cam + r0[:, None] * mixed.directions_cam
    u = p0[:, 0] / p0[:, 2] * K[0, 0] + K[0, 2]
    v = p0[:, 1] / p0[:, 2] * K[1, 1] + K[1, 2]
    near_edge = (np.minimum(np.abs(u - 49.5), np.abs(u - 109.5)) < 3) | (np.minimum(np.abs(v - 29.5), np.abs(v - 89.5)) < 3)
    assert near_edge[changed].all()
    dz = mixed.directions_cam[changed, 2]
    r_box, r_wall = 4.0 / dz, 12.0 / dz  # ranges to the two planes along each ray (MOUNT has no z offset)
    rm = mixed.range_m[changed]
    assert (rm > r_box * 1.05).all() and (rm < r_wall / 1.05).all()  # strictly between: a mixed pixel
    # a plain wall has no edge: nothing changes
    flat = np.full((H, W), 12.0, np.float32)
    a, b = _scan(flat, "ideal"), _scan(flat, sens)
    np.testing.assert_array_equal(a.range_m, b.range_m)


def test_ideal_knobs_off_draw_nothing_and_uniform_knobs_match_the_old_arguments():
    depth = _floor()
    a = _scan(depth, SensorModel("t", noise_std_m=0.03, dropout=0.2))
    b = simulate_scan(grid_surface(depth, K), PAT, MOUNT, K, W, H, np.random.default_rng(0), noise_std_m=0.03,
                      dropout=0.2)
    assert a.points_cam.tobytes() == b.points_cam.tobytes()
    # noise_std_m / dropout given explicitly replace the sensor's own
    c = simulate_scan(grid_surface(depth, K), PAT, MOUNT, K, W, H, np.random.default_rng(0),
                      sensor=SensorModel("t", noise_std_m=0.5, dropout=0.9), noise_std_m=0.03, dropout=0.2)
    assert a.points_cam.tobytes() == c.points_cam.tobytes()


def test_presets_round_trip_through_pattern_and_meta_json(tmp_path):
    real = get_sensor("realistic")
    assert real == SENSOR_PRESETS["realistic"] and get_sensor(None) == get_sensor("ideal") == SensorModel()
    assert SensorModel.from_dict(json.loads(json.dumps(real.to_dict()))) == real
    over = get_sensor("realistic:mixed_returns=0.1,noise_rel=0")
    assert over.mixed_returns == 0.1 and over.noise_rel == 0 and over.dark_dropout == real.dark_dropout
    assert get_sensor("range_dropout=0.2") == dataclasses.replace(SensorModel(), name="range_dropout=0.2",
                                                                   range_dropout=0.2)
    for bad in ("realistic:bogus=1", "fancy", "dropout=2", "noise_rel=x"):
        with pytest.raises(ValueError):
            get_sensor(bad)
    # a pattern file carries its sensor
    pat = get_pattern("hdl64")
    pat.sensor = over
    save_pattern(pat, tmp_path / "mine.json")
    back = load_pattern(tmp_path / "mine.json")
    assert back.sensor == over and back.elevations_deg.tobytes() == pat.elevations_deg.tobytes()
    # a sensor file, and the meta of a scan, give the same model back
    (tmp_path / "s.json").write_text(json.dumps(real.to_dict()))
    assert get_sensor(str(tmp_path / "s.json")) == real
    depth = np.full((H, W), 8.0, np.float32)
    rgb = np.full((H, W, 3), 90, np.uint8)
    _, info = simulate_sparse_depth(depth, K, np.random.default_rng(0),
                                    ScanSpec(lidar=str(tmp_path / "mine.json"), mount="none"), rgb=rgb)
    assert get_sensor(json.loads(json.dumps(info))["sensor"]) == over  # the pattern's own sensor
    _, info = simulate_sparse_depth(depth, K, np.random.default_rng(0), ScanSpec(sensor="realistic", mount="kitti"),
                                    rgb=rgb)
    assert get_sensor(info["sensor"]) == real and info["hidden_geometry"] is True
