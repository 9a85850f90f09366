"""Teacher map -> metric pseudo depth, for each kind of teacher (see datagen/teachers/zoo.py for the kinds).

- disparity (Depth Anything relative, MiDaS): `disparity_to_depth` (datagen/disparity.py): a near/far pair is
  drawn per image and inverse depth is made an affine function of the disparity between 1/far and 1/near.
- depth (relative depth, true = s * map + b): the same near/far draw (same ranges, same draw order), but the
  map is made affine in *depth*: depth = near + t * (far - near), t the map normalised to [0, 1] over its
  valid pixels. The ambiguity of such a map is affine in depth, not in inverse depth, so this is the only
  map of the family that keeps its geometry. No sky rule: a relative-depth model has no "infinitely far"
  value to detect, so sky becomes the far end unless the model leaves it non-finite.
- metric (metres): used as it is, no near/far draw. Optionally (`scale_jitter` > 0, off by default) one
  global factor per image, log-uniform in [1 / (1 + j), 1 + j], drawn from the sample's own depth stream,
  multiplies it (scale augmentation). Pixels with no surface get 0: non-finite or <= 0, at or beyond
  `SATURATION` of a bounded metric head (sigmoid x max_depth, or ZoeDepth's last bin: where such a head
  puts the sky), or beyond the depth PNG's range (MAX_DEPTH_M, 256 m).

teacher.png always stores the teacher's own map (its kind is meta.json's teacher.output); this module only
makes depth.png.
"""

from __future__ import annotations

import math

import numpy as np

from datagen.disparity import DepthRange, disparity_to_depth, sample_near_far
from shared.depth import MAX_DEPTH_M

SATURATION = 0.98  # fraction of a bounded head's ceiling above which a metric pixel counts as sky / too far


def relative_depth_to_depth(rel: np.ndarray, rng: np.random.Generator, scene: str | DepthRange = "any",
                            near_m: float | None = None, far_m: float | None = None) -> tuple[np.ndarray, dict]:
    """Relative depth (H x W, larger = farther, affine-ambiguous) -> depth in metres, affine in the map, with
    the nearest valid pixel at `near` and the farthest at `far` (drawn as for disparity, or given)."""
    rel = np.asarray(rel, dtype=np.float64)
    if rel.ndim != 2:
        raise ValueError(f"relative depth must be H x W, got shape {rel.shape}")
    near, far, name = sample_near_far(rng, scene, near_m, far_m)
    valid = np.isfinite(rel)
    depth = np.zeros(rel.shape, np.float32)
    info = {"scene": name, "near_m": near, "far_m": far, "map_min": None, "map_max": None, "valid_fraction": 0.0}
    if valid.any():
        lo, hi = float(rel[valid].min()), float(rel[valid].max())
        info.update(map_min=lo, map_max=hi)
        if hi > lo:  # a constant map has no structure: no pixel can be placed
            t = (rel[valid] - lo) / (hi - lo)
            depth[valid] = (near + t * (far - near)).astype(np.float32)
            info["valid_fraction"] = float(valid.mean())
    return depth, info


def metric_to_depth(metric: np.ndarray, rng: np.random.Generator, scale_jitter: float = 0.0,
                    ceiling_m: float | None = None) -> tuple[np.ndarray, dict]:
    """A metric teacher's depth as pseudo depth: unchanged up to the optional global scale; see the module."""
    d = np.asarray(metric, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"metric depth must be H x W, got shape {d.shape}")
    if scale_jitter < 0:
        raise ValueError(f"scale_jitter must be >= 0, got {scale_jitter}")
    valid = np.isfinite(d) & (d > 0)
    if ceiling_m is not None:
        valid &= d < SATURATION * ceiling_m
    scale = 1.0
    if scale_jitter > 0:
        scale = math.exp(rng.uniform(-math.log1p(scale_jitter), math.log1p(scale_jitter)))
    depth = np.where(valid, d * np.float32(scale), np.float32(0.0)).astype(np.float32)
    depth[depth > MAX_DEPTH_M] = 0.0  # beyond what depth.png can hold: no surface rather than a clipped one
    return depth, {"scale": scale, "ceiling_m": ceiling_m, "valid_fraction": float((depth > 0).mean())}


def teacher_to_depth(teacher_map: np.ndarray, output: str, rng: np.random.Generator, scene: str = "any",
                     scale_jitter: float = 0.0, ceiling_m: float | None = None) -> tuple[np.ndarray, dict]:
    """Dispatch on the teacher's kind ("disparity", "depth" or "metric"); info records what was drawn."""
    if output == "disparity":
        return disparity_to_depth(teacher_map, rng, scene=scene)
    if output == "depth":
        return relative_depth_to_depth(teacher_map, rng, scene=scene)
    if output == "metric":
        return metric_to_depth(teacher_map, rng, scale_jitter=scale_jitter, ceiling_m=ceiling_m)
    raise ValueError(f"unknown teacher output {output!r}; expected disparity, depth or metric")
