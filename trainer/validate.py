"""Validation during training (`trainer pretrain|finetune --val-shards DIR`).

Every --val-every steps and at the end of a run, rank 0 runs the EMA network over the validation shards
as `trainer eval` does (trainer.evaluate.iter_predictions: the whole frame padded to a multiple of 32,
fp32, no gradient, one sample at a time in shard order, no augmentation) and scores each image in metres:

    val_rmse_m, val_mae_m            RMSE and MAE over the pixels with GT, per image, then the mean over images
    val_top_rmse_m, val_top_mae_m    the same in the top R rows only (--val-top-rows R: the rows above every
                                     label of the fine-tuning set, where only the teacher and the
                                     pre-training teach anything); images without GT there are left out
    val_images, val_top_images       how many images each mean is over
    val_s                            seconds the validation took

Validation reads its own loader with its own generator and touches neither the training data's position
nor any global random state, so a run with validation ends with the same weights as one without (tested).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch

from trainer.metrics import rmse_mae_m

VAL_COLUMNS = ("val_rmse_m", "val_mae_m", "val_top_rmse_m", "val_top_mae_m", "val_images", "val_top_images",
               "val_s")


def parse_top_rows(value: int | str | None) -> int | str | None:
    """--val-top-rows: a number of rows (>= 0), "auto" (derived from the fine-tuning shards' labels:
    unlabelled_rows), or None (no top-row metrics)."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        rows = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--val-top-rows must be a number of rows or 'auto', got {value!r}") from None
    if rows < 0:
        raise ValueError(f"--val-top-rows must be >= 0, got {rows}")
    return rows


def unlabelled_rows(shards) -> int:
    """How many rows from the top never hold a label (gt > 0) in any sample of a labelled shard set: the rows
    above every label. Reads the whole set once. Raises ValueError when no sample has gt.png."""
    from shared.shard import iter_samples

    top, labelled = None, False
    for s in iter_samples(shards):
        if s.gt is None:
            continue
        labelled = True
        rows = np.flatnonzero((s.gt > 0).any(axis=1))
        first = int(rows[0]) if len(rows) else s.height
        top = first if top is None else min(top, first)
    if not labelled:
        raise ValueError(f"{shards}: no sample has gt.png, so the rows above every label cannot be derived; "
                         "give --val-top-rows R instead")
    return top or 0


def check_val_shards(shards) -> None:
    """Fail before training when the validation set is missing or its first sample has no GT."""
    from shared.shard import iter_samples

    first = next(iter(iter_samples(shards)), None)
    if first is None:
        raise ValueError(f"--val-shards {shards}: no sample found")
    if first.gt is None:
        raise ValueError(f"--val-shards {shards}: sample {first.key} has no gt.png; validation needs ground "
                         "truth (a labelled set, e.g. datagen --labelled --gt dense)")


def score_images(pairs: Iterable[tuple[np.ndarray, np.ndarray]], top_rows: int | None = None) -> dict:
    """The val_* metrics of (prediction, GT) pairs in metres (see the module docstring), without val_s."""
    overall, top = [], []
    for pred, gt in pairs:
        m = rmse_mae_m(pred, gt)
        if m is not None:
            overall.append(m)
        if top_rows:
            region = np.zeros(gt.shape, bool)
            region[:top_rows] = True
            m = rmse_mae_m(pred, gt, region)
            if m is not None:
                top.append(m)

    def mean(items, key):
        return float(np.mean([x[key] for x in items])) if items else float("nan")

    return {"val_rmse_m": mean(overall, "rmse_m"), "val_mae_m": mean(overall, "mae_m"),
            "val_top_rmse_m": mean(top, "rmse_m"), "val_top_mae_m": mean(top, "mae_m"),
            "val_images": len(overall), "val_top_images": len(top)}


def validate(model: torch.nn.Module, shards, convention: str = "kitti", top_rows: int | None = None) -> dict:
    """The val_* metrics of `model` (in eval mode; the EMA copy during training) on the validation shards,
    with val_s, the seconds it took. Raises ValueError naming the shards when no image has GT."""
    from trainer.evaluate import iter_predictions

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        preds = iter_predictions(model, shards, convention=convention)
        result = score_images(((p.depth_m, p.gt) for p in preds if p.gt is not None), top_rows)
    finally:
        model.train(was_training)
    if result["val_images"] == 0:
        raise ValueError(f"--val-shards {shards}: no image with ground truth (gt.png) to validate against")
    return {**result, "val_s": time.perf_counter() - t0}


def as_checkpoint_meta(val: dict, shards, top_rows: int | None) -> dict:
    """What a checkpoint records of the validation made at its step (metadata "val")."""
    return {"rmse_m": val["val_rmse_m"], "mae_m": val["val_mae_m"], "top_rmse_m": val["val_top_rmse_m"],
            "top_mae_m": val["val_top_mae_m"], "images": val["val_images"], "top_images": val["val_top_images"],
            "top_rows": top_rows, "shards": str(shards)}
