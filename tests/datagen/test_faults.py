"""Faults in `datagen run`: repeated SIGKILLs, a full disk, an output that cannot be written.

- Killed twice at random moments (seeded), then resumed: the result equals an uninterrupted run, byte
  for byte, and at every kill the tars under their final names are complete and have their rows.
- Disk full (a real ENOSPC from a tiny tmpfs when this process may mount one, and a simulated one
  everywhere): the shard task raises an OSError that says so, and no shard is left under its final
  name, nor a temporary one.
- Output not writable (a path that is a file; a read-only mount): a PipelineError naming the folder and
  the reason, before any work.
The many-kill and Ray-worker-kill versions are in bench/chaos.py (`make chaos`).
"""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: bind 127.0.0.1

import errno
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet")

from datagen.job.pipeline import process_shard, run  # noqa: E402
from datagen.job.settings import PipelineError, RunConfig  # noqa: E402
from datagen.job.shard_files import ROWS_SUFFIX, shard_name, write_tables  # noqa: E402
from datagen.sources import get_source  # noqa: E402
from datagen.teachers.runner import OracleTeacher  # noqa: E402
from shared.shard import TMP_MARK, validate_shard  # noqa: E402
from tests.procs import kill_tree  # noqa: E402

N, SHARD, SEED = 24, 2, 5
OPTS = {"width": 64, "height": 48, "seed": SEED}


def task_cfg() -> RunConfig:
    """The settings a shard task gets from the driver, for the job the CLI runs with ARGS below."""
    return RunConfig(source="synthetic", source_options=dict(OPTS), seed=SEED)


def reference(out: Path) -> Path:
    """The uninterrupted job, shard after shard in this process (no Ray: the bytes do not depend on it)."""
    job = out / "synthetic"
    job.mkdir(parents=True)
    items = get_source("synthetic", None, count=N, **OPTS).items()
    shards = [items[i:i + SHARD] for i in range(0, N, SHARD)]
    for i, chunk in enumerate(shards):
        process_shard(task_cfg(), i, chunk, None, OracleTeacher().info(), str(job))
    write_tables(job, [True] * len(shards), "synthetic", [])
    return job


# ---------------------------------------------------------------------------------------------------------
# SIGKILL, twice




def kill_after_progress(out: Path, rng: np.random.Generator, log: Path) -> int:
    """Start `datagen run`; once at least one more shard than before is finished, wait a random few ms
    and SIGKILL its whole process group (driver, raylet, workers). Returns the finished shards then."""
    job = out / "synthetic"
    before = len(list(job.glob("*.tar"))) if job.exists() else 0
    cmd = [sys.executable, "-m", "datagen.cli", "run", "--source", "synthetic", "--width", str(OPTS["width"]),
           "--height", str(OPTS["height"]), "--limit", str(N), "--shard-size", str(SHARD), "--seed", str(SEED),
           "--out", str(out), "--workers", "2", "--progress", "none"]
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (job.exists() and len(list(job.glob("*.tar"))) > before):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"datagen run ended or hung before writing a shard:\n{log.read_text()[-3000:]}")
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 0.05)))  # a random moment inside the job
        kill_tree(proc.pid)
        proc.wait()
    finally:
        kill_tree(proc.pid)
    return len(list(job.glob("*.tar")))


def test_two_sigkills_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref = reference(tmp_path / "ref")
    n_shards = -(-N // SHARD)
    out, rng = tmp_path / "killed", np.random.default_rng(8)
    job = out / "synthetic"
    finished_at_kill = []
    for k in range(2):
        finished_at_kill.append(kill_after_progress(out, rng, tmp_path / "killed.log"))
        # the invariant at a kill: a tar under its final name is complete and has its rows on disk
        for tar in job.glob("*.tar"):
            assert (job / f"{tar.stem}{ROWS_SUFFIX}").is_file(), tar
            assert validate_shard(tar).ok, tar
            assert tar.read_bytes() == (ref / tar.name).read_bytes(), f"kill {k}: {tar.name} differs"
    assert finished_at_kill[0] < finished_at_kill[1] < n_shards, "both kills must land midway"
    assert not (job / "manifest.parquet").exists()  # no run got to the end

    summary = run(RunConfig(source="synthetic", source_options={"width": OPTS["width"], "height": OPTS["height"]},
                            limit=N, shard_size=SHARD, seed=SEED, out=str(out), workers=2, progress="none"))
    assert summary.done + summary.skipped == N and summary.failed == 0
    assert summary.skipped >= SHARD * finished_at_kill[1]
    assert not [p for p in job.iterdir() if TMP_MARK in p.name]
    assert pq.read_table(job / "manifest.parquet").to_pylist() == pq.read_table(ref / "manifest.parquet").to_pylist()
    assert pq.read_table(job / "failures.parquet").num_rows == 0
    tars = sorted(p.name for p in job.glob("*.tar"))
    assert tars == sorted(p.name for p in ref.glob("*.tar")) and len(tars) == n_shards
    for name in tars:
        assert (job / name).read_bytes() == (ref / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------------
# disk full


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 16 KiB tmpfs (room for a few small files, not for a shard); skipped where mounting is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def shard_items(n: int = 4) -> list:
    return get_source("synthetic", None, count=n, **OPTS).items()


def assert_no_shard_left(job: Path, partial_ok: bool = False) -> None:
    names = sorted(p.name for p in job.iterdir())
    assert not [n for n in names if n.endswith(".tar")], names  # nothing under a final name
    assert not [n for n in names if n.endswith(ROWS_SUFFIX)], names  # the shard is not marked finished
    if not partial_ok:
        assert not [n for n in names if TMP_MARK in n], names  # and no partial file either


def fill_tiny_disk(job: Path) -> OSError:
    with pytest.raises(OSError) as info:
        process_shard(task_cfg(), 0, shard_items(), None, OracleTeacher().info(), str(job))
    assert info.value.errno == errno.ENOSPC or "No space left" in str(info.value)
    return info.value


def test_a_real_full_disk_stops_the_shard_with_no_shard_under_its_final_name(tiny_tmpfs):
    job = tiny_tmpfs / "synthetic"
    job.mkdir()
    fill_tiny_disk(job)
    assert_no_shard_left(job, partial_ok=True)  # a rerun removes *.tmp-* files at start


def test_a_real_full_disk_leaves_no_partial_file(tiny_tmpfs):
    job = tiny_tmpfs / "synthetic"
    job.mkdir()
    fill_tiny_disk(job)
    assert_no_shard_left(job)


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written (as a full disk's do)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("room", [0, 3000, 20000])  # at the first header, inside a member, members later
def test_a_simulated_full_disk_stops_the_shard_cleanly(tmp_path, monkeypatch, room):
    import builtins

    import shared.storage

    def full_open(path, mode="r", *a, **kw):
        f = builtins.open(path, mode, *a, **kw)
        return FullDisk(f, room) if "w" in mode and TMP_MARK in str(path) else f

    monkeypatch.setattr(shared.storage, "open", full_open, raising=False)  # ShardWriter's open (AtomicFile)
    job = tmp_path / "synthetic"
    job.mkdir()
    with pytest.raises(OSError, match="No space left"):
        process_shard(task_cfg(), 0, shard_items(), None, OracleTeacher().info(), str(job))
    assert_no_shard_left(job)
    monkeypatch.undo()  # and with room again, the same call writes the shard
    rows = process_shard(task_cfg(), 0, shard_items(), None, OracleTeacher().info(), str(job))
    assert rows["samples"] == 4 and validate_shard(job / f"{shard_name('synthetic', 0)}.tar").ok


# ---------------------------------------------------------------------------------------------------------
# output not writable (checked before Ray starts, so these are quick)


def test_output_path_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(PipelineError, match="cannot create the output folder .*out/synthetic"):
        run(RunConfig(source="synthetic", source_options={"width": 64, "height": 48}, limit=2,
                      out=str(tmp_path / "out"), progress="none"))
    assert (tmp_path / "out").read_text() == "not a folder"


def test_read_only_output_is_a_clear_error(tmp_path):
    """Root ignores permission bits, so the folder is made read-only the way root cannot ignore: a
    read-only mount (skipped where this process may not mount)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "synthetic").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(PipelineError, match=r"cannot write to the output folder .*Read-only file system"):
            run(RunConfig(source="synthetic", source_options={"width": 64, "height": 48}, limit=2, out=str(mnt),
                          progress="none"))
        assert os.listdir(mnt / "synthetic") == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
