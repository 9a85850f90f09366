"""DDP on CPU: `torchrun --nproc_per_node 2` (gloo, tiny model) completes, and over the two ranks each
sample is seen exactly once per pass (every rank logs the keys it consumed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import write_shards

from trainer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    if shutil.which("torchrun"):
        return ["torchrun"]
    return [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_torchrun_two_cpu_processes_each_sample_once_per_pass(tmp_path):
    keys = write_shards(tmp_path / "s", 4, 3, h=32, w=64)  # 12 samples, 4 shards for 2 ranks x 1 worker
    out = tmp_path / "run"
    cmd = [*torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "trainer.cli", "pretrain",
           "--shards", str(tmp_path / "s"), "--model", "tiny", "--steps", "6", "--batch-size", "4",
           "--crop", "32x64", "--out", str(out), "--workers", "1", "--device", "cpu", "--threads", "1",
           "--log-keys", "--quiet", "--log-every", "2", "--ckpt-every", "3", "--json", str(tmp_path / "s.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # 6 steps x 4 samples = 24 = two passes over 12 samples; each rank took 2 per step
    per_epoch: dict[int, Counter] = {0: Counter(), 1: Counter()}
    for rank in (0, 1):
        rows = [line.split("\t") for line in (out / f"keys-rank{rank}.tsv").read_text().splitlines()]
        assert len(rows) == 12
        for _, epoch, key in rows:
            per_epoch[int(epoch)][key] += 1
    for epoch, seen in per_epoch.items():
        assert set(seen) == set(keys) and set(seen.values()) == {1}, (epoch, seen)

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6 and summary["samples_seen"] == 24
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt-0000003.safetensors", "ckpt-0000006.safetensors"]
    state = ckpt.read_state(ckpt.latest_checkpoint(out))
    assert state["data"]["world_size"] == 2 and len(state["data"]["ranks"]) == 2 and len(state["rng"]) == 2
    assert sorted(p.name for p in out.glob("*.csv")) == ["log.csv"]  # rank 0 alone logs
