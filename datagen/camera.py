"""Camera intrinsics for data generation: random K from a documented distribution, and resizing with K.

The pinhole helpers (make_K, scale_K, crop_K, backproject, project, ...) and the conventions live in
shared.camera, which the trainer uses too: x right, y down, z forward; pixel (u, v) has its centre at
integer (u, v); K is 3x3 float64.

Why random intrinsics at all: the pseudo-labelled images (COCO, Landmarks, ...) come without
calibration, and the completion network back-projects with K, so pre-training must see the spread of
focal lengths and principal points it will meet (KITTI ~81 deg wide, NYU ~63 deg, phone photos).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.camera import as_K, make_K, scale_K


@dataclass(frozen=True)
class IntrinsicsDistribution:
    """Where random intrinsics come from.

    hfov_deg: horizontal field of view, drawn uniformly in this range; fx = (W / 2) / tan(hfov / 2).
    pp_jitter: the principal point is the image centre plus a uniform offset of up to this fraction of
        the width (cx) and of the height (cy). Real calibrations sit within ~1-3% of the centre
        (KITTI cam 2: cx 609.6 of 1242, 1.8%; cy 172.9 of 375, 3.9%).
    aspect_jitter: fy = fx * (1 + a), a uniform in +-this. Pixels are square to within a fraction of a
        percent on real cameras; a little jitter keeps the network from relying on fx == fy exactly.
    """

    hfov_deg: tuple[float, float]
    pp_jitter: float = 0.02
    aspect_jitter: float = 0.005


# normal: 45-75 deg, the spread of consumer photos (COCO, Landmarks): 35 mm-equivalent focal lengths of
#   about 22-43 mm (phones are ~26 mm = 69 deg; "normal" lenses 50 mm = 40 deg).
# wide: 75-100 deg, driving and action cameras (KITTI 81 deg, nuScenes front 64..70 deg is in 'normal',
#   Cityscapes ~ 50 deg too; GoPro-like linear modes up to ~100 deg).
# any: the union, the default for pre-training on mixed sources.
INTRINSICS_PRESETS: dict[str, IntrinsicsDistribution] = {
    "normal": IntrinsicsDistribution(hfov_deg=(45.0, 75.0), pp_jitter=0.02, aspect_jitter=0.005),
    "wide": IntrinsicsDistribution(hfov_deg=(75.0, 100.0), pp_jitter=0.02, aspect_jitter=0.005),
    "any": IntrinsicsDistribution(hfov_deg=(45.0, 100.0), pp_jitter=0.02, aspect_jitter=0.005),
}


def fx_from_hfov(width: int, hfov: float) -> float:
    """Focal length in pixels giving this horizontal FOV (degrees) across `width` pixels."""
    return (width / 2.0) / math.tan(math.radians(hfov) / 2.0)


def hfov_deg(K: np.ndarray, width: int) -> float:
    """Horizontal field of view of K over an image `width` pixels wide (centred principal point)."""
    return math.degrees(2.0 * math.atan((width / 2.0) / as_K(K)[0, 0]))


def sample_intrinsics(width: int, height: int, rng: np.random.Generator,
                      dist: str | IntrinsicsDistribution = "any") -> np.ndarray:
    """Draw a K for an image of this size. Draw order is fixed (hfov, aspect, cx, cy): same rng, same K."""
    if isinstance(dist, str):
        if dist not in INTRINSICS_PRESETS:
            raise ValueError(f"unknown intrinsics preset {dist!r}; choose from {sorted(INTRINSICS_PRESETS)}")
        dist = INTRINSICS_PRESETS[dist]
    lo, hi = dist.hfov_deg
    hfov = rng.uniform(lo, hi)
    aspect = 1.0 + rng.uniform(-dist.aspect_jitter, dist.aspect_jitter)
    jx, jy = rng.uniform(-dist.pp_jitter, dist.pp_jitter, size=2)
    fx = fx_from_hfov(width, hfov)
    cx = (width - 1) / 2.0 + jx * width
    cy = (height - 1) / 2.0 + jy * height
    return make_K(fx, fx * aspect, cx, cy)


def resize_image_and_K(image: np.ndarray, K: np.ndarray, width: int, height: int,
                       nearest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Resize an image (H x W or H x W x C) to width x height and update K.

    Use nearest=True for depth maps: interpolating across a depth edge invents surfaces that do not
    exist (and mixes valid values with the 0 = invalid marker).
    """
    h0, w0 = image.shape[:2]
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if image.dtype == np.uint8:
        out = np.asarray(Image.fromarray(image).resize((width, height), resample))
    else:
        # PIL's float mode is single channel; resize channel by channel.
        chans = image[..., None] if image.ndim == 2 else image
        out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(chans[..., c], dtype=np.float32))
                                   .resize((width, height), resample)) for c in range(chans.shape[-1])], -1)
        out = out[..., 0] if image.ndim == 2 else out
        out = out.astype(image.dtype, copy=False)
    return out, scale_K(K, width / w0, height / h0)

