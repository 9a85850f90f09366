"""Any network in the trainer: `--model plugin_net:PluginNet` (tests/trainer/plugin_net.py) through pretrain,
finetune with the distillation losses, eval, predict, export and complete, rebuilt from the checkpoint's
recorded import path and kwargs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_shards
from plugin_net import PluginNet
from typer.testing import CliRunner

from shared.depth import decode_depth_png
from shared.shard import iter_samples
from trainer.checkpoint import load_model, read_checkpoint, read_metadata
from trainer.cli import app
from trainer.complete import load_completer
from trainer.evaluate import iter_predictions, load_for_inference
from trainer.losses import multiscale_loss
from trainer.model import MULTISCALE_WEIGHTS, build_model, model_config_dict, multiscale_weights

runner = CliRunner()
PLUGIN = "plugin_net:PluginNet"


def invoke(*args, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("plugin")
    write_shards(root / "train", 1, 4, seed=1)
    write_shards(root / "val", 1, 2, seed=9, h=70, w=90)  # not a multiple of 32: padded and cut back
    common = ["--batch-size", "2", "--crop", "64x96", "--workers", "0", "--quiet", "--steps", "2"]
    invoke("pretrain", "--shards", root / "train", "--model", PLUGIN, "--model-kwargs", '{"width": 6}',
           "--out", root / "pre", *common)
    invoke("finetune", "--shards", root / "train", "--init", root / "pre", "--out", root / "ft", "--json",
           root / "ft.json", *common)
    return root


def test_checkpoint_records_the_import_path_and_kwargs(runs):
    meta = read_metadata(runs / "ft")
    assert meta["model_name"] == PLUGIN
    assert meta["model_config"] == {"arch": "plugin", "class": PLUGIN, "kwargs": {"width": 6}}
    summary = json.loads((runs / "ft.json").read_text())
    assert summary["model"] == PLUGIN and np.isfinite(summary["final_loss"])
    model, _ = load_model(runs / "ft")
    assert type(model).__name__ == "PluginNet" and model.enc[0].out_channels == 6
    # finetune started from the pretrained weights and moved them
    pre, _ = read_checkpoint(runs / "pre", "model")
    ft, _ = read_checkpoint(runs / "ft", "model")
    assert set(pre) == set(ft) and any(not torch.equal(pre[k], ft[k]) for k in pre)


def test_eval_predict_export_complete(runs):
    invoke("eval", "--ckpt", runs / "ft", "--shards", runs / "val", "--json", runs / "ev.json")
    ev = json.loads((runs / "ev.json").read_text())
    invoke("export", "--ckpt", runs / "ft", "--out", runs / "plugin.safetensors")
    invoke("eval", "--ckpt", runs / "plugin.safetensors", "--shards", runs / "val", "--json", runs / "ev2.json")
    ev2 = json.loads((runs / "ev2.json").read_text())
    assert ev["count"] == 2 and ev["model"] == PLUGIN == ev2["model"]
    assert ev["metrics"] == pytest.approx(ev2["metrics"], rel=1e-6)  # the export holds the same network
    invoke("predict", "--ckpt", runs / "plugin.safetensors", "--shards", runs / "val", "--out", runs / "pred",
           "--previews", "1")
    model, info = load_for_inference(str(runs / "ft"), device="cpu")
    complete = load_completer(runs / "plugin.safetensors")
    samples = {s.key: s for s in iter_samples(str(runs / "val"))}
    for p in iter_predictions(model, str(runs / "val")):
        png = decode_depth_png((runs / "pred" / f"{p.key}.png").read_bytes())
        assert png.shape == (70, 90)
        np.testing.assert_allclose(png, np.clip(p.depth_m, 1 / 256, None), atol=1 / 512 + 1e-6)
        s = samples[p.key]
        np.testing.assert_allclose(complete(s.rgb, s.sparse, s.K), p.depth_m, rtol=1e-5, atol=1e-5)


def test_one_output_network_trains(runs, tmp_path):
    invoke("pretrain", "--shards", runs / "train", "--model", PLUGIN, "--model-kwargs", '{"outputs": 1}',
           "--batch-size", "2", "--crop", "64x96", "--workers", "0", "--quiet", "--steps", "1", "--out", tmp_path / "r")
    assert read_metadata(tmp_path / "r")["model_config"]["kwargs"] == {"outputs": 1}


def test_bad_plugin_names_are_refused(runs, tmp_path):
    out = invoke("pretrain", "--shards", runs / "train", "--model", "no_such_module_xyz:Net", "--steps", "1",
                 "--out", tmp_path / "r", code=2)
    assert "cannot import no_such_module_xyz" in out
    out = invoke("pretrain", "--shards", runs / "train", "--model", "plugin_net:Missing", "--steps", "1",
                 "--out", tmp_path / "r", code=2)
    assert "no nn.Module subclass Missing" in out
    out = invoke("pretrain", "--shards", runs / "train", "--model", PLUGIN, "--model-kwargs", "[1]", "--steps", "1",
                 "--out", tmp_path / "r", code=2)
    assert "JSON object" in out


def test_build_model_round_trip_and_weights():
    net = build_model(PLUGIN, {"width": 4})
    assert isinstance(net, PluginNet)
    again = build_model(model_config_dict(net))
    assert model_config_dict(again) == {"arch": "plugin", "class": PLUGIN, "kwargs": {"width": 4}}
    assert multiscale_weights(6) == MULTISCALE_WEIGHTS and multiscale_weights(1) == (1.0,)
    t, m = torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert multiscale_loss([t * 0, t * 3], t, m).item() == pytest.approx(0.25 * 1 + 2)
