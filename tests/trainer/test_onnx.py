"""ONNX export (trainer/onnx_export.py): the graph's outside 4-NN search is the network's own, the export
runs in onnxruntime with the PyTorch network's outputs on frames of other sizes than the exporting one,
and the ONNX completer gives what load_completer gives on a user's frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_shards
from typer.testing import CliRunner

from shared.shard import iter_samples
from trainer import checkpoint as ckpt
from trainer import model as model_mod
from trainer.cli import app
from trainer.complete import load_completer
from trainer.model import NUM_LEVELS, build_model, model_config_dict, network_inputs
from trainer.onnx_export import (
    MAX_REL_ERR,
    OnnxExportError,
    calibrate_batchnorm,
    example_inputs,
    graph_module,
    load_onnx_completer,
    neighbours,
    read_onnx_metadata,
)
from trainer.ops import _propagate_graph, knn4, propagate

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
runner = CliRunner()


def calibrated_tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return calibrate_batchnorm(build_model("tiny"))


def test_neighbours_are_the_networks_own_search(monkeypatch):
    """neighbours() from the sparse map alone equals the 4-NN the network searches at every level (on the
    pooled maps it computes), and feeding them gives the network's outputs exactly."""
    model = calibrated_tiny()
    rgb, sparse, K, *given = example_inputs(96, 160, seed=5, density=0.03)
    sparse[..., :40, :] = 0  # empty top rows: coarse cells with and without points
    given = neighbours(sparse)
    seen = []

    def recording_knn4(s, *a, **k):
        out = knn4(s, *a, **k)
        seen.append((s.shape[-2:], out[0]))
        return out

    monkeypatch.setattr(model_mod, "knn4", recording_knn4)
    x, s, _ = network_inputs(rgb, sparse)
    with torch.no_grad():
        own = model(x, s, K)
        fed = model(x, s, K, given)
    assert len(seen) == NUM_LEVELS
    for (hw, idx) in seen:  # levels run coarse to fine
        lv = [i for i in range(NUM_LEVELS) if given[i].shape[-1] == hw[0] * hw[1]][0]
        assert torch.equal(idx, given[lv]), f"level {lv}"
    for a, b in zip(own, fed, strict=True):
        assert torch.equal(a, b)


def test_neighbours_refuse_a_frame_the_graph_cannot_take():
    with pytest.raises(ValueError, match="multiples of 32"):
        neighbours(np.zeros((70, 90), np.float32))


def test_graph_propagation_equals_the_eager_one():
    g = torch.Generator().manual_seed(0)
    h, h0, m = (torch.rand(2, 1, 20, 30, generator=g) for _ in range(3))
    for k in (3, 5, 7):
        w = torch.randn(2, k * k - 1, 20, 30, generator=g)
        for a, b in zip(propagate(h, h0, w, m, 6), _propagate_graph(h, h0, w, m, 6, 2, 1e-6), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_plugin_network_is_refused_with_a_clear_error():
    with pytest.raises(OnnxExportError, match="BP-Net"):
        graph_module(torch.nn.Conv2d(1, 1, 1))


def test_cli_export_matches_pytorch_carries_metadata_and_completes_a_frame(tmp_path):
    """One export (it is the slow part; one test so that one worker pays for it): `trainer export --onnx`
    passes its own check on three sizes; a fourth size, larger than any the export saw, agrees too; the
    checkpoint's metadata travels; the ONNX completer gives what load_completer gives on a 70 x 90 frame
    from a real shard sample (not a multiple of 32: padded and cut back)."""
    import onnxruntime as ort

    torch.set_num_threads(1)
    model = calibrated_tiny()
    sd = model.state_dict()
    meta = {"model_name": "tiny", "model_config": model_config_dict(model), "stage": "finetune",
            "convention": "kitti", "provenance": [{"source": "synthetic", "teacher": {"id": "oracle"}}]}
    ckpt.save_checkpoint(tmp_path / "run", 1, sd, {k: v.clone() for k, v in sd.items()}, meta, state={"step": 1})
    # --no-onnx-optimize: onnxscript's clean-up is half the export's time here (48 s against 91 s); the graph
    # it tidies is the same network, and every export is checked in onnxruntime either way
    result = runner.invoke(app, ["export", "--ckpt", str(tmp_path / "run"), "--onnx", str(tmp_path / "net.onnx"),
                                 "--no-onnx-optimize"])
    assert result.exit_code == 0, result.output
    assert "max relative error" in result.output

    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    args = example_inputs(160, 448, seed=9)
    with torch.no_grad():
        ref = graph_module(calibrated_tiny())(*args).numpy()
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)})[0]
    assert got.shape == ref.shape == (1, 1, 160, 448)
    assert np.abs(got - ref).max() <= MAX_REL_ERR * np.abs(ref).max()

    meta = read_onnx_metadata(tmp_path / "net.onnx")
    assert meta["convention"] == "kitti" and meta["model_name"] == "tiny"
    assert build_model(meta["model_config"]).config == build_model("tiny").config
    assert meta["provenance"][0]["teacher"]["id"] == "oracle"
    assert meta["dmd3c"]["graph_inputs"][:3] == ["rgb", "sparse", "K"]

    write_shards(tmp_path / "shards", 1, 1, seed=3, h=70, w=90)
    s = next(iter(iter_samples(str(tmp_path / "shards"))))
    ref = load_completer(tmp_path / "run")(s.rgb, s.sparse, s.K)
    got = load_onnx_completer(tmp_path / "net.onnx")(s.rgb, s.sparse, s.K)
    assert got.shape == ref.shape == (70, 90)
    assert np.abs(got - ref).max() <= MAX_REL_ERR * np.abs(ref).max()


def test_pooled_validity_is_max_pooling():
    """The premise of neighbours(): a coarse cell of the learned pooling is valid exactly where max pooling
    of the input's validity is (cells with points get a depth between their points', the others 0)."""
    model = calibrated_tiny()
    rgb, sparse, K, *_ = example_inputs(64, 128, seed=3, density=0.02)
    feat = torch.randn(1, 8, 64 // 4, 128 // 4)
    with torch.no_grad():
        pooled = model.pred2.wpool(sparse, feat)
    assert torch.equal(pooled > 1e-3, F.max_pool2d((sparse > 1e-3).float(), 4) > 0)
