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
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from shared.fsutil import TMP_MARK, atomic_write_bytes, fsync_dir, temporary_path

# object stores: scheme -> the fsspec package that implements it (named in the error when it is missing)
OBJECT_STORES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: "C:" is no scheme
# bucket or container names as S3, GCS and Azure allow them: lower case, digits, '.', '-', '_'
OBJECT_URL_RE = re.compile(r"^([a-z0-9]+)://([a-z0-9][a-z0-9._-]{1,221}[a-z0-9])(/.*)?$")


class StorageError(ValueError):
    """A location that cannot be used: unknown scheme, malformed URL, missing bucket, library not installed."""


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
    try:
        return fsspec.core.url_to_fs(location, use_listings_cache=False)
    except ImportError as exc:
        package = OBJECT_STORES.get(URL_RE.match(location).group(1).lower())
        raise StorageError(f"{location}: reading this store needs the {package} package (pip install {package})") \
            from exc


# ---------------------------------------------------------------------------------------------------------
# reading


def exists(location) -> bool:
    if not is_url(location):
        return os.path.exists(location)
    fs, path = _fs(location)
    return fs.exists(path)


def is_file(location) -> bool:
    if not is_url(location):
        return os.path.isfile(location)
    fs, path = _fs(location)
    return fs.isfile(path)


def is_dir(location) -> bool:
    """A local folder, or a prefix that holds at least one object (object stores have no empty folders)."""
    if not is_url(location):
        return os.path.isdir(location)
    fs, path = _fs(location)
    return fs.isdir(path)


def read_bytes(location) -> bytes:
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = _fs(location)
    return fs.cat_file(path)


def open_read(location, block_size: int = 8 * 2**20):
    """A binary file streamed from the location (object stores: ranged reads of block_size bytes)."""
    if not is_url(location):
        return open(location, "rb")  # noqa: SIM115 (the caller closes it)
    fs, path = _fs(location)
    return fs.open(path, "rb", block_size=block_size)


def listdir(location) -> list[str]:
    """Names of the files directly in a folder or under a prefix (not sub-folders), sorted; [] when none."""
    if not is_url(location):
        return sorted(e.name for e in os.scandir(location) if e.is_file())
    fs, path = _fs(location)
    try:
        entries = fs.ls(path, detail=True)
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
    return sorted(p[len(prefix):] for p in fs.find(path) if p.startswith(prefix) and not p.endswith("/"))


def glob(pattern: str) -> list[str]:
    """URLs of the objects matching a glob pattern (object stores only), sorted."""
    fs, path = _fs(pattern)
    scheme = URL_RE.match(pattern).group(1).lower()
    return sorted(f"{scheme}://{p}" for p in fs.glob(path))


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
        if URL_RE.match(location).group(1).lower() == "s3":
            fs.call_s3("head_bucket", Bucket=bucket)  # unlike exists(), tells a missing bucket from no server
        elif not fs.exists(bucket):
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
        fs.pipe_file(path, data)
        return
    atomic_write_bytes(location, data)


def create_exclusive(location: str, data: bytes) -> None:
    """Create an object only if no object has that name (S3's conditional PUT, If-None-Match: *);
    FileExistsError otherwise. Object stores only (a local lock uses fcntl)."""
    fs, path = _fs(location)
    try:
        fs.pipe_file(path, data, mode="create")
    except TypeError:  # a store whose fsspec library has no exclusive create: check, then write
        if fs.exists(path):
            raise FileExistsError(location) from None
        fs.pipe_file(path, data)


def remove(location) -> None:
    """Delete a file; a missing one is not an error."""
    if not is_url(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = _fs(location)
    try:
        fs.rm_file(path)
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
    fs.copy(path, _fs(dst)[1])
    fs.rm_file(path)


class AtomicFile:
    """A binary file that appears under its final name only when `commit()` is called: it is written to
    `<name>.tmp-<pid>` (streamed: an object store gets a multipart upload) and renamed by `replace`.
    `abort()` deletes the temporary file. A crash leaves only the temporary one, which `remove_partial`
    deletes."""

    def __init__(self, location):
        self.location = os.fspath(location)
        self.tmp = f"{self.location}{TMP_MARK}{os.getpid()}" if is_url(location) else str(temporary_path(location))
        if is_url(self.location):
            fs, path = _fs(self.tmp)
            self.file = fs.open(path, "wb")
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
        except (OSError, ValueError):
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
            uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
        except PermissionError:  # a role without s3:ListBucketMultipartUploads: such parts stay until a
            uploads = []  # lifecycle rule aborts them; they are never visible as objects
        for up in uploads:
            rest = up["Key"][len(prefix):]
            if "/" not in rest and TMP_MARK in rest:
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                n += 1
    return n
