"""Exact resume (N steps straight == N/2, stop, resume, N/2) and crash-safe checkpoint writes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import write_shards

from shared import fsutil
from trainer import checkpoint as ckpt
from trainer.train import TrainConfig, train


def base_config(tmp_path, workers: int) -> TrainConfig:
    if not (tmp_path / "s").exists():
        write_shards(tmp_path / "s", 3, 3)
    # random crops, flips and jitter on: the data position and RNG must all be restored
    return TrainConfig(shards=str(tmp_path / "s"), model="tiny", steps=6, batch_size=2, crop="32x64",
                       workers=workers, lr=3e-3, seed=11, shuffle_buffer=4, ema_decay=0.9, log_every=1,
                       ckpt_every=100, progress=False)


def weights(path) -> dict[str, torch.Tensor]:
    model, _ = ckpt.read_checkpoint(path, "model")
    ema, _ = ckpt.read_checkpoint(path, "ema")
    return {**{f"model.{k}": v for k, v in model.items()}, **{f"ema.{k}": v for k, v in ema.items()}}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, workers):
    cfg = base_config(tmp_path, workers)
    straight = train(dataclasses.replace(cfg, out=str(tmp_path / "a")))
    half = train(dataclasses.replace(cfg, out=str(tmp_path / "b"), stop_at=3))
    assert half["steps"] == 3
    resumed = train(dataclasses.replace(cfg, out=str(tmp_path / "b"), resume=True))
    assert resumed["steps"] == 6 and resumed["steps_this_run"] == 3
    a, b = weights(straight["checkpoint"]), weights(resumed["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    # and the run really moved away from its start
    assert any(not torch.equal(a[k], weights(ckpt.list_checkpoints(tmp_path / "b")[0])[k]) for k in a)


def test_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    cfg = dataclasses.replace(base_config(tmp_path, 0), out=str(tmp_path / "run"), ckpt_every=2)
    train(dataclasses.replace(cfg, stop_at=4))
    before = weights(ckpt.latest_checkpoint(tmp_path / "run"))

    real_write_all = fsutil._write_all

    def dying_write(f, data, chunk=1 << 22):
        real_write_all(f, data[: len(data) // 2], chunk)  # half the bytes reach the disk, then the "crash"
        raise OSError("simulated crash during a checkpoint write")

    monkeypatch.setattr(fsutil, "_write_all", dying_write)
    with pytest.raises(OSError, match="simulated crash"):
        train(dataclasses.replace(cfg, resume=True))
    monkeypatch.undo()
    # a SIGKILL'ed writer would also leave its temporary file behind
    (tmp_path / "run" / "ckpt-0000006.safetensors.tmp-99999").write_bytes(b"partial")

    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest.name == "ckpt-0000004.safetensors"
    after = weights(latest)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert ckpt.read_state(latest)["step"] == 4
    model, meta = ckpt.load_model(tmp_path / "run")
    assert meta["step"] == 4 and meta["model_name"] == "tiny"
    # and training resumes from it
    assert train(dataclasses.replace(cfg, resume=True))["steps"] == 6
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "ckpt-0000006.safetensors"


def test_state_file_loads_with_weights_only_and_rebuilds_the_network(tmp_path):
    summary = train(dataclasses.replace(base_config(tmp_path, 0), out=str(tmp_path / "run"), steps=2))
    state = torch.load(ckpt.state_path_for(summary["checkpoint"]), weights_only=True)
    assert state["step"] == 2 and state["data"]["world_size"] == 1
    model, meta = ckpt.load_model(summary["checkpoint"])
    assert meta["train_config"]["steps"] == 2 and meta["stage"] == "pretrain"
    sd, _ = ckpt.read_checkpoint(summary["checkpoint"], "ema")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
