"""ScanSpec: one value for "which scan", parsed once from the command-line spellings."""

import dataclasses
import json

import numpy as np
import pytest

from shared.camera import make_K
from shared.scan.lidar import simulate_sparse_depth
from shared.scan.patterns import get_pattern, save_pattern
from shared.scan.sensor import get_sensor
from shared.scan.spec import ScanSpec, ScanSpecError

W, H = 96, 64
K = make_K(60.0, 60.0, (W - 1) / 2, (H - 1) / 2)


def test_defaults_are_datagen_runs():
    s = ScanSpec()
    assert (s.lidar, s.mount, s.mesh, s.occlusion, s.sensor) == ("hdl64", "random", "grid", "none", "ideal")
    assert s.noise_std_m is None and s.dropout is None and s.hidden is None
    assert ScanSpec.from_cli() == s


def test_cli_spellings_and_fields_round_trip():
    """0 noise / dropout on the command line mean "the sensor's own" (None); cli_fields gives the options back
    as job.json has always held them, and to_dict / from_dict through JSON give the same spec."""
    s = ScanSpec.from_cli(lidar="vlp16", mount="kitti", lidar_noise_m=0.02, lidar_dropout=0.0,
                          hidden_geometry=False, sensor="realistic")
    assert s.noise_std_m == 0.02 and s.dropout is None and s.hidden is False
    assert s.cli_fields() == {"lidar": "vlp16", "mesh": "grid", "occlusion": "none", "mount": "kitti",
                              "lidar_noise_m": 0.02, "lidar_dropout": 0.0, "hidden_geometry": False,
                              "sensor": "realistic"}
    assert ScanSpec.from_cli(**s.cli_fields()) == s
    assert ScanSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert hash(s) == hash(ScanSpec.from_dict(s.to_dict()))  # frozen: usable as a key
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lidar = "hdl64"
    with pytest.raises(ScanSpecError, match="unknown keys"):
        ScanSpec.from_dict({**s.to_dict(), "lidr": "x"})


@pytest.mark.parametrize("kw,option", [
    ({"lidar": "hdl6"}, "--lidar"), ({"lidar": "missing.json"}, "--lidar"), ({"mount": "roof"}, "--mount"),
    ({"mesh": "marching"}, "--mesh"), ({"occlusion": "ray"}, "--occlusion"), ({"sensor": "fancy"}, "--sensor"),
    ({"noise_std_m": -1.0}, "--lidar-noise-m"), ({"dropout": 1.0}, "--lidar-dropout"),
    ({"mesh": "poisson", "hidden": True}, "--hidden-geometry"),
])
def test_bad_spellings_name_the_option(kw, option):
    with pytest.raises(ScanSpecError, match=option):
        ScanSpec(**kw)


def test_pixel_protocols_are_scans_without_a_sensor():
    assert ScanSpec(lidar="points:300").pixel_protocol and not ScanSpec().pixel_protocol
    depth = np.full((H, W), 7.0, np.float32)
    sparse, info = simulate_sparse_depth(depth, K, np.random.default_rng(0), ScanSpec(lidar="points:300"))
    assert np.count_nonzero(sparse) == 300 and np.all(sparse[sparse > 0] == 7.0)


def test_a_pattern_files_sensor_is_used_unless_one_is_named(tmp_path):
    """sensor None (the datagen run default) takes a pattern file's own sensor; a named one replaces it.
    Other patterns cannot name a sensor, so their None is stored as 'ideal' (what job.json has held)."""
    own = get_sensor("realistic:mixed_returns=0")
    pat = get_pattern("vlp16")
    pat.sensor = own
    path = str(tmp_path / "mine.json")
    save_pattern(pat, path)
    depth = np.full((H, W), 9.0, np.float32)
    rgb = np.full((H, W, 3), 100, np.uint8)
    spec = ScanSpec.from_cli(lidar=path, mount="none")
    assert spec.sensor is None and ScanSpec.from_cli(lidar="vlp16").sensor == "ideal"
    _, info = simulate_sparse_depth(depth, K, np.random.default_rng(0), spec, rgb=rgb)
    assert get_sensor(info["sensor"]) == own
    _, info = simulate_sparse_depth(depth, K, np.random.default_rng(0), dataclasses.replace(spec, sensor="ideal"))
    assert get_sensor(info["sensor"]) == get_sensor("ideal")


def test_same_spec_and_seed_same_bytes():
    """The spec and the generator fix the scan: its random pattern, mount, phase and sensor draws."""
    v, u = np.mgrid[0:H, 0:W]
    depth = (6.0 + 0.02 * u + 0.05 * v).astype(np.float32)
    spec = ScanSpec(lidar="random", mount="random", sensor="realistic")
    rgb = np.full((H, W, 3), 120, np.uint8)
    a, ia = simulate_sparse_depth(depth, K, np.random.default_rng(5), spec, rgb=rgb)
    b, ib = simulate_sparse_depth(depth, K, np.random.default_rng(5), ScanSpec.from_dict(spec.to_dict()), rgb=rgb)
    assert a.tobytes() == b.tobytes() and ia == ib
    c, _ = simulate_sparse_depth(depth, K, np.random.default_rng(6), spec, rgb=rgb)
    assert a.tobytes() != c.tobytes()
