"""`datagen run --address` against a Ray head started with `ray start --head` on loopback (token auth on).

The head is stopped by killing the processes this test started (its own process group; tests/datagen/
raynodes.py), never with `ray stop`, which kills every Ray process on the machine by name.
"""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("psutil")

from raynodes import Node, free_port, head_args  # noqa: E402

from datagen.job.pipeline import process_shard  # noqa: E402
from datagen.job.settings import RunConfig  # noqa: E402
from datagen.sources import get_source  # noqa: E402
from datagen.teachers.runner import OracleTeacher  # noqa: E402
from shared.shard import validate_shard  # noqa: E402


@pytest.fixture(scope="module")
def ray_head():
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    head = Node(head_args(port, temp_dir, num_cpus=2), env, "head")
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_run_against_a_ray_head(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "datagen.cli", "run", "--address", address, "--source", "synthetic", "--width",
           "96", "--height", "64", "--limit", "5", "--shard-size", "3", "--out", str(out), "--progress", "log",
           "--runtime-env", "off"]  # this machine's nodes have the project (tests/datagen/test_two_nodes.py ships it)
    # the driver is given the token but not RAY_AUTH_MODE: datagen turns token mode on for an explicit
    # address when a token is at hand, as a head started by `ray start --head` expects
    driver_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    res = subprocess.run(cmd, env=driver_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "done 5, skipped 0, failed 0" in res.stdout and "2 workers" in res.stdout  # the head's 2 CPUs
    job = out / "synthetic"
    manifest = pq.read_table(job / "manifest.parquet").to_pylist()
    items = get_source("synthetic", None, count=5, width=96, height=64).items()
    assert [r["key"] for r in manifest] == [it.key for it in items]
    for name in ("synthetic-000000.tar", "synthetic-000001.tar"):
        assert validate_shard(job / name).ok
    # the cluster wrote what a plain call of the shard function writes
    cfg = RunConfig(source="synthetic", source_options={"width": 96, "height": 64, "seed": 0})
    plain = tmp_path / "plain"
    plain.mkdir()
    process_shard(cfg, 1, items[3:], None, OracleTeacher().info(), str(plain))
    assert (plain / "synthetic-000001.tar").read_bytes() == (job / "synthetic-000001.tar").read_bytes()

