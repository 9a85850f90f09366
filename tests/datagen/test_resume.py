"""Resume after a real SIGKILL: `datagen run` is killed midway, the same job is run again, and the result
equals an uninterrupted run: same keys, same shard bytes, shards finished before the kill untouched."""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: bind 127.0.0.1

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from datagen.job.pipeline import RunConfig, run  # noqa: E402
from datagen.sources import get_source  # noqa: E402
from shared.shard import TMP_MARK, validate_shard  # noqa: E402

N, SHARD = 30, 2
ARGS = ["--source", "synthetic", "--width", "96", "--height", "64", "--limit", str(N), "--shard-size", str(SHARD),
        "--seed", "3"]
CFG = dict(source="synthetic", source_options={"width": 96, "height": 64}, limit=N, shard_size=SHARD, seed=3,
           progress="none")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def kill_midway(out: Path) -> dict[str, bytes]:
    """Start `datagen run` as its own process group, SIGKILL it once a shard is finished, return those shards."""
    cmd = [sys.executable, "-m", "datagen.cli", "run", *ARGS, "--out", str(out), "--workers", "4096",
           "--progress", "log"]
    log = open(out.parent / "killed.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    job = out / "synthetic"
    try:
        deadline = time.monotonic() + 120
        while not (job.exists() and list(job.glob("*.tar"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"datagen run ended or hung before writing a shard: {(out.parent / 'killed.log').read_text()}")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-job
        proc.wait()
        finished = {p.name: p.read_bytes() for p in job.glob("*.tar")}  # final names are finished shards
    finally:
        # what the driver started (Ray's raylet, agents, workers) shares its process group: clean it up
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    return finished


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    items = get_source("synthetic", None, count=N, seed=3, width=96, height=64).items()
    ref = run(RunConfig(**CFG, out=str(tmp_path / "ref")))
    assert (ref.done, ref.failed) == (N, 0)
    ref_dir = tmp_path / "ref" / "synthetic"

    out = tmp_path / "killed"
    finished = kill_midway(out)
    job = out / "synthetic"
    n_shards = -(-N // SHARD)
    assert 1 <= len(finished) < n_shards, "the kill must land midway for this test to mean anything"
    assert "--workers 4096 but this machine has" in (tmp_path / "killed.log").read_text()  # says so, still runs

    resumed = run(RunConfig(**CFG, out=str(out)))
    assert resumed.skipped >= SHARD * len(finished)
    assert resumed.done + resumed.skipped == N and resumed.failed == 0
    assert not [p for p in job.iterdir() if TMP_MARK in p.name]  # partial files removed
    for name, data in finished.items():  # finished before the kill: byte for byte the same
        assert (job / name).read_bytes() == data

    manifest = pq.read_table(job / "manifest.parquet").to_pylist()
    keys = [r["key"] for r in manifest]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(it.key for it in items)  # each input once
    assert manifest == pq.read_table(ref_dir / "manifest.parquet").to_pylist()
    tars = sorted(p.name for p in job.glob("*.tar"))
    assert tars == sorted(p.name for p in ref_dir.glob("*.tar")) and len(tars) == n_shards
    for name in tars:
        assert (job / name).read_bytes() == (ref_dir / name).read_bytes()
        assert validate_shard(job / name).ok
