"""scripts/rescan_study.py (`make study-rescan`): its pre-training variants and sweep set are what its
report says they are. "resim" draws from the stored scans' family, "target" casts the rig's own LiDAR, and
the sweep set is the held-out world through the full hdl64."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from datagen.world.rig import kitti_pattern
from shared.camera import make_K
from shared.scan.patterns import load_pattern
from shared.scan.spec import ScanSpec
from trainer.train import TrainConfig, rescan_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study():
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("rescan_study", ROOT / "scripts" / "rescan_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rescan_study"] = mod
    spec.loader.exec_module(mod)  # imports scripts/ablation.py as `ablation`
    yield mod
    for name in ("rescan_study", "ablation"):
        sys.modules.pop(name, None)
    sys.path[:] = path


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def spec_of(args: list[str]) -> ScanSpec:
    """What `trainer pretrain` makes of the variant's options."""
    kw = dict(zip(args[::2], args[1::2], strict=True))
    return rescan_spec(TrainConfig(stage="pretrain", lidar=kw["--lidar"], mount=kw["--mount"], sensor=kw["--sensor"]))


def test_resim_draws_from_the_family_the_stored_scans_came_from(study, tmp_path):
    p = study.ablation.PRESETS["demo"]
    cmd = study.ablation.datagen_command(p, "pretrain", 4, tmp_path)
    assert "--sensor" not in cmd  # datagen's default sensor: ideal
    stored = ScanSpec.from_cli(lidar=option(cmd, "--lidar"), mount=option(cmd, "--mount"))
    assert spec_of(study.lidar_args("resim", tmp_path / "t.json")) == stored
    assert study.lidar_args("stored", tmp_path / "t.json") == []


def test_target_casts_the_rigs_lidar_from_its_mount_with_its_sensor(study, tmp_path, monkeypatch):
    K = make_K(0.58 * 384, 0.58 * 384, 191.5, 63.5)  # the rig's camera on a 384 x 128 frame
    monkeypatch.setattr(study, "iter_samples", lambda _: iter([SimpleNamespace(K=K)]))
    path = study.target_lidar(tmp_path / "eval", tmp_path / "target.json")
    want, got = kitti_pattern(K), load_pattern(path)
    assert 15 <= got.n_rings < 64  # hdl64 thinned to the frame, as the held-out scans
    np.testing.assert_allclose(got.elevations_deg, want.elevations_deg)
    assert got.azimuth_step_deg == pytest.approx(want.azimuth_step_deg)
    spec = spec_of(study.lidar_args("target", path))
    assert (spec.lidar, spec.mount, spec.sensor) == (str(path), "kitti", "realistic")  # datagen.sources.synthetic


def test_the_sweep_set_is_the_heldout_world_through_the_full_hdl64(study, tmp_path):
    p = study.ablation.PRESETS["demo"]
    held = study.ablation.datagen_command(p, "eval", p.n_eval, tmp_path / "eval")
    sweep = study.sweep_set_command(p, tmp_path / "sweep")
    assert "rig=kitti" in held and "rig=native" in sweep and "rig=kitti" not in sweep
    for name in ("--seed", "--limit", "--width", "--height", "--family", "--gt"):
        assert option(sweep, name) == option(held, name), name
    assert option(sweep, "--gt") == "dense" and "--labelled" in sweep
