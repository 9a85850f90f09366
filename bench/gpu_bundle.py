"""The GPU check's carry bundle: the wheels a lent GPU machine lacks, built here, used there without pip.

    make gpu-bundle                                  # = python bench/gpu_bundle.py build: bench/gpu-bundle/
    make gpu-bundle GPU_PYTHON=3.11                  # for another Python (the wheels with C code are per version)
    python bench/gpu_bundle.py show                  # what it holds, what this interpreter would take from it

A lent machine has no internet and receives the working tree plus at most 64 MiB of carried (git-ignored)
files; the tree itself is about 2 MiB. Its image is assumed to have only torch, transformers and numpy (and
what they pull in); the bundle holds what parts 1-5 of bench/gpu_check.py import beyond them, with their
dependencies: Pillow (images), isal (the PNG maps' deflate), webdataset and braceexpand (shards), typer and
tqdm (the two CLIs), and numba with llvmlite (the LiDAR scan's grid caster). The wheels come from PyPI
(`pip download`, binary only, for CPython GPU_PYTHON on manylinux x86-64), pinned to the versions installed
where the bundle is built when they are (so the bundle matches what the tests ran with); numpy, torch and
transformers are left out: the machine's own are used, and a second numpy beside its torch would break both.

What is left out on purpose, because it does not fit: llvmlite alone is 57 MiB as downloaded, so
  - pyarrow (53 MiB): datagen then writes its shards and sidecars but not manifest.parquet and
    failures.parquet (datagen/job/shard_files.py), and the check counts rows from the sidecars;
  - scipy (34 MiB): the check's datagen runs use a Depth Anything teacher (the oracle needs scipy), and the
    trainer's 4-NN takes its bucketed search on the CPU (identical results); part 3 compares the CUDA
    methods with the CPU bucketed search instead of the KD-tree;
  - Open3D, Ray: not needed (datagen runs with --executor local, the grid mesh, a folder of images).
Wheels over 1 MiB are recompressed with LZMA (the same files and RECORD, a smaller zip): llvmlite goes from
57 to about 39 MiB. `build` prints the total and refuses one over 60 MiB.

On the machine (activate(), which bench/gpu_check.py calls first): each wheel whose distribution this
interpreter lacks is unpacked with zipfile into a throwaway folder under the temporary directory, which goes
first on sys.path and on PYTHONPATH for the check's child processes; a distribution the machine has is left
to the machine (its own build, made for its numpy and Python, wins). Why not `pip install` into a virtual
environment with --system-site-packages: it needs venv and ensurepip, which a Python image often lacks, pip
would resolve against a machine we know little about, and nothing here needs an entry point (the check runs
`python -m datagen.cli`, `python -m torch.distributed.run -m trainer.cli`). Unpacking needs the standard
library only and leaves the machine's environment as it was. A wheel built for another Python than the one
running is refused with the command that builds the right one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "bench" / "gpu-bundle"
MANIFEST = "bundle.json"
# what parts 1-5 import beyond the machine's torch, transformers and numpy (pip adds their dependencies)
REQUIREMENTS = ("pillow", "isal", "webdataset", "braceexpand", "typer", "tqdm", "numba")
MACHINE_HAS = ("numpy", "torch", "transformers")  # never bundled: the machine's own must be used
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LZMA_ABOVE = 1 << 20  # recompress wheels larger than this
LIMIT_MIB = 60  # of the 64 MiB that travel, the working tree takes about 2


class BundleError(RuntimeError):
    """The bundle cannot be used by this interpreter; the message says what to do."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_tags(filename: str) -> tuple[str, str, str, str, str]:
    """(distribution, version, python tag, abi tag, platform tag) of a wheel's file name."""
    parts = filename[:-len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"not a wheel file name: {filename}")
    return parts[0], parts[1], parts[-3], parts[-2], parts[-1]


def fits_this_python(filename: str) -> bool:
    """Whether this interpreter can import the wheel: pure Python, or built for this CPython (or its stable
    ABI) on Linux x86-64, the lent machines' platform."""
    _, _, py, abi, plat = wheel_tags(filename)
    major, minor = sys.version_info[:2]
    tags = py.split(".")
    if abi == "abi3":
        python_ok = any(t.startswith(f"cp{major}") and t[3:].isdigit() and int(t[3:]) <= minor for t in tags)
    elif abi == "none":
        python_ok = any(t in (f"py{major}", f"py{major}{minor}", f"cp{major}{minor}") for t in tags)
    else:
        python_ok = f"cp{major}{minor}" in tags and abi == f"cp{major}{minor}"
    if plat == "any":
        return python_ok
    linux_x86 = sys.platform.startswith("linux") and platform.machine() == "x86_64"
    return python_ok and linux_x86 and all(p.endswith("_x86_64") and "linux" in p for p in plat.split("."))


def installed() -> dict[str, str]:
    """canonical distribution name -> version, of what this interpreter can import already."""
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


# ---------------------------------------------------------------------------------------------------------
# building (here, with pip and PyPI)


def pinned(requirements) -> list[str]:
    """name==version where the builder's environment has the package (the versions the tests ran with)."""
    have = installed()
    return [f"{r}=={have[canonical(r)]}" if canonical(r) in have else r for r in requirements]


def recompress(path: Path) -> None:
    """The same wheel with its members LZMA-compressed: same names, contents, dates and RECORD."""
    tmp = path.with_suffix(".lzma-tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as dst:
        for info in src.infolist():
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_LZMA
            dst.writestr(out, src.read(info))
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(out: Path, python_version: str, requirements=REQUIREMENTS) -> dict:
    """Download the wheels into a fresh `out`, drop what the machine has, recompress the big ones, write
    bundle.json; returns it."""
    if not re.fullmatch(r"3\.\d+", python_version):
        raise SystemExit(f"--python-version must look like 3.12, got {python_version!r}")
    staging = Path(tempfile.mkdtemp(prefix="gpu-bundle-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--implementation", "cp",
               "--python-version", python_version, *(f"--platform={p}" for p in PLATFORMS), "--dest", str(staging),
               *pinned(requirements)]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        wheels = sorted(staging.glob("*.whl"))
        dropped = [w.name for w in wheels if canonical(wheel_tags(w.name)[0]) in MACHINE_HAS]
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        entries = []
        for w in wheels:
            name, version = wheel_tags(w.name)[:2]
            if canonical(name) in MACHINE_HAS:
                continue
            downloaded = w.stat().st_size
            if downloaded > LZMA_ABOVE:
                recompress(w)
            dest = out / w.name
            shutil.move(str(w), dest)
            entries.append({"file": w.name, "name": canonical(name), "version": version, "bytes": dest.stat().st_size,
                            "downloaded_bytes": downloaded, "lzma": downloaded > LZMA_ABOVE, "sha256": sha256(dest)})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    total = sum(e["bytes"] for e in entries)
    manifest = {"python_version": python_version, "platforms": list(PLATFORMS), "requirements": list(requirements),
                "left_out": dropped, "bytes": total, "wheels": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(describe(manifest), flush=True)
    if total > LIMIT_MIB * 2**20:
        raise SystemExit(f"the bundle is {total / 2**20:.1f} MiB, over {LIMIT_MIB} MiB: it would not travel")
    return manifest


def describe(manifest: dict) -> str:
    lines = [f"{e['file']}  {e['bytes'] / 2**20:6.2f} MiB" + (f" (downloaded {e['downloaded_bytes'] / 2**20:.2f}, "
                                                               "LZMA)" if e["lzma"] else "")
             for e in manifest["wheels"]]
    lines.append(f"{len(manifest['wheels'])} wheels for CPython {manifest['python_version']}, "
                 f"{manifest['bytes'] / 2**20:.1f} MiB in all; left out (the machine's own): "
                 f"{', '.join(manifest['left_out']) or 'nothing'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# using it (there, standard library only)


def read_manifest(bundle: Path) -> dict:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} holds no {MANIFEST}: build the bundle with `make gpu-bundle`")
    return json.loads(path.read_text())


def unpack(wheel: Path, site: Path) -> None:
    """A wheel into site: its files, its .dist-info (so importlib.metadata sees it), and the purelib/platlib
    parts of its .data folder; scripts, headers and data files are not needed here."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                name = "/".join(parts[2:])
            if name.startswith("/") or ".." in name.split("/"):
                raise BundleError(f"{wheel.name}: unsafe member name {info.filename!r}")
            dest = site / name
            if name.endswith("/"):
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode | 0o600)


def plan(bundle: Path) -> dict:
    """Which of the bundle's wheels this interpreter needs (its distribution is missing) and which it has."""
    manifest = read_manifest(bundle)
    have = installed()
    need, kept = [], []
    for e in manifest["wheels"]:
        if e["name"] in have:
            kept.append(f"{e['name']} {have[e['name']]}")
        else:
            need.append(e)
    wrong = [e["file"] for e in need if not fits_this_python(e["file"])]
    if wrong:
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise BundleError(
            f"{bundle} was built for CPython {manifest['python_version']} on Linux x86-64 and this is Python {here} "
            f"on {sys.platform} {platform.machine()}; it lacks {', '.join(wrong[:3])}"
            f"{' ...' if len(wrong) > 3 else ''}. Build it for this Python where PyPI is reachable: "
            f"`make gpu-bundle GPU_PYTHON={here}`")
    return {"manifest": manifest, "need": need, "kept": kept}


def activate(bundle: Path, site: Path | None = None) -> dict:
    """Make the bundle's missing distributions importable here and in child processes. Returns what was used:
    {"site": folder or None, "used": ["name version", ...], "kept": ["name version" the machine had, ...]}.

    The unpacked folder is named after the bundle's content and this Python, so a second run reuses it."""
    p = plan(bundle)
    used = [f"{e['name']} {e['version']}" for e in p["need"]]
    if not p["need"]:
        return {"site": None, "used": [], "kept": p["kept"]}
    key = hashlib.sha256(json.dumps([e["sha256"] for e in p["need"]]).encode()).hexdigest()[:12]
    site = site or Path(tempfile.gettempdir()) / f"dmd3c-gpu-bundle-py{sys.version_info.major}{sys.version_info.minor}-{key}"
    done = site / ".unpacked"
    if not done.is_file():
        if site.exists():
            shutil.rmtree(site)
        site.mkdir(parents=True)
        for e in p["need"]:
            wheel = Path(bundle) / e["file"]
            if sha256(wheel) != e["sha256"]:
                raise BundleError(f"{wheel} does not match {MANIFEST} (a partial copy?): build the bundle again")
            unpack(wheel, site)
        done.write_text("\n".join(used) + "\n")
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    import importlib

    importlib.invalidate_caches()
    return {"site": str(site), "used": used, "kept": p["kept"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the wheels into the bundle folder (needs PyPI)")
    b.add_argument("--python-version", default="3.12", help="CPython of the machine (the lent machines: 3.12)")
    b.add_argument("--out", type=Path, default=DEFAULT_DIR)
    s = sub.add_parser("show", help="what the bundle holds and what this interpreter would take from it")
    s.add_argument("bundle", type=Path, nargs="?", default=DEFAULT_DIR)
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.out, args.python_version)
        return 0
    try:
        p = plan(args.bundle)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(p["manifest"]))
    print("this interpreter would unpack: " + (", ".join(f"{e['name']} {e['version']}" for e in p["need"]) or "nothing"))
    print("and keep its own: " + (", ".join(p["kept"]) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
