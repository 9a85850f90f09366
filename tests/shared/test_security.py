"""Security review as tests: no pickle on untrusted input, no remote code, shard member names never paths.

Static part: an `ast` scan of every Python file of datagen/, trainer/, shared/, bench/ and scripts/
(the scanner is first shown to catch each pattern on a planted snippet, so a pass means something).
Behavioural part: a checkpoint carrying a pickle payload is refused by every loader of the trainer and
the payload never runs; a tar whose member names are `../x`, `/tmp/x` or carry dots and slashes is
read by every reader of the project and nothing is written outside the folders we name.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from shared.camera import make_K
from shared.shard import Sample, ShardError, encode_sample, iter_samples, validate_shard

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("datagen", "trainer", "shared", "bench", "scripts")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal"}

# ---------------------------------------------------------------------------------------------------------
# static scan


def _dotted(node: ast.AST) -> str:
    """'np.load' for np.load, 'torch.hub.load' for torch.hub.load; '' for anything not a plain name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    """The constant value of keyword `name` ('missing' when absent, 'dynamic' when not a constant)."""
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "dynamic"
    return "missing"


def scan_source(text: str, where: str = "<src>") -> list[str]:
    """Every unsafe-deserialisation or remote-code pattern in one module's source."""
    problems = []
    tree = ast.parse(text)
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_MODULES:
                    problems.append(f"{line}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in PICKLE_MODULES:
                problems.append(f"{line}: from {node.module} import ...")
            if mod == "joblib" and any(a.name == "load" for a in node.names):
                problems.append(f"{line}: from joblib import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is not False:
                problems.append(f"{line}: {name}( without allow_pickle=False")
            if name == "torch.load" and _kw(node, "weights_only") is not True:
                problems.append(f"{line}: torch.load( without weights_only=True")
            if name.endswith("joblib.load") or name.endswith("read_pickle") or name == "torch.hub.load":
                problems.append(f"{line}: {name}(")
            if name.endswith("from_pretrained") and _kw(node, "trust_remote_code") != "missing":
                problems.append(f"{line}: {name}(trust_remote_code=...)")
            if _kw(node, "trust_remote_code") not in ("missing", False):
                problems.append(f"{line}: trust_remote_code={_kw(node, 'trust_remote_code')!r}")
        elif isinstance(node, ast.Dict):  # {"trust_remote_code": True} passed on as **kwargs
            for k in node.keys:
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code":
                    problems.append(f"{line}: a dict with key trust_remote_code")
    return problems


def project_files() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30, "the scan found suspiciously few files"
    return files


# The planted unsafe calls are assembled from parts so that a plain text search of the repository for
# unsafe loads finds only real code (there is none); the AST scanner sees the assembled source.
_LOAD, _TRC, _WO, _AP = "lo" + "ad", "trust_remote" + "_code", "weights" + "_only", "allow" + "_pickle"


def _planted(module: str, alias: str, *kwargs: str) -> str:
    """'import <module>' and a call of <alias>'s loader on 'x' with kwargs, as source text."""
    return f"import {module}\n{alias}." + _LOAD + "(" + ", ".join(["'x'", *kwargs]) + ")"


@pytest.mark.parametrize("snippet", [
    "import pickle", "import dill as d", "from _pickle import loads", "import cloudpickle",
    "from joblib import load", _planted("joblib", "joblib"), "import pandas as pd\npd.read_pickle('x')",
    _planted("numpy as np", "np"), _planted("numpy", "numpy", _AP + "=True"),
    _planted("torch", "torch"), _planted("torch", "torch", _WO + "=False"), _planted("torch", "torch", _WO + "=flag"),
    f"M.from_pretrained('x', {_TRC}=False)", f"f({_TRC}=True)",
    f"kw = {{'{_TRC}': True}}",
])
def test_scanner_catches_each_pattern(snippet):
    assert scan_source(snippet), snippet


def test_scanner_passes_the_safe_forms():
    safe = ("import numpy as np\nimport torch\nnp.load('x', allow_pickle=False)\n"
            "torch.load('x', map_location='cpu', weights_only=True)\nM.from_pretrained('x', local_files_only=True)")
    assert scan_source(safe) == []


def test_no_pickle_no_unsafe_loads_no_remote_code_in_the_project():
    problems = []
    for p in project_files():
        text = p.read_text()
        problems += scan_source(text, str(p.relative_to(ROOT)))
        # whatever the syntax (a config file, a string built at run time), the words never appear in code
        if "trust_remote_code" in text and p.name != "test_security.py":
            problems.append(f"{p.relative_to(ROOT)}: mentions trust_remote_code")
    assert problems == []


# ---------------------------------------------------------------------------------------------------------
# pickle payloads in checkpoints


class Payload:
    """Unpickling this calls open(marker, 'w'): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def evil_pth(tmp_path):
    """A BP-Net-style .pth ({"net": state_dict}) with a pickle payload beside real tensors."""
    import torch

    from trainer.model import build_model

    marker = tmp_path / "payload-ran"
    sd = build_model("tiny").state_dict()
    path = tmp_path / "result_ema.pth"
    torch.save({"net": sd, "extra": Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_the_payload_is_live(evil_pth, tmp_path):
    """Control, without running it: the checkpoint's pickle stream imports `open` (GLOBAL 'io open') and
    calls it on the marker path, so an unsafe unpickler would execute it and the refusals below are real."""
    import pickletools
    import zipfile

    path, marker = evil_pth
    with zipfile.ZipFile(path) as zf:
        stream = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(stream)]
    assert any(name == "GLOBAL" and arg.split()[-1] == "open" for name, arg in ops)  # torch.save: protocol 2
    assert ("BINUNICODE", str(marker)) in ops
    assert any(name == "REDUCE" for name, _ in ops)
    assert not marker.exists()


def test_original_checkpoint_loader_refuses_a_pickle_payload(evil_pth):
    import torch

    from trainer import checkpoint as ckpt
    from trainer.model import build_model, load_original_checkpoint

    path, marker = evil_pth
    with pytest.raises(pickle.UnpicklingError):
        load_original_checkpoint(build_model("tiny"), path)
    with pytest.raises(pickle.UnpicklingError):  # the path `trainer eval/predict --ckpt x.pth` and --init take
        ckpt.load_model(path, "tiny")
    assert not marker.exists()
    # the same file without the payload loads: the refusal is about the payload, not the format
    clean = path.with_name("clean.pth")
    torch.save({"net": build_model("tiny").state_dict()}, clean)
    load_original_checkpoint(build_model("tiny"), clean)


def test_training_state_with_a_pickle_payload_is_refused(tmp_path):
    """A run directory whose state-*.pt was swapped for a payload: --resume's reader refuses it."""
    import torch

    from trainer import checkpoint as ckpt
    from trainer.model import build_model, model_config_dict

    model = build_model("tiny")
    sd = model.state_dict()
    meta = {"model_name": "tiny", "model_config": model_config_dict(model), "stage": "pretrain"}
    path = ckpt.save_checkpoint(tmp_path / "run", 2, sd, {k: v.clone() for k, v in sd.items()}, meta, {"step": 2})
    assert ckpt.read_state(path)["step"] == 2
    marker = tmp_path / "payload-ran"
    buf = io.BytesIO()
    torch.save({"step": 2, "rng": Payload(marker)}, buf)
    ckpt.state_path_for(path).write_bytes(buf.getvalue())
    with pytest.raises(pickle.UnpicklingError):
        ckpt.read_state(path)
    from trainer.train import TrainConfig, train

    with pytest.raises(pickle.UnpicklingError):
        train(TrainConfig(shards=str(tmp_path), out=str(tmp_path / "run"), resume=True, steps=3, progress=False))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# hostile member names in a shard

H, W = 32, 32


def _sample(key: str) -> Sample:
    rng = np.random.default_rng(len(key))
    depth = rng.uniform(2, 20, (H, W)).astype(np.float32)
    return Sample(key=key, rgb=rng.integers(0, 256, (H, W, 3), dtype=np.uint8), K=make_K(30, 30, 16, 16),
                  teacher=1 / depth, depth=depth, sparse=np.where(rng.random((H, W)) < 0.1, depth, 0),
                  gt=depth, meta={"source": "test"})


def hostile_shard(path: Path, outside: Path) -> list[str]:
    """A tar of decodable samples stored under hostile keys (plus a symlink and a hard link member);
    returns the hostile keys. One good sample comes last, so that readers must get past the bad ones."""
    bad_keys = ["../evil", f"{outside}/abs-evil", "dir.with.dots/evil", "sub/dir/evil", "..", "./evil"]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, key in enumerate(bad_keys + ["good-0000"]):
            members = encode_sample(_sample(f"k{i}"))
            for name, data in sorted((k, v) for k, v in members.items() if not k.startswith("__")):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if i == 0:
                for kind, target in ((tarfile.SYMTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "../evil.meta.json")):
                    link = tarfile.TarInfo(f"../linked-{kind.decode()}.rgb.png")
                    link.type, link.linkname = kind, target
                    tar.addfile(link)
    return bad_keys


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """(shard, outside dir, snapshot function): the shard sits two levels down; the working directory is a
    fresh folder inside tmp_path, so a relative escape would land where the snapshot sees it."""
    outside = Path("/tmp") / f"dmd3c-evil-{uuid.uuid4().hex}"  # an absolute name outside tmp_path
    shard = tmp_path / "a" / "b" / "hostile-000000.tar"
    shard.parent.mkdir(parents=True)
    hostile_shard(shard, outside)
    cwd = tmp_path / "a" / "b" / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def snapshot() -> set[str]:
        return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}

    yield shard, outside, snapshot
    assert not outside.exists(), f"something wrote to {outside}"
    assert not list(Path("/tmp").glob("abs-evil*")) and not Path("/etc/evil.meta.json").exists()


def test_shard_readers_never_use_member_names_as_paths(hostile, tmp_path):
    from shared.inspect import summarize

    shard, outside, snapshot = hostile
    before = snapshot()
    # the streaming reader: whatever it yields, it writes nothing
    keys = [s.key for s in iter_samples(shard, strict=False)]
    assert "good-0000" in keys
    report = validate_shard(shard)
    assert not report.ok
    text = "\n".join(report.errors)
    for bad in ("../evil", "sub/dir/evil"):  # hostile keys are reported by name
        assert bad in text
    summary, kept = summarize(str(shard), keep=8)
    assert summary.samples >= 1
    assert snapshot() == before


def test_trainer_loader_and_datagen_inspect_write_nothing_outside(hostile, tmp_path):
    from typer.testing import CliRunner

    from datagen.cli import app
    from trainer.data import DataConfig, make_loader

    shard, outside, snapshot = hostile
    before = snapshot()
    cfg = DataConfig(str(shard), batch_size=1, crop_hw=None, train=False, workers=0)
    keys = [k for batch in make_loader(cfg) for k in batch["key"]]
    assert "good-0000" in keys
    train_cfg = DataConfig(str(shard), batch_size=2, crop_hw=(32, 32), workers=0, shuffle_buffer=2)
    it = iter(make_loader(train_cfg))
    for _ in range(4):  # several epochs of training batches over the same hostile shard
        next(it)
    del it
    assert snapshot() == before
    preview = shard.parent / "inspect" / "preview.png"
    preview.parent.mkdir()
    before = snapshot()
    res = CliRunner().invoke(app, ["inspect", str(shard), "--preview", str(preview), "--samples", "8",
                                   "--json", str(preview.with_suffix(".json"))])
    assert res.exit_code == 0, res.output
    after = snapshot() - before
    assert after == {"a/b/inspect/preview.png", "a/b/inspect/preview.json"}
    json.loads(preview.with_suffix(".json").read_text())


def test_predict_refuses_a_hostile_key_and_writes_only_under_out(hostile, tmp_path):
    from trainer import checkpoint as ckpt
    from trainer.evaluate import InferenceOptions, predict
    from trainer.model import build_model, model_config_dict

    shard, outside, snapshot = hostile
    model = build_model("tiny")
    sd = model.state_dict()
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, 1, sd, {k: v.clone() for k, v in sd.items()}, {"model_name": "tiny", "model_config": model_config_dict(model),
                                          "stage": "pretrain"}, {"step": 1})
    before = snapshot()
    out = shard.parent / "preds"
    # decode_sample refuses the hostile keys, so the loader skips those samples (and counts them)
    res = predict(str(run), str(shard), str(out), previews=8, opts=InferenceOptions(device="cpu"))
    assert res["written"] == 1 and sorted(p.name for p in out.glob("*.png")) == ["good-0000.png"]
    new = snapshot() - before
    assert all(p == "a/b/preds" or p.startswith("a/b/preds/") for p in new), new
    # the escape targets a relative key would reach from --out, and from the working directory
    for base in (out, Path.cwd()):
        for name in ("../evil.png", "evil.png", "../preview/evil.png", "dir.with.dots/evil.png", "sub/dir/evil.png"):
            assert not (base / name).exists()
    # and a shard of good keys only goes through: predict itself works
    good = shard.parent / "good"
    good.mkdir()
    with tarfile.open(good / "good-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted((k, v) for k, v in encode_sample(_sample("good-0000")).items()
                                 if not k.startswith("__")):
            info = tarfile.TarInfo(f"good-0000.{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    res = predict(str(run), str(good), str(shard.parent / "preds2"), previews=1,
                  opts=InferenceOptions(device="cpu"))
    assert res["written"] == 1 and (shard.parent / "preds2" / "good-0000.png").is_file()


def test_keys_are_checked_before_any_write(tmp_path):
    """The writer side: a hostile key never becomes a member name, so a shard we write is safe to read."""
    from shared.shard import ShardWriter, check_key

    for bad in ("../x", "/abs", "a.b", "a/b", "", ".", "k\x00", "x y"):
        with pytest.raises(ShardError):
            check_key(bad)
    with ShardWriter(tmp_path / "w.tar") as wr:
        with pytest.raises(ShardError):
            wr.write(_sample("../evil"))
        wr.write(_sample("ok-1"))
    with tarfile.open(tmp_path / "w.tar") as tar:
        assert all(n.startswith("ok-1.") for n in tar.getnames())
    assert sorted(os.listdir(tmp_path)) == ["w.tar"]


def test_a_key_ending_in_a_newline_is_refused():
    from shared.shard import check_key

    with pytest.raises(ShardError):
        check_key("good\n")
