"""Codecs for the image members of a shard: depth PNGs, the teacher's disparity PNG, RGB.

Depth PNG (the KITTI convention): uint16, value = round(depth_m * 256), 0 = no value. The largest
depth it can hold is 65535 / 256 = 255.996 m. Teacher disparity is relative (unknown scale and shift),
so it is stored as a 16-bit PNG linearly scaled to 1..65535 over the valid values, 0 = invalid, with
the two end values written in meta.json; 16 bits keep 1/65534 of its range, far below the teacher's
own noise, where the official release's 8-bit grey PNG keeps 1/255.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from isal import isal_zlib
from PIL import Image, UnidentifiedImageError

DEPTH_SCALE = 256.0
MAX_DEPTH_M = 65535 / DEPTH_SCALE
PNG_COMPRESS_LEVEL = 3  # zlib level of PIL-written PNGs (RGB as PNG; 16-bit maps before the direct writer)
PNG_DEFLATE_LEVEL = 1  # ISA-L level (0-3) of the 16-bit maps: 2 is no smaller here, 3 slower and larger
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class CodecError(ValueError):
    """A member could not be encoded or decoded; the message says what was expected."""


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", isal_zlib.crc32(tag + data))


def _uint16_png(arr: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG, written directly: one filter for the whole image, then deflate by ISA-L.

    PIL's writer tries every PNG filter on every row and deflates with zlib: ~20 ms for the three maps of
    a 640 x 480 sample. Here a mostly empty map (a LiDAR scan) is left unfiltered (zeros stay zeros) and a
    dense one (depth, disparity) gets the "Up" filter (smooth rows become small differences), which are
    the filters that compress these maps best; deflate is ISA-L's, 3-4x faster than zlib's level 1 at the
    same size (docs/pipeline.md, "Speed"). Any PNG reader decodes it to the same values.
    """
    a = np.ascontiguousarray(arr, dtype=">u2")  # PNG stores 16-bit samples big-endian
    h, w = a.shape
    if h == 0 or w == 0:
        raise CodecError(f"cannot write an empty {h} x {w} map as PNG")
    rows = a.view(np.uint8).reshape(h, 2 * w)
    lines = np.empty((h, 2 * w + 1), np.uint8)  # each line: its filter type byte, then the filtered row
    if 2 * np.count_nonzero(a) < a.size:
        lines[:, 0] = 0  # None
        lines[:, 1:] = rows
    else:
        lines[:, 0] = 2  # Up: each byte minus the byte above it, modulo 256 (the first row: minus 0)
        lines[0, 1:] = rows[0]
        np.subtract(rows[1:], rows[:-1], out=lines[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)  # 16 bits, greyscale, deflate, no interlace
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", isal_zlib.compress(lines.tobytes(), PNG_DEFLATE_LEVEL)) + _png_chunk(b"IEND", b""))


def uint16_png_pil(arr: np.ndarray) -> bytes:
    """The 16-bit PNG writer of earlier shards (PIL, zlib level 3, PIL's per-row filter choice): the
    reference the direct writer is tested and benchmarked against. Decodes to the same values."""
    # built from raw bytes: Image.fromarray takes an int32 detour on some PIL versions
    arr = np.ascontiguousarray(arr, dtype="<u2")
    img = Image.frombuffer("I;16", (arr.shape[1], arr.shape[0]), arr.tobytes(), "raw", "I;16", 0, 1)
    return _png_bytes(img)


def _open_png(data: bytes, what: str) -> Image.Image:
    if not data.startswith(PNG_SIGNATURE):
        raise CodecError(f"{what}: not a PNG file (bad signature, {len(data)} bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise CodecError(f"{what}: corrupt PNG ({exc})") from exc
    return img


def _read_uint16(data: bytes, what: str) -> np.ndarray:
    img = _open_png(data, what)
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise CodecError(f"{what}: expected a 16-bit greyscale PNG, got PIL mode {img.mode}")
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise CodecError(f"{what}: expected a single-channel PNG, got shape {arr.shape}")
    if arr.dtype != np.uint16:
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise CodecError(f"{what}: values outside 0..65535")
        arr = arr.astype(np.uint16)
    return arr


def encode_depth_png(depth_m: np.ndarray) -> bytes:
    """Encode a depth map in metres (0 = no value) as a KITTI-style uint16 PNG.

    Raises CodecError for NaN, negative values or depths above 255.996 m: silently clipping a
    far point would corrupt a training target. A positive depth below 1/512 m (which would round
    to the "no value" code) is stored as the smallest code, 1/256 m, so valid stays valid.
    """
    d = np.asarray(depth_m)
    if d.ndim != 2:
        raise CodecError(f"depth map must be 2-D (H x W), got shape {d.shape}")
    if d.dtype not in (np.float32, np.float64):
        d = d.astype(np.float64)
    lo, hi = (d.min(), d.max()) if d.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # a NaN anywhere makes min and max NaN
        raise CodecError("depth map has NaN or infinite values; use 0 for 'no value'")
    if lo < 0:
        raise CodecError(f"depth map has negative values (min {lo:.3f} m)")
    if hi > MAX_DEPTH_M:
        raise CodecError(f"depth {hi:.3f} m exceeds the depth PNG range 0..{MAX_DEPTH_M:.3f} m")
    return _uint16_png(_depth_codes(d))


def _depth_codes(d: np.ndarray) -> np.ndarray:
    # x 256 is exact in float32 as in float64, so the codes do not depend on the input's precision;
    # a positive depth that rounds to 0 gets code 1
    return np.maximum(np.rint(d * DEPTH_SCALE), d > 0).astype(np.uint16)


def as_stored_depth(depth_m: np.ndarray) -> np.ndarray:
    """The depth map exactly as a depth PNG gives it back (float32 metres): what a reader of the shard sees.
    Same checks as encode_depth_png, without the PNG."""
    d = np.asarray(depth_m)
    if d.dtype not in (np.float32, np.float64):
        d = d.astype(np.float64)
    lo, hi = (d.min(), d.max()) if d.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > MAX_DEPTH_M:
        encode_depth_png(d)  # raises the codec's own error
    return _depth_codes(d).astype(np.float32) / np.float32(DEPTH_SCALE)


def decode_depth_png(data: bytes, what: str = "depth.png") -> np.ndarray:
    """Decode a KITTI-style uint16 depth PNG to float32 metres (0 = no value)."""
    return _read_uint16(data, what).astype(np.float32) / np.float32(DEPTH_SCALE)


def encode_disparity_png(disp: np.ndarray) -> tuple[bytes, dict]:
    """Encode relative disparity as a 16-bit PNG scaled to 1..65535 over its valid values.

    Valid means finite and > 0 (the teacher's sky is 0). Returns the PNG bytes and the scaling
    {"min": lo, "max": hi} to store in meta.json; a constant map stores every valid pixel as 65535.
    """
    d = np.asarray(disp, dtype=np.float64)
    if d.ndim != 2:
        raise CodecError(f"disparity map must be 2-D (H x W), got shape {d.shape}")
    with np.errstate(invalid="ignore"):  # NaN compares False: invalid, like inf and <= 0
        valid = (d > 0) & (d < np.inf)
    if not valid.any():
        return _uint16_png(np.zeros(d.shape, np.uint16)), {"min": 0.0, "max": 0.0}
    lo, hi = float(np.min(d, where=valid, initial=np.inf)), float(np.max(d, where=valid, initial=-np.inf))
    if hi > lo:
        with np.errstate(invalid="ignore", over="ignore"):  # the invalid pixels are zeroed below
            t = d - lo
            t /= hi - lo
            t *= 65534.0
            t += 1.0
            np.rint(t, out=t)
        t[~valid] = 0
        q = t.astype(np.uint16)
    else:
        q = np.where(valid, np.uint16(65535), np.uint16(0))
    return _uint16_png(q), {"min": lo, "max": hi}


def decode_disparity_png(data: bytes, scaling: dict, what: str = "teacher.png") -> np.ndarray:
    """Decode a teacher PNG back to float32 disparity with its stored scaling (0 = invalid)."""
    try:
        lo, hi = float(scaling["min"]), float(scaling["max"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"{what}: meta.json teacher_scaling must have numeric 'min' and 'max'") from exc
    q = _read_uint16(data, what).astype(np.float64)
    out = np.where(q > 0, lo + (q - 1.0) / 65534.0 * (hi - lo), 0.0)
    if hi == lo:
        out = np.where(q > 0, lo, 0.0)
    return out.astype(np.float32)


def encode_rgb(rgb: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """Encode an H x W x 3 uint8 image as JPEG (default, quality 95, 4:4:4) or PNG."""
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise CodecError(f"rgb must be H x W x 3 uint8, got shape {a.shape} dtype {a.dtype}")
    img = Image.fromarray(np.ascontiguousarray(a), mode="RGB")
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        raise CodecError(f"rgb format must be 'jpg' or 'png', got {fmt!r}")
    return buf.getvalue()


def as_stored_rgb(rgb: np.ndarray, fmt: str = "jpg", quality: int = 95) -> np.ndarray:
    """The image exactly as a reader of the shard decodes it: through JPEG for fmt jpg, itself for png."""
    return decode_rgb(encode_rgb(rgb, fmt, quality)) if fmt in ("jpg", "jpeg") else np.asarray(rgb)


def decode_rgb(data: bytes, what: str = "rgb") -> np.ndarray:
    """Decode a JPEG or PNG to H x W x 3 uint8 RGB."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise CodecError(f"{what}: corrupt or unsupported image ({exc})") from exc
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)
