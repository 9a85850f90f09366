"""Where shards and data sets live: a local folder or a prefix in an object store, behind one small API.

    /data/shards, shards, file:///data/shards     a local folder: plain os calls, exactly as before
    s3://bucket/prefix                            S3 and S3-compatible servers (MinIO, Ceph, R2, ...): s3fs
    gs://bucket/prefix, az://container/prefix     Google Cloud Storage (gcsfs), Azure Blob (adlfs)

The layer for object stores is fsspec (docs/pipeline.md says why): one API for every store, the one the
scientific Python stack already uses (pandas, Hugging Face datasets), streaming reads and writes,
and the store's own credential chain. Credentials and the endpoint come from the standard environment
that the store's library reads (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, ~/.aws, an instance role); nothing here stores or forwards a secret.

A string that starts like a URL (`scheme:`) is a URL. An unknown scheme or a malformed URL is refused with
StorageError, never taken as a local path (a local folder whose name has a colon is written `./s3:x`).

Atomic writes, the same guarantee on every store: a file appears under its final name only when complete.
Streams (shards, tables) are written to `<name>.tmp-<pid>` and renamed (local: os.replace after fsync;
object stores: a server-side copy, then the temporary key is deleted); small byte strings are written
with one PUT, which an object store makes visible only once complete. `remove_partial` deletes what a
killed writer left: temporary files, and on S3 the multipart uploads of temporary keys never completed.

Transient faults (a store that throttles, answers 5xx, drops connections or cuts a body short) are retried
under one policy, `RetryPolicy`, set by the environment variable DMD3C_STORAGE_RETRY (for example
"attempts=8,base=0.5,max=30,timeout=60"; docs/reliability.md says what each layer retries and why):
botocore retries each S3 request (a multipart upload's parts included) up to `attempts` times, and every
operation of this module is retried as a whole up to `attempts` times with exponential backoff and full
jitter; a read stream that breaks is reopened at the byte it had reached. Missing objects, refused
permissions and other permanent errors are never retried.
"""

from __future__ import annotations

import errno
import functools
import http.client
import importlib
import io
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

from shared.fsutil import TMP_MARK, atomic_write_bytes, fsync_dir, temporary_path

# object stores: scheme -> the fsspec package that implements it (named in the error when it is missing)
OBJECT_STORES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: "C:" is no scheme
# bucket or container names as S3, GCS and Azure allow them: lower case, digits, '.', '-', '_'
OBJECT_URL_RE = re.compile(r"^([a-z0-9]+)://([a-z0-9][a-z0-9._-]{1,221}[a-z0-9])(/.*)?$")


log = logging.getLogger("shared.storage")
T = TypeVar("T")


class StorageError(ValueError):
    """A location that cannot be used: unknown scheme, malformed URL, missing bucket, library not installed."""


# ---------------------------------------------------------------------------------------------------------
# transient faults: one retry policy

RETRY_ENV = "DMD3C_STORAGE_RETRY"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})  # throttled, or the server failed: try again
RETRY_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded",
                         "InternalError", "ServiceUnavailable", "RequestTimeout", "OperationAborted"})
RETRY_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT, errno.ECONNRESET,
                          errno.ECONNABORTED, errno.EPIPE, errno.EAGAIN})  # s3fs's translations of the above
PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class RetryPolicy:
    """How transient object-store faults are retried; the one setting for both packages.

    attempts   tries of one request (botocore's retries) and of one operation of this module (ours), >= 1
    base, max  our backoff before retry k: uniform(0, min(max, base * 2 ** (k - 1))) seconds (full jitter)
    timeout    seconds to connect, and to wait for each read of a reply (botocore's connect and read timeouts)

    What is retried (`is_transient`): HTTP 429, 500, 502, 503, 504 and S3's throttling and server error
    codes; connections refused, reset, aborted or closed early; timeouts; bodies cut short. Never: a missing
    object, an object that already exists (a conditional create), refused permissions, bad requests.
    """

    attempts: int = 5
    base: float = 0.2
    max: float = 10.0
    timeout: float = 60.0

    def __post_init__(self):
        if self.attempts < 1 or self.base < 0 or self.max < 0 or self.timeout <= 0:
            raise StorageError(f"{RETRY_ENV}: attempts must be >= 1, base and max >= 0, timeout > 0; got {self}")

    @classmethod
    def parse(cls, text: str | None) -> RetryPolicy:
        """From "attempts=8,base=0.5,max=30,timeout=60" (any subset; empty: the defaults)."""
        values = {}
        names = {f.name: f.type for f in fields(cls)}
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise StorageError(f"{RETRY_ENV}={text!r}: expected KEY=VALUE pairs separated by commas, keys "
                                   f"{', '.join(names)}")
            try:
                values[key] = int(value) if key == "attempts" else float(value)
            except ValueError:
                raise StorageError(f"{RETRY_ENV}={text!r}: {key} must be a number, got {value!r}") from None
        return cls(**values)

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...)."""
        return random.uniform(0, min(self.max, self.base * 2 ** (retry - 1)))

    def botocore_config(self) -> dict:
        """botocore's Config for S3 clients: standard retry mode (429, 5xx, throttling, connection errors,
        timeouts; its own exponential backoff with full jitter) with our number of attempts per request."""
        return {"retries": {"mode": "standard", "total_max_attempts": self.attempts},
                "connect_timeout": self.timeout, "read_timeout": self.timeout}

    def call(self, fn: Callable[[], T], what: str) -> T:
        """fn(), retried on transient errors; the last error is raised when the attempts are spent."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if attempt == self.attempts or not is_transient(exc):
                    if attempt > 1:
                        exc.add_note(f"{what}: gave up after {attempt} attempts ({RETRY_ENV})")
                    raise
                delay = self.backoff(attempt)
                log.info("%s: %s: %s; retry %d of %d in %.2f s", what, type(exc).__name__, exc, attempt,
                         self.attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


@functools.lru_cache(maxsize=8)
def _parse_policy(text: str | None) -> RetryPolicy:
    return RetryPolicy.parse(text)


def retry_policy() -> RetryPolicy:
    """The policy in force: DMD3C_STORAGE_RETRY, read at each use (a test or a worker may set it)."""
    return _parse_policy(os.environ.get(RETRY_ENV))


@functools.cache
def _transient_types() -> tuple[type, ...]:
    """Exception classes that mean "the connection or the reply broke", from whichever libraries are here."""
    found: list[type] = [ConnectionError, TimeoutError, http.client.IncompleteRead]  # reset, aborted, refused
    for module, names in (
        ("botocore.exceptions", ("ConnectionError", "HTTPClientError", "IncompleteReadError", "ResponseStreamingError")),
        ("botocore.parsers", ("ResponseParserError",)),  # a throttling reply that is not valid XML
        ("aiohttp", ("ClientPayloadError", "ClientConnectionError")),  # s3fs's transport: a body cut short
        ("urllib3.exceptions", ("ProtocolError", "TimeoutError")),
        ("fsspec.exceptions", ("FSTimeoutError",)),
    ):
        try:
            found += [c for c in (getattr(importlib.import_module(module), n, None) for n in names)
                      if isinstance(c, type)]
        except ImportError:  # a library that is not installed raises nothing
            pass
    return tuple(found)


def is_transient(exc: BaseException) -> bool:
    """Whether an error of an object-store call may go away when the call is made again (RetryPolicy)."""
    if isinstance(exc, PERMANENT):
        return False
    seen = 0
    while exc is not None and seen < 6:
        if isinstance(exc, _transient_types()):
            return True
        response = getattr(exc, "response", None)  # botocore's ClientError
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return status in RETRY_STATUS or response.get("Error", {}).get("Code") in RETRY_CODES
        if type(exc) is OSError and exc.errno in RETRY_ERRNOS:  # s3fs's translation of a 5xx or throttling
            return True
        exc, seen = exc.__cause__, seen + 1  # what the library wrapped (s3fs: the ClientError)
    return False


def is_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and URL_RE.match(location) is not None


def is_object_store(location: str | os.PathLike) -> bool:
    return is_url(location) and URL_RE.match(location).group(1).lower() in OBJECT_STORES


def check(location: str | os.PathLike, what: str = "path", readers: tuple[str, ...] = ()) -> str:
    """The location, validated and normalised: a local path as given (file:// turned into a path), an
    object-store URL without a trailing slash. `readers`: other schemes the caller can read (e.g.
    WebDataset's pipe: and http:), passed through unchanged. Anything else that looks like a URL raises
    StorageError naming `what` (the option) and the forms expected."""
    if not is_url(location):
        return os.fspath(location)
    scheme = URL_RE.match(location).group(1).lower()
    if scheme == "file":
        if not location.startswith("file://") or not location[len("file://"):].startswith("/"):
            raise StorageError(f"{what} {location!r}: a file URL is file:///absolute/path")
        return location[len("file://"):]
    if scheme in readers:
        return location
    if scheme not in OBJECT_STORES:
        known = ", ".join(f"{s}://" for s in (*OBJECT_STORES, *readers))
        raise StorageError(f"{what} {location!r}: unknown URL scheme {scheme!r}; expected a local folder or one of "
                           f"{known} (a local name with a colon is written ./{location})")
    m = OBJECT_URL_RE.match(location)
    key = (m.group(3) or "")[1:].rstrip("/") if m else ""  # one trailing slash is a folder, more are empty parts
    parts = key.split("/") if key else []
    if m is None or m.group(1) != scheme or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"{what} {location!r} is not a valid {scheme} URL: expected {scheme}://BUCKET/PREFIX "
                           "(bucket: 3-63 lower-case letters, digits, '.', '-'; no empty, '.' or '..' parts)")
    return f"{scheme}://{m.group(2)}" + (f"/{key}" if key else "")


def join(location: str | os.PathLike, *names: str) -> str:
    if is_url(location):
        return "/".join([location.rstrip("/"), *names])
    return os.path.join(location, *names)


def basename(location: str | os.PathLike) -> str:
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


def _fs(location: str):
    """(fsspec filesystem, its path) of an object-store URL. Listings are never cached: other processes
    (the workers) write the same prefix, and a stale listing would hide their files."""
    import fsspec

    check(location)
    scheme = URL_RE.match(location).group(1).lower()
    options = {"use_listings_cache": False}
    if scheme == "s3":  # botocore retries each request (RetryPolicy.botocore_config)
        options["config_kwargs"] = retry_policy().botocore_config()
    try:
        fs, path = fsspec.core.url_to_fs(location, **options)
    except ImportError as exc:
        package = OBJECT_STORES.get(scheme)
        raise StorageError(f"{location}: reading this store needs the {package} package (pip install {package})") \
            from exc
    if scheme == "s3":
        fs.retries = 1  # s3fs's own retry loop off: ours (RetryPolicy.call) is the one above botocore's
    return fs, path


def _retry(fn: Callable[[], T], what: str) -> T:
    return retry_policy().call(fn, what)


def _info(location: str) -> dict | None:
    """fsspec's info of an object or prefix, None when there is none. (fsspec's isfile and exists answer False
    on any error, so a throttled store would look empty: this raises instead, after the retries.)"""
    fs, path = _fs(location)
    try:
        return _retry(lambda: fs.info(path), f"info {location}")
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------
# reading


def exists(location) -> bool:
    if not is_url(location):
        return os.path.exists(location)
    return _info(location) is not None


def is_file(location) -> bool:
    if not is_url(location):
        return os.path.isfile(location)
    info = _info(location)
    return info is not None and info["type"] == "file"


def is_dir(location) -> bool:
    """A local folder, or a prefix that holds at least one object (object stores have no empty folders)."""
    if not is_url(location):
        return os.path.isdir(location)
    info = _info(location)
    return info is not None and info["type"] == "directory"


def read_bytes(location) -> bytes:
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = _fs(location)
    return _retry(lambda: fs.cat_file(path), f"read {location}")


def open_read(location, block_size: int = 8 * 2**20):
    """A binary file streamed from the location (object stores: ranged reads of block_size bytes; a read that
    breaks is retried from the byte it had reached, see ResumableReader)."""
    if not is_url(location):
        return open(location, "rb")  # noqa: SIM115 (the caller closes it)
    return ResumableReader(location, block_size)


class ResumableReader(io.RawIOBase):
    """An object read as a stream that survives dropped connections and bodies cut short: a read that fails
    with a transient error (is_transient) is retried under the RetryPolicy, reopening the object at the byte
    the stream had reached, so the caller sees every byte once, in order. The object must not change
    meanwhile: if its ETag or size differs on reopening, the read fails (OSError) rather than mix versions."""

    def __init__(self, location: str, block_size: int = 8 * 2**20):
        super().__init__()
        self.location, self.block_size = location, block_size
        self._fs, self._path = _fs(location)
        self._f = self._open()
        details = getattr(self._f, "details", None) or {}
        self.size = details.get("size")
        self._version = (details.get("ETag"), details.get("size"))
        self.reopened = 0

    def _open(self):
        return _retry(lambda: self._fs.open(self._path, "rb", block_size=self.block_size), f"open {self.location}")

    def _reopen(self, pos: int) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 (a broken stream may fail to close; it is dropped either way)
            pass
        self._f = self._fs.open(self._path, "rb", block_size=self.block_size)
        details = getattr(self._f, "details", None) or {}
        if (details.get("ETag"), details.get("size")) != self._version:
            raise OSError(errno.ESTALE, f"{self.location} changed while it was read")
        self._f.seek(pos)
        self.reopened += 1

    def _call(self, fn: Callable[[], T]) -> T:
        pos, first = self._f.tell(), [True]

        def attempt():
            if not first[0]:
                self._reopen(pos)
            first[0] = False
            return fn()

        try:
            return _retry(attempt, f"stream {self.location} at byte {pos}")
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise OSError(f"{self.location}: read failed at byte {pos} after {retry_policy().attempts} attempts "
                          f"({RETRY_ENV}): {type(exc).__name__}: {exc}") from exc

    def __repr__(self) -> str:  # webdataset names the stream in its messages
        return f"<{type(self).__name__} {self.location}>"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._call(lambda: self._f.read(size))

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        if not self.closed:
            try:
                self._f.close()
            finally:
                super().close()


def listdir(location) -> list[str]:
    """Names of the files directly in a folder or under a prefix (not sub-folders), sorted; [] when none."""
    if not is_url(location):
        return sorted(e.name for e in os.scandir(location) if e.is_file())
    fs, path = _fs(location)
    try:
        entries = _retry(lambda: fs.ls(path, detail=True), f"list {location}")
    except FileNotFoundError:
        return []
    return sorted(basename(e["name"]) for e in entries if e["type"] == "file")


def find(location) -> list[str]:
    """Relative paths ('a/b.jpg') of every file below a folder or prefix, sorted. One listing on an object
    store (paginated, 1000 keys a request), so a data set of 100,000 images costs 100 requests, not 100,000."""
    if not is_url(location):
        root = Path(location)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    fs, path = _fs(location)
    prefix = path.rstrip("/") + "/"
    found = _retry(lambda: fs.find(path), f"list {location}")
    return sorted(p[len(prefix):] for p in found if p.startswith(prefix) and not p.endswith("/"))


def glob(pattern: str) -> list[str]:
    """URLs of the objects matching a glob pattern (object stores only), sorted."""
    fs, path = _fs(pattern)
    scheme = URL_RE.match(pattern).group(1).lower()
    return sorted(f"{scheme}://{p}" for p in _retry(lambda: fs.glob(path), f"list {pattern}"))


# ---------------------------------------------------------------------------------------------------------
# writing


def makedirs(location) -> None:
    """Create a local folder; for an object store, check that the bucket exists (prefixes need no creating,
    and making buckets is left to whoever owns the account)."""
    if not is_url(location):
        os.makedirs(location, exist_ok=True)
        return
    fs, path = _fs(location)
    bucket = path.split("/", 1)[0]
    try:
        if URL_RE.match(location).group(1).lower() == "s3":  # unlike exists(), tells a missing bucket from no server
            _retry(lambda: fs.call_s3("head_bucket", Bucket=bucket), f"check {location}")
        elif _info(f"{URL_RE.match(location).group(1)}://{bucket}") is None:
            raise FileNotFoundError(bucket)
    except FileNotFoundError:
        raise StorageError(f"{location}: the bucket {bucket!r} does not exist (or these credentials cannot see it); "
                           "create it first") from None
    except Exception as exc:  # noqa: BLE001 (no server, refused credentials: say what the library said)
        raise StorageError(f"cannot reach {location}: {type(exc).__name__}: {exc}") from exc


def write_bytes(location, data: bytes) -> None:
    """Write a small file atomically: local, shared.fsutil's temporary file, fsync and rename; an object
    store, one PUT."""
    if is_url(location):
        fs, path = _fs(location)
        _retry(lambda: fs.pipe_file(path, data), f"write {location}")  # one PUT: repeating it is harmless
        return
    atomic_write_bytes(location, data)


def create_exclusive(location: str, data: bytes) -> None:
    """Create an object only if no object has that name (S3's conditional PUT, If-None-Match: *);
    FileExistsError otherwise. Object stores only (a local lock uses fcntl). A retried create whose first try
    did reach the store meets its own object: FileExistsError too (the lease lock knows its own token)."""
    fs, path = _fs(location)
    try:
        _retry(lambda: fs.pipe_file(path, data, mode="create"), f"create {location}")
    except TypeError:  # a store whose fsspec library has no exclusive create: check, then write
        if exists(location):
            raise FileExistsError(location) from None
        write_bytes(location, data)


def remove(location) -> None:
    """Delete a file; a missing one is not an error."""
    if not is_url(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = _fs(location)
    try:
        _retry(lambda: fs.rm_file(path), f"delete {location}")
    except FileNotFoundError:
        pass


def replace(src, dst) -> None:
    """Rename src to dst, replacing it. Local: os.replace, then the folder is fsynced so that the rename
    survives a power cut. Object stores: a server-side copy (atomic: dst appears whole), then src deleted."""
    if not is_url(dst):
        os.replace(src, dst)
        fsync_dir(os.path.dirname(os.fspath(dst)) or ".")
        return
    fs, path = _fs(src)
    _retry(lambda: fs.copy(path, _fs(dst)[1]), f"copy {src}")  # the same copy again is harmless
    remove(src)


class AtomicFile:
    """A binary file that appears under its final name only when `commit()` is called: it is written to
    `<name>.tmp-<pid>` (streamed: an object store gets a multipart upload) and renamed by `replace`.
    `abort()` deletes the temporary file. A crash leaves only the temporary one, which `remove_partial`
    deletes."""

    def __init__(self, location):
        self.location = os.fspath(location)
        self.tmp = f"{self.location}{TMP_MARK}{os.getpid()}" if is_url(location) else str(temporary_path(location))
        if is_url(self.location):  # each request of the upload (its parts) is retried by botocore
            fs, path = _fs(self.tmp)
            self.file = _retry(lambda: fs.open(path, "wb"), f"open {self.tmp}")
        else:
            os.makedirs(os.path.dirname(self.location) or ".", exist_ok=True)
            self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in commit/abort)

    def commit(self) -> str:
        if is_url(self.location):
            self.file.close()  # completes the upload
        else:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        replace(self.tmp, self.location)
        return self.location

    def abort(self) -> None:
        try:
            if hasattr(self.file, "discard"):  # an fsspec upload: drop it rather than complete it
                self.file.discard()
                self.file.closed = True
            else:
                self.file.close()  # on a full disk, flushing the buffer fails again
        except Exception:  # noqa: BLE001 (cleanup: the store's or the disk's error is already being raised)
            pass
        finally:
            remove(self.tmp)


def remove_partial(location) -> int:
    """Delete what killed writers left in a folder or prefix (not below it): files whose name has TMP_MARK
    and, on S3, multipart uploads of such keys that were never completed. Returns how many."""
    if not is_url(location) and not os.path.isdir(location):
        return 0
    names = [n for n in listdir(location) if TMP_MARK in n]
    for name in names:
        remove(join(location, name))
    n = len(names)
    if is_url(location) and URL_RE.match(location).group(1).lower() == "s3":
        fs, path = _fs(location)
        bucket, _, key = path.partition("/")
        prefix = key.rstrip("/") + "/" if key else ""
        try:
            uploads = _retry(lambda: fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix),
                             f"list uploads {location}").get("Uploads", [])
        except PermissionError:  # a role without s3:ListBucketMultipartUploads: such parts stay until a
            uploads = []  # lifecycle rule aborts them; they are never visible as objects
        for up in uploads:
            rest = up["Key"][len(prefix):]
            if "/" not in rest and TMP_MARK in rest:
                try:
                    _retry(lambda up=up: fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"],
                                                    UploadId=up["UploadId"]), f"abort upload {up['Key']}")
                except FileNotFoundError:  # aborted meanwhile (by a retried request, or another cleaner)
                    pass
                n += 1
    return n
