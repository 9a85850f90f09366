"""The shard format, version 1: one WebDataset tar per N samples (described for users in shards/README.md).

Members of a sample, all under one key:

    rgb.jpg | rgb.png   uint8 RGB
    teacher.png         the teacher's map (kind in meta teacher.output), 16-bit, scaled to 1..65535, 0 = invalid
    depth.png           dense pseudo depth (pre-training target), depth PNG (m x 256)
    sparse.png          LiDAR input, simulated or real, depth PNG
    gt.png              ground truth (labelled sources only), depth PNG
    meta.json           schema_version, key, source, K, sizes, teacher, scaling, lidar, ...

Writers: `ShardWriter` writes a tar under a temporary name and renames it when complete, with a fixed
mtime so the same samples give the same bytes. Readers: `iter_samples` (built on webdataset.WebDataset)
and `decode_sample` (what the trainer's own WebDataset pipeline maps over raw samples).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from shared import storage
from shared.camera import as_K
from shared.depth import (
    CodecError,
    decode_depth_png,
    decode_disparity_png,
    decode_rgb,
    encode_depth_png,
    encode_disparity_png,
    encode_rgb,
)
from shared.fsutil import TMP_MARK

SCHEMA_VERSION = 1
DEPTH_MEMBERS = ("depth", "sparse", "gt")
KNOWN_MEMBERS = ("rgb.jpg", "rgb.png", "teacher.png", "depth.png", "sparse.png", "gt.png", "meta.json")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class ShardError(ValueError):
    """A sample or shard that does not follow the format; names the shard and key when known."""

    def __init__(self, message: str, shard: str | None = None, key: str | None = None):
        where = ", ".join(p for p in (f"shard {shard}" if shard else "", f"key {key}" if key else "") if p)
        self.message = f"{where}: {message}" if where else message
        super().__init__(self.message)
        self.shard, self.key, self.reason = shard, key, message

    def __str__(self) -> str:  # WebDataset appends the URL to args; keep the message readable
        return self.message


def check_key(key: str) -> str:
    """Keys are letters, digits, '_' and '-' (WebDataset splits keys at the first dot)."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ShardError(f"invalid sample key {key!r}: use letters, digits, '_' and '-' only")
    return key


@dataclass
class Sample:
    """One decoded sample. Maps are H x W float32 with 0 = no value; rgb is H x W x 3 uint8."""

    key: str
    rgb: np.ndarray
    K: np.ndarray
    teacher: np.ndarray | None = None  # the teacher's map: relative disparity, relative depth or metres
    depth: np.ndarray | None = None  # dense pseudo depth, metres
    sparse: np.ndarray | None = None  # LiDAR, metres
    gt: np.ndarray | None = None  # ground truth, metres
    meta: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def encode_sample(sample: Sample, rgb_format: str = "jpg", jpeg_quality: int = 95) -> dict:
    """Turn a Sample into the member dict a tar writer takes (bytes values, "__key__")."""
    key = check_key(sample.key)
    h, w = sample.height, sample.width
    out: dict = {"__key__": key}
    ext = "jpg" if rgb_format in ("jpg", "jpeg") else "png"
    out[f"rgb.{ext}"] = encode_rgb(sample.rgb, ext, jpeg_quality)
    meta = dict(sample.meta)
    for name in ("teacher", *DEPTH_MEMBERS):
        arr = getattr(sample, name)
        if arr is None:
            continue
        if arr.shape != (h, w):
            raise ShardError(f"{name} has shape {arr.shape}, rgb is {(h, w)}", key=key)
        if name == "teacher":
            out["teacher.png"], meta["teacher_scaling"] = encode_disparity_png(arr)
        else:
            out[f"{name}.png"] = encode_depth_png(arr)
    if sample.sparse is not None:
        meta["point_count"] = int(np.count_nonzero(sample.sparse))
    meta.update(schema_version=SCHEMA_VERSION, key=key, width=w, height=h, K=as_K(sample.K).tolist())
    # Listing the members lets a reader tell a sample cut short by a truncated tar from one that
    # never had, say, a gt.png.
    meta["members"] = sorted([*(k for k in out if not k.startswith("__")), "meta.json"])
    out["meta.json"] = json.dumps(_jsonable(meta), sort_keys=True).encode()
    return out


def decode_sample(raw: dict, shard: str | None = None) -> Sample:
    """Decode the member dict of one sample (as WebDataset yields it, bytes values) into a Sample.

    Raises ShardError naming the shard and key for a missing or corrupt member, a wrong
    schema_version or sizes that disagree.
    """
    key = raw.get("__key__")
    shard = shard or raw.get("__url__")
    try:  # a hostile or mangled key never reaches code that might build a path from it
        check_key(key)
    except ShardError as exc:
        raise ShardError(exc.reason, shard) from None
    if "meta.json" not in raw:
        raise ShardError("missing member meta.json", shard, key)
    try:
        meta = json.loads(raw["meta.json"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardError(f"meta.json is not valid JSON ({exc})", shard, key) from exc
    if not isinstance(meta, dict):
        raise ShardError("meta.json must hold a JSON object", shard, key)
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(
            f"unsupported schema_version {version!r}: this reader knows version {SCHEMA_VERSION}; "
            "regenerate the shards or update the project",
            shard,
            key,
        )
    missing = [m for m in meta.get("members", []) if m not in raw]
    if missing:
        raise ShardError(f"missing member(s) {', '.join(missing)} (listed in meta.json)", shard, key)
    rgb_name = "rgb.jpg" if "rgb.jpg" in raw else "rgb.png" if "rgb.png" in raw else None
    if rgb_name is None:
        raise ShardError("missing member rgb.jpg or rgb.png", shard, key)
    try:
        rgb = decode_rgb(raw[rgb_name], rgb_name)
        K = as_K(meta.get("K"))
        maps = {}
        if "teacher.png" in raw:
            maps["teacher"] = decode_disparity_png(raw["teacher.png"], meta.get("teacher_scaling"))
        for name in DEPTH_MEMBERS:
            if f"{name}.png" in raw:
                maps[name] = decode_depth_png(raw[f"{name}.png"], f"{name}.png")
    except (CodecError, ValueError) as exc:
        raise ShardError(str(exc), shard, key) from exc
    h, w = rgb.shape[:2]
    if (meta.get("height"), meta.get("width")) != (h, w):
        raise ShardError(f"meta.json says {meta.get('height')}x{meta.get('width')}, rgb is {h}x{w}", shard, key)
    for name, arr in maps.items():
        if arr.shape != (h, w):
            raise ShardError(f"{name}.png is {arr.shape[0]}x{arr.shape[1]}, rgb is {h}x{w}", shard, key)
    return Sample(key=str(key), rgb=rgb, K=K, meta=meta, **maps)


class ShardWriter:
    """Write one tar shard atomically: samples go to `<name>.tmp-<pid>`, renamed on `close()`. `path` is a
    local path or an object-store URL (shared.storage: the upload is streamed, then copied into place).

    A crash leaves only the temporary file (which readers and `list_shards` ignore and the
    pipeline removes on resume), never a half-written shard under its final name. The tar
    headers carry a fixed mtime, user and mode, so the same samples always give the same bytes.
    """

    def __init__(self, path: str | os.PathLike, rgb_format: str = "jpg", jpeg_quality: int = 95):
        # a local path stays a Path; an object-store URL (s3://...) is written through shared.storage
        self.path = path if storage.is_url(path) else Path(path)
        self.rgb_format, self.jpeg_quality = rgb_format, jpeg_quality
        self.count = 0
        self._keys: set[str] = set()
        try:
            self._out = storage.AtomicFile(self.path)
        except OSError as exc:
            raise OSError(f"cannot write shard {self.path}: {exc.strerror or exc}") from exc
        # PAX: a member name over ustar's 100 characters (a nuScenes key is about 95 before ".teacher.png")
        # gets an extended header; shorter names give the same bytes as plain ustar.
        self._tar = tarfile.open(fileobj=self._out.file, mode="w|", format=tarfile.PAX_FORMAT)

    def write(self, sample: Sample | dict) -> None:
        """Add one sample (a Sample, or an already encoded member dict with "__key__")."""
        members = encode_sample(sample, self.rgb_format, self.jpeg_quality) if isinstance(sample, Sample) else sample
        key = check_key(members["__key__"])
        if key in self._keys:
            raise ShardError(f"duplicate key {key}", str(self.path), key)
        self._keys.add(key)
        # meta.json last is not required by readers; a fixed order keeps bytes reproducible.
        for name in sorted(k for k in members if not k.startswith("__")):
            data = members[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "dmd3c"
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> Path | str:
        """Finish the tar, flush it to disk (or complete the upload), and give it its final name."""
        self._tar.close()
        self._out.commit()
        return self.path

    def abort(self) -> None:
        """Drop the partial shard."""
        try:
            self._tar.close()
        except Exception:  # noqa: BLE001 (the file may be broken; we delete it anyway)
            pass
        self._out.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def list_shards(spec: str | os.PathLike | Iterable) -> list[str]:
    """Expand a shard spec into a sorted list of URLs/paths.

    Accepts a .tar file, a directory (every *.tar below it), a glob, a brace pattern
    ("shards/coco-{000000..000009}.tar"), the same on an object store (s3://bucket/shards/ lists every
    .tar below the prefix; gs://, az:// alike), a URL webdataset opens itself (http(s)://, pipe:, ...),
    or a list of these. Temporary files of unfinished shards are never listed. An unknown URL scheme
    raises StorageError (a ValueError): a URL is never taken as a local path.
    """
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in list_shards(s)]
    s = str(spec)
    if storage.is_url(s):
        return _list_shard_urls(s)
    p = Path(s)
    if p.is_dir():
        found = sorted(str(f) for f in p.rglob("*.tar") if TMP_MARK not in f.name)
        if not found:
            raise FileNotFoundError(f"no .tar shards under directory {p}")
        return found
    if p.is_file():
        return [s]
    if "{" in s:
        out = list(braceexpand(s))
        missing = [u for u in out if not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(f"shard pattern {s}: {len(missing)} files missing, e.g. {missing[0]}")
        return out
    found = sorted(f for f in glob.glob(s, recursive=True) if f.endswith(".tar") and TMP_MARK not in f)
    if not found:
        raise FileNotFoundError(f"no shards match {s} (expected a .tar file, a directory of them or a glob)")
    return found


def _list_shard_urls(spec: str) -> list[str]:
    readers = tuple(s for s in _gopen_schemes() if s != "__default__" and s not in storage.OBJECT_STORES)
    spec = storage.check(spec, "shard spec", readers=readers)  # webdataset's own: pipe:, http(s):, ...
    if not storage.is_url(spec):  # file:///...
        return list_shards(spec)
    if not storage.is_object_store(spec) or "{" in spec:
        return list(braceexpand(spec))
    if any(c in spec for c in "*?["):
        found = storage.glob(spec)
    elif spec.endswith(".tar") and storage.is_file(spec):
        return [spec]
    else:
        found = [storage.join(spec, rel) for rel in storage.find(spec)]
    found = [u for u in found if u.endswith(".tar") and TMP_MARK not in storage.basename(u)]
    if not found:
        raise FileNotFoundError(f"no .tar shards at {spec} (expected a .tar object, a prefix holding them or a glob)")
    return found


def _gopen_schemes() -> dict:
    """webdataset's table of URL openers by scheme (the module, not the function `webdataset.gopen`)."""
    import importlib

    return importlib.import_module("webdataset.gopen").gopen_schemes


def _open_shard(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset's opener for object-store URLs: a stream through shared.storage (webdataset has no s3://
    opener, and its gs:// one shells out to gsutil)."""
    try:
        return storage.open_read(url)
    except FileNotFoundError as exc:
        raise ShardError("missing shard (no such object)", url) from exc


def shard_dataset(urls: list[str], handler):
    """Plain webdataset.WebDataset over these shards, in this order: no shuffling and no splitting (the
    callers decide both). Object-store URLs are opened through shared.storage."""
    import webdataset as wds  # lazy: it imports torch, which shared (and datagen's workers) never need

    for scheme in storage.OBJECT_STORES:  # the gopen table is webdataset's documented hook
        _gopen_schemes()[scheme] = _open_shard
    return wds.WebDataset(urls, shardshuffle=False, handler=handler, empty_check=False, nodesplitter=None,
                          workersplitter=None)


@dataclass
class ReadStats:
    """Counts of what a streaming read skipped, with the first few reasons for the log."""

    samples: int = 0
    skipped: int = 0
    reasons: list = field(default_factory=list)

    def skip(self, exc: BaseException) -> None:
        self.skipped += 1
        if len(self.reasons) < 100:
            self.reasons.append(str(exc))


def _describe(exn: BaseException) -> tuple[str, str | None]:
    """Message and shard of an exception raised inside WebDataset (it appends the URL to args)."""
    if isinstance(exn, ShardError):
        return exn.reason, exn.shard
    raw_args = getattr(exn, "args", ())
    args = [a for a in raw_args if isinstance(a, str)]
    names = [str(a.name) for a in raw_args if isinstance(getattr(a, "name", None), str)]
    names += re.findall(r"name='([^']+)'", " ".join(args))
    shard = next((a for a in reversed(args + names) if a.endswith(".tar") or "://" in a), None)
    message = args[0] if args else repr(exn)
    return f"unreadable tar data ({message.split(' @ ')[0]})", shard


def make_error_handler(strict: bool, stats: ReadStats | None = None):
    """A WebDataset handler: strict re-raises with the shard named; streaming counts and goes on."""

    def handler(exn: BaseException) -> bool:
        if strict:
            if isinstance(exn, ShardError):
                raise exn
            message, shard = _describe(exn)
            raise ShardError(message, shard) from exn
        if stats is not None:
            message, shard = _describe(exn)
            stats.skip(ShardError(message, shard, getattr(exn, "key", None)))
        return True

    return handler


def iter_samples(spec, strict: bool = True, stats: ReadStats | None = None) -> Iterator[Sample]:
    """Read samples in order with plain webdataset.WebDataset and decode them with `decode_sample`.

    strict=True raises ShardError at the first bad sample or tar (naming shard and key);
    strict=False skips it and counts it in `stats`.
    """
    stats = stats if stats is not None else ReadStats()
    handler = make_error_handler(strict, stats)
    ds = shard_dataset(list_shards(spec), handler)
    for raw in ds:
        try:
            sample = decode_sample(raw)
        except ShardError as exc:
            handler(exc)
            continue
        stats.samples += 1
        yield sample


@dataclass
class ValidationReport:
    shard: str
    samples: int
    errors: list
    members: Counter

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_shard(path: str | os.PathLike) -> ValidationReport:
    """Check every sample of one shard: readable tar, known members, unique valid keys, decodable."""
    path = str(path)
    errors: list[str] = []
    members: Counter = Counter()
    seen: set[str] = set()
    try:
        with storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, name = info.name.partition(".")
                if "/" in key:
                    key = key.rsplit("/", 1)[-1]
                if name not in KNOWN_MEMBERS:
                    errors.append(f"shard {path}, key {key}: unknown member {name!r}")
                members[name] += 1
                seen.add(key)
    except (tarfile.TarError, OSError, EOFError) as exc:
        errors.append(f"shard {path}: unreadable tar ({exc})")
    try:  # a complete tar ends with two zero blocks; a copy cut at a member boundary does not
        with storage.open_read(path) as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 1024))
            tail = f.read()
        if size % 512 or tail != bytes(1024):
            errors.append(f"shard {path}: truncated (no end-of-archive marker, {size} bytes)")
    except OSError as exc:
        errors.append(f"shard {path}: cannot read ({exc})")
    stats = ReadStats()
    keys: Counter = Counter()
    for s in iter_samples(path, strict=False, stats=stats):
        keys[s.key] += 1
        try:
            check_key(s.key)
        except ShardError as exc:
            errors.append(f"shard {path}: {exc}")
    errors += [r if r.startswith("shard") else f"shard {path}: {r}" for r in stats.reasons]
    errors += [f"shard {path}, key {k}: appears {n} times" for k, n in keys.items() if n > 1]
    return ValidationReport(path, stats.samples, errors, members)
