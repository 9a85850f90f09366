"""`trainer eval --sweep`: one checkpoint under several sparse-input protocols, one table.

The field reports a model at several input densities: KITTI at 64/32/16/8 LiDAR lines, NYUv2 at
500/200/100/50 points (shared.sparsity has the protocols). The sweep loads the model once, evaluates
it under `full` (the reference, always first) and each setting asked for, and writes one table, JSON
and Markdown, with the metrics and the achieved input density of every setting.
"""

from __future__ import annotations

from pathlib import Path

from shared.fsutil import write_json
from shared.sparsity import Protocol, parse_sweep
from trainer.evaluate import InferenceOptions, metrics_of
from trainer.metrics import LABELS, METRIC_KEYS


def sweep(ckpt: str, shards, protocols: str | list[str], kind: str = "kitti",
          opts: InferenceOptions = InferenceOptions(), target: str = "gt", json_path: str | None = None,
          seed: int = 0) -> dict:
    """Metrics of one checkpoint under each setting of `protocols` (shared.sparsity.parse_sweep: e.g.
    "lines:64,32,16,8"; seed seeds points:N), with evaluate's options, which mean the same here (each row
    sets its own input protocol: opts.sparsity is not used).

    Returns {"rows": [{"protocol", "seed", "input_density_percent", "relative_density", "count",
    "skipped", "metrics"}, ...], checkpoint, model, ...}; rows start with `full`. json_path: the table as
    JSON there and as Markdown beside it (.md).
    """
    settings = parse_sweep(protocols, seed)
    if all(p.kind != "full" for p in settings):
        settings.insert(0, Protocol("full", None, seed))
    model, info = opts.load(ckpt)
    rows = []
    for p in settings:
        r = metrics_of(opts.predictions(model, info, shards, target, sparsity=p), kind)
        rows.append({**p.to_dict(), "input_density_percent": r["input_density_percent"], "count": r["count"],
                     "skipped": r["skipped"], "metrics": r["metrics"]})
    full = next(r["input_density_percent"] for r in rows if r["protocol"] == "full")
    for r in rows:
        r["relative_density"] = r["input_density_percent"] / full if full else None
    table = {"kind": kind, "checkpoint": str(info.get("path", ckpt)), "model": info.get("model_name"),
             "step": info.get("step"), "weights": opts.which, "target": target, "shards": str(shards),
             "crop": opts.crop, "convention": info["convention"], "rows": rows}
    if json_path:
        write_json(json_path, table)
        Path(json_path).with_suffix(".md").write_text(format_sweep(table) + "\n")
    return table


def format_sweep(table: dict) -> str:
    """The sweep as a Markdown table: one row per setting."""
    keys = METRIC_KEYS[table["kind"]]
    head = ["input", "density [%]", "vs full", *(LABELS[k] for k in keys), "images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        cells = [r["protocol"], f"{r['input_density_percent']:.3f}",
                 "n/a" if r["relative_density"] is None else f"{r['relative_density']:.3f}",
                 *("n/a" if r["metrics"][k] is None else f"{r['metrics'][k]:.4f}" for k in keys), str(r["count"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
