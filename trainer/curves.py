"""Learning curves from log.csv: the training loss and the validation metrics against the step.

    plot_run(run_dir)                    RUN/curves.png: one run (written by `trainer pretrain|finetune` at its end)
    plot_runs({variant: [run_dirs]}, f)  several runs in one figure: one colour per variant, each seed a thin
                                         line, their mean a thick one (the ablation's curves.png)

matplotlib's object API with the Agg canvas: no screen, no pyplot state.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

# (column, panel title); the top-row columns are drawn only where they hold numbers
PANELS = (("loss", "training loss"), ("val_rmse_m", "validation RMSE (m)"), ("val_mae_m", "validation MAE (m)"),
          ("val_top_rmse_m", "validation RMSE, top rows (m)"), ("val_top_mae_m", "validation MAE, top rows (m)"))


def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """log.csv as {column: float array} (empty cells: NaN). Raises FileNotFoundError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no log.csv (a run directory of trainer pretrain|finetune was expected)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = list(reader.fieldnames or [])

    def num(x: str | None) -> float:
        try:
            return float(x) if x not in (None, "") else math.nan
        except ValueError:
            return math.nan

    return {c: np.array([num(r.get(c)) for r in rows], np.float64) for c in columns}


def series(log: dict[str, np.ndarray], column: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one column where it holds a number; a step logged twice (a resumed run repeats its
    last validation) keeps its last value."""
    if column not in log or "step" not in log:
        return np.zeros(0), np.zeros(0)
    steps, vals = log["step"], log[column]
    ok = np.isfinite(steps) & np.isfinite(vals)
    by_step = dict(zip(steps[ok].astype(int).tolist(), vals[ok].tolist(), strict=True))
    keys = sorted(by_step)
    return np.array(keys, np.int64), np.array([by_step[k] for k in keys], np.float64)


def _figure(n_panels: int, ncols: int):
    from matplotlib.figure import Figure

    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    return fig, axes


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """RUN/curves.png (or `out`): training loss, validation RMSE and MAE (overall solid, top rows dashed)
    against the step. Panels without data say so."""
    run_dir = Path(run_dir)
    log = read_log(run_dir)
    out = Path(out) if out else run_dir / "curves.png"
    fig, axes = _figure(3, 3)
    steps, loss = series(log, "loss")
    axes[0].plot(steps, loss, color="C0")
    axes[0].set_title("training loss")
    if len(loss) and np.all(loss > 0):
        axes[0].set_yscale("log")
    for ax, metric, title in ((axes[1], "rmse_m", "validation RMSE (m)"), (axes[2], "mae_m", "validation MAE (m)")):
        ax.set_title(title)
        drawn = False
        for col, style, label in ((f"val_{metric}", "-o", "whole frame"), (f"val_top_{metric}", "--s", "top rows")):
            x, y = series(log, col)
            if len(x):
                ax.plot(x, y, style, markersize=3, label=label, color="C1")
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no validation\n(--val-shards)", ha="center", va="center", transform=ax.transAxes)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir.name))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean of several runs' (steps, values) at the steps all of them logged."""
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return np.zeros(0, np.int64), np.zeros(0)
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
    if not common:
        return np.zeros(0, np.int64), np.zeros(0)
    vals = [np.array([dict(zip(s.tolist(), v.tolist(), strict=True))[k] for k in common]) for s, v in curves]
    return np.array(common, np.int64), np.mean(vals, axis=0)


def plot_runs(groups: dict[str, list[str | Path]], out: str | Path, title: str | None = None) -> dict:
    """One figure of several variants' runs: a panel per PANELS entry, a colour per variant, each run (seed) a
    thin line and the mean over its runs a thick one. Returns what was drawn, {variant: {column: (steps,
    mean)}}. Each run's steps are its own stage's (pre-training and fine-tuning runs share the axis)."""
    logs = {v: [read_log(r) for r in runs] for v, runs in groups.items()}
    fig, axes = _figure(len(PANELS) + 1, 3)
    drawn: dict[str, dict] = {v: {} for v in groups}
    for ax, (col, name) in zip(axes, PANELS, strict=False):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        any_data = False
        for i, (variant, runs) in enumerate(logs.items()):
            curves = [series(log, col) for log in runs]
            for x, y in curves:
                if len(x) and len(runs) > 1:
                    ax.plot(x, y, color=f"C{i}", linewidth=0.7, alpha=0.4)
            x, y = mean_curve(curves)
            if len(x):
                ax.plot(x, y, color=f"C{i}", linewidth=2.0, label=variant, marker="o" if col != "loss" else None,
                        markersize=3)
                drawn[variant][col] = (x, y)
                any_data = True
        if col == "loss" and any_data and all(np.all(d[col][1] > 0) for d in drawn.values() if col in d):
            ax.set_yscale("log")
        if not any_data:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    legend_ax = axes[len(PANELS)]
    legend_ax.set_axis_off()
    handles, labels = [], []
    for ax in axes[: len(PANELS)]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        legend_ax.legend(handles, labels, loc="center", fontsize=9,
                         title="thick: mean over seeds; thin: each seed")
    for ax in axes[len(PANELS) + 1:]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return drawn
