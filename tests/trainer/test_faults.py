"""Faults during training: SIGKILL in the middle of a checkpoint write, shards corrupted on disk mid-run.

tests/trainer/test_resume.py already covers a write that raises half-way in the same process; here a
real training process is SIGKILLed while a checkpoint file is half on disk (no `except`, no `finally`
runs), once in the weights' write and once in `latest`'s. The kill lands in the write by construction:
the child's `shared.fsutil._write_all` writes half the bytes, fsyncs them, says so on stdout and waits;
the parent kills it then. Afterwards the previous checkpoint loads and `--resume` ends with the weights
of a run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from conftest import write_shards

from trainer import checkpoint as ckpt
from trainer.train import TrainConfig, train

# the child: train, but block half-way through the argv[3]-th write of a file named argv[2]...
CHILD = r"""
import json, os, sys, time
from shared import fsutil
from trainer.train import TrainConfig, train

real, prefix, nth = fsutil._write_all, sys.argv[2], int(sys.argv[3])
seen = [0]

def half_then_wait(f, data, chunk=1 << 22):
    seen[0] += os.path.basename(f.name).startswith(prefix)
    if os.path.basename(f.name).startswith(prefix) and seen[0] == nth:
        real(f, data[: len(data) // 2], chunk)
        f.flush()
        os.fsync(f.fileno())
        print("IN_WRITE", f.name, flush=True)
        time.sleep(600)
    real(f, data, chunk)

fsutil._write_all = half_then_wait
train(TrainConfig(**json.loads(sys.argv[1])))
print("FINISHED", flush=True)
"""

# the kill lands while ckpt 4's files are written (the second `latest`); ckpt 2 is the one that must survive.
# The state file is written by the same function as the weights; bench/chaos.py kills in all three.
TARGETS = {"weights": ("ckpt-0000004.safetensors.tmp-", 1), "latest": ("latest.tmp-", 2)}


def config(tmp_path: Path, out: str) -> TrainConfig:
    if not (tmp_path / "s").exists():
        write_shards(tmp_path / "s", 3, 2)
    return TrainConfig(shards=str(tmp_path / "s"), model="tiny", steps=6, batch_size=2, crop="32x64", workers=0,
                       lr=3e-3, seed=11, shuffle_buffer=4, ema_decay=0.9, log_every=1, ckpt_every=2, keep=5,
                       progress=False, out=str(tmp_path / out), threads=1)


def weights(path) -> dict[str, torch.Tensor]:
    model, _ = ckpt.read_checkpoint(path, "model")
    ema, _ = ckpt.read_checkpoint(path, "ema")
    return {**{f"model.{k}": v for k, v in model.items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def test_sigkill_during_each_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(tmp_path):
    straight = train(config(tmp_path, "straight"))
    want = weights(straight["checkpoint"])
    at_2 = weights(Path(straight["out"]) / "ckpt-0000002.safetensors")
    # the children run side by side; each is killed once it is inside its write
    children = {}
    for which, (prefix, nth) in TARGETS.items():
        cfg = dataclasses.asdict(config(tmp_path, which))
        children[which] = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg), prefix, str(nth)],
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for which, proc in children.items():
        out = []
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # blocks until the child prints; it prints only from inside the write
            out.append(line)
            if line.startswith("IN_WRITE") or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert out and out[-1].startswith("IN_WRITE"), f"{which}: {''.join(out)[-2000:]}"
        assert proc.returncode == -signal.SIGKILL

    for which, (prefix, _) in TARGETS.items():
        run = tmp_path / which
        partial = [p for p in run.iterdir() if p.name.startswith(prefix)]
        assert len(partial) == 1 and partial[0].stat().st_size > 0, which  # the kill did land in the write
        latest = ckpt.latest_checkpoint(run)
        # `latest` is written last, so after a kill in any write it still names step 2 (when the kill hit
        # `latest` itself, ckpt-4 is complete on disk but not yet the checkpoint of record)
        assert (run / "latest").read_text().strip() == "ckpt-0000002", which
        assert latest.name == "ckpt-0000002.safetensors"
        got = weights(latest)
        assert all(torch.equal(got[k], at_2[k]) for k in at_2), which
        assert ckpt.read_state(latest)["step"] == 2
        model, meta = ckpt.load_model(run)
        assert meta["step"] == 2 and meta["model_name"] == "tiny"

        resumed = train(dataclasses.replace(config(tmp_path, which), resume=True))
        assert resumed["steps"] == 6 and resumed["steps_this_run"] == 4
        got = weights(resumed["checkpoint"])
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=f"{which}: {k}")
        assert not [p for p in run.iterdir() if ".tmp-" in p.name]  # the killed write's file was deleted


def flip_png_member(shard: Path, member_suffix: str) -> str:
    """Flip bits inside the compressed pixel data of the first member ending in `member_suffix`, in place."""
    with tarfile.open(shard) as tar:
        info = next(m for m in tar.getmembers() if m.name.endswith(member_suffix))
    with open(shard, "r+b") as f:
        for j in range(info.offset_data + 60, info.offset_data + info.size - 20, 7):
            f.seek(j)
            b = f.read(1)
            f.seek(j)
            f.write(bytes([b[0] ^ 0xFF]))
    return info.name


def test_shards_corrupted_on_disk_during_training_are_skipped_counted_logged(tmp_path, monkeypatch, caplog):
    """Four shards of two samples, batch 2: an epoch is 4 steps. After step 3 (the trainer has been reading
    for a while) one shard is cut in the middle and one PNG of another gets bit flips. Training finishes its
    16 steps; every later epoch skips the broken samples, counts them in the summary and log.csv, and logs."""
    import trainer.train as tt

    keys = write_shards(tmp_path / "s", 4, 2)
    shards = sorted((tmp_path / "s").glob("*.tar"))
    cfg = dataclasses.replace(config(tmp_path, "run"), steps=16, ckpt_every=100)
    calls, real_loss = [0], tt.compute_loss
    damaged = {}

    def loss_then_corrupt(*a, **kw):
        calls[0] += 1
        if calls[0] == 3:
            size = shards[1].stat().st_size
            with open(shards[1], "r+b") as f:
                f.truncate(size // 2 + 700)  # inside a member of the second sample
            damaged["flipped"] = flip_png_member(shards[2], ".depth.png")
        return real_loss(*a, **kw)

    monkeypatch.setattr(tt, "compute_loss", loss_then_corrupt)
    with caplog.at_level("WARNING", logger="trainer.data"):
        summary = train(cfg)
    assert summary["steps"] == 16 and calls[0] == 16
    assert damaged["flipped"].startswith(keys[4])
    # three epochs after the damage, each losing >= 2 samples (the cut one, the flipped one)
    assert summary["skipped_samples"] >= 6
    assert "skipped a corrupt sample" in caplog.text
    assert shards[1].name in caplog.text or shards[2].name in caplog.text
    rows = (Path(cfg.out) / "log.csv").read_text().splitlines()
    assert int(rows[-1].split(",")[9]) == summary["skipped_samples"]  # the skipped column
    model, meta = ckpt.load_model(summary["checkpoint"])
    assert meta["step"] == 16 and all(torch.isfinite(p).all() for p in model.parameters())
