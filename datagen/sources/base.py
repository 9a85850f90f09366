"""What every source yields, and the image loading they share.

A source knows one data set's on-disk layout and nothing else. Sources that set `object_storage` (folder,
coco) also read a root in an object store (s3://bucket/prefix, through shared.storage): one listing of the
prefix, then each image streamed into memory by the worker that loads it, never copied to a local disk. `items()` lists its inputs in a
stable sorted order with stable keys (cheap: paths only, so the list can be split across Ray
workers); `load(item)` reads one input into a `Record` (in a worker). Bad inputs raise
`InputError` from `load`, and the pipeline writes them to failures.parquet.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MIN_IMAGE_SIDE = 32  # below this no useful geometry survives a 1/32 feature map


class LayoutError(FileNotFoundError):
    """--root does not look like the data set: the message names the layout expected."""


class InputError(ValueError):
    """One input cannot be turned into a sample; the message says why (goes to failures.parquet)."""


@dataclass(frozen=True)
class Item:
    """One input, before loading: JSON-able so it travels cheaply to workers."""

    key: str  # "<source>-<stable id>": letters, digits, '_' and '-'
    source: str
    path: str  # the main input file (or a URI such as "synthetic://street/17")
    extra: dict = field(default_factory=dict, hash=False, compare=False)  # other files, native K, ...


@dataclass
class Record:
    """One loaded input. Depth maps are H x W float32 metres, 0 = no value."""

    key: str
    source: str
    source_path: str
    rgb: np.ndarray  # H x W x 3 uint8
    K: np.ndarray | None = None  # native intrinsics, when the data set has them
    sparse: np.ndarray | None = None  # real LiDAR (labelled sets)
    gt: np.ndarray | None = None  # ground truth (labelled sets)
    true_depth: np.ndarray | None = None  # the synthetic world's exact depth (oracle teacher)
    true_object_id: np.ndarray | None = None  # and which object each pixel sees (int32, -1 = sky)
    meta: dict = field(default_factory=dict)


def make_key(source: str, stable_id: str) -> str:
    """A key from a stable id (usually a relative path): every other character becomes '_'."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", stable_id).strip("_")
    return f"{source}-{clean}"


def assign_keys(source: str, ids: Sequence[str]) -> list[str]:
    """Unique keys for ids (relative paths with their extension), in the order given.

    The key is make_key(source, id without its extension). Ids that clean to the same key
    ("a b.jpg" and "a_b.jpg", or "x.jpg" and "x.png") each get a suffix from a hash of their full id,
    so a key depends only on its own path and on which paths collide, never on listing order.
    """
    stems = [str(PurePosixPath(i).with_suffix("")) if PurePosixPath(i).suffix else i for i in ids]
    keys = [make_key(source, s) for s in stems]
    counts = Counter(keys)
    out = [
        k if counts[k] == 1 else f"{k}_{hashlib.sha1(i.encode()).hexdigest()[:8]}"
        for k, i in zip(keys, ids, strict=True)
    ]
    if len(set(out)) != len(out):
        dup = sorted(k for k, n in Counter(out).items() if n > 1)[:5]
        raise LayoutError(f"{source}: inputs with the same key even after disambiguation: {dup}")
    return out


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(root: Path | str) -> list[Path] | list[str]:
    """Every image file below root, sorted by relative path (hidden files and dirs skipped). An object-store
    root (a URL) is listed once and gives URLs."""
    if storage.is_url(root):
        rel = [r for r in storage.find(root)
               if is_image_name(r) and not any(part.startswith(".") for part in r.split("/"))]
        return [storage.join(root, r) for r in rel]  # find() sorts by relative path
    out = [
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def load_rgb(path: str | Path) -> np.ndarray:
    """Read any common image as H x W x 3 uint8 RGB.

    Applies the EXIF orientation; converts greyscale, palette, RGBA (composited on grey), CMYK and
    16-bit images; raises InputError naming the file for an empty, truncated, unreadable or too
    small image. An object-store URL is read into memory with one request.
    """
    remote = storage.is_url(path)
    path = path if remote else Path(path)
    try:
        if remote:
            data = storage.read_bytes(path)
            size, src = len(data), io.BytesIO(data)
        else:
            size, src = path.stat().st_size, path
        if size == 0:
            raise InputError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                arr = _to_rgb8(img)
    except InputError:
        raise
    except (OSError, EOFError, UnidentifiedImageError, SyntaxError, ValueError, IndexError, struct.error,
            Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from exc
    h, w = arr.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise InputError(f"{path}: image is {w}x{h}, smaller than {MIN_IMAGE_SIDE} px on a side")
    return arr


def _to_rgb8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img).astype(np.float64)
        hi = 65535.0 if a.max(initial=0) > 255 else 255.0
        g = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = np.nanmin(a), np.nanmax(a)
        g = np.clip((a - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        # transparent pixels carry arbitrary colours; composite on mid-grey so they read as flat
        bg = Image.new("RGBA", img.size, (128, 128, 128, 255))
        img = Image.alpha_composite(bg, img)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(arr)


class Source:
    """Base class: subclasses set `name`, `layout` (a one-paragraph description for errors and the
    README) and `labelled`, and implement `items()` and `load()`."""

    name: str = "?"
    layout: str = ""
    labelled: bool = False
    has_native_intrinsics: bool = False
    object_storage: bool = False  # whether --root may be an object-store URL (s3://bucket/prefix)
    # the options a subclass accepts, with their defaults; None = accept anything (no validation).
    # Options passed as None mean "the default", so a CLI can forward unset flags as None.
    option_defaults: dict | None = None

    def __init__(self, root: str | Path | None, intrinsics: str = "random", **options):
        if intrinsics not in ("random", "native"):
            raise ValueError(f"--intrinsics must be 'random' or 'native', got {intrinsics!r}")
        if intrinsics == "native" and not self.has_native_intrinsics:
            raise ValueError(f"source {self.name!r} has no native intrinsics; use --intrinsics random")
        if self.option_defaults is not None:
            unknown = sorted(set(options) - set(self.option_defaults))
            if unknown:
                valid = ", ".join(sorted(self.option_defaults)) or "none"
                raise ValueError(f"source {self.name!r} got unknown option(s) {unknown}; valid: {valid}")
            options = {**self.option_defaults, **{k: v for k, v in options.items() if v is not None}}
        if root is not None:
            root = storage.check(root, "--root")  # StorageError (a ValueError) for an unknown or bad URL
            if storage.is_url(root) and not self.object_storage:
                readers = ", ".join(sorted(n for n, c in _object_storage_sources().items() if c))
                raise ValueError(f"source {self.name!r} reads a local --root only, not {root}; "
                                 f"sources that read object storage: {readers}")
        self.root = None if root is None else root if storage.is_url(root) else Path(root)
        self.intrinsics = intrinsics
        self.options = options

    def layout_error(self, detail: str) -> LayoutError:
        return LayoutError(f"{detail}\nExpected the {self.name} layout under --root {self.root}:\n{self.layout}")

    def is_dir(self, rel: str = "") -> bool:
        """Whether root/rel is a folder (in an object store: a prefix that holds objects)."""
        return storage.is_dir(storage.join(self.root, rel) if rel else self.root)

    def files_in(self, rel: str) -> list[Path] | list[str]:
        """The files directly in root/rel, sorted by name: Paths, or URLs for an object-store root."""
        if storage.is_url(self.root):
            where = storage.join(self.root, rel)
            return [storage.join(where, n) for n in storage.listdir(where)]
        return sorted(p for p in (self.root / rel).iterdir() if p.is_file())

    def check_layout(self) -> None:
        if self.root is None or not self.is_dir():
            raise self.layout_error(f"--root {self.root} is not a directory")

    def items(self) -> list[Item]:
        raise NotImplementedError

    def load(self, item: Item) -> Record:
        raise NotImplementedError


def image_items(source: str, root: Path | str, paths: Sequence[Path] | Sequence[str], extras: Sequence[dict] | None = None) -> list[Item]:
    """Items for image files below root, sorted by relative path; keys from the relative paths."""
    rel = [p[len(root) + 1:] if storage.is_url(root) else p.relative_to(root).as_posix() for p in paths]
    order = sorted(range(len(rel)), key=rel.__getitem__)
    rel = [rel[i] for i in order]
    keys = assign_keys(source, rel)
    ext = [extras[i] for i in order] if extras is not None else [{} for _ in order]
    return [Item(k, source, str(paths[i]), e) for k, i, e in zip(keys, order, ext, strict=True)]


def image_record(item: Item, K: np.ndarray | None = None, **meta) -> Record:
    """The record of a plain image input: RGB only (and native K when the data set has it)."""
    return Record(item.key, item.source, item.path, load_rgb(item.path), K=K, meta=dict(meta))


def _object_storage_sources() -> dict[str, bool]:
    from datagen.sources import SOURCES

    return {name: cls.object_storage for name, cls in SOURCES.items()}
