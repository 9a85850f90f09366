"""A real S3-protocol server for the object-storage tests: moto's standalone server on 127.0.0.1.

One server for the whole pytest run (started on first use, stopped by its process id at the end); each test
gets its own bucket. The standard AWS variables point s3fs/botocore at it, as a user's environment would:
nothing in the project is told about the server.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The endpoint URL of a moto S3 server, with AWS_* set for this process and the ones it starts."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as f:  # port 0: the server takes a free port and prints it
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"Running on (http://127\.0\.0\.1:\d+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto's S3 server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        endpoint = found.group(1)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            yield endpoint
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group: the server and nothing else
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket: its URL, s3://<name>."""
    import fsspec

    name = f"t-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", use_listings_cache=False).mkdir(name)
    return f"s3://{name}"
