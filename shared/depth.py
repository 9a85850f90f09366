"""Codecs for the image members of a shard: depth PNGs, the teacher's disparity PNG, RGB.

Depth PNG (the KITTI convention): uint16, value = round(depth_m * 256), 0 = no value. The largest
depth it can hold is 65535 / 256 = 255.996 m. Teacher disparity is relative (unknown scale and shift),
so it is stored as a 16-bit PNG linearly scaled to 1..65535 over the valid values, 0 = invalid, with
the two end values written in meta.json; 16 bits keep 1/65534 of its range, far below the teacher's
own noise, where the official release's 8-bit grey PNG keeps 1/255.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

DEPTH_SCALE = 256.0
MAX_DEPTH_M = 65535 / DEPTH_SCALE
PNG_COMPRESS_LEVEL = 3  # zlib level: faster than PIL's default 6 (docs/pipeline.md, "Speed and memory")


class CodecError(ValueError):
    """A member could not be encoded or decoded; the message says what was expected."""


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _open_png(data: bytes, what: str) -> Image.Image:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise CodecError(f"{what}: not a PNG file (bad signature, {len(data)} bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise CodecError(f"{what}: corrupt PNG ({exc})") from exc
    return img


def _uint16_png(arr: np.ndarray) -> bytes:
    # PIL writes a 16-bit greyscale PNG from mode "I;16"; building it from raw bytes avoids the
    # int32 detour of Image.fromarray on some PIL versions.
    arr = np.ascontiguousarray(arr, dtype="<u2")
    img = Image.frombuffer("I;16", (arr.shape[1], arr.shape[0]), arr.tobytes(), "raw", "I;16", 0, 1)
    return _png_bytes(img)


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
    d = d.astype(np.float64)
    if not np.all(np.isfinite(d)):
        raise CodecError("depth map has NaN or infinite values; use 0 for 'no value'")
    if d.min(initial=0.0) < 0:
        raise CodecError(f"depth map has negative values (min {d.min():.3f} m)")
    if d.max(initial=0.0) > MAX_DEPTH_M:
        raise CodecError(f"depth {d.max():.3f} m exceeds the depth PNG range 0..{MAX_DEPTH_M:.3f} m")
    q = np.rint(d * DEPTH_SCALE)
    q[(q == 0) & (d > 0)] = 1
    return _uint16_png(q.astype(np.uint16))


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
    valid = np.isfinite(d) & (d > 0)
    q = np.zeros(d.shape, dtype=np.uint16)
    if not valid.any():
        return _uint16_png(q), {"min": 0.0, "max": 0.0}
    lo, hi = float(d[valid].min()), float(d[valid].max())
    if hi > lo:
        q[valid] = np.rint(1.0 + (d[valid] - lo) / (hi - lo) * 65534.0).astype(np.uint16)
    else:
        q[valid] = 65535
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
