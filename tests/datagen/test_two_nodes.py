"""A two-node Ray cluster on this machine (a head from `ray start --head`, a second node from `ray start
--address`, both on 127.0.0.1, token auth on) whose nodes do NOT have this project: one datagen job reads
a folder of images from the S3 server (tests' conftest.py), writes its shards there, and gets its code
through Ray's runtime environment (--runtime-env code). The same job with --runtime-env off fails and says
why, which shows the nodes really lack the project.

The head has no CPU for tasks (as on a large cluster), so every shard task runs on the second node. Both
nodes are stopped through their process groups (tests/datagen/raynodes.py).
"""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("psutil")
pytest.importorskip("s3fs")

from fixtures import make_folder  # noqa: E402
from raynodes import Node, free_port, head_args  # noqa: E402

from datagen.sources import get_source, load_rgb  # noqa: E402
from datagen.teachers.runner import save_random_teacher  # noqa: E402
from shared import storage  # noqa: E402
from shared.shard import iter_samples, list_shards, validate_shard  # noqa: E402

pytestmark = pytest.mark.cluster

NOT_INSTALLED = "raise ImportError('this Ray node does not have the dmd3c project installed')\n"


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """(address, driver environment) of a head and a worker node whose Python cannot import the project."""
    hidden = tmp_path_factory.mktemp("no_project")
    for package in ("datagen", "shared"):  # shadow the editable install on the nodes (PYTHONPATH comes first)
        (hidden / package).mkdir()
        (hidden / package / "__init__.py").write_text(NOT_INSTALLED)
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray2n", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # AWS_* for S3: the nodes' own
    # `=0` (the tests' loopback guard for a local Ray) makes `ray start --address` refuse to add a node; the
    # nodes stay on loopback through --node-ip-address=127.0.0.1
    node_env = {**env, "PYTHONPATH": str(hidden), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    nodes = [Node(head_args(port, temp_dir, num_cpus=0), node_env, "head")]
    try:
        nodes.append(Node(["--address", f"127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                           "--disable-usage-stats"], node_env, "second node"))
        yield f"127.0.0.1:{port}", {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def datagen_run(address: str, env: dict, cwd, *args: str) -> subprocess.CompletedProcess:
    """The driver runs outside the repository: Ray puts the driver's sys.path (the cwd among it) on the
    workers' sys.path, which on this one machine would hand them the project from the checkout."""
    cmd = [sys.executable, "-m", "datagen.cli", "run", "--address", address, "--progress", "log", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_job_on_two_nodes_without_the_project_reads_and_writes_s3(cluster, s3_bucket, tmp_path):
    address, env = cluster
    tree = make_folder(tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    import fsspec

    fsspec.filesystem("s3").put(f"{tmp_path / 'photos'}/", f"{s3_bucket.removeprefix('s3://')}/photos", recursive=True)
    teacher = save_random_teacher(tmp_path / "tiny_da")  # a local path: on one machine, every node sees it
    job = ["--source", "folder", "--root", f"{s3_bucket}/photos", "--out", f"{s3_bucket}/shards", "--teacher",
           str(teacher), "--shard-size", "3", "--teacher-batch", "2", "--rgb-format", "png"]

    # the nodes really lack the project: without shipping it, the job stops at once and says why
    refused = datagen_run(address, env, tmp_path, "--source", "synthetic", "--limit", "1", "--width", "64",
                          "--height", "48", "--out", f"{s3_bucket}/refused", "--runtime-env", "off")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "does not have the dmd3c project installed" in refused.stderr and "--runtime-env" in refused.stderr

    res = datagen_run(address, env, tmp_path, *job, "--runtime-env", "code")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "shipping datagen, shared (py_modules)" in res.stderr
    assert "done 8, skipped 0, failed 1" in res.stdout and "2 workers" in res.stdout  # the second node's CPUs
    out = f"{s3_bucket}/shards/folder"
    with storage.open_read(f"{out}/failures.parquet") as f:
        failures = pq.read_table(f).to_pylist()
    assert [(r["source_path"], r["stage"]) for r in failures] == [(f"{s3_bucket}/photos/broken.jpg", "load")]
    assert all(validate_shard(u).ok for u in list_shards(f"{out}/"))
    assert not [n for n in storage.listdir(out) if ".tmp-" in n or n == ".lock"]
    # each sample holds its image exactly as it is on disk (PNG in the shard), keyed as the local source keys it
    local = {it.key: it.path for it in get_source("folder", tmp_path / "photos").items()}
    samples = {s.key: s for s in iter_samples(f"{out}/")}
    assert sorted(samples) == sorted(k for k in local if not local[k].endswith("broken.jpg"))
    assert len(samples) == len(tree["paths"])
    for key, s in samples.items():
        assert np.array_equal(s.rgb, load_rgb(local[key])), key
        assert s.meta["source_path"] == f"{s3_bucket}/photos/{os.path.relpath(local[key], tmp_path / 'photos')}"
