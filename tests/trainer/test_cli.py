"""The command line end to end on tiny shards: pretrain -> finetune --init -> eval -> predict -> score,
plus export and an original-style .pth checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_shards
from typer.testing import CliRunner

from shared.depth import decode_depth_png, encode_depth_png
from shared.shard import iter_samples
from trainer.cli import app
from trainer.evaluate import iter_predictions, load_for_inference

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    write_shards(root / "train", 2, 4, seed=1)
    write_shards(root / "val", 1, 3, seed=9)  # held out
    common = ["--model", "tiny", "--batch-size", "2", "--crop", "64x96", "--workers", "0", "--quiet"]
    invoke("pretrain", "--shards", root / "train", "--steps", "3", "--out", root / "pre", "--json",
           root / "pre.json", *common)
    invoke("finetune", "--shards", root / "train", "--init", root / "pre", "--steps", "30", "--lr", "1e-2",
           "--out", root / "ft", "--json", root / "ft.json", "--val-shards", root / "val", "--val-every", "10",
           "--val-top-rows", "16", *common[2:])
    return root


def eval_json(root, ckpt, name, *extra) -> dict:
    out = invoke("eval", "--ckpt", ckpt, "--shards", root / "val", "--json", root / f"{name}.json", *extra)
    assert ("RMSE [m]" if "nyu" in extra else "RMSE [mm]") in out
    return json.loads((root / f"{name}.json").read_text())


def test_pretrain_and_finetune_write_their_runs(runs):
    pre, ft = (json.loads((runs / f"{n}.json").read_text()) for n in ("pre", "ft"))
    assert pre["stage"] == "pretrain" and pre["steps"] == 3 and pre["model"] == "tiny"
    assert ft["stage"] == "finetune" and ft["model"] == "tiny"  # the network came from --init
    assert ft["final_loss"] < ft["first_loss"]
    assert (runs / "ft" / "latest").read_text().strip() == "ckpt-0000030"


def test_validation_logs_and_eval_takes_the_best_checkpoint(runs):
    import csv

    with open(runs / "ft" / "log.csv", newline="") as f:
        val = {int(r["step"]): float(r["val_rmse_m"]) for r in csv.DictReader(f) if r["val_rmse_m"]}
    assert sorted(val) == [10, 20, 30]
    best_step = min(val, key=val.get)
    best = eval_json(runs, runs / "ft" / "best", "eval-best")
    assert best["step"] == best_step
    assert best["metrics"]["rmse_mm"] == pytest.approx(1000 * val[best_step], rel=1e-9)
    assert json.loads((runs / "ft.json").read_text())["best_checkpoint"].endswith(f"{best_step:07d}.safetensors")
    assert (runs / "ft" / "curves.png").is_file()


def test_finetuning_lowers_rmse_on_held_out_samples(runs):
    before = eval_json(runs, runs / "pre", "eval-pre")
    after = eval_json(runs, runs / "ft", "eval-ft")
    assert before["count"] == after["count"] == 3 and after["skipped"] == 0
    assert after["metrics"]["rmse_mm"] < before["metrics"]["rmse_mm"]
    steps1 = eval_json(runs, runs / "ft", "eval-1", "--steps", "1")
    assert steps1["count"] == 1


def test_predict_writes_full_size_pngs_that_read_back_to_the_predictions(runs):
    out = runs / "pred"
    invoke("predict", "--ckpt", runs / "ft", "--shards", runs / "val", "--out", out, "--previews", "2")
    model, _ = load_for_inference(str(runs / "ft"), device="cpu")
    preds = list(iter_predictions(model, str(runs / "val")))
    assert len(preds) == 3
    for p in preds:
        png = decode_depth_png((out / f"{p.key}.png").read_bytes())
        assert png.shape == p.full_hw == (64, 96)
        expected = np.clip(p.full_size(), 1 / 256, 65535 / 256)
        assert np.abs(png - expected).max() <= 1 / 256
    assert len(list((out / "preview").glob("*.png"))) == 2


def test_score_matches_eval_within_png_rounding(runs):
    out = runs / "pred"
    if not out.exists():
        invoke("predict", "--ckpt", runs / "ft", "--shards", runs / "val", "--out", out)
    gt = runs / "gt"
    gt.mkdir(exist_ok=True)
    for s in iter_samples(runs / "val"):
        (gt / f"{s.key}.png").write_bytes(encode_depth_png(s.gt))
    table = invoke("score", "--pred", out, "--gt", gt, "--kind", "kitti", "--json", runs / "score.json")
    assert "iRMSE" in table
    scored = json.loads((runs / "score.json").read_text())
    evaluated = eval_json(runs, runs / "ft", "eval-ft2")
    assert scored["count"] == 3
    assert scored["metrics"]["rmse_mm"] == pytest.approx(evaluated["metrics"]["rmse_mm"], abs=1000 / 256)


def test_export_and_original_pth_give_the_same_metrics(runs):
    exported = runs / "model.safetensors"
    invoke("export", "--ckpt", runs / "ft", "--out", exported)
    ref = eval_json(runs, runs / "ft", "eval-ref")["metrics"]
    assert eval_json(runs, exported, "eval-export")["metrics"] == ref
    # an original BP-Net / DMD3C checkpoint: weights under "net", loaded with weights_only=True
    model, _ = load_for_inference(str(exported), device="cpu")
    torch.save({"net": model.state_dict(), "epoch": 1}, runs / "orig.pth")
    assert eval_json(runs, runs / "orig.pth", "eval-pth", "--model", "tiny")["metrics"] == ref
    nyu = eval_json(runs, runs / "ft", "eval-nyu", "--kind", "nyu")["metrics"]
    assert set(nyu) == {"rmse_m", "rel", "delta1", "delta2", "delta3"}
    assert nyu["rmse_m"] == pytest.approx(ref["rmse_mm"] / 1000)
