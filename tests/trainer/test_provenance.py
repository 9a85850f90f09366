"""Provenance travels with the weights: shards' job.json / meta.json -> checkpoint -> --init child -> export
and model card, with a warning wherever a teacher's licence forbids commercial use."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import make_sample, write_shards
from typer.testing import CliRunner

from shared.shard import ShardWriter
from trainer.checkpoint import load_model, read_checkpoint, read_metadata
from trainer.cli import app
from trainer.complete import load_completer
from trainer.provenance import collect, most_restrictive

runner = CliRunner()
DA_LARGE = "depth-anything/Depth-Anything-V2-Large-hf"
DA_SMALL = "depth-anything/Depth-Anything-V2-Small-hf"


def invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def teacher_shards(root, teacher: str, revision: str, licence: str | None, source: str, seed: int):
    """Two samples whose meta.json names the teacher, and (licence given) the job.json `datagen run` writes."""
    root.mkdir(parents=True)
    with ShardWriter(root / f"{source}-000000.tar", rgb_format="png") as wr:
        for i in range(4):
            s = make_sample(i, seed=seed)
            s.meta = {"source": source, "source_path": f"/x/{i}",
                      "teacher": {"model": teacher, "revision": revision, "dtype": "float32", "output": "disparity"}}
            wr.write(s)
    if licence is not None:
        (root / "job.json").write_text(json.dumps({
            "source": source, "teacher": teacher, "seed": 0,
            "teacher_about": {"license": {"license": licence, "source": "model card",
                                          "non_commercial": licence.startswith("cc-by-nc")}}}))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("prov")
    teacher_shards(root / "coco", DA_LARGE, "rev-large", "cc-by-nc-4.0", "coco", 1)
    teacher_shards(root / "kitti", DA_SMALL, "rev-small", None, "kitti", 2)  # no job.json: meta.json only
    write_shards(root / "val", 1, 2, seed=9)
    common = ["--model", "tiny", "--batch-size", "2", "--crop", "64x96", "--workers", "0", "--quiet", "--steps", "2"]
    invoke("pretrain", "--shards", root / "coco", "--out", root / "pre", *common)
    invoke("finetune", "--shards", root / "kitti", "--init", root / "pre", "--out", root / "ft",
           "--val-shards", root / "val", "--val-every", "2", *common[2:])
    return root


def test_collect_reads_job_json_then_meta(runs):
    (coco,) = collect(str(runs / "coco"), "pretrain")
    assert coco == {"shards": str(runs / "coco"), "source": "coco", "stage": "pretrain",
                    "teacher": {"id": DA_LARGE, "revision": "rev-large", "licence": "cc-by-nc-4.0",
                                "non_commercial": True}}
    (kitti,) = collect(str(runs / "kitti"))
    assert kitti["source"] == "kitti" and kitti["teacher"]["id"] == DA_SMALL
    assert kitti["teacher"]["revision"] == "rev-small" and kitti["teacher"]["licence"] == "unknown"


def test_checkpoints_record_and_init_appends(runs):
    pre = read_metadata(runs / "pre")["provenance"]
    assert [e["teacher"]["id"] for e in pre] == [DA_LARGE] and pre[0]["stage"] == "pretrain"
    ft = read_metadata(runs / "ft")["provenance"]
    assert ft[0] == pre[0]  # the parent's entry carried over unchanged, then this run's
    assert [(e["stage"], e["source"], e["teacher"]["id"]) for e in ft] == [
        ("pretrain", "coco", DA_LARGE), ("finetune", "kitti", DA_SMALL)]


def test_export_carries_provenance_and_warns(runs, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer"):
        invoke("export", "--ckpt", runs / "ft", "--out", runs / "model.safetensors")
    assert any("non-commercial" in r.getMessage() and "cc-by-nc-4.0" in r.getMessage() for r in caplog.records)
    assert read_metadata(runs / "model.safetensors")["provenance"] == read_metadata(runs / "ft")["provenance"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        load_completer(runs / "model.safetensors")
    assert any("cc-by-nc-4.0" in r.getMessage() for r in caplog.records)


def test_model_card(runs):
    invoke("export", "--ckpt", runs / "ft", "--model-card", runs / "card")
    card = runs / "card"
    readme = (card / "README.md").read_text()
    front = readme.split("---\n")[1]
    assert "license: cc-by-nc-4.0\n" in front and "library_name: dmd3c\n" in front and "- depth-completion" in front
    assert DA_LARGE in readme and DA_SMALL in readme and "rev-large" in readme
    meta = read_metadata(runs / "ft")
    assert meta["val"]["rmse_m"] is not None and f"| rmse_m | {meta['val']['rmse_m']:.4f} |" in readme
    config = json.loads((card / "config.json").read_text())
    assert config["model_name"] == "tiny" and config["model_config"] == meta["model_config"]
    sd, _ = read_checkpoint(runs / "ft", "ema")
    model, _ = load_model(card / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_most_restrictive_licence():
    def entry(lic):
        return {"teacher": {"licence": lic}}

    assert most_restrictive([entry("apache-2.0"), entry("cc-by-nc-4.0")]) == "cc-by-nc-4.0"
    assert most_restrictive([entry("apache-2.0")]) == "apache-2.0"
    assert most_restrictive([entry("apache-2.0"), entry("unknown")]) == "other"
    assert most_restrictive([entry("apache-2.0"), entry("mit")]) == "other"
    assert most_restrictive([]) == "other"
