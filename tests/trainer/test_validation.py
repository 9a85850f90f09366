"""Validation during training (--val-shards): the logged numbers equal an independent evaluation of the
checkpoint saved at that step, `best` follows the lowest validation RMSE and survives pruning and resume,
validation changes no weight, an old log.csv stays one table, and the learning-curve figures."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
from conftest import write_shards

from trainer import checkpoint as ckpt
from trainer import curves, validate
from trainer.evaluate import evaluate, iter_predictions, load_for_inference
from trainer.train import RunLog, TrainConfig, train


@pytest.fixture
def sets(tmp_path):
    write_shards(tmp_path / "s", 3, 3)
    write_shards(tmp_path / "v", 1, 3, seed=7)  # its own seed: never the training samples
    return tmp_path


def config(root, **kw) -> TrainConfig:
    base = dict(stage="finetune", shards=str(root / "s"), model="tiny", steps=6, batch_size=2, crop="32x64",
                workers=0, lr=3e-3, seed=11, shuffle_buffer=4, ema_decay=0.9, log_every=1, ckpt_every=100,
                progress=False, curves=False)
    return TrainConfig(**{**base, **kw})


def rows_of(run) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def weights(path) -> dict[str, torch.Tensor]:
    model, _ = ckpt.read_checkpoint(path, "model")
    ema, _ = ckpt.read_checkpoint(path, "ema")
    return {**{f"model.{k}": v for k, v in model.items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def test_logged_validation_equals_an_evaluation_of_the_checkpoint_of_that_step(sets):
    run = sets / "run"
    summary = train(config(sets, out=str(run), val_shards=str(sets / "v"), val_every=3, val_top_rows=12))
    val_rows = [r for r in rows_of(run) if r["val_rmse_m"]]
    assert [int(r["step"]) for r in val_rows] == [3, 6]
    for r in val_rows:
        path = run / f"ckpt-{int(r['step']):07d}.safetensors"  # a validation always has its checkpoint
        assert ckpt.read_metadata(path)["val"]["rmse_m"] == pytest.approx(float(r["val_rmse_m"]), rel=1e-12)
        ref = evaluate(str(path), str(sets / "v"))  # `trainer eval`: per image, then the mean; in mm
        assert int(r["val_images"]) == ref["count"] == 3
        assert float(r["val_rmse_m"]) * 1000 == pytest.approx(ref["metrics"]["rmse_mm"], rel=1e-9)
        assert float(r["val_mae_m"]) * 1000 == pytest.approx(ref["metrics"]["mae_mm"], rel=1e-9)
        # the top 12 rows, computed here by hand
        model, _ = load_for_inference(str(path), device="cpu")
        rmse, mae = [], []
        for p in iter_predictions(model, str(sets / "v")):
            m = p.gt[:12] > 0
            err = np.maximum(p.depth_m[:12][m].astype(np.float64), 1 / 256) - p.gt[:12][m]
            rmse.append(np.sqrt(np.mean(err**2)))
            mae.append(np.mean(np.abs(err)))
        assert float(r["val_top_rmse_m"]) == pytest.approx(np.mean(rmse), rel=1e-9)
        assert float(r["val_top_mae_m"]) == pytest.approx(np.mean(mae), rel=1e-9)
        assert float(r["val_s"]) > 0
    best = min(val_rows, key=lambda r: float(r["val_rmse_m"]))
    assert ckpt.resolve(run / "best").name == f"ckpt-{int(best['step']):07d}.safetensors"
    assert summary["best_val_rmse_m"] == pytest.approx(float(best["val_rmse_m"]))
    assert summary["val"]["step"] == 6


def test_validation_changes_no_weight_and_resume_stays_exact(sets):
    cfg = config(sets)
    plain = train(dataclasses.replace(cfg, out=str(sets / "plain")))
    with_val = dataclasses.replace(cfg, val_shards=str(sets / "v"), val_every=2, val_top_rows="auto")
    straight = train(dataclasses.replace(with_val, out=str(sets / "val")))
    train(dataclasses.replace(with_val, out=str(sets / "half"), stop_at=3))
    resumed = train(dataclasses.replace(with_val, out=str(sets / "half"), resume=True))
    a = weights(plain["checkpoint"])
    for other in (straight, resumed):
        b = weights(other["checkpoint"])
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    # "auto": the conftest shards label about half the pixels of every row, so no row is free of labels
    assert ckpt.read_metadata(straight["checkpoint"])["val"]["top_rows"] == 0


def scripted(monkeypatch, rmses: list[float]):
    """validate() returning these RMSEs in turn (what best and pruning react to)."""
    queue = list(rmses)

    def fake(model, shards, convention="kitti", top_rows=None):
        r = queue.pop(0)
        return {"val_rmse_m": r, "val_mae_m": r / 2, "val_top_rmse_m": float("nan"), "val_top_mae_m": float("nan"),
                "val_images": 3, "val_top_images": 0, "val_s": 0.01}

    monkeypatch.setattr(validate, "validate", fake)
    return queue


def test_best_follows_the_lowest_rmse_survives_pruning_and_resume(sets, monkeypatch):
    run = sets / "run"
    cfg = config(sets, out=str(run), steps=8, val_shards=str(sets / "v"), val_every=1, keep=2)
    queue = scripted(monkeypatch, [5.0, 2.0, 4.0, 3.0, 6.0, 7.0])
    train(dataclasses.replace(cfg, stop_at=6))
    assert not queue
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["ckpt-0000002.safetensors", "ckpt-0000005.safetensors", "ckpt-0000006.safetensors"]
    assert (run / "best").read_text().strip() == "ckpt-0000002"
    assert ckpt.read_metadata(run / "best")["step"] == 2  # RUN/best works wherever a checkpoint is taken
    assert ckpt.resolve(run).name == "ckpt-0000006.safetensors"  # the run directory still means latest
    # resumed: 2.0 is still the one to beat (read from the checkpoint's metadata)
    scripted(monkeypatch, [2.5, 1.5])
    summary = train(dataclasses.replace(cfg, resume=True))
    assert summary["best_checkpoint"].endswith("ckpt-0000008.safetensors") and summary["best_val_rmse_m"] == 1.5
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt-0000007.safetensors", "ckpt-0000008.safetensors"]
    rows = [r for r in rows_of(run) if r["val_rmse_m"]]
    assert [float(r["val_rmse_m"]) for r in rows] == [5.0, 2.0, 4.0, 3.0, 6.0, 7.0, 2.5, 1.5]


def test_best_of_a_run_without_validation_is_a_clear_error(sets, monkeypatch):
    scripted(monkeypatch, [1.0])
    train(config(sets, out=str(sets / "run"), steps=2, val_shards=str(sets / "v"), val_every=5))
    assert ckpt.resolve(sets / "run" / "best").name == "ckpt-0000002.safetensors"
    # a fresh run (no --resume) in the same directory: the earlier run's best means nothing for it
    train(config(sets, out=str(sets / "run"), steps=2))
    with pytest.raises(FileNotFoundError, match="no validation"):
        ckpt.resolve(sets / "run" / "best")


def test_a_log_from_before_validation_stays_one_table_after_resume(sets):
    run = sets / "run"
    cfg = config(sets, out=str(run))
    train(dataclasses.replace(cfg, stop_at=3))
    # make it look like a log.csv written before the val_* columns existed
    old_cols = [c for c in RunLog.COLUMNS if not c.startswith("val_")]
    rows = rows_of(run)
    with open(run / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_cols)
        w.writeheader()
        w.writerows({k: r[k] for k in old_cols} for r in rows)
    train(dataclasses.replace(cfg, resume=True, val_shards=str(sets / "v"), val_every=3))
    with open(run / "log.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == old_cols + [c for c in RunLog.COLUMNS if c not in old_cols]
    assert all(len(r) == len(header) for r in body)
    parsed = curves.read_log(run)
    assert parsed["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert np.isnan(parsed["val_rmse_m"][:5]).all() and np.isfinite(parsed["val_rmse_m"][5])


def test_top_rows_and_the_bad_settings():
    gt = np.full((6, 4), 10.0)
    pred = gt.copy()
    pred[:2] += 3.0  # wrong in the top two rows only
    got = validate.score_images([(pred, gt), (gt, gt)], top_rows=2)
    assert got["val_top_mae_m"] == pytest.approx(1.5) and got["val_top_rmse_m"] == pytest.approx(1.5)
    assert got["val_mae_m"] == pytest.approx(0.5) and got["val_rmse_m"] == pytest.approx(np.sqrt(3.0) / 2)
    assert got["val_images"] == got["val_top_images"] == 2
    assert np.isnan(validate.score_images([(pred, gt)])["val_top_rmse_m"])
    assert validate.parse_top_rows("auto") == "auto" and validate.parse_top_rows("7") == 7
    with pytest.raises(ValueError, match="val-top-rows"):
        validate.parse_top_rows("top")
    with pytest.raises(ValueError, match="val-every"):
        train(TrainConfig(val_every=0))


def test_validation_sets_without_gt_and_auto_without_labels_are_refused(tmp_path):
    write_shards(tmp_path / "u", 1, 2, labelled=False)
    with pytest.raises(ValueError, match="no gt.png"):
        validate.check_val_shards(tmp_path / "u")
    with pytest.raises(ValueError, match="give --val-top-rows"):
        validate.unlabelled_rows(tmp_path / "u")


def test_curves_of_one_run_and_of_several(tmp_path):
    def fake_run(name, val):
        d = tmp_path / name
        d.mkdir()
        with open(d / "log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "val_rmse_m"])
            w.writeheader()
            for step, loss, v in ((1, 3.0, ""), (2, 2.0, val[0]), (3, 1.5, ""), (4, 1.0, val[1])):
                w.writerow({"step": step, "loss": loss, "val_rmse_m": v})
        return d

    a, b, c = fake_run("a", (4.0, 2.0)), fake_run("b", (6.0, 3.0)), fake_run("c", (1.0, 1.0))
    drawn = curves.plot_runs({"full": [a, b], "sup": [c]}, tmp_path / "all.png")
    steps, mean = drawn["full"]["val_rmse_m"]
    assert steps.tolist() == [2, 4] and mean.tolist() == [5.0, 2.5]  # the mean over the seeds
    assert drawn["sup"]["loss"][1].tolist() == [3.0, 2.0, 1.5, 1.0]
    assert "val_top_rmse_m" not in drawn["full"]  # no such column: nothing drawn
    assert (tmp_path / "all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert curves.plot_run(a).name == "curves.png" and (a / "curves.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="log.csv"):
        curves.read_log(tmp_path / "nothing")
