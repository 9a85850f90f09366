"""bench/gpu_bundle.py: the GPU check's carry bundle is unpacked without pip, only for what this Python lacks,
is importable by child processes, and is refused (saying how to build the right one) when it was built for
another Python or was copied incompletely. Wheels here are made by the test, in the wheel format."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bundle_module():
    spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "bench" / "gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gb = load_bundle_module()
HERE = f"cp{sys.version_info.major}{sys.version_info.minor}"
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str], tag: str = "py3-none-any") -> Path:
    """A wheel: the files, a .dist-info with METADATA, WHEEL and RECORD."""
    info = f"{name}-{version}.dist-info"
    members = dict(files)
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    members[f"{info}/WHEEL"] = f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n"
    members[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in members) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, text in members.items():
            z.writestr(n, text)
    return path


def make_bundle(folder: Path, wheels: list[Path], python_version: str | None = None) -> Path:
    """A bundle folder holding these wheels and its bundle.json, as `build` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for w in wheels:
        dest = folder / w.name
        if w != dest:
            dest.write_bytes(w.read_bytes())
        name, version = gb.wheel_tags(w.name)[:2]
        entries.append({"file": w.name, "name": gb.canonical(name), "version": version, "bytes": dest.stat().st_size,
                        "downloaded_bytes": dest.stat().st_size, "lzma": False,
                        "sha256": hashlib.sha256(dest.read_bytes()).hexdigest()})
    manifest = {"python_version": python_version or VERSION, "platforms": [],
                "requirements": [], "left_out": [], "bytes": sum(e["bytes"] for e in entries), "wheels": entries}
    (folder / gb.MANIFEST).write_text(json.dumps(manifest))
    return folder


def probe_bundle(folder: Path) -> Path:
    """One distribution no environment has (dmd3c-probe, module dmd3c_probe, with a .data/purelib part) and one
    every test environment has (pytest, at a version nobody has)."""
    wheels = folder / "wheels"
    wheels.mkdir(parents=True)
    probe = make_wheel(wheels, "dmd3c_probe", "1.0", {"dmd3c_probe/__init__.py": "VALUE = 42\n",
                                                      "dmd3c_probe-1.0.data/purelib/dmd3c_probe_extra.py": "X = 1\n",
                                                      "dmd3c_probe-1.0.data/scripts/probe": "#!/bin/sh\n"})
    mine = make_wheel(wheels, "pytest", "0.0.1", {"pytest_from_the_bundle.py": "raise RuntimeError\n"})
    return make_bundle(folder / "bundle", [probe, mine])


@pytest.fixture
def clean_path(monkeypatch):
    """activate() changes sys.path and PYTHONPATH: give both back after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))


def test_activate_unpacks_only_what_this_python_lacks_and_children_import_it(tmp_path, clean_path):
    bundle = probe_bundle(tmp_path)
    site = tmp_path / "site"
    got = gb.activate(bundle, site=site)
    assert got["used"] == ["dmd3c-probe 1.0"] and got["site"] == str(site)
    assert [k for k in got["kept"] if k.startswith("pytest ")] and "0.0.1" not in " ".join(got["kept"])
    assert (site / "dmd3c_probe" / "__init__.py").is_file() and (site / "dmd3c_probe_extra.py").is_file()
    assert not (site / "pytest_from_the_bundle.py").exists()  # the machine's own pytest is left alone
    assert not list(site.rglob("probe"))  # scripts are not unpacked
    assert sys.path[0] == str(site)
    code = ("import dmd3c_probe, dmd3c_probe_extra; from importlib import metadata; "
            "print(dmd3c_probe.VALUE, dmd3c_probe_extra.X, metadata.version('dmd3c-probe'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["42", "1", "1.0"]  # a child process sees it through PYTHONPATH
    # a second run reuses the unpacked folder
    (site / "dmd3c_probe" / "marker").write_text("kept")
    gb.activate(bundle, site=site)
    assert (site / "dmd3c_probe" / "marker").is_file()


def test_a_bundle_for_another_python_is_refused_with_the_command_that_builds_the_right_one(tmp_path):
    other = "cp39" if HERE != "cp39" else "cp310"
    wheels = tmp_path / "w"
    wheels.mkdir()
    compiled = make_wheel(wheels, "dmd3c_probe", "1.0", {"dmd3c_probe/__init__.py": ""},
                          tag=f"{other}-{other}-manylinux_2_28_x86_64")
    mine = make_wheel(wheels, "pytest", "0.0.1", {"x.py": ""}, tag=f"{other}-{other}-manylinux_2_28_x86_64")
    with pytest.raises(gb.BundleError, match=f"make gpu-bundle GPU_PYTHON={VERSION}"):
        gb.plan(make_bundle(tmp_path / "a", [compiled, mine], python_version="3.9"))
    assert gb.plan(make_bundle(tmp_path / "b", [mine]))["need"] == []  # installed here: its tag does not matter


def test_a_damaged_copy_and_an_unsafe_wheel_are_refused(tmp_path, clean_path):
    bundle = probe_bundle(tmp_path)
    wheel = next(bundle.glob("dmd3c_probe-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:-10])
    with pytest.raises(gb.BundleError, match="does not match"):
        gb.activate(bundle, site=tmp_path / "site")
    evil = make_wheel(tmp_path, "dmd3c_evil", "1.0", {"../escaped.py": ""})
    with pytest.raises(gb.BundleError, match="unsafe"):
        gb.activate(make_bundle(tmp_path / "evil", [evil]), site=tmp_path / "site2")
    assert not (tmp_path / "escaped.py").exists()


def test_recompressed_wheels_keep_their_files(tmp_path):
    wheel = make_wheel(tmp_path, "dmd3c_probe", "1.0", {"dmd3c_probe/big.py": "x = 1\n" * 50_000})
    with zipfile.ZipFile(wheel) as z:
        before = {i.filename: z.read(i) for i in z.infolist()}
    gb.recompress(wheel)
    with zipfile.ZipFile(wheel) as z:
        assert {i.filename: z.read(i) for i in z.infolist()} == before  # RECORD included, so still valid
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_LZMA}
