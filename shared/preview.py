"""Pictures of samples for people: depth with a perceptual colour map and a colour bar in metres.

matplotlib with the Agg backend (no screen needed). Used by `datagen inspect --preview` and by
`trainer predict` / the demo for previews of predictions and errors.
"""

from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def depth_limits(*maps: np.ndarray | None) -> tuple[float, float]:
    """A shared colour range over the valid (> 0) values of several depth maps (2nd-98th pct)."""
    vals = np.concatenate([m[m > 0].ravel() for m in maps if m is not None and np.any(m > 0)] or [np.ones(1)])
    lo, hi = np.percentile(vals, [2, 98])
    return float(lo), float(max(hi, lo + 1e-3))


def colorize(depth: np.ndarray, vmin: float, vmax: float, cmap: str = "turbo_r") -> np.ndarray:
    """H x W x 3 uint8 picture of a depth map; pixels without a value are black."""
    plt = _plt()
    t = np.clip((depth - vmin) / max(vmax - vmin, 1e-9), 0, 1)
    rgb = (plt.get_cmap(cmap)(t)[..., :3] * 255).astype(np.uint8)
    rgb[~(depth > 0)] = 0
    return rgb


def sparse_overlay(rgb: np.ndarray, sparse: np.ndarray, vmin: float, vmax: float, radius: int = 1) -> np.ndarray:
    """The RGB image darkened, with each LiDAR point drawn as a coloured dot."""
    out = (rgb.astype(np.float32) * 0.45).astype(np.uint8)
    colours = colorize(sparse, vmin, vmax)
    vs, us = np.nonzero(sparse > 0)
    h, w = sparse.shape
    for dv in range(-radius + 1, radius):
        for du in range(-radius + 1, radius):
            v, u = np.clip(vs + dv, 0, h - 1), np.clip(us + du, 0, w - 1)
            out[v, u] = colours[vs, us]
    return out


def contact_sheet(rows: list[dict], path: str, title: str | None = None, cmap: str = "turbo_r",
                  limits: tuple[float, float] | None = None) -> None:
    """Write a PNG with one row per sample and one panel per entry of each row.

    Each row is an ordered dict of panel title -> array: H x W x 3 uint8 shown as an image, H x W
    float depth in metres shown with the colour map and a colour bar, or ("dots", rgb, sparse) for
    LiDAR points over the image. Panels whose array is None say "absent". Titles ending with
    "(rel)" are relative maps (the teacher) and get a unitless bar; "error" panels a signed one.
    """
    plt = _plt()
    ncols = max(len(r) for r in rows)
    first = next(v for r in rows for v in r.values() if v is not None and not isinstance(v, tuple))
    h, w = first.shape[:2]
    panel_w = 3.2
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(panel_w * ncols, panel_w * h / w * len(rows) + 0.6), squeeze=False
    )
    for r, row in enumerate(rows):
        depths = [v for k, v in row.items() if isinstance(v, np.ndarray) and v.ndim == 2 and "rel" not in k
                  and "error" not in k]
        dots = [v[2] for v in row.values() if isinstance(v, tuple)]
        vmin, vmax = limits if limits is not None else depth_limits(*depths, *dots)
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(row):
                continue
            name, val = list(row.items())[c]
            ax.set_title(name, fontsize=8)
            if val is None:
                ax.text(0.5, 0.5, "absent", ha="center", va="center", transform=ax.transAxes)
                continue
            if isinstance(val, tuple):
                ax.imshow(sparse_overlay(val[1], val[2], vmin, vmax))
                sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(vmin, vmax))
                fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.02, label="m")
            elif val.ndim == 3:
                ax.imshow(val)
            elif "error" in name:
                lim = float(np.percentile(np.abs(val[np.isfinite(val)]), 98)) if np.isfinite(val).any() else 1.0
                im = ax.imshow(np.where(np.isfinite(val), val, 0), cmap="coolwarm", vmin=-lim, vmax=lim)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="m")
            elif "rel" in name:
                valid = val[val > 0]
                lo, hi = (np.percentile(valid, [2, 98]) if valid.size else (0.0, 1.0))
                im = ax.imshow(np.ma.masked_where(~(val > 0), val), cmap="magma", vmin=lo, vmax=max(hi, lo + 1e-6))
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="disparity (rel.)")
            else:
                im = ax.imshow(np.ma.masked_where(~(val > 0), val), cmap=cmap, vmin=vmin, vmax=vmax)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="m")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
