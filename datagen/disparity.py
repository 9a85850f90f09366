"""Relative disparity from the teacher -> a plausible metric depth map.

Depth Anything V2 gives disparity that is affine-invariant: d_true = s * d + b for an unknown s > 0
and b. No metric depth can be recovered from one image, so we do not try: we invent a plausible one.
A near and a far distance are drawn per image from a range that suits the scene type, and the
normalised disparity is mapped *linearly in inverse depth* between 1/far and 1/near. Any affine map
of a correct disparity stays a correct disparity of some scene, so the result is exactly the teacher's
geometry up to the one affine ambiguity it has, fixed by (near, far).

Sky is what has no surface: the pixels the teacher puts at infinity. Depth Anything is trained with
the sky's disparity set to zero and its relative head ends in a ReLU, so its sky sits at (or within
a hair of) its output's zero, while the farthest real surface of a sky-free photo (the back wall of a
room, a street's end) keeps a clearly positive disparity. So a pixel is sky when its disparity is
at most `sky_threshold` (default 1%) of the map's maximum -- measured from the teacher's zero, not
from the map's own minimum: a map without sky keeps all of its pixels, and a map with sky drops the
sky. (Measuring from the minimum, as this module once did, deleted the farthest 2% of every sky-free
image: the far wall of rooms, 34-64 m of street.) Non-finite pixels have no surface either. Sky
pixels get depth 0 (= invalid), which the mesh leaves as a hole, as a real LiDAR gets no return
from the sky. A teacher whose zero is not infinity (negative outputs) is not a disparity teacher and
needs its own conversion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DepthRange:
    """Sampling ranges (metres) for the nearest and farthest valid depth of one image.

    Both are drawn log-uniformly (scale quantities: 1-2 m is as different as 50-100 m).
    """

    near_m: tuple[float, float]
    far_m: tuple[float, float]


# outdoor: street level photos; the nearest surface (ground at the image bottom, a parked car) is
#   1-3 m away and the farthest visible surface 50-120 m (KITTI's LiDAR sees ~80-120 m).
# indoor: rooms; nearest 0.3-1 m (a table, a wall close by), farthest 6-15 m (a hall, a long corridor);
#   NYUv2's depth tops out near 10 m.
# any: either of the two, picked with equal probability per image (a union of independent ranges
#   would give implausible pairs such as near 3 m with far 6 m outdoors).
DEPTH_RANGES: dict[str, DepthRange | tuple[DepthRange, ...]] = {
    "outdoor": DepthRange(near_m=(1.0, 3.0), far_m=(50.0, 120.0)),
    "indoor": DepthRange(near_m=(0.3, 1.0), far_m=(6.0, 15.0)),
}
DEPTH_RANGES["any"] = (DEPTH_RANGES["outdoor"], DEPTH_RANGES["indoor"])


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def sample_near_far(rng: np.random.Generator, scene: str | DepthRange = "any", near_m: float | None = None,
                    far_m: float | None = None) -> tuple[float, float, str]:
    """Draw (near_m, far_m, scene type). Draw order is fixed: [type,] near, far. near_m / far_m, when given,
    replace the drawn value (the draws still happen, so the rng moves on as without them); the result must
    have 0 < near < far."""
    if isinstance(scene, DepthRange):
        rngs, name = scene, "custom"
    else:
        if scene not in DEPTH_RANGES:
            raise ValueError(f"unknown scene type {scene!r}; choose from {sorted(DEPTH_RANGES)}")
        rngs, name = DEPTH_RANGES[scene], scene
        if isinstance(rngs, tuple):
            i = int(rng.integers(len(rngs)))
            rngs, name = rngs[i], ("outdoor", "indoor")[i]
    near = _log_uniform(rng, *rngs.near_m)
    far = max(_log_uniform(rng, *rngs.far_m), near * 1.5)
    near = near if near_m is None else float(near_m)
    far = far if far_m is None else float(far_m)
    if not 0 < near < far:
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    return near, far, name


def disparity_to_depth(disp: np.ndarray, rng: np.random.Generator, scene: str | DepthRange = "any",
                       sky_threshold: float = 0.01, near_m: float | None = None,
                       far_m: float | None = None) -> tuple[np.ndarray, dict]:
    """Turn relative disparity (H x W, larger = nearer) into metric depth (H x W float32, 0 = no surface).

    1. sky = non-finite, or disp <= sky_threshold * max(disp) (the teacher's zero is infinity; see the
       module docstring); a map whose maximum is not positive has no surface at all.
    2. Over the remaining (valid) pixels, t = (disp - d_min) / (d_max - d_min) in [0, 1] (t = 1 for a
       constant map: one fronto-parallel plane at `near`).
    3. 1 / depth = 1/far + t * (1/near - 1/far): the nearest valid pixel is at `near`, the farthest at
       `far`, and inverse depth is an affine function of the teacher's disparity.
    near_m / far_m override the sampled values (for tests or a known scene scale); rng is then unused.
    The info dict records what was drawn, for meta.json.
    """
    disp = np.asarray(disp, dtype=np.float64)
    if disp.ndim != 2:
        raise ValueError(f"disparity must be H x W, got shape {disp.shape}")
    near, far, name = sample_near_far(rng, scene, near_m, far_m)

    finite = np.isfinite(disp)
    depth = np.zeros(disp.shape, np.float32)
    info = {"scene": name, "near_m": near, "far_m": far, "sky_threshold": sky_threshold,
            "disp_min": None, "disp_max": None, "sky_fraction": 1.0, "valid_fraction": 0.0}
    if not finite.any():
        return depth, info
    lo, hi = float(disp[finite].min()), float(disp[finite].max())
    info.update(disp_min=lo, disp_max=hi)
    if hi <= 0:  # everything at the teacher's zero or below: no surface
        return depth, info
    valid = finite & (np.where(finite, disp, 0.0) > sky_threshold * hi)
    if valid.any():
        dv = disp[valid]
        d_lo, d_hi = float(dv.min()), float(dv.max())
        t = (dv - d_lo) / (d_hi - d_lo) if d_hi > d_lo else np.ones_like(dv)
        inv = 1.0 / far + t * (1.0 / near - 1.0 / far)
        depth[valid] = (1.0 / inv).astype(np.float32)
    info.update(sky_fraction=float(1.0 - valid.mean()), valid_fraction=float(valid.mean()))
    return depth, info
