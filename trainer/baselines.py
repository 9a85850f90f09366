"""The field's classical depth-completion baselines, no learning: nearest-neighbour filling and IP-Basic.

    nearest_fill(sparse)   every pixel takes the depth of the nearest LiDAR point (Euclidean, in pixels)
    ip_basic(sparse)       Ku, Harakeh and Waslander, "In Defense of Classical Image Processing: Fast Depth
                           Completion on the CPU" (CRV 2018): the `fill_in_fast` pipeline of their release
                           with the settings of its published KITTI result (see ip_basic)

Both take and return float32 depth maps in metres with 0 = no value. `run_baseline` is what
`trainer baseline` runs: it writes one uint16 depth PNG (metres x 256, as `trainer predict`) per sample
of a shard set or per PNG of a folder of sparse scans, so that `trainer score` scores them like any
method. numpy, SciPy and OpenCV only: no torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

# The kernels of IP-Basic's release, as published (uint8 structuring elements).
FULL_KERNEL_3 = np.ones((3, 3), np.uint8)
FULL_KERNEL_5 = np.ones((5, 5), np.uint8)
FULL_KERNEL_7 = np.ones((7, 7), np.uint8)
FULL_KERNEL_9 = np.ones((9, 9), np.uint8)
FULL_KERNEL_31 = np.ones((31, 31), np.uint8)
CROSS_KERNEL_3 = np.array([[0, 1, 0],
                           [1, 1, 1],
                           [0, 1, 0]], np.uint8)
CROSS_KERNEL_5 = np.array([[0, 0, 1, 0, 0],
                           [0, 0, 1, 0, 0],
                           [1, 1, 1, 1, 1],
                           [0, 0, 1, 0, 0],
                           [0, 0, 1, 0, 0]], np.uint8)
DIAMOND_KERNEL_5 = np.array([[0, 0, 1, 0, 0],
                             [0, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1],
                             [0, 1, 1, 1, 0],
                             [0, 0, 1, 0, 0]], np.uint8)
CROSS_KERNEL_7 = np.zeros((7, 7), np.uint8)
CROSS_KERNEL_7[3, :] = CROSS_KERNEL_7[:, 3] = 1
DIAMOND_KERNEL_7 = (np.abs(np.arange(7)[:, None] - 3) + np.abs(np.arange(7)[None, :] - 3) <= 3).astype(np.uint8)

METHODS = ("nearest", "ip-basic")
BLURS = ("gaussian", "bilateral", "none")
IP_BASIC_MAX_DEPTH_M = 100.0  # the release's max_depth: the inversion's pivot
VALID_M = 0.1  # the release's test for "has a value", in its inverted map as in the input


def nearest_fill(sparse: np.ndarray) -> np.ndarray:
    """Every pixel takes the depth of the nearest LiDAR point (Euclidean in pixels; ties: SciPy's choice).
    A scan without any point gives zeros."""
    from scipy.ndimage import distance_transform_edt

    sparse = np.asarray(sparse, np.float32)
    if not np.any(sparse > 0):
        return np.zeros_like(sparse)
    _, (iy, ix) = distance_transform_edt(sparse <= 0, return_indices=True)
    return sparse[iy, ix]


# ---------------------------------------------------------------------------------------------------------
# IP-Basic, one function per stage of `fill_in_fast`, in the order it runs them. Every stage works on the
# inverted map (max_depth - depth where there is a value, 0 elsewhere), where a larger value is a nearer
# point: a grey dilation (a maximum) then lets the nearer of two competing points win, which is why the
# pipeline inverts.


def invert(depth: np.ndarray, max_depth: float = IP_BASIC_MAX_DEPTH_M) -> np.ndarray:
    """max_depth - d on the pixels with d > 0.1 m, the others as they are (the release's inversion; it is its
    own inverse). A point beyond max_depth becomes negative there and counts as empty from then on."""
    out = np.array(depth, np.float32)
    valid = out > VALID_M
    out[valid] = np.float32(max_depth) - out[valid]
    return out


def dilate(inv: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Grey dilation (maximum over the kernel's ones), OpenCV's border: pixels outside never win."""
    import cv2

    return cv2.dilate(inv, kernel)


def close_holes(inv: np.ndarray) -> np.ndarray:
    """Morphological closing with the full 5 x 5 kernel (dilation, then erosion)."""
    import cv2

    return cv2.morphologyEx(inv, cv2.MORPH_CLOSE, FULL_KERNEL_5)


def fill_empty(inv: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Empty pixels (< 0.1) take the value of a dilation with `kernel`; the others keep theirs."""
    out = inv.copy()
    empty = out < VALID_M
    out[empty] = dilate(inv, kernel)[empty]
    return out


def extend_to_top(inv: np.ndarray) -> np.ndarray:
    """Each column's topmost value (> 0.1) copied into every row above it; a column without one is left as
    it is (the release's argmax then finds row 0, so nothing changes either)."""
    out = inv.copy()
    valid = out > VALID_M
    top = np.argmax(valid, axis=0)
    cols = np.arange(out.shape[1])
    value = out[top, cols]
    above = np.arange(out.shape[0])[:, None] < top[None, :]
    return np.where(above, value[None, :], out).astype(np.float32)


def median_blur(inv: np.ndarray) -> np.ndarray:
    """OpenCV's 5 x 5 median filter (float32 maps allow 3 or 5)."""
    import cv2

    return cv2.medianBlur(inv, 5)


def smooth(inv: np.ndarray, blur: str) -> np.ndarray:
    """The release's final blur: "bilateral" (5 px, sigma colour 1.5, sigma space 2.0, all pixels) or
    "gaussian" (5 x 5, sigma from the size, applied to the pixels that have a value only), or "none"."""
    import cv2

    if blur == "bilateral":
        return cv2.bilateralFilter(inv, 5, 1.5, 2.0)
    if blur == "gaussian":
        out = inv.copy()
        valid = out > VALID_M
        out[valid] = cv2.GaussianBlur(inv, (5, 5), 0)[valid]
        return out
    if blur == "none":
        return inv
    raise ValueError(f"blur must be one of {BLURS}, got {blur!r}")


def ip_basic(sparse: np.ndarray, max_depth: float = IP_BASIC_MAX_DEPTH_M, extrapolate: bool = True,
             blur: str = "gaussian", kernel: np.ndarray = DIAMOND_KERNEL_5) -> np.ndarray:
    """IP-Basic's `fill_in_fast` on one sparse depth map (metres, 0 = no value): a dense map in metres, 0
    where the pipeline leaves a pixel without a value (the release writes those 0s too; the KITTI devkit
    then fills them, as `trainer score` does).

    The stages (Ku et al. 2018, Sec. III): invert (max_depth - d), dilate with the 5 x 5 diamond, close
    holes with a full 5 x 5 kernel, fill empty pixels from a 7 x 7 dilation, then, with `extrapolate`,
    extend each column's topmost value to the top of the frame and fill what is still empty from a 31 x 31
    dilation, then a 5 x 5 median blur, the final blur, and the inversion back. Defaults: the settings of
    the release's published KITTI result ("fast" fill, extrapolate on, Gaussian blur; the function's own
    defaults in the release are extrapolate off and bilateral, its recommendation for keeping structure).
    Differences from the release: it works in place on the caller's array, this does not; everything else,
    float32 arithmetic and OpenCV's border rules included, is the same. See docs/baselines.md.
    """
    if blur not in BLURS:
        raise ValueError(f"blur must be one of {BLURS}, got {blur!r}")
    sparse = np.asarray(sparse, np.float32)
    if sparse.ndim != 2:
        raise ValueError(f"ip_basic takes one H x W depth map, got shape {sparse.shape}")
    inv = invert(sparse, max_depth)
    inv = dilate(inv, kernel)
    inv = close_holes(inv)
    inv = fill_empty(inv, FULL_KERNEL_7)
    if extrapolate:
        inv = extend_to_top(inv)
        inv = fill_empty(inv, FULL_KERNEL_31)
    inv = median_blur(inv)
    inv = smooth(inv, blur)
    return invert(inv, max_depth)


def complete(method: str, sparse: np.ndarray, **ip_basic_options) -> np.ndarray:
    """One baseline by name (METHODS) on one sparse map."""
    if method == "nearest":
        return nearest_fill(sparse)
    if method == "ip-basic":
        return ip_basic(sparse, **ip_basic_options)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ---------------------------------------------------------------------------------------------------------
# `trainer baseline`: a shard set or a folder of sparse PNGs -> prediction PNGs


def sparse_inputs(shards: str | None = None, sparse_dir: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, sparse depth in metres) of every sample of a shard set (name: its key) or of every *.png of a
    folder (name: the file's stem), in order."""
    if (shards is None) == (sparse_dir is None):
        raise ValueError("give exactly one of shards (a shard set) or sparse_dir (a folder of depth PNGs)")
    if shards is not None:
        from shared.shard import check_key, iter_samples

        for s in iter_samples(shards):
            if s.sparse is None:
                raise ValueError(f"{shards}: sample {s.key} has no sparse.png (the LiDAR input a baseline fills)")
            yield check_key(s.key), s.sparse
        return
    from shared.depth import decode_depth_png

    folder = Path(sparse_dir)
    files = sorted(folder.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no .png sparse depth maps (uint16, metres x 256) in {folder}")
    for f in files:
        yield f.stem, decode_depth_png(f.read_bytes(), what=str(f))


def run_baseline(method: str, out: str, shards: str | None = None, sparse_dir: str | None = None,
                 max_depth: float = IP_BASIC_MAX_DEPTH_M, blur: str = "gaussian", extrapolate: bool = True) -> dict:
    """Fill every sparse input with a baseline and write <out>/<name>.png (uint16, metres x 256; 0 = no
    value, which `trainer score` fills as the KITTI devkit does; IP-Basic's negative values, points beyond
    max_depth that nothing replaced, are written as 0 too). max_depth, blur and extrapolate are IP-Basic's
    (ignored by nearest). Returns a summary."""
    from shared.depth import MAX_DEPTH_M, encode_depth_png

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    options = {"max_depth": max_depth, "blur": blur, "extrapolate": extrapolate} if method == "ip-basic" else {}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, empty = 0, 0
    for name, sparse in sparse_inputs(shards, sparse_dir):
        dense = np.clip(complete(method, sparse, **options), 0, MAX_DEPTH_M)
        empty += int((dense <= 0).sum())
        (out_dir / f"{name}.png").write_bytes(encode_depth_png(dense))
        n += 1
    return {"method": method, "written": n, "out": str(out_dir), "pixels_without_value": empty, "options": options}
