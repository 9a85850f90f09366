"""The network on a user's own files: `trainer complete` and `load_completer`.

    from trainer import load_completer
    complete = load_completer("runs/finetune/best", device="cpu")
    depth = complete(rgb, sparse, K)   # H x W x 3 uint8, H x W float32 metres (0 = no point), 3 x 3

The frame is fed exactly as `trainer eval|predict` feed a shard sample (trainer.data.eval_frame: the whole
image padded bottom/right to a multiple of 32, K unchanged; trainer.evaluate.run_network: the checkpoint's
input convention, the finest output, back in metres) and cut back to the input size.

Inputs are checked before the network runs; a bad one raises InputError (a ValueError) whose message names
the file (or the argument) and says what was expected:

- rgb and sparse must have the same height and width;
- the scan must be in metres: a uint16 PNG is metres x 256 (KITTI) and is refused when its largest value is
  under SPARSE_PNG_MIN_CODE (0.5 m: raw metres or another scale written into a PNG); a .npy (or the array
  given to the Python call) is float metres and is refused when its largest value is over
  SPARSE_MAX_M (1000 m: millimetres or PNG codes), or when it holds NaN or negative values;
- the scan must have at least one point (> 0);
- K must be 3 x 3, finite, with positive focal lengths, bottom row (0, 0, 1) and its principal point inside
  the image (0 <= cx <= W, 0 <= cy <= H).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.depth import DEPTH_SCALE, MAX_DEPTH_M, CodecError, _read_uint16, decode_rgb, encode_depth_png
from shared.shard import Sample
from trainer.data import collate, eval_frame
from trainer.evaluate import load_for_inference, run_network
from trainer.model import for_inference

log = logging.getLogger("trainer")

SPARSE_PNG_MIN_CODE = int(0.5 * DEPTH_SCALE)  # a metres x 256 PNG whose farthest point is under 0.5 m: wrong units
SPARSE_MAX_M = 1000.0  # float metres beyond 1 km: millimetres (or PNG codes) rather than metres
RGB_SUFFIXES = (".png", ".jpg", ".jpeg")
SPARSE_SUFFIXES = (".png", ".npy")
MIN_DEPTH_M = 1.0 / DEPTH_SCALE  # the smallest depth a PNG can hold (0 reads as "no value")


class InputError(ValueError):
    """An input the network cannot be run on; the message names the file or argument and what to do."""


# ---------------------------------------------------------------------------------------------------------
# reading and checking inputs


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """H x W x 3 uint8 from a PNG or JPEG (greyscale and RGBA are converted)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such RGB image (expected a .png or .jpg)")
    try:
        return decode_rgb(p.read_bytes(), str(p))
    except CodecError as exc:
        raise InputError(f"{exc}; expected an RGB .png or .jpg") from exc


def read_sparse(path: str | os.PathLike) -> np.ndarray:
    """H x W float32 metres (0 = no point) from a uint16 PNG (metres x 256, KITTI) or a .npy (float metres)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such sparse depth file (expected a uint16 .png in metres x 256 or a .npy "
                         "in metres)")
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"{p}: not a plain numeric .npy ({exc}); save an H x W float array of metres") from exc
        if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
            arr = arr.squeeze(0 if arr.shape[0] == 1 else -1)
        if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"{p}: expected an H x W array of float metres, got {arr.dtype} of shape {arr.shape}")
        if np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{p}: holds integers ({arr.dtype}); a .npy scan is float metres (divide KITTI "
                             "PNG codes by 256, millimetres by 1000)")
        arr = arr.astype(np.float32)
        check_sparse(arr, str(p))
        return arr
    if p.suffix.lower() != ".png":
        raise InputError(f"{p}: unknown sparse depth format {p.suffix!r}; give a uint16 .png (metres x 256) or "
                         "a .npy (float metres)")
    try:
        codes = _read_uint16(p.read_bytes(), str(p))
    except CodecError as exc:
        raise InputError(f"{exc}; a sparse PNG is uint16 greyscale, metres x 256 (KITTI)") from exc
    top = int(codes.max(initial=0))
    if top == 0:
        raise InputError(f"{p}: the scan has no points (every pixel is 0); nothing to complete from")
    if top < SPARSE_PNG_MIN_CODE:
        raise InputError(f"{p}: the farthest point reads {top / DEPTH_SCALE:.3f} m (largest value {top}); a "
                         "sparse PNG holds metres x 256 (KITTI), so these look like metres or another unit: "
                         "multiply metres by 256 before writing the uint16 PNG")
    return codes.astype(np.float32) / np.float32(DEPTH_SCALE)


def check_sparse(sparse: np.ndarray, what: str = "sparse") -> None:
    """Refuse a scan that is not H x W float metres with at least one point (module docstring)."""
    if sparse.ndim != 2:
        raise InputError(f"{what}: expected an H x W depth map, got shape {sparse.shape}")
    if not np.all(np.isfinite(sparse)):
        raise InputError(f"{what}: has NaN or infinite values; use 0 for 'no point'")
    if sparse.size and sparse.min() < 0:
        raise InputError(f"{what}: has negative depths (min {sparse.min():.3f}); depth is z in metres, 0 = no point")
    top = float(sparse.max(initial=0))
    if top == 0:
        raise InputError(f"{what}: the scan has no points (every pixel is 0); nothing to complete from")
    if top > SPARSE_MAX_M:
        raise InputError(f"{what}: the farthest point is {top:g}, over {SPARSE_MAX_M:g} m; the scan must be in "
                         "metres (divide millimetres by 1000, KITTI PNG codes by 256)")


def check_K(K, hw: tuple[int, int], what: str = "K") -> np.ndarray:
    """K as 3 x 3 float64 if it fits an image of hw = (H, W), else InputError."""
    arr = np.asarray(K, dtype=np.float64)
    if arr.shape != (3, 3):
        raise InputError(f"{what}: intrinsics must be 3 x 3 (9 numbers), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what}: intrinsics have NaN or infinite values")
    if arr[0, 0] <= 0 or arr[1, 1] <= 0:
        raise InputError(f"{what}: focal lengths must be positive pixels, got fx={arr[0, 0]:g}, fy={arr[1, 1]:g}")
    if not np.allclose(arr[2], (0, 0, 1)):
        raise InputError(f"{what}: the bottom row of K must be 0 0 1, got {arr[2].tolist()}")
    h, w = hw
    cx, cy = arr[0, 2], arr[1, 2]
    if not (0 <= cx <= w and 0 <= cy <= h):
        raise InputError(f"{what}: principal point ({cx:g}, {cy:g}) is outside the {w} x {h} image; K must be "
                         "this image's intrinsics (scale or crop K with the image)")
    return arr


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text)]


def read_K(path: str | os.PathLike) -> np.ndarray:
    """3 x 3 from a text file of 9 numbers (3 lines of 3, or one line)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such intrinsics file (expected 9 numbers: the 3 x 3 K)")
    vals = _numbers(p.read_text(errors="replace"))
    if len(vals) != 9:
        raise InputError(f"{p}: expected 9 numbers (the 3 x 3 K, row by row), found {len(vals)}")
    return np.asarray(vals, np.float64).reshape(3, 3)


def read_calib(path: str | os.PathLike, camera: str = "02") -> np.ndarray:
    """K of a KITTI calib_cam_to_cam.txt: the left 3 x 3 of P_rect_<camera> (the rectified camera's
    projection), parsed by shared.scan.fit.read_intrinsics."""
    from shared.scan.fit import read_intrinsics

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such calibration file (expected KITTI's calib_cam_to_cam.txt)")
    if not re.search(rf"^P_rect_{camera}:", p.read_text(errors="replace"), re.M):
        raise InputError(f"{p}: no P_rect_{camera} line; expected KITTI's calib_cam_to_cam.txt (or give --K)")
    try:
        return read_intrinsics(str(p), camera)
    except ValueError as exc:
        raise InputError(f"{p}: P_rect_{camera} is not 12 numbers ({exc})") from exc


# ---------------------------------------------------------------------------------------------------------
# the network


@dataclass
class Completer:
    """A loaded network that completes one frame at a time (load_completer builds it)."""

    model: torch.nn.Module | None  # ready for inference (trainer.model.for_inference), on its device
    info: dict  # the checkpoint's metadata; info["convention"]: its input convention
    runner: Callable[[dict], np.ndarray] | None = None  # instead of model: collated batch -> B x H x W metres

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray, sparse: np.ndarray, K, max_depth: float | None = None,
                 names: dict | None = None) -> np.ndarray:
        """H x W float32 metres: the network's finest output at the input size (clamped to
        [1/256, max_depth] when max_depth is given). `names` ({"rgb"|"sparse"|"K": file}) only words errors."""
        names = names or {}
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"{names.get('rgb', 'rgb')}: expected H x W x 3 uint8, got {rgb.dtype} of shape "
                             f"{rgb.shape}")
        sparse = np.asarray(sparse, dtype=np.float32)
        if sparse.shape != rgb.shape[:2]:
            raise InputError(f"{names.get('sparse', 'sparse')}: the scan is {_hw(sparse.shape)} but the image "
                             f"{names.get('rgb', 'rgb')} is {_hw(rgb.shape)}; give a scan projected into this "
                             "image (same height and width)")
        check_sparse(sparse, names.get("sparse", "sparse"))
        K = check_K(K, rgb.shape[:2], names.get("K", "K"))
        h, w = sparse.shape
        frame = eval_frame(Sample(key="frame", rgb=rgb, K=K, sparse=sparse))
        batch = collate([frame], ["frame"])
        depth = self.runner(batch) if self.runner else run_network(self.model, batch, self.info["convention"])
        depth = depth[0, :h, :w]
        if max_depth is not None:
            depth = np.clip(np.nan_to_num(depth), MIN_DEPTH_M, max_depth)
        return np.ascontiguousarray(depth, dtype=np.float32)


def _hw(shape) -> str:
    return f"{shape[1]} x {shape[0]} (W x H)" if len(shape) >= 2 else str(shape)


def load_completer(path: str | os.PathLike, device: str = "cpu", which: str = "ema") -> Completer:
    """A Completer from any checkpoint `trainer eval` takes (a file, RUN, RUN/best, an export)."""
    model, info = load_for_inference(str(path), which=which, device=device)
    from trainer.provenance import warn_noncommercial

    warn_noncommercial(info, str(path))
    return Completer(for_inference(copy.deepcopy(model)), info)


# ---------------------------------------------------------------------------------------------------------
# files: `trainer complete`


def _by_stem(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes:
            if p.stem in found:
                raise InputError(f"{folder}: two {what} files named {p.stem} ({found[p.stem].name}, {p.name}); "
                                 "keep one")
            found[p.stem] = p
    return found


def pair_files(rgb: str, sparse: str, K: str | None = None) -> list[tuple[str, Path, Path, Path | None]]:
    """[(stem, rgb file, sparse file, K file or None)]: one frame, or folders paired by file stem (K: one file
    for every frame, a folder of <stem>.txt, or None)."""
    r, s = Path(rgb), Path(sparse)
    if r.is_dir() != s.is_dir():
        raise InputError(f"--rgb {r} and --sparse {s}: give two files or two folders")
    if not r.is_dir():
        kf = Path(K) if K else None
        if kf is not None and kf.is_dir():
            raise InputError(f"--K {kf} is a folder; for one frame give one file of 9 numbers")
        return [(r.stem, r, s, kf)]
    rgbs, scans = _by_stem(r, RGB_SUFFIXES, "RGB"), _by_stem(s, SPARSE_SUFFIXES, "sparse")
    if not rgbs:
        raise InputError(f"{r}: no RGB images (.png, .jpg) in this folder")
    missing = sorted(set(rgbs) - set(scans))
    if missing:
        raise InputError(f"{s}: no scan for {len(missing)} image(s) of {r}, e.g. {missing[0]} (expected "
                         f"{s / missing[0]}.png or .npy: files are paired by name)")
    kdir = Path(K) if K and Path(K).is_dir() else None
    out = []
    for stem in sorted(rgbs):
        kf = (kdir / f"{stem}.txt") if kdir else (Path(K) if K else None)
        if kdir and not kf.is_file():
            raise InputError(f"{kdir}: no intrinsics {stem}.txt for {rgbs[stem]}")
        out.append((stem, rgbs[stem], scans[stem], kf))
    return out


def preview(rgb: np.ndarray, sparse: np.ndarray, depth: np.ndarray, max_depth: float | None) -> np.ndarray:
    """rgb | LiDAR dots over the rgb | completed depth, the depths on one colour scale (0 .. max_depth when
    given, else the shared 2nd-98th percentiles)."""
    from shared.preview import colorize, depth_limits, sparse_overlay

    vmin, vmax = (0.0, float(max_depth)) if max_depth else depth_limits(depth, sparse)
    return np.concatenate([rgb, sparse_overlay(rgb, sparse, vmin, vmax, radius=2), colorize(depth, vmin, vmax)],
                          axis=1)


def complete_files(ckpt: str, rgb: str, sparse: str, out: str, K: str | None = None, calib: str | None = None,
                   max_depth: float | None = None, previews: bool = True, device: str = "cpu",
                   which: str = "ema") -> dict:
    """What `trainer complete` runs: depth PNGs (uint16, metres x 256, clamped to [1/256, max_depth]) and
    previews. One frame: `out` is the PNG, the preview beside it as <out stem>.preview.png. Folders: `out`
    is a folder of <stem>.png and preview/<stem>.png. Every input is checked before the network loads."""
    if (K is None) == (calib is None):
        raise InputError("give the intrinsics as --K (a file of 9 numbers, or a folder of <stem>.txt) or "
                         "--calib (KITTI's calib_cam_to_cam.txt), one of them")
    limit = MAX_DEPTH_M if max_depth is None else float(max_depth)
    if not 0 < limit <= MAX_DEPTH_M:
        raise InputError(f"--max-depth {max_depth}: must be in (0, {MAX_DEPTH_M:.3f}] m, the PNG's range")
    frames = pair_files(rgb, sparse, K)
    calib_K = read_calib(calib) if calib else None
    single = not Path(rgb).is_dir()
    out_path = Path(out)
    if single and out_path.suffix.lower() != ".png":
        raise InputError(f"--out {out_path}: for one frame give the output .png (for folders, a folder)")
    loaded = []  # read and check everything first: a bad frame fails before any work
    for stem, rf, sf, kf in frames:
        img, scan = read_rgb(rf), read_sparse(sf)
        k = read_K(kf) if kf is not None else calib_K
        if scan.shape != img.shape[:2]:
            raise InputError(f"{sf}: the scan is {_hw(scan.shape)} but the image {rf} is {_hw(img.shape)}; "
                             "give a scan projected into this image (same height and width)")
        loaded.append((stem, img, scan, check_K(k, img.shape[:2], str(kf or calib)), {"rgb": rf, "sparse": sf}))
    completer = load_completer(ckpt, device=device, which=which)
    written = []
    for stem, img, scan, k, names in loaded:
        depth = completer(img, scan, k, max_depth=limit, names=names)
        target = out_path if single else out_path / f"{stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_depth_png(depth))
        if previews:
            from PIL import Image

            pv = target.with_name(f"{target.stem}.preview.png") if single else out_path / "preview" / f"{stem}.png"
            pv.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(preview(img, scan, depth, max_depth)).save(pv)
        written.append(str(target))
    return {"written": len(written), "out": str(out_path), "files": written,
            "checkpoint": completer.info.get("path", str(ckpt)), "model": completer.info.get("model_name"),
            "max_depth_m": limit}
