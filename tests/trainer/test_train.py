"""The training loop learns: a tiny model overfits one fixed batch; fine-tuning lowers its loss."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import write_shards

from trainer.train import EMA, RunLog, TrainConfig, compute_loss, lr_at, param_groups, train


def fixed_batch_config(tmp_path, stage: str, steps: int, lr: float) -> TrainConfig:
    """One shard of 2 samples, crop = image size, no flip, no jitter: every batch is the same batch."""
    write_shards(tmp_path / "s", 1, 2)
    return TrainConfig(stage=stage, shards=str(tmp_path / "s"), out=str(tmp_path / stage), model="tiny",
                       steps=steps, batch_size=2, crop="64x96", workers=0, flip=False, jitter=0.0, lr=lr,
                       warmup_frac=0.05, lr_end_frac=0.05, log_every=1, ckpt_every=10_000, progress=False)


def logged_losses(out) -> list[float]:
    with open(out / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_tiny_model_overfits_one_fixed_batch(tmp_path):
    cfg = fixed_batch_config(tmp_path, "pretrain", steps=30, lr=1e-2)
    summary = train(cfg)
    losses = logged_losses(tmp_path / "pretrain")
    assert len(losses) == 30 and summary["steps"] == 30
    assert losses[-1] <= losses[0] / 10, losses
    assert summary["final_loss"] == pytest.approx(losses[-1])


def test_finetune_loss_goes_down_and_logs_its_terms(tmp_path):
    cfg = fixed_batch_config(tmp_path, "finetune", steps=15, lr=1e-2)
    train(cfg)
    with open(tmp_path / "finetune" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < 0.5 * losses[0], losses
    for term in ("sup", "ssi", "reg"):
        assert all(float(r[term]) >= 0 for r in rows)
    first = rows[0]
    total = float(first["sup"]) + cfg.lambda_ssi * float(first["ssi"]) + cfg.lambda_reg * float(first["reg"])
    assert total == pytest.approx(float(first["loss"]), rel=1e-5)
    # each term's pull on the prediction is logged, so a user sees whether distillation pulls
    assert set(RunLog.PULLS) <= set(rows[0])
    for r in rows:
        shares = [float(r[f"share_{t}"]) for t in ("sup", "ssi", "reg")]
        assert sum(shares) == pytest.approx(1.0, rel=1e-4) and min(shares) > 0.05, shares
        assert float(r["pull_ssi_unlabelled"]) > 0 and float(r["pull_sup_unlabelled"]) == 0


def test_space_depth_refuses_samples_without_pseudo_depth():
    """--space depth fits the teacher in depth, which only unlabelled shards (depth.png) allow; on labelled
    shards it used to turn distillation silently off (both terms 0)."""
    b = 2
    batch = {"key": ["kitti-a", "kitti-b"], "has_depth": torch.tensor([True, False]),
             "depth": torch.rand(b, 1, 8, 8) + 1, "gt": torch.rand(b, 1, 8, 8) + 1,
             "teacher": torch.rand(b, 1, 8, 8) + 0.1}
    preds = [torch.rand(b, 1, 8, 8) + 1 for _ in range(6)]
    with pytest.raises(ValueError, match="kitti-b.*--space disparity"):
        compute_loss(TrainConfig(stage="finetune", space="depth"), preds, batch)
    batch["has_depth"][:] = True
    _, parts = compute_loss(TrainConfig(stage="finetune", space="depth"), preds, batch)
    assert parts["ssi"] > 0


def test_one_cycle_schedule_shape():
    cfg = TrainConfig(steps=100, lr=1.0, lr_start_frac=0.1, lr_end_frac=0.01, warmup_frac=0.1)
    lrs = [lr_at(s, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.01)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))


def test_weight_decay_skips_1d_parameters_and_ema_averages():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    decay, no_decay = param_groups(net, 0.05)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
    ema = EMA(net, decay=0.5, warmup=False)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.module[0].weight, w0 + 0.5)


def test_the_teacher_is_fitted_in_the_space_its_kind_is_affine_in():
    """datagen records the teacher's kind (meta teacher.output): a relative disparity and a metric map
    (as 1/m) are fitted in disparity, a relative-depth map in depth; a prediction that is an exact affine
    image of the teacher in its own space leaves L_SSI at 0."""
    from shared.shard import Sample
    from trainer.data import teacher_map

    depth = np.linspace(2.0, 30.0, 8 * 8, dtype=np.float32).reshape(8, 8)

    def sample(kind, teacher):
        meta = {"teacher": {"output": kind}} if kind else {}
        return Sample(key="k", rgb=np.zeros((8, 8, 3), np.uint8), K=np.eye(3), teacher=teacher, meta=meta)

    t, space = teacher_map(sample("metric", depth))
    np.testing.assert_allclose(t, 1.0 / depth, rtol=1e-6)
    assert space == "disparity"
    assert teacher_map(sample(None, 1.0 / depth))[1] == "disparity"  # shards from before: disparity
    rel_depth = 0.3 * depth + 2.0
    t, space = teacher_map(sample("depth", rel_depth))
    assert space == "depth" and t is rel_depth
    with pytest.raises(ValueError, match="teacher.output"):
        teacher_map(sample("normals", depth))

    b = 2
    pred = torch.from_numpy(depth).expand(b, 1, 8, 8).clone()
    batch = {"key": ["a", "b"], "gt": torch.zeros(b, 1, 8, 8), "has_depth": torch.tensor([False, False]),
             "teacher": torch.from_numpy(rel_depth).expand(b, 1, 8, 8).clone(), "teacher_space": ["depth"] * b}
    cfg = TrainConfig(stage="finetune")
    _, parts = compute_loss(cfg, [pred] * 6, batch)
    assert parts["ssi"] < 1e-4  # fitted in depth: exact
    _, parts_as_disp = compute_loss(cfg, [pred] * 6, {**batch, "teacher_space": ["disparity"] * b})
    assert parts_as_disp["ssi"] > 0.1  # read as a disparity, the same map would be wrong
    with pytest.raises(ValueError, match="mixes"):
        compute_loss(cfg, [pred] * 6, {**batch, "teacher_space": ["depth", "disparity"]})
