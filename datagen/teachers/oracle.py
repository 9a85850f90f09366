"""The oracle teacher: what a monocular depth model would say about a synthetic scene of known depth.

The synthetic world knows the true depth, so its teacher is made from it: the true disparity with the
errors a real monocular model (Depth Anything V2) makes, then an unknown affine map. Each error is a
seeded knob of `TeacherErrors`, in the order they are applied:

1. objects   wrong relative depth between objects: each object's disparity d becomes d exp(sigma_s z1)
             + sigma_o m z2, z1, z2 ~ N(0, 1) per object (the ray-cast object ids); surfaces covering more
             than `layout_fraction` of the image (ground, walls, floor) are the layout that the bends
             distort instead.
2. bend      low-frequency bends of large planes: disparity plus a m f, f a sum of `bend_waves` plane
             waves of at most `bend_max_cycles` cycles across the image, scaled to max |f| = 1.
   m is the image's disparity spread (mean absolute deviation from the median, off the sky): the scale
   in which Depth Anything's scale-and-shift-invariant loss measures errors, so what training leaves
   behind is additive in those units, not relative per pixel. Far pixels (small disparity) therefore
   get large relative errors, as monocular models do. The result is floored at 0 (nothing lies beyond
   the sky).
3. thin      thin structures (poles, branches, fence rails, pens: objects whose footprint is at most
             `thin_width_px` wide) are lost with probability `thin_lost` (their pixels take the value of
             the nearest pixel of something else: the building behind, or the sky) or fattened with
             probability `thin_fat` (their value spreads `fat_px` px over what is behind them).
4. texture   depth edges that follow texture and shadows: disparity times 1 + t h, h the luminance's
             high-pass (luminance minus its Gaussian blur of `texture_px`): bright marks come nearer.
5. edge_blur smoothing across depth edges: a joint bilateral filter of `edge_blur_px` guided by the
             luminance, so depth edges that the image shows stay sharp and those it hides (similar
             colours on both sides) are smoothed.
6. sky_halo  leakage at the sky: sky pixels within `halo_px` of a surface get `halo` times that surface's
             value at the boundary, falling linearly with distance (the teacher's edges against the
             sky are soft).
Then the affine map: out = scale (d + shift), scale log-uniform in `scale_range`, shift uniform in
`shift_range` (relative to the normalised disparity, whose maximum is about 1), and 0 for the sky.

Units: px knobs are pixels at Depth Anything's input (shorter side 518 px) and scale with the image's
shorter side, so the errors keep their size relative to the scene at any resolution.

Calibration: the layout errors (objects, bend) scale with `strength`, the one number fitted per scene
family to Depth Anything V2's published zero-shot relative-depth AbsRel (see REFERENCES and
docs/synthetic_world.md). The detail errors (thin, texture, edge_blur, sky_halo) belong to the
network's resolution and are fixed a priori. The metric is shared/relative_depth.py.

Draws: four independent streams are split off the rng passed in (affine, bend, objects, thin), so
the same rng gives the same bytes, and turning one mode off leaves the others' draws unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

# scipy.ndimage is imported where it is used: datagen with another teacher runs without scipy (the GPU check's
# minimal environment, bench/gpu_bundle.py)

REFERENCE_SHORT_SIDE_PX = 518  # Depth Anything's input: shorter side 518 px
MODES = ("objects", "bend", "thin", "texture", "edge_blur", "sky_halo")


@dataclass(frozen=True)
class TeacherErrors:
    # layout errors, multiplied by `strength` (the number calibrated per family)
    strength: float = 1.0
    object_scale: float = 0.05      # std of the per-object log-disparity factor
    object_offset: float = 0.1      # std of the per-object disparity offset, in units of the spread m
    layout_fraction: float = 0.2    # objects larger than this share of the image keep their depth
    bend: float = 0.1               # peak of the low-frequency field, in units of the spread m
    bend_waves: int = 3
    bend_max_cycles: float = 1.5
    # detail errors, fixed (px at a 518 px shorter side)
    thin_width_px: float = 6.0
    thin_lost: float = 0.3
    thin_fat: float = 0.4
    fat_px: float = 3.0
    texture: float = 0.03           # relative disparity change per unit of luminance high-pass
    texture_px: float = 4.0
    edge_blur_px: float = 3.0       # spatial sigma of the joint bilateral filter
    edge_blur_contrast: float = 0.08  # luminance difference (0..1) that stops the blur (range sigma)
    halo: float = 0.5
    halo_px: float = 6.0
    # the unknown affine map
    scale_range: tuple[float, float] = (1.0, 100.0)
    shift_range: tuple[float, float] = (0.025, 0.1)

    def only(self, *modes: str) -> TeacherErrors:
        """These error modes and no other (the affine map stays)."""
        _check_modes(modes)
        return self.without(*(m for m in MODES if m not in modes))

    def without(self, *modes: str) -> TeacherErrors:
        _check_modes(modes)
        off = {"objects": {"object_scale": 0.0, "object_offset": 0.0}, "bend": {"bend": 0.0}, "thin": {"thin_lost": 0.0, "thin_fat": 0.0},
               "texture": {"texture": 0.0}, "edge_blur": {"edge_blur_px": 0.0}, "sky_halo": {"halo": 0.0}}
        return replace(self, **{k: v for m in modes for k, v in off[m].items()})


# Depth Anything V2-Large, zero-shot relative depth after a per-image affine fit in disparity (Yang et
# al., "Depth Anything V2", NeurIPS 2024, Table 2): dataset, AbsRel, delta1. Outdoor families take the
# KITTI figures, indoor ones NYUv2's (docs/synthetic_world.md says why).
REFERENCES = {
    "street": ("KITTI", 0.074, 0.946),
    "nature": ("KITTI", 0.074, 0.946),
    "room": ("NYUv2", 0.045, 0.979),
    "tabletop": ("NYUv2", 0.045, 0.979),
}

# `strength` per family, fitted to the REFERENCES AbsRel by `python bench/teacher_calibration.py --fit`
# (bisection on the mean over 48 scenes of seed 1000 at the family's default size), before any training
# result was seen; docs/synthetic_world.md has the fit's output and the check on other scenes.
ORACLE_ERRORS = {
    "street": TeacherErrors(strength=1.205),
    "nature": TeacherErrors(strength=1.395),
    "room": TeacherErrors(strength=2.004),
    "tabletop": TeacherErrors(strength=2.075),
}
DEFAULT_FAMILY = "street"  # the errors used when the family is not known


def oracle_teacher(depth_m: np.ndarray, rng: np.random.Generator, *, rgb: np.ndarray | None = None,
                   object_id: np.ndarray | None = None, family: str | None = None,
                   errors: TeacherErrors | None = None) -> np.ndarray:
    """Relative disparity (float32, H x W) of a scene of known depth, with a monocular model's errors.

    depth_m: true depth in metres, 0 (or not finite) = sky. rgb (H x W x 3 uint8) drives the texture
    leaks and guides the edge-aware blur; object_id (H x W int, -1 = sky; SyntheticScene.object_id)
    tells objects apart for the per-object errors and the thin structures. Without rgb there are no
    texture leaks and the blur is a plain Gaussian; without object ids no per-object or thin-structure
    errors. errors: the knobs; default ORACLE_ERRORS[family] (DEFAULT_FAMILY's when family is None).
    The sky is exactly 0 except for the halo (and except pixels that a lost thin structure hands to the
    sky, which are 0 though not sky).
    """
    if errors is None:
        key = DEFAULT_FAMILY if family is None else family
        if key not in ORACLE_ERRORS:
            raise ValueError(f"oracle teacher: unknown family {family!r}: use one of {', '.join(ORACLE_ERRORS)}")
        errors = ORACLE_ERRORS[key]
    e = errors
    depth = np.asarray(depth_m, dtype=np.float64)
    sky = ~(np.isfinite(depth) & (depth > 0))
    disp = np.where(sky, 0.0, 1.0 / np.where(sky, 1.0, depth))
    top = disp.max()
    if top > 0:
        disp = disp / top
    h, w = disp.shape
    px = min(h, w) / REFERENCE_SHORT_SIDE_PX
    r_affine, r_bend, r_objects, r_thin = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=4))
    lum = None if rgb is None else _luminance(rgb, disp.shape)
    ids = None if object_id is None else _check_ids(object_id, disp.shape)

    spread = disparity_spread(disp, sky)
    if ids is not None:
        disp = object_errors(disp, ids, e.strength * e.object_scale, e.strength * e.object_offset * spread,
                             e.layout_fraction, r_objects)
    disp = bend(disp, e.strength * e.bend * spread, e.bend_waves, e.bend_max_cycles, r_bend)
    disp = np.where(sky, 0.0, np.maximum(disp, 0.0))
    seen_sky = sky
    if ids is not None:
        disp, seen_sky = thin_structures(disp, ids, sky, e.thin_width_px * px, e.thin_lost, e.thin_fat,
                                         e.fat_px * px, r_thin)
    if lum is not None:
        disp = texture_leak(disp, lum, seen_sky, e.texture, e.texture_px * px)
    disp = edge_aware_blur(disp, lum, seen_sky, e.edge_blur_px * px, e.edge_blur_contrast)

    scale = math.exp(r_affine.uniform(math.log(e.scale_range[0]), math.log(e.scale_range[1])))
    shift = r_affine.uniform(*e.shift_range)
    out = np.where(seen_sky, 0.0, scale * (disp + shift))
    out = sky_halo(out, seen_sky, e.halo, e.halo_px * px)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# The error modes, each on a normalised disparity map (sky 0)


def disparity_spread(disp: np.ndarray, sky: np.ndarray) -> float:
    """Mean absolute deviation of the disparity from its median, off the sky (0 when all is sky)."""
    d = disp[~sky]
    return float(np.mean(np.abs(d - np.median(d)))) if d.size else 0.0


def object_errors(disp: np.ndarray, object_id: np.ndarray, scale_sigma: float, offset_sigma: float,
                  layout_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Each object's disparity d becomes d exp(scale_sigma z1) + offset_sigma z2 (z1, z2 ~ N(0, 1), drawn
    per object present in id order): the object sits nearer or farther than it is, relative to the rest.
    Objects covering more than layout_fraction of the image keep their disparity."""
    ids, counts = np.unique(object_id[object_id >= 0], return_counts=True)
    z = rng.standard_normal((len(ids), 2))
    if (scale_sigma <= 0 and offset_sigma <= 0) or not len(ids):
        return disp
    factor, offset = np.exp(scale_sigma * z[:, 0]), offset_sigma * z[:, 1]
    layout = counts > layout_fraction * object_id.size
    factor[layout], offset[layout] = 1.0, 0.0
    hit = object_id >= 0
    k = np.searchsorted(ids, object_id[hit])
    out = disp.copy()
    out[hit] = disp[hit] * factor[k] + offset[k]
    return out


def bend(disp: np.ndarray, amplitude: float, n_waves: int, max_cycles: float, rng: np.random.Generator) -> np.ndarray:
    """disp plus amplitude f: f a sum of n_waves random plane waves of 0.25..max_cycles cycles across the
    image, scaled to max |f| = 1. Draws per wave: direction, frequency, phase, weight."""
    h, w = disp.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    field = np.zeros_like(disp)
    for _ in range(n_waves):
        ang = rng.uniform(0, 2 * math.pi)
        cycles = rng.uniform(0.25, max_cycles)
        phase = rng.uniform(0, 2 * math.pi)
        weight = rng.uniform(0.5, 1.0)
        field += weight * np.cos((u * math.cos(ang) / w + v * math.sin(ang) / h) * 2 * math.pi * cycles + phase)
    peak = np.abs(field).max()
    if amplitude <= 0 or peak == 0:
        return disp
    return disp + amplitude * field / peak


def footprint_width(object_id: np.ndarray) -> dict[int, float]:
    """Width in px of each object's image footprint: 2 d + 1, d the largest distance from one of its
    pixels to the nearest pixel where another object (or the sky) begins. A 1-2 px wide pole gives
    1, a 3-4 px one 3."""
    from scipy import ndimage  # lazy, see the imports above

    diff = np.zeros(object_id.shape, bool)
    dv = object_id[1:] != object_id[:-1]
    dh = object_id[:, 1:] != object_id[:, :-1]
    diff[1:] |= dv
    diff[:-1] |= dv
    diff[:, 1:] |= dh
    diff[:, :-1] |= dh
    dist = ndimage.distance_transform_edt(~diff)
    ids = np.unique(object_id[object_id >= 0])
    if not len(ids):
        return {}
    widest = ndimage.maximum(dist, labels=object_id + 1, index=ids + 1)
    return {int(i): 2.0 * float(d) + 1.0 for i, d in zip(ids, np.atleast_1d(widest), strict=True)}


def thin_structures(disp: np.ndarray, object_id: np.ndarray, sky: np.ndarray, width_px: float, p_lost: float,
                    p_fat: float, fat_px: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Lose or fatten thin objects (footprint at most width_px wide). One draw u per object present (id
    order): lost when u < p_lost, fattened when u < p_lost + p_fat. Returns the map and the teacher's sky
    (the true sky plus lost pixels that took the sky's place)."""
    from scipy import ndimage  # lazy, see the imports above

    widths = footprint_width(object_id)
    u = rng.uniform(size=len(widths))
    lost = [i for (i, wd), x in zip(widths.items(), u, strict=True) if wd <= width_px and x < p_lost]
    fat = [i for (i, wd), x in zip(widths.items(), u, strict=True) if wd <= width_px and p_lost <= x < p_lost + p_fat]
    disp, seen_sky = disp.copy(), sky.copy()
    if fat and fat_px > 0:
        mask = np.isin(object_id, fat)
        dist, (iv, iu) = ndimage.distance_transform_edt(~mask, return_indices=True)
        near_value = disp[iv, iu]
        grow = ~mask & ~seen_sky & (dist <= fat_px) & (near_value > disp)
        disp[grow] = near_value[grow]
    if lost:
        mask = np.isin(object_id, lost)
        _, (iv, iu) = ndimage.distance_transform_edt(mask, return_indices=True)
        disp[mask] = disp[iv, iu][mask]
        seen_sky[mask] = sky[iv, iu][mask]
    return disp, seen_sky


def texture_leak(disp: np.ndarray, lum: np.ndarray, sky: np.ndarray, amount: float, sigma_px: float) -> np.ndarray:
    """disp times 1 + amount (lum - G_sigma * lum) off the sky: the image's edges, texture and shadows
    alike, leak into the disparity."""
    from scipy import ndimage  # lazy, see the imports above

    if amount <= 0:
        return disp
    high = lum - ndimage.gaussian_filter(lum, max(sigma_px, 0.5), mode="nearest")
    return np.where(sky, disp, disp * (1.0 + amount * high))


def edge_aware_blur(disp: np.ndarray, lum: np.ndarray | None, sky: np.ndarray, sigma_px: float,
                    contrast: float) -> np.ndarray:
    """Joint bilateral filter of disp off the sky: weights exp(-r^2 / 2 sigma^2) exp(-dL^2 / 2 contrast^2),
    dL the luminance difference (no range term without an image). The sky neither gives nor takes."""
    if sigma_px <= 0:
        return disp
    r = max(1, int(math.ceil(2.0 * sigma_px)))
    valid = (~sky).astype(np.float64)
    pad = [(r, r), (r, r)]
    d_p, v_p = np.pad(disp, pad, mode="edge"), np.pad(valid, pad, mode="edge")
    l_p = None if lum is None else np.pad(lum, pad, mode="edge")
    h, w = disp.shape
    num, den = np.zeros_like(disp), np.zeros_like(disp)
    for dv in range(-r, r + 1):
        for du in range(-r, r + 1):
            sl = (slice(r + dv, r + dv + h), slice(r + du, r + du + w))
            wgt = math.exp(-(dv * dv + du * du) / (2.0 * sigma_px ** 2)) * v_p[sl]
            if l_p is not None:
                wgt = wgt * np.exp(-((l_p[sl] - lum) ** 2) / (2.0 * contrast ** 2))
            num += wgt * d_p[sl]
            den += wgt
    return np.where(sky | (den <= 0), disp, num / np.where(den > 0, den, 1.0))


def sky_halo(out: np.ndarray, sky: np.ndarray, strength: float, halo_px: float) -> np.ndarray:
    """Sky pixels at distance d <= halo_px from a surface get strength (1 - (d - 1) / halo_px) times the
    value of the nearest surface pixel; farther sky stays 0."""
    from scipy import ndimage  # lazy, see the imports above

    if strength <= 0 or halo_px <= 0 or not sky.any() or sky.all():
        return out
    dist, (iv, iu) = ndimage.distance_transform_edt(sky, return_indices=True)
    near = sky & (dist <= halo_px)
    out = out.copy()
    out[near] = strength * (1.0 - (dist[near] - 1.0) / halo_px) * out[iv[near], iu[near]]
    return out


def _check_modes(modes) -> None:
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown error modes {sorted(unknown)}: choose from {', '.join(MODES)}")


def _luminance(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    img = np.asarray(rgb)
    if img.shape[:2] != shape or img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"oracle teacher: rgb must be H x W x 3 with H x W = {shape}, got {img.shape}")
    return img[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0  # Rec. 601 luma


def _check_ids(object_id: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    ids = np.asarray(object_id)
    if ids.shape != shape or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"oracle teacher: object_id must be an integer H x W map of shape {shape}, "
                         f"got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64)
