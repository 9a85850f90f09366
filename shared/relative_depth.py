"""How close a relative disparity map is to the true depth: the zero-shot relative-depth protocol.

Depth Anything (V1 and V2) reports zero-shot relative depth as MiDaS does: the prediction t is a
disparity known up to scale and shift, so per image
    s, b      = argmin sum_valid (s t + b - 1 / g)^2        least squares in disparity (1 / metres)
    aligned   = 1 / max(s t + b, 1 / cap)                   depth in metres; cap = the data set's depth cap
    AbsRel    = mean_valid |aligned - g| / g
    delta1    = share of valid pixels with max(aligned / g, g / aligned) < 1.25
over the valid pixels: GT depth g finite, 0 < g <= cap. The cap is 80 m for KITTI and 10 m for NYUv2
(MiDaS' evaluation clamps the aligned disparity at 1 / cap, so a teacher that calls a surface sky
costs a bounded error). Scores are per image, then averaged over images.

Used by bench/teacher_calibration.py (the oracle teacher against Depth Anything V2's published table)
and `datagen inspect` (the teacher of labelled shards against their GT).
"""

from __future__ import annotations

import numpy as np

OUTDOOR_CAP_M = 80.0  # KITTI
INDOOR_CAP_M = 10.0   # NYUv2


def fit_scale_shift(teacher: np.ndarray, depth_m: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """Least-squares s, b of s * teacher + b = 1 / depth on the valid pixels."""
    t = np.asarray(teacher, np.float64)[valid]
    y = 1.0 / np.asarray(depth_m, np.float64)[valid]
    A = np.stack([t, np.ones_like(t)], 1)
    (s, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(s), float(b)


def relative_depth_errors(teacher: np.ndarray, depth_m: np.ndarray, cap_m: float,
                          valid: np.ndarray | None = None) -> dict | None:
    """AbsRel and delta1 of one image after the affine fit in disparity (module docstring), with the
    fitted scale and shift and the pixel count; None when fewer than 2 pixels are valid."""
    t = np.asarray(teacher, np.float64)
    g = np.asarray(depth_m, np.float64)
    if t.shape != g.shape:
        raise ValueError(f"teacher shape {t.shape} != depth shape {g.shape}")
    ok = np.isfinite(g) & (g > 0) & (g <= cap_m) & np.isfinite(t)
    if valid is not None:
        ok &= valid
    if ok.sum() < 2:
        return None
    s, b = fit_scale_shift(t, g, ok)
    aligned = 1.0 / np.maximum(s * t[ok] + b, 1.0 / cap_m)
    gt = g[ok]
    ratio = np.maximum(aligned / gt, gt / aligned)
    return {"absrel": float(np.mean(np.abs(aligned - gt) / gt)), "delta1": float(np.mean(ratio < 1.25)),
            "scale": s, "shift": b, "pixels": int(ok.sum())}


def depth_cap_for(gt_m: np.ndarray) -> float:
    """The protocol's cap for an image whose data set is not named: NYUv2's 10 m when no GT pixel lies
    beyond it (an indoor scene), else KITTI's 80 m."""
    g = np.asarray(gt_m)
    return INDOOR_CAP_M if not (np.isfinite(g) & (g > INDOOR_CAP_M)).any() else OUTDOOR_CAP_M


def mean_interval(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-scene values and its percentile-bootstrap interval over scenes: (mean, low, high).
    With a single value the interval is that value."""
    from scipy.stats import bootstrap  # lazy: shared must import without scipy

    x = np.asarray(list(values), np.float64)
    if x.size == 0:
        raise ValueError("mean_interval: no values")
    if x.size == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0]), float(x[0])
    res = bootstrap((x,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(x.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)
