"""DDP on CPU: `torchrun --nproc_per_node 2` (gloo, tiny model) completes, and over the two ranks each
sample is seen exactly once per pass (every rank logs the keys it consumed); a rank killed inside a
checkpoint write is restarted by torchrun and the run ends with the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from conftest import write_shards

from tests.procs import kill_tree
from trainer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    if shutil.which("torchrun"):
        return ["torchrun"]
    return [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted `torchrun --nproc_per_node 2 -m trainer.cli pretrain` of 6 steps: its folder (shards
    in s/, the run in run/, the summary in s.json) and the sample keys."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not built")
    tmp_path = tmp_path_factory.mktemp("ddp")
    keys = write_shards(tmp_path / "s", 4, 3, h=32, w=64)  # 12 samples, 4 shards for 2 ranks x 1 worker
    cmd = [*torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "trainer.cli", "pretrain",
           "--shards", str(tmp_path / "s"), "--model", "tiny", "--steps", "6", "--batch-size", "4",
           "--crop", "32x64", "--out", str(tmp_path / "run"), "--workers", "1", "--device", "cpu", "--threads",
           "1", "--log-keys", "--quiet", "--log-every", "2", "--ckpt-every", "3", "--json", str(tmp_path / "s.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path, keys


def test_torchrun_two_cpu_processes_each_sample_once_per_pass(two_rank_run):
    tmp_path, keys = two_rank_run
    out = tmp_path / "run"

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


# ---------------------------------------------------------------------------------------------------------
# a rank that dies: torchrun --max-restarts restarts the workers, --resume continues from `latest`

CHILD = Path(__file__).with_name("ddp_child.py")  # the trainer's command line with test hooks


def restartable_run(shards: Path, out: Path, marks: Path, steps: int = 6, ckpt_every: int = 2,
                    max_restarts: int = 3, stall: str | None = None) -> subprocess.Popen:
    """`torchrun --max-restarts N` of 2 CPU ranks (gloo) running `trainer pretrain --resume`, in its own
    process group; ddp_child.py's hooks: pid files in `marks`, and `stall` (see there)."""
    marks.mkdir(parents=True, exist_ok=True)
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "2", "--max-restarts", str(max_restarts),
           "--monitor-interval", "0.2", str(CHILD), "pretrain", "--shards", str(shards), "--model", "tiny",
           "--steps", str(steps), "--batch-size", "4", "--crop", "32x64", "--out", str(out), "--workers", "1",
           "--device", "cpu", "--threads", "1", "--quiet", "--log-every", "1", "--ckpt-every", str(ckpt_every),
           "--resume"]
    # each restart its own TCPStore: torchrun's shared one keeps the workers' keys from one restart to the
    # next, and a restarted rank can read its peer's old address (docs/reliability.md)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DMD3C_TEST_MARKS": str(marks),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if stall:
        env["DMD3C_TEST_STALL"] = stall
    log = open(marks / "torchrun.log", "w")  # noqa: SIM115 (the child holds it; closed with the process)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)




def finish(proc: subprocess.Popen, marks: Path, timeout: float = 400) -> int:
    """Wait for a run; whatever happens, no process of it outlives the test (torchrun starts its workers in
    sessions of their own: they are found by their pid files)."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_tree(proc.pid)
        proc.wait()
        for mark in marks.glob("rank*.pid"):
            try:
                if "ddp_child.py" in " ".join(psutil.Process(int(mark.read_text())).cmdline()):
                    kill_tree(int(mark.read_text()))
            except (psutil.Error, ValueError):
                pass


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    latest = ckpt.latest_checkpoint(out)
    model, _ = ckpt.read_checkpoint(latest, "model")
    ema, _ = ckpt.read_checkpoint(latest, "ema")
    return {**{f"model.{k}": v for k, v in model.items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, (path, proc.returncode)
        time.sleep(0.05)
    return path.read_text()


def test_a_rank_killed_inside_a_checkpoint_write_is_restarted_and_ends_with_the_uninterrupted_weights(tmp_path,
                                                                                                   two_rank_run):
    """Rank 0 is SIGKILLed half-way through writing checkpoint 4's weights. torchrun (--max-restarts 3)
    restarts both ranks, which resume from checkpoint 2 (--resume, the same argv); the run ends at step 6
    with the weights and EMA of the uninterrupted run (two_rank_run), bit for bit, and the killed write's
    temporary file is gone. (More kills at random steps: bench/chaos.py, ddp_rank_kills.)"""
    ref, _ = two_rank_run
    want = final_weights(ref / "run")
    out, marks = tmp_path / "run", tmp_path / "marks"
    proc = restartable_run(ref / "s", out, marks, stall="ckpt-0000004.safetensors.tmp-:0:0")
    try:
        pid, partial = wait_for(marks / "in-write.pid", proc).split()
        assert Path(partial).stat().st_size > 0  # half of the weights are on disk
        os.kill(int(pid), signal.SIGKILL)
        assert (out / "latest").read_text().strip() == "ckpt-0000002"
    finally:
        rc = finish(proc, marks)
    log = (marks / "torchrun.log").read_text()
    assert rc == 0, log[-3000:]
    assert {p.name for p in marks.glob("*.pid")} >= {"rank0-restart1.pid", "rank1-restart1.pid"}  # restarted
    got = final_weights(out)
    assert ckpt.read_metadata(out)["step"] == 6 and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    for path in ckpt.list_checkpoints(out):  # every checkpoint on disk is whole
        ckpt.read_checkpoint(path, "ema")
        assert ckpt.read_state(path)["step"] == ckpt.read_metadata(path)["step"]


def test_restarts_with_torchruns_shared_store_are_warned_about():
    """torchrun keeps its shared TCPStore, and the workers' keys in it, from one restart to the next (a
    restarted rank connected to its peer's old address and the run hung: bench/chaos.py's ddp_rank_kills
    did); the trainer says what to set."""
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in ckpt.torchrun_restart_hazard(env)
    assert ckpt.torchrun_restart_hazard({**env, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert ckpt.torchrun_restart_hazard({**env, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert ckpt.torchrun_restart_hazard({}) is None
