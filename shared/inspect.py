"""What is in a set of shards: counts, members, value ranges, LiDAR density, K; and a preview.

Labelled shards also get the teacher's accuracy against their GT, as Depth Anything reports zero-shot
relative depth (shared/relative_depth.py: AbsRel and delta1 after a per-image affine fit in disparity;
mean over images with a 95% bootstrap interval), per family (synthetic) or source: how good the teacher
is where the truth is known, e.g. the oracle's calibration on a held-out synthetic set.

The logic behind `datagen inspect`; kept in `shared` so it needs neither Ray nor Open3D.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from shared.preview import contact_sheet
from shared.relative_depth import depth_cap_for, mean_interval, relative_depth_errors
from shared.shard import ReadStats, Sample, iter_samples, list_shards


@dataclass
class _Range:
    lo: float = float("inf")
    hi: float = float("-inf")
    n: int = 0

    def add(self, arr: np.ndarray) -> None:
        v = arr[arr > 0]
        if v.size:
            self.lo, self.hi, self.n = min(self.lo, float(v.min())), max(self.hi, float(v.max())), self.n + 1


@dataclass
class Summary:
    shards: int = 0
    samples: int = 0
    skipped: int = 0
    members: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    ranges: dict = field(default_factory=dict)
    density_pct: list = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    fx: list = field(default_factory=list)
    first_K: list | None = None
    errors: list = field(default_factory=list)
    teacher_vs_gt: dict = field(default_factory=dict)  # family or source -> list of per-image scores

    def as_dict(self) -> dict:
        dens = np.array(self.density_pct) if self.density_pct else None
        return {
            "shards": self.shards,
            "samples": self.samples,
            "skipped": self.skipped,
            "sources": dict(self.sources),
            "members": dict(self.members),
            "sizes": {f"{w}x{h}": n for (w, h), n in self.sizes.items()},
            "ranges": {k: {"min": r.lo, "max": r.hi, "samples": r.n} for k, r in self.ranges.items()},
            "lidar_density_pct": None if dens is None else
            {"mean": float(dens.mean()), "min": float(dens.min()), "max": float(dens.max())},
            "fx_px": None if not self.fx else {"min": min(self.fx), "max": max(self.fx)},
            "first_K": self.first_K,
            "errors": self.errors[:20],
            "teacher_vs_gt": {k: {"images": len(v), "absrel": mean_interval([r["absrel"] for r in v]),
                                  "delta1": mean_interval([r["delta1"] for r in v])}
                              for k, v in sorted(self.teacher_vs_gt.items())},
        }


def summarize(spec, limit: int | None = None, keep: int = 0) -> tuple[Summary, list[Sample]]:
    """Read every sample (or the first `limit`), tolerating bad ones, and gather statistics.

    Returns the summary and the first `keep` samples (for a preview).
    """
    shards = list_shards(spec)
    s = Summary(shards=len(shards))
    stats = ReadStats()
    kept: list[Sample] = []
    for sample in iter_samples(shards, strict=False, stats=stats):
        s.samples += 1
        s.sources[sample.meta.get("source", "?")] += 1
        s.sizes[(sample.width, sample.height)] += 1
        for m in sample.meta.get("members", []):
            s.members[m] += 1
        for name in ("teacher", "depth", "sparse", "gt"):
            arr = getattr(sample, name)
            if arr is not None:
                s.ranges.setdefault(name, _Range()).add(arr)
        if sample.sparse is not None:
            s.density_pct.append(100.0 * np.count_nonzero(sample.sparse) / sample.sparse.size)
        if sample.teacher is not None and sample.gt is not None:
            score = relative_depth_errors(sample.teacher, sample.gt, depth_cap_for(sample.gt))
            if score is not None:
                group = sample.meta.get("family") or sample.meta.get("source", "?")
                s.teacher_vs_gt.setdefault(group, []).append(score)
        s.fx.append(float(sample.K[0, 0]))
        if s.first_K is None:
            s.first_K = sample.K.tolist()
        if len(kept) < keep:
            kept.append(sample)
        if limit and s.samples >= limit:
            break
    s.skipped, s.errors = stats.skipped, stats.reasons
    return s, kept


def format_summary(s: Summary) -> str:
    d = s.as_dict()
    lines = [
        f"shards            {d['shards']}",
        f"samples           {d['samples']}  (unreadable, skipped: {d['skipped']})",
        f"sources           {d['sources']}",
        f"image sizes (WxH) {d['sizes']}",
        "members           " + ", ".join(f"{k}: {v}" for k, v in sorted(d["members"].items())),
    ]
    for name, r in d["ranges"].items():
        unit = "(relative)" if name == "teacher" else "m"
        lines.append(f"{name + ' range':<18}{r['min']:.3f} .. {r['max']:.3f} {unit}")
    if d["lidar_density_pct"]:
        x = d["lidar_density_pct"]
        lines.append(f"LiDAR density     {x['mean']:.2f}% of pixels (min {x['min']:.2f}%, max {x['max']:.2f}%)")
    if d["fx_px"]:
        lines.append(f"fx                {d['fx_px']['min']:.1f} .. {d['fx_px']['max']:.1f} px")
    if d["first_K"]:
        lines.append(f"K (first sample)  {np.round(np.array(d['first_K']), 2).tolist()}")
    for group, t in d["teacher_vs_gt"].items():
        a, d1 = t["absrel"], t["delta1"]
        lines.append(f"teacher vs GT     {group}: AbsRel {a[0]:.4f} [{a[1]:.4f}, {a[2]:.4f}], delta1 {d1[0]:.4f} "
                     f"[{d1[1]:.4f}, {d1[2]:.4f}] over {t['images']} images (affine fit in disparity, 95% interval)")
    for e in d["errors"][:5]:
        lines.append(f"error             {e}")
    return "\n".join(lines)


def preview(samples: list[Sample], path: str) -> None:
    """Contact sheet: RGB | teacher | dense depth | LiDAR dots over RGB | GT, one row per sample."""
    rows = []
    for s in samples:
        rows.append({
            f"{s.key}: RGB": s.rgb,
            "teacher (rel)": s.teacher,
            "dense depth": s.depth,
            f"LiDAR ({0 if s.sparse is None else np.count_nonzero(s.sparse)} pts)":
                None if s.sparse is None else ("dots", s.rgb, s.sparse),
            "GT": s.gt,
        })
    if not rows:
        raise ValueError("no readable samples to preview")
    contact_sheet(rows, path)
