"""The trainer's network and losses as they were before the speed work of issue 26, loaded from git, so
that a benchmark measures old and new in one run.

    from bench.legacy import load_legacy
    old = load_legacy()          # a namespace: old.model, old.ops, old.losses, old.train
    net = old.model.build_model("tiny")

The files trainer/ops.py, model.py, losses.py and train.py are read with `git show` at REFERENCE_COMMIT
(the main branch the work started from) into a private package (`trainer_legacy`), their imports of each
other rewired to it (train.py's other imports, data and checkpoints, stay the current ones). Needs the
repository's git history; raises RuntimeError without it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_COMMIT = "4df43f9ee3327eecb9d98454304bcc4a89b770fc"
PACKAGE = "trainer_legacy"
FILES = ("ops", "model", "losses", "train")
_cache: dict[str, SimpleNamespace] = {}


def load_legacy(commit: str = REFERENCE_COMMIT) -> SimpleNamespace:
    """The reference modules (model, ops, losses) of `commit`, imported once per process."""
    if commit in _cache:
        return _cache[commit]
    if PACKAGE in sys.modules:
        raise RuntimeError("one legacy commit per process")
    tmp = Path(tempfile.mkdtemp(prefix="trainer-legacy-"))
    pkg = tmp / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f'"""trainer/ at {commit}."""\n')
    for name in FILES:
        try:
            text = subprocess.run(["git", "show", f"{commit}:trainer/{name}.py"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise RuntimeError(f"cannot read trainer/{name}.py at {commit} from git ({exc}); the old-vs-new "
                               "comparison needs the repository's history") from exc
        for other in FILES:
            text = text.replace(f"from trainer.{other} import", f"from {PACKAGE}.{other} import")
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(tmp))
    mods = SimpleNamespace(commit=commit, **{n: importlib.import_module(f"{PACKAGE}.{n}") for n in FILES})
    _cache[commit] = mods
    return mods
