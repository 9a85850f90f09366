"""shared.storage against a throttling, flaky object store: moto's S3 server behind tests/s3faults.py's proxy,
which answers 503 SlowDown or 500, resets connections mid-request, cuts bodies short and stalls.

Every operation of the module gets through faults that are transient (the proxy fails the same request at
most twice running); DMD3C_STORAGE_RETRY's `attempts` governs every layer (attempts=1 lets each fault
through); permanent errors are never retried; a read stream cut mid-object resumes at its byte."""

from __future__ import annotations

import errno
import io

import pytest

from shared import storage
from shared.shard import ShardWriter, iter_samples, validate_shard
from shared.storage import RETRY_ENV, RetryPolicy, StorageError, is_transient
from tests.s3faults import FAULTS

pytest.importorskip("s3fs")


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Our layer's backoff in milliseconds (botocore's own, before a request's retry, is not settable)."""
    monkeypatch.setenv(RETRY_ENV, "attempts=5,base=0.01,max=0.1")


def test_the_policy_is_parsed_from_one_variable_and_bad_values_are_refused():
    assert RetryPolicy.parse(None) == RetryPolicy.parse("") == RetryPolicy()
    p = RetryPolicy.parse("attempts=8, base=0.5,max=30,timeout=12")
    assert (p.attempts, p.base, p.max, p.timeout) == (8, 0.5, 30.0, 12.0)
    assert p.botocore_config() == {"retries": {"mode": "standard", "total_max_attempts": 8},
                                   "connect_timeout": 12.0, "read_timeout": 12.0}
    for bad in ("attempts=0", "tries=3", "attempts", "base=-1", "max=soon", "timeout=0"):
        with pytest.raises(StorageError, match=RETRY_ENV):
            RetryPolicy.parse(bad)


def test_backoff_is_full_jitter_below_an_exponential_cap():
    p = RetryPolicy(attempts=10, base=0.1, max=1.0)
    for k in range(1, 9):
        cap = min(1.0, 0.1 * 2 ** (k - 1))
        draws = [p.backoff(k) for _ in range(300)]
        assert all(0 <= d <= cap for d in draws)
        assert max(draws) > 0.8 * cap and min(draws) < 0.2 * cap  # spread over the whole range


def client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def test_what_is_transient_and_what_is_not():
    import aiohttp
    import botocore.exceptions as b

    translated = OSError(errno.EBUSY, "Please reduce your request rate.")  # s3fs's form of a 503 SlowDown
    translated.__cause__ = client_error(503, "SlowDown")
    transient = [ConnectionResetError(), ConnectionAbortedError(), TimeoutError(), client_error(503, "SlowDown"),
                 client_error(500, "InternalError"), client_error(429, "TooManyRequests"), translated,
                 OSError(errno.EREMOTEIO, "Internal Server Error"), aiohttp.ClientPayloadError("cut"),
                 b.EndpointConnectionError(endpoint_url="http://x"), b.ConnectionClosedError(endpoint_url="x"),
                 b.ReadTimeoutError(endpoint_url="x")]
    permanent = [FileNotFoundError("k"), FileExistsError("k"), PermissionError("denied"), ValueError("bad"),
                 client_error(404, "NoSuchKey"), client_error(403, "AccessDenied"), client_error(400, "BadDigest"),
                 OSError(errno.EINVAL, "invalid"), KeyError("x")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def every_operation(root: str) -> dict:
    """Each storage operation once, against the prefix `root`; returns what each one gave."""
    got = {}
    storage.makedirs(root)
    storage.write_bytes(f"{root}/a.bin", b"one" * 1000)
    storage.write_bytes(f"{root}/sub/b.bin", b"two")
    got["read"] = storage.read_bytes(f"{root}/a.bin")
    with storage.open_read(f"{root}/a.bin", block_size=1024) as f:
        got["stream"] = f.read()
    got["exists"] = (storage.exists(f"{root}/a.bin"), storage.exists(f"{root}/none"))
    got["is_file"] = (storage.is_file(f"{root}/a.bin"), storage.is_file(f"{root}/sub"))
    got["is_dir"] = (storage.is_dir(f"{root}/sub"), storage.is_dir(f"{root}/a.bin"))
    got["listdir"] = storage.listdir(root)
    got["find"] = storage.find(root)
    got["glob"] = storage.glob(f"{root}/**/*.bin")
    storage.create_exclusive(f"{root}/lock", b"mine")
    with pytest.raises(FileExistsError):
        storage.create_exclusive(f"{root}/lock", b"theirs")
    got["lock"] = storage.read_bytes(f"{root}/lock")
    storage.remove(f"{root}/lock")
    storage.remove(f"{root}/lock")
    storage.replace(f"{root}/sub/b.bin", f"{root}/sub/c.bin")
    f = storage.AtomicFile(f"{root}/table.parquet")
    f.file.write(b"PAR1" * 5000)
    f.commit()
    storage.write_bytes(f"{root}/x.tar{storage.TMP_MARK}9", b"left by a killed writer")
    got["removed"] = storage.remove_partial(root)
    got["after"] = storage.find(root)
    return got


EXPECTED = {"read": b"one" * 1000, "stream": b"one" * 1000, "exists": (True, False), "is_file": (True, False),
            "is_dir": (True, False), "listdir": ["a.bin"], "find": ["a.bin", "sub/b.bin"], "lock": b"mine",
            "removed": 1, "after": ["a.bin", "sub/c.bin", "table.parquet"]}


def test_every_operation_gets_through_every_kind_of_transient_fault(s3_bucket, fault_proxy):
    """A third of the requests fail, each kind several times (the same request up to twice running): every
    operation gives what it gives without faults, nothing is lost or duplicated."""
    proxy = fault_proxy(rate=0.35, kinds=FAULTS, max_in_a_row=2, stall_s=0.3, seed=11)
    for run in ("one", "two"):
        got = every_operation(f"{s3_bucket}/{run}")
        got["glob"] = [u.removeprefix(f"{s3_bucket}/{run}/") for u in got["glob"]]
        assert got == {**EXPECTED, "glob": ["a.bin", "sub/b.bin"]}, run
    assert all(proxy.stats[kind] >= 2 for kind in FAULTS), proxy.stats  # the faults did happen


def test_attempts_governs_every_layer(s3_bucket, fault_proxy, monkeypatch):
    """attempts=1: no layer retries, so a fault reaches the caller (once for each of several operations);
    attempts=2 is enough against a proxy that fails each request once."""
    storage.write_bytes(f"{s3_bucket}/a.bin", b"data")
    monkeypatch.setenv(RETRY_ENV, "attempts=1")
    fault_proxy(rate=1.0, kinds=("503", "truncate"), max_in_a_row=1, seed=2)  # (aiohttp itself retries a reset once)
    for op in (lambda: storage.is_file(f"{s3_bucket}/a.bin"), lambda: storage.read_bytes(f"{s3_bucket}/a.bin"),
               lambda: storage.listdir(s3_bucket), lambda: storage.write_bytes(f"{s3_bucket}/b.bin", b"x")):
        with pytest.raises(Exception) as info:  # noqa: PT011 (whatever the library raised)
            op()
        assert is_transient(info.value), repr(info.value)
    monkeypatch.setenv(RETRY_ENV, "attempts=2,base=0.01")  # other botocore options: a new client
    assert storage.read_bytes(f"{s3_bucket}/a.bin") == b"data" and storage.is_file(f"{s3_bucket}/a.bin")
    assert storage.listdir(s3_bucket) == ["a.bin"]


def test_a_throttled_store_is_not_taken_for_an_empty_one(s3_bucket, fault_proxy, monkeypatch):
    """fsspec's exists() and isfile() answer False on any error; with a store that keeps answering 503, ours
    raise after the retries instead (a finished shard must not look missing, a job must not redo it)."""
    storage.write_bytes(f"{s3_bucket}/a.tar", b"finished")
    monkeypatch.setenv(RETRY_ENV, "attempts=2,base=0.01")
    fault_proxy(rate=1.0, kinds=("503",), max_in_a_row=10**6)
    for op in (storage.exists, storage.is_file, storage.is_dir):
        with pytest.raises(OSError, match="reduce your request rate|Service Unavailable|SlowDown"):
            op(f"{s3_bucket}/a.tar")


def test_a_stream_cut_mid_object_resumes_at_its_byte(s3_bucket, fault_proxy, samples):
    """A shard read in small ranges, half of them cut short: the same bytes, and the stream was reopened
    (a restart from byte 0 or a dropped tail would change what is read); the shard reads and validates."""
    buf = io.BytesIO()
    with ShardWriter(f"{s3_bucket}/s/test-000000.tar") as w:
        for s in samples:
            w.write(s)
    data = storage.read_bytes(f"{s3_bucket}/s/test-000000.tar")
    proxy = fault_proxy(rate=0.5, kinds=("truncate",), max_in_a_row=2, seed=3)
    with storage.open_read(f"{s3_bucket}/s/test-000000.tar", block_size=4096) as f:
        while chunk := f.read(1000):
            buf.write(chunk)
        reopened = f.reopened
    assert buf.getvalue() == data and reopened > 0 and proxy.stats["truncate"] > 0
    assert [s.key for s in iter_samples(f"{s3_bucket}/s/")] == [s.key for s in samples]
    assert validate_shard(f"{s3_bucket}/s/test-000000.tar").ok


def test_an_object_replaced_during_a_read_is_not_mixed(s3_bucket, fault_proxy):
    """A reopened stream checks that the object is the one it started: bytes of two versions never mix."""
    storage.write_bytes(f"{s3_bucket}/o.bin", b"a" * 50_000)
    f = storage.open_read(f"{s3_bucket}/o.bin", block_size=4096)
    assert f.read(10_000) == b"a" * 10_000
    storage.write_bytes(f"{s3_bucket}/o.bin", b"b" * 50_000)
    fault_proxy(rate=1.0, kinds=("truncate",), max_in_a_row=1)
    with pytest.raises(OSError, match="changed while it was read|no longer exists"):  # ours, or s3fs's If-Match
        f.read(20_000)
    f.close()
