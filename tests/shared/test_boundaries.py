"""Import boundaries: the trainer runs without ray/open3d/transformers/datagen; datagen never
imports the trainer; shared imports neither (the scan, shared.scan, imports Open3D lazily, on the Poisson
and BVH paths only). Checked in fresh interpreters, so nothing a test
imported earlier can hide a leak."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sorted(sys.modules)))"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return {m.split(".")[0] for m in out.stdout.split()}


def test_trainer_cli_needs_no_datagen_stack():
    loaded = modules_after("import trainer.cli\nfrom trainer.cli import app")
    leaked = loaded & {"ray", "open3d", "transformers", "datagen"}
    assert not leaked, f"trainer.cli imported {sorted(leaked)}"


def test_shared_is_light():
    loaded = modules_after("import shared.shard, shared.depth, shared.camera, shared.inspect")
    leaked = loaded & {"ray", "open3d", "transformers", "torch", "datagen", "trainer"}
    assert not leaked, f"shared imported {sorted(leaked)}"


def _imported_roots(path: Path, top_level_only: bool = False) -> set[str]:
    """The top-level packages a module's import statements name (with top_level_only: only the statements
    of the module body, which run on import)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package,forbidden", [
    ("datagen", {"trainer"}),
    ("trainer", {"datagen", "ray", "open3d", "transformers"}),
    ("shared", {"datagen", "trainer", "ray", "open3d", "transformers"}),
])
def test_no_forbidden_import_statements(package, forbidden):
    """Static check: covers lazy imports inside functions that an import-time test would miss."""
    def bad(p: Path) -> set[str]:
        if p.is_relative_to(ROOT / "shared" / "scan"):  # Open3D: an optional, lazy import there only
            return (_imported_roots(p) & (forbidden - {"open3d"})) | (_imported_roots(p, True) & {"open3d"})
        return _imported_roots(p) & forbidden

    offenders = {str(p.relative_to(ROOT)): sorted(bad(p)) for p in (ROOT / package).rglob("*.py") if bad(p)}
    assert not offenders, offenders


def test_the_trainer_can_use_the_scan_without_datagen_or_open3d():
    """The trainer re-simulates scans in its loader with shared.scan: that must not pull in datagen or Open3D."""
    loaded = modules_after("import trainer.cli\nimport shared.scan.spec, shared.scan.lidar")
    leaked = loaded & {"ray", "open3d", "transformers", "datagen"}
    assert not leaked, f"shared.scan imported {sorted(leaked)}"


def test_importing_all_of_datagen_never_loads_trainer():
    pkg = ROOT / "datagen"
    names = [m.name for m in pkgutil.walk_packages([str(pkg)], prefix="datagen.")]  # sub-packages too
    assert {"datagen.job.pipeline", "datagen.teachers.runner", "datagen.world.scenes", "datagen.sources.kitti"} <= set(names)
    code = "import importlib\n" + "\n".join(f"importlib.import_module({n!r})" for n in names)
    assert "trainer" not in modules_after(code)


def test_only_the_ray_runner_imports_ray():
    users = [str(p.relative_to(ROOT)) for p in (ROOT / "datagen").rglob("*.py") if "ray" in _imported_roots(p)]
    assert set(users) <= {"datagen/job/ray_runner.py"}, users
