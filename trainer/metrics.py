"""Evaluation metrics of depth completion, KITTI DC and NYUv2, in numpy (no torch: `trainer score` is light).

Every metric is computed per image on the pixels with ground truth, then averaged over images,
as the official KITTI devkit (evaluate_depth.cpp) does; an image without any valid GT pixel is
skipped and counted apart, never scored as zero. Sums run in float64 (the devkit uses float32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.depth import decode_depth_png

PRED_FLOOR_M = 1.0 / 256  # smallest depth a KITTI PNG holds; keeps 1/pred finite for non-positive output

KITTI_KEYS = ("rmse_mm", "mae_mm", "irmse_per_km", "imae_per_km")
NYU_KEYS = ("rmse_m", "rel", "delta1", "delta2", "delta3")
METRIC_KEYS = {"kitti": KITTI_KEYS, "nyu": NYU_KEYS}
LABELS = {"rmse_mm": "RMSE [mm]", "mae_mm": "MAE [mm]", "irmse_per_km": "iRMSE [1/km]",
          "imae_per_km": "iMAE [1/km]", "rmse_m": "RMSE [m]", "rel": "REL",
          "delta1": "δ<1.25", "delta2": "δ<1.25²", "delta3": "δ<1.25³"}


def _valid_pairs(pred_m: np.ndarray, gt_m: np.ndarray, floor: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    pred = np.asarray(pred_m, dtype=np.float64)
    gt = np.asarray(gt_m, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    valid = np.isfinite(gt) & (gt > 0)
    if not valid.any():
        return None
    p = pred[valid]
    if floor:
        p = np.where(np.isfinite(p), np.maximum(p, PRED_FLOOR_M), PRED_FLOOR_M)
    return p, gt[valid]


def kitti_metrics(pred_m: np.ndarray, gt_m: np.ndarray, floor: bool = True) -> dict[str, float] | None:
    """KITTI DC metrics of one image, or None when no GT pixel is valid (the image is skipped).

    Over the n pixels with gt > 0, with depths d (prediction) and g (GT) in metres:
        RMSE [mm]   = 1000 * sqrt( (1/n) sum (d - g)^2 )
        MAE  [mm]   = 1000 * (1/n) sum |d - g|
        iRMSE [1/km] = sqrt( (1/n) sum (1000/d - 1000/g)^2 )      (1/m * 1000 = 1/km)
        iMAE  [1/km] = (1/n) sum |1000/d - 1000/g|
    The devkit computes in m and 1/m; the leaderboard's mm and 1/km are those x 1000. Predictions
    that are non-positive or not finite are read as PRED_FLOOR_M = 1/256 m, the smallest depth a
    submission PNG can hold (a 0 there means "no value", which score_dirs fills as the devkit does).
    floor=False takes the values as they are (score_dirs: a filled PNG, where the devkit's -1 m marks
    what its fill leaves empty).
    """
    pair = _valid_pairs(pred_m, gt_m, floor)
    if pair is None:
        return None
    d, g = pair
    err = d - g
    inv_err = 1000.0 / d - 1000.0 / g
    return {
        "rmse_mm": 1000.0 * float(np.sqrt(np.mean(err**2))),
        "mae_mm": 1000.0 * float(np.mean(np.abs(err))),
        "irmse_per_km": float(np.sqrt(np.mean(inv_err**2))),
        "imae_per_km": float(np.mean(np.abs(inv_err))),
    }


def nyu_metrics(pred_m: np.ndarray, gt_m: np.ndarray, floor: bool = True) -> dict[str, float] | None:
    """NYUv2 metrics of one image, or None when no GT pixel is valid.

    Over the n pixels with gt > 0 (d, g in metres):
        RMSE [m] = sqrt( (1/n) sum (d - g)^2 );   REL = (1/n) sum |d - g| / g
        delta_k  = (1/n) #{ max(d/g, g/d) < 1.25^k },  k = 1, 2, 3   (fractions in 0..1)
    Non-positive predictions are read as PRED_FLOOR_M, as in kitti_metrics (unless floor=False).
    """
    pair = _valid_pairs(pred_m, gt_m, floor)
    if pair is None:
        return None
    d, g = pair
    ratio = np.maximum(d / g, g / d)
    return {
        "rmse_m": float(np.sqrt(np.mean((d - g) ** 2))),
        "rel": float(np.mean(np.abs(d - g) / g)),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
    }


_METRIC_FNS = {"kitti": kitti_metrics, "nyu": nyu_metrics}


def rmse_mae_m(pred_m: np.ndarray, gt_m: np.ndarray, region: np.ndarray | None = None) -> dict[str, float] | None:
    """RMSE and MAE in metres of one image over the pixels with GT (and inside `region`, a boolean mask,
    when given), or None when there is no such pixel. Predictions that are not positive or not finite
    count as PRED_FLOOR_M, as in kitti_metrics. What validation during training and the ablation score."""
    gt = np.asarray(gt_m)
    if region is not None:
        region = np.asarray(region, bool)
        if region.shape != gt.shape:
            raise ValueError(f"region shape {region.shape} != ground truth shape {gt.shape}")
        gt = np.where(region, gt, 0)
    pair = _valid_pairs(pred_m, gt)
    if pair is None:
        return None
    err = pair[0] - pair[1]
    return {"rmse_m": float(np.sqrt(np.mean(err**2))), "mae_m": float(np.mean(np.abs(err)))}


class MetricAccumulator:
    """Per-image metrics, averaged over the images that had ground truth.

    acc = MetricAccumulator("kitti"); acc.add(pred_m, gt_m, name); acc.result()
    """

    def __init__(self, kind: str = "kitti"):
        if kind not in _METRIC_FNS:
            raise ValueError(f"kind must be one of {sorted(_METRIC_FNS)}, got {kind!r}")
        self.kind = kind
        self.per_image: list[dict] = []  # {"name", **metrics} or {"name", "skipped": True}

    def add(self, pred_m: np.ndarray, gt_m: np.ndarray, name: str | None = None,
            floor: bool = True) -> dict[str, float] | None:
        m = _METRIC_FNS[self.kind](pred_m, gt_m, floor)
        name = name if name is not None else str(len(self.per_image))
        self.per_image.append({"name": name, "skipped": True} if m is None else {"name": name, **m})
        return m

    def result(self) -> dict:
        """{"kind", "count" (images scored), "skipped" (no valid GT), "metrics": {key: mean or None}}."""
        scored = [r for r in self.per_image if not r.get("skipped")]
        keys = METRIC_KEYS[self.kind]
        means = {k: (float(np.mean([r[k] for r in scored])) if scored else None) for k in keys}
        return {"kind": self.kind, "count": len(scored), "skipped": len(self.per_image) - len(scored),
                "metrics": means}


# -----------------------------------------------------------------------------
# scoring PNG folders, as the devkit does

DEVKIT_MISSING_M = -1.0  # what the devkit's io_depth.h holds for "no value" and scores as is


def read_depth_png(path: str | Path) -> np.ndarray:
    """A KITTI-style uint16 depth PNG as float32 metres (value / 256, 0 = no value)."""
    path = Path(path)
    return decode_depth_png(path.read_bytes(), what=str(path))


def fill_invalid_like_devkit(depth_m: np.ndarray) -> np.ndarray:
    """The devkit's DepthImage::interpolateBackground on a prediction (0 = no value).

    Per row: a run of missing pixels between two valid ones takes the smaller (nearer) of the two;
    missing pixels before the first / after the last valid one of the row take that value. Then per
    column, rows left fully empty above the first / below the last filled row take that row's value.
    Empty rows between filled rows stay what the devkit leaves there, its "invalid" -1, which it
    then scores as a depth of -1 m (raw LiDAR scans, scored as a baseline, have many such rows).
    """
    d = np.array(depth_m, dtype=np.float32)
    valid = d > 0
    if valid.all() or not valid.any():
        return d
    h, w = d.shape
    cols = np.broadcast_to(np.arange(w), (h, w))
    prev = np.maximum.accumulate(np.where(valid, cols, -1), axis=1)
    nxt = np.minimum.accumulate(np.where(valid, cols, w)[:, ::-1], axis=1)[:, ::-1]
    left = np.take_along_axis(d, prev.clip(0, w - 1), axis=1)
    right = np.take_along_axis(d, nxt.clip(0, w - 1), axis=1)
    has_l, has_r = prev >= 0, nxt < w
    fill = np.where(has_l & has_r, np.minimum(left, right), np.where(has_l, left, right))
    row_ok = valid.any(axis=1)
    d = np.where(valid, d, np.where(row_ok[:, None], fill, DEVKIT_MISSING_M)).astype(np.float32)
    rows = np.flatnonzero(row_ok)
    d[: rows[0]] = d[rows[0]]
    d[rows[-1] + 1:] = d[rows[-1]]
    return d


def _kitti_aliases(gt_name: str) -> list[str]:
    # val_selection_cropped names GT "..._groundtruth_depth_..." and the inputs "..._velodyne_raw_..."
    # / "..._image_..."; a prediction named after either input is accepted.
    if "_groundtruth_depth_" not in gt_name:
        return []
    return [gt_name.replace("_groundtruth_depth_", f"_{x}_") for x in ("velodyne_raw", "image")]


def score_dirs(pred_dir: str | Path, gt_dir: str | Path, kind: str = "kitti") -> dict:
    """Score every GT PNG of gt_dir against the prediction PNG of the same name in pred_dir.

    Both are KITTI-style uint16 depth PNGs (depth = value / 256 m, 0 = no value). A prediction's
    missing pixels are filled as the devkit does (fill_invalid_like_devkit). Returns
    MetricAccumulator.result() plus "per_image" (one dict per GT file, by sorted name) and
    "unused_predictions" (prediction PNGs without a GT). Raises FileNotFoundError naming the GT file
    that has no prediction, ValueError naming the file whose size differs or that holds no value.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gt_files = sorted(gt_dir.glob("*.png"))
    if not gt_files:
        raise FileNotFoundError(f"no .png ground truth files in {gt_dir}")
    acc = MetricAccumulator(kind)
    used = set()
    for gt_path in gt_files:
        names = [gt_path.name, *_kitti_aliases(gt_path.name)]
        pred_path = next((pred_dir / n for n in names if (pred_dir / n).is_file()), None)
        if pred_path is None:
            raise FileNotFoundError(f"no prediction for ground truth {gt_path} (looked for "
                                    + ", ".join(str(pred_dir / n) for n in names) + ")")
        used.add(pred_path.name)
        gt, pred = read_depth_png(gt_path), read_depth_png(pred_path)
        if pred.shape != gt.shape:
            raise ValueError(f"{pred_path}: size {pred.shape[1]}x{pred.shape[0]} differs from ground truth "
                             f"{gt_path} {gt.shape[1]}x{gt.shape[0]} (W x H)")
        if not (pred > 0).any():
            raise ValueError(f"{pred_path}: prediction holds no depth value (all pixels 0)")
        acc.add(fill_invalid_like_devkit(pred), gt, name=gt_path.name, floor=False)
    out = acc.result()
    out["per_image"] = acc.per_image
    out["unused_predictions"] = sorted(p.name for p in pred_dir.glob("*.png") if p.name not in used)
    return out


def format_table(result: dict) -> str:
    """A Markdown table of a result (MetricAccumulator.result / score_dirs) or of a flat metrics dict."""
    metrics = result.get("metrics", result)
    keys = [k for k in (*KITTI_KEYS, *NYU_KEYS) if k in metrics]
    head = [LABELS[k] for k in keys]
    row = ["n/a" if metrics[k] is None else f"{metrics[k]:.4f}" for k in keys]
    if "count" in result:
        head += ["images", "skipped"]
        row += [str(result["count"]), str(result.get("skipped", 0))]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"])
