"""A real S3-protocol server for the object-storage tests: moto's standalone server on 127.0.0.1, and, for
the fault tests, a proxy in front of it that fails a set share of requests (tests/s3faults.py).

One server for the whole pytest run (started on first use, stopped by its process id at the end); each test
gets its own bucket. The standard AWS variables point s3fs/botocore at it, as a user's environment would:
nothing in the project is told about the server.
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The endpoint URL of a moto S3 server, with AWS_* set for this process and the ones it starts."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from tests.s3faults import MotoServer, aws_env

    try:
        server = MotoServer(tmp_path_factory.mktemp("moto") / "server.log")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in aws_env(server.endpoint).items():
                mp.setenv(k, v)
            yield server.endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket: its URL, s3://<name>."""
    import fsspec

    name = f"t-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", use_listings_cache=False).mkdir(name)
    return f"s3://{name}"


def _forget_s3_clients() -> None:
    """fsspec caches one filesystem (and its client, bound to an endpoint) per set of options: a test that
    moves AWS_ENDPOINT_URL must drop them."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def fault_proxy(s3_server, monkeypatch):
    """start(**FaultProxy options) -> a FaultProxy in front of the S3 server, with AWS_ENDPOINT_URL of this
    process (and of the processes it starts) pointed at it. Every proxy is closed at the end of the test."""
    from tests.s3faults import FaultProxy

    proxies = []

    def start(**options) -> FaultProxy:
        proxy = FaultProxy(s3_server, **options)
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        _forget_s3_clients()
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    _forget_s3_clients()
