"""`make finetune-kitti` and `make finetune-nyu` end to end: tiny fake trees in the real layouts, a tiny
random Depth Anything teacher, the tiny network and 2 steps; datagen with --workers 0 (its shard tasks in
its own process: Ray's start-up would be most of the test, and tests/datagen/test_pipeline.py covers the
same tasks under Ray). Make runs in a subprocess with this very
interpreter's venv (VENV/BIN) and `-o <stamp>`, so the setup step is never redone (no network here).

It lives in tests/datagen because it uses the datagen fixtures and builds the teacher with transformers;
the trainer runs only in make's subprocesses."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures import make_kitti, make_nyu  # noqa: E402

from datagen.teachers.runner import save_random_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="needs GNU make")

# variables of the targets: never inherited from the environment of whoever runs the tests
MAKE_VARS = ("KITTI_ROOT", "NYU_ROOT", "TEACHER", "INIT", "MODEL", "STEPS", "OUT", "SHARDS", "CROP", "EVAL_CROP",
             "PRESET", "BATCH_SIZE", "DATAGEN_ARGS", "TRAIN_ARGS")
KITTI_KEYS = {"rmse_mm", "mae_mm", "irmse_per_km", "imae_per_km"}
NYU_KEYS = {"rmse_m", "rel", "delta1", "delta2", "delta3"}


def make(target: str, **variables) -> subprocess.CompletedProcess:
    venv = Path(sys.prefix)
    cmd = [MAKE, "-s", "-o", f"{venv}/.setup-stamp", f"VENV={venv}", f"BIN={Path(sys.executable).parent}", target]
    cmd += [f"{k}={v}" for k, v in variables.items()]
    # an outer `make test` leaves MAKEFLAGS/MAKELEVEL (and maybe jobserver fds) behind: start clean
    env = {k: v for k, v in os.environ.items() if k not in (*MAKE_VARS, "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_da(tmp_path_factory) -> str:
    """A tiny random Depth Anything plus a V2-style processor, saved with save_pretrained."""
    return save_random_teacher(tmp_path_factory.mktemp("tiny_da"))


def check_eval(path: Path, keys: set[str], expected_names: list[str]) -> dict:
    result = json.loads(path.read_text())
    assert set(result["metrics"]) == keys
    assert all(math.isfinite(v) for v in result["metrics"].values()), result["metrics"]
    # every held-out sample was scored, and only those: the eval ran on the eval split's shards
    assert sorted(r["name"] for r in result["per_image"]) == sorted(expected_names)
    assert result["count"] == len(expected_names) and result["skipped"] == 0
    assert result["model"] == "tiny" and result["step"] == 2
    return result


def manifest_keys(folder: Path) -> list[str]:
    return sorted(pq.read_table(folder / "manifest.parquet").column("key").to_pylist())


def test_missing_or_wrong_root_fails_before_any_work(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "run"
    for target, var, expect in (("finetune-kitti", "KITTI_ROOT", "data_depth_velodyne"),
                                ("finetune-nyu", "NYU_ROOT", "val/official")):
        res = make(target, SHARDS=shards, OUT=out, TEACHER=tmp_path / "no-teacher")
        assert res.returncode != 0
        assert f"{var} is not set" in res.stderr and expect in res.stderr, res.stderr
        assert "Traceback" not in res.stderr + res.stdout
    # a tree with the training split but no val_selection_cropped: the eval split is checked up front too
    make_kitti(tmp_path / "kitti", splits=("train",), selection=0, test=0)
    res = make("finetune-kitti", KITTI_ROOT=tmp_path / "kitti", SHARDS=shards, OUT=out)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "val_selection_cropped" in res.stderr and "Expected the kitti layout" in res.stderr, res.stderr
    # an empty folder as NYU_ROOT
    (tmp_path / "empty").mkdir()
    res = make("finetune-nyu", NYU_ROOT=tmp_path / "empty", SHARDS=shards, OUT=out)
    assert res.returncode != 0 and "Expected the nyu layout" in res.stderr and "Traceback" not in res.stderr
    assert not shards.exists() and not out.exists()  # nothing was started


def test_finetune_kitti_end_to_end(tmp_path, tiny_da):
    tree = make_kitti(tmp_path / "kitti", drives=1, frames=2, splits=("train",), selection=2, test=0)
    shards, out = tmp_path / "shards", tmp_path / "run"
    args = dict(KITTI_ROOT=tree["root"], TEACHER=tiny_da, MODEL="tiny", STEPS=2, OUT=out, SHARDS=shards,
                CROP="64x96", BATCH_SIZE=2, TRAIN_ARGS="--workers 0 --quiet", DATAGEN_ARGS="--workers 0")
    res = make("finetune-kitti", **args)
    assert res.returncode == 0, res.stdout + res.stderr

    train_dir, eval_dir = shards / "kitti-train" / "kitti", shards / "kitti-val_selection_cropped" / "kitti"
    train_keys = manifest_keys(train_dir)
    assert len(train_keys) == tree["splits"]["train"]["count"] == 4
    sel_keys = ["kitti-" + r["id"].replace("/", "_") for r in tree["splits"]["val_selection_cropped"]["items"]]
    assert manifest_keys(eval_dir) == sorted(sel_keys)
    assert not set(train_keys) & set(sel_keys)
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["stage"] == "finetune" and summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    first = check_eval(out / "eval-val_selection_cropped.json", KITTI_KEYS, sel_keys)

    # again: shards and the finished fine-tune are reused (bytes untouched), the evaluation is redone
    before = {p: p.read_bytes() for p in [*train_dir.glob("*.tar"), *eval_dir.glob("*.tar"), out / "latest",
                                          *out.glob("ckpt-*.safetensors")]}
    res = make("finetune-kitti", **args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "done 0, skipped 4" in res.stdout and "done 0, skipped 2" in res.stdout
    assert "fine-tuned already (step 2)" in res.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert check_eval(out / "eval-val_selection_cropped.json", KITTI_KEYS, sel_keys)["metrics"] == first["metrics"]

    # the same OUT with another INIT would silently continue the old run: refused before any work
    res = make("finetune-kitti", **{**args, "INIT": out})
    assert res.returncode != 0 and "use another OUT" in res.stderr and "Traceback" not in res.stderr
    assert "+ datagen.cli run" not in res.stderr


def test_finetune_nyu_end_to_end(tmp_path, tiny_da):
    tree = make_nyu(tmp_path / "nyu", splits=("train", "val"), frames=2)  # 64 x 48 frames
    shards, out = tmp_path / "shards", tmp_path / "run"
    res = make("finetune-nyu", NYU_ROOT=tree["root"], TEACHER=tiny_da, MODEL="tiny", STEPS=2, OUT=out,
               SHARDS=shards, CROP="32x64", BATCH_SIZE=2, TRAIN_ARGS="--workers 0 --quiet", DATAGEN_ARGS="--workers 0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(manifest_keys(shards / "nyu-train" / "nyu")) == 2
    val_keys = [f"nyu-val_official_{p['path'].stem}" for p in tree["splits"]["val"]["items"]]
    assert manifest_keys(shards / "nyu-val" / "nyu") == sorted(val_keys)
    result = check_eval(out / "eval-val.json", NYU_KEYS, val_keys)
    assert all(0 <= result["metrics"][k] <= 1 for k in ("delta1", "delta2", "delta3"))
