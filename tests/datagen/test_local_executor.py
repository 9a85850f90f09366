"""`datagen run --executor local` (`--workers 0`): the shard tasks in this process, without Ray. Its bytes equal
Ray's (tests/datagen/test_pipeline.py compares the two file for file); here: it resumes after a SIGKILL, it runs
where Ray, Open3D, pyarrow and scipy cannot be imported (the GPU check's minimal environment), its options are
checked, and a chunk the teacher rejects is retried one image at a time as on Ray."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fixtures import make_folder
from typer.testing import CliRunner

from datagen.cli import app
from datagen.job.local_runner import InProcessTeacher, LocalRequest
from datagen.job.pipeline import run
from datagen.job.settings import RunConfig
from datagen.sample import StageError
from datagen.teachers.runner import Packed, save_random_teacher

ROOT = Path(__file__).resolve().parents[2]
N, SHARD = 24, 2
SYN = ["--source", "synthetic", "--width", "96", "--height", "64", "--limit", str(N), "--shard-size", str(SHARD),
       "--seed", "5"]
SYN_CFG = dict(source="synthetic", source_options={"width": 96, "height": 64}, limit=N, shard_size=SHARD, seed=5,
               progress="none", executor="local")


def job_files(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.name != ".lock"}


@pytest.fixture(scope="module")
def tiny_da(tmp_path_factory):
    return save_random_teacher(tmp_path_factory.mktemp("tiny_da"))


def test_sigkill_then_resume_equals_an_uninterrupted_local_run(tmp_path):
    ref = run(RunConfig(**SYN_CFG, out=str(tmp_path / "ref")))
    assert (ref.done, ref.failed, ref.executor) == (N, 0, "local")

    out = tmp_path / "killed"
    job = out / "synthetic"
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "datagen.cli", "run", *SYN, "--out", str(out), "--executor",
                             "local", "--progress", "log"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (job.exists() and list(job.glob("*.tar"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"datagen run ended or hung before a shard: {(tmp_path / 'killed.log').read_text()}")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # the only process of a local run
        proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    finished = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in job.glob("*.tar")}
    assert 1 <= len(finished) < N // SHARD, "the kill must land midway for this test to mean anything"

    resumed = run(RunConfig(**SYN_CFG, out=str(out)))
    assert resumed.skipped >= SHARD * len(finished) and resumed.done + resumed.skipped == N
    assert {n: (p.read_bytes(), p.stat().st_mtime_ns) for n, p in ((n, job / n) for n in finished)} == finished
    assert job_files(job) == job_files(tmp_path / "ref" / "synthetic")  # shards, sidecars, tables, job.json


BLOCKED_RUN = textwrap.dedent("""
    import json, sys
    BLOCKED = ("ray", "open3d", "pyarrow", "scipy")
    for name in BLOCKED:  # importing any of them now raises ImportError, as where it is not installed
        sys.modules[name] = None
    from typer.testing import CliRunner
    from datagen.cli import app
    root, teacher, out = sys.argv[1:4]
    res = CliRunner().invoke(app, ["run", "--source", "folder", "--root", root, "--teacher", teacher, "--out", out,
                                   "--shard-size", "3", "--teacher-batch", "2", "--workers", "0", "--progress", "log"])
    folder = {"exit": res.exit_code, "output": res.output}
    res = CliRunner().invoke(app, ["run", "--source", "folder", "--root", root, "--teacher", teacher, "--out",
                                   out + "-ray", "--progress", "none"])
    no_ray = {"exit": res.exit_code, "output": res.output}
    for name in ("open3d", "pyarrow", "scipy"):  # the synthetic world renders with Open3D, its oracle uses scipy
        del sys.modules[name]
    res = CliRunner().invoke(app, ["run", "--limit", "3", "--width", "64", "--height", "48", "--out", out,
                                   "--executor", "local", "--progress", "none"])
    synthetic = {"exit": res.exit_code, "output": res.output}
    loaded = sorted({m.split(".")[0] for m in sys.modules if sys.modules[m] is not None})
    print(json.dumps({"folder": folder, "no_ray": no_ray, "synthetic": synthetic, "loaded": loaded}))
""")


def test_runs_without_ray_open3d_pyarrow_and_scipy(tmp_path, tiny_da):
    """In a fresh interpreter where ray, open3d, pyarrow and scipy cannot be imported, a local run of a folder of
    images with a Depth Anything teacher (the GPU check's datagen run) writes the same shards and sidecars as a
    run with everything installed; without pyarrow no table is written and an earlier run's tables are removed.
    The synthetic source then runs without Ray (it needs Open3D: its world is rendered by Open3D's ray caster)."""
    tree = make_folder(tmp_path / "tree")
    cfg = RunConfig(source="folder", root=str(tree["root"]), teacher=tiny_da, shard_size=3, teacher_batch=2,
                    progress="none", executor="local")
    ref = run(replace(cfg, out=str(tmp_path / "ref")))
    assert ref.done == tree["count"]
    out = tmp_path / "out"
    run(replace(cfg, out=str(out), limit=4))  # an earlier run, with its tables
    assert (out / "folder" / "manifest.parquet").is_file()

    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(tree["root"]), tiny_da, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    folder, synthetic = result["folder"], result["synthetic"]
    assert folder["exit"] == 0, folder["output"][-3000:]
    assert f"done {tree['count'] - 3}, skipped 3, failed 0" in folder["output"]  # the first full shard was kept
    assert "in this process (--executor local)" in folder["output"]
    assert "not written: pyarrow is not installed" in folder["output"]
    files = job_files(out / "folder")
    assert "manifest.parquet" not in files and "failures.parquet" not in files  # the stale ones are gone
    expected = {n: b for n, b in job_files(tmp_path / "ref" / "folder").items() if not n.endswith(".parquet")}
    assert files == expected
    no_ray = result["no_ray"]  # the default executor where Ray is missing: says so and what to do instead
    last = no_ray["output"].strip().splitlines()[-1]  # (CliRunner closes the stream logging had: "Logging error")
    assert no_ray["exit"] == 1 and last.startswith("error: Ray is not installed") and "--executor local" in last
    assert synthetic["exit"] == 0 and "done 3, skipped 0, failed 0" in synthetic["output"], synthetic["output"]
    assert "ray" not in result["loaded"]


@pytest.mark.parametrize("args,message", [
    (["--executor", "ray", "--workers", "0"], "--workers 0 runs the shards in this process"),
    (["--executor", "local", "--address", "10.0.0.1:6379"], "joins a Ray cluster"),
    (["--executor", "dask"], "--executor must be one of ray, local"),
    (["--workers", "-1"], "--workers must be >= 0"),
])
def test_executor_options_are_checked_before_any_work(tmp_path, args, message):
    res = CliRunner().invoke(app, ["run", "--limit", "2", "--out", str(tmp_path / "x"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "x").exists()


class _Model:
    """Stands in for DepthTeacher.run: fails on a batch holding image 1, answers the others."""

    def __init__(self):
        self.calls = []

    def run(self, packed: Packed) -> list:
        idx = [i for ids, _ in packed.groups for i in ids]
        self.calls.append(idx)
        if 1 in idx:
            raise RuntimeError("CUDA error: an illegal memory access\nsecond line: the one kept")
        return [(ids, [np.full(packed.sizes[i], i, np.float32) for i in ids], [{} for _ in ids], None)
                for ids, _ in packed.groups]


class _Feed:
    def pack(self, images):
        return Packed([im.shape[:2] for im in images], [([i for i in range(len(images))], np.stack(images))], False)

    def unpack(self, packed, answer):
        out = [None] * len(packed.sizes)
        for idx, maps, infos, _ in answer:
            for i, m, info in zip(idx, maps, infos, strict=True):
                out[i] = (m, info)
        return out


def test_a_chunk_the_teacher_rejects_is_retried_one_image_at_a_time():
    """As ray_runner.TeacherRequest: the image the model rejects gets a StageError naming the last line of the
    error, the others their map; every call goes through the teacher's one thread, in order."""
    teacher = InProcessTeacher.__new__(InProcessTeacher)
    teacher.teacher = _Model()
    teacher.pool = ThreadPoolExecutor(max_workers=1)
    try:
        maps = LocalRequest(teacher, _Feed(), [np.zeros((4, 5, 3), np.uint8)] * 3).maps()
    finally:
        teacher.close()
    assert teacher.teacher.calls == [[0, 1, 2], [0], [1], [2]]
    assert isinstance(maps[1], StageError) and maps[1].stage == "teacher"
    assert maps[1].error == "RuntimeError: second line: the one kept"
    for i in (0, 2):
        assert maps[i][0].shape == (4, 5) and float(maps[i][0][0, 0]) == i
