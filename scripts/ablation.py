"""The paper's ablation on the synthetic world, where the true depth is known everywhere.

    python scripts/ablation.py --preset demo   # `make demo`: ~15 min on 2 CPU cores
    python scripts/ablation.py --preset cpu    # `make bench-synthetic SCALE=cpu`: ~2 h on 2 CPU cores
    python scripts/ablation.py --preset bench  # `make bench-synthetic`: larger, for more time or a GPU

The world models the paper's setting (docs/synthetic_world.md):
- pre-training side, "internet photos": mixed scene families (street, room, ...), a random camera per
  scene, a random LiDAR pattern and mount per scene with an ideal sensor, and pseudo depth from the
  oracle teacher (the errors of a real monocular model) placed between a random near and far;
- target side, "KITTI": street scenes through one fixed rig (datagen/world/rig.py: KITTI's camera scaled
  to the frame, an hdl64 scaled with it on KITTI's mount, range noise and dropout), semi-dense GT
  accumulated from 11 scans (nothing above the top laser's reach), and held-out scenes from a seed
  nobody trained or tuned on, with dense GT.

Steps, each a call of the project's own command lines (so this is also an end-to-end test of them):
1. `datagen run --source synthetic` for the three sets.
2. `trainer pretrain`, then `trainer finetune` for: no pre-training (full losses), pre-training then
   L_sup only, pre-training then L_sup + L_SSI + L_reg (the full method); each fine-tuning once per
   training seed (--seeds).
3. `trainer predict` on the held-out scenes; RMSE and MAE per image, overall and in the rows that never
   had a training label (above every label of the fine-tuning set), against nearest-neighbour
   interpolation of the sparse input and the pre-trained model used zero-shot.
4. For every variant, its difference from the full method with a 95% bootstrap interval over the
   held-out scenes (per-scene errors averaged over the training seeds, then scenes resampled); a
   difference is called significant when its interval excludes 0.

The demo writes its unlabelled set to shards/synthetic (datagen's default output) and everything
else under --out (default runs/demo): the labelled sets, one run directory (with checkpoints) per
variant and seed, predictions, previews/, shards_preview.png, results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.depth import decode_depth_png  # noqa: E402
from shared.preview import contact_sheet, depth_limits  # noqa: E402
from shared.shard import iter_samples  # noqa: E402
from trainer.checkpoint import latest_checkpoint  # noqa: E402


@dataclass
class Preset:
    width: int
    height: int
    n_pretrain: int
    n_finetune: int
    n_eval: int
    model: str
    crop: str
    batch_size: int
    pretrain_steps: int
    finetune_steps: int
    pretrain_lr: float
    finetune_lr: float
    shard_size: int
    seeds: int = 1          # fine-tuning runs per variant, seeds 0 .. seeds-1
    workers: int = 2
    previews: int = 3
    bootstrap: int = 2000   # resamples of the held-out scenes


PRESETS = {
    # demo: ~15 min on 2 CPU cores. The tiny network on 64x192 crops is what fits; the images stay
    # 384x128 and predictions are made on the whole frame.
    "demo": Preset(width=384, height=128, n_pretrain=300, n_finetune=48, n_eval=32, model="tiny",
                   crop="64x192", batch_size=8, pretrain_steps=300, finetune_steps=120,
                   pretrain_lr=2e-3, finetune_lr=1e-3, shard_size=50),
    # cpu: the demo's frame and crop with ~5x the data, the bpnet-s network and three fine-tuning
    # seeds; about 2 h on 2 CPU cores (`make bench-synthetic SCALE=cpu`; its table is in the README).
    "cpu": Preset(width=384, height=128, n_pretrain=1500, n_finetune=200, n_eval=100, model="bpnet-s",
                  crop="64x192", batch_size=8, pretrain_steps=1000, finetune_steps=200,
                  pretrain_lr=1e-3, finetune_lr=5e-4, shard_size=100, seeds=3),
    "bench": Preset(width=608, height=192, n_pretrain=4000, n_finetune=400, n_eval=200, model="bpnet-s",
                    crop="192x608", batch_size=8, pretrain_steps=4000, finetune_steps=1500,
                    pretrain_lr=1e-3, finetune_lr=5e-4, shard_size=100, seeds=3),
}

VARIANTS = [
    ("nearest", "sparse input densified by nearest-neighbour interpolation (no learning)"),
    ("teacher", "the teacher's map, scale and shift fitted in disparity to the LiDAR points (no learning)"),
    ("finetune_only", "fine-tuning only, L_sup + L_SSI + L_reg (no pre-training)"),
    ("pretrain_only", "pre-training only (zero-shot)"),
    ("pretrain_sup", "pre-training, then fine-tuning with L_sup only"),
    ("full", "pre-training, then fine-tuning with L_sup + L_SSI + L_reg (the full method)"),
]
REGIONS = ("overall", "no_label")
METRICS = ("rmse_m", "mae_m")
SEEDS = {"pretrain": 1, "finetune": 2, "eval": 3}  # datagen --seed of each set: three disjoint worlds


# ----------------------------------------------------------------------------------------------------
# running the project's commands


def tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def run(cmd: list[str], log: Path, every_s: float = 5.0) -> None:
    """Run one command, its whole output into `log`; on the console its log lines and, at most every
    `every_s` seconds, its latest progress-bar state (step, loss, time left), so no minute is silent."""
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, bufsize=0)
        pending, last_shown, status = b"", 0.0, ""
        while chunk := proc.stdout.read(4096):
            pending += chunk
            *pieces, pending = re.split(rb"(\r|\n)", pending)
            for text, sep in zip(pieces[::2], pieces[1::2], strict=True):
                line = text.decode(errors="replace").strip()
                if not line:
                    continue
                if sep == b"\n":  # a log line: keep it
                    f.write(line + "\n")
                    print("  " + line, flush=True)
                else:  # a progress-bar redraw: show the latest one every few seconds
                    status = line
            if status and time.time() - last_shown >= every_s:
                print("  " + status, flush=True)
                f.write(status + "\n")
                last_shown, status = time.time(), ""
        proc.wait()
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        sys.exit(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))
    print(f"  done in {time.time() - t0:.0f} s", flush=True)


def datagen_command(p: Preset, kind: str, n: int, dest: Path) -> list[str]:
    """The `datagen run` argv of one set (pretrain, finetune or eval)."""
    common = ["--source", "synthetic", "--out", str(dest), "--limit", str(n), "--seed", str(SEEDS[kind]),
              "--width", str(p.width), "--height", str(p.height), "--workers", str(p.workers),
              "--shard-size", str(p.shard_size), "--progress", "log"]
    if kind == "pretrain":  # internet photos: every family, a random camera, LiDAR pattern and mount
        extra = ["--family", "mixed", "-o", "camera=random", "--lidar", "random", "--mount", "random"]
    else:  # the target: KITTI-like street scenes through one fixed rig
        gt = "accumulated" if kind == "finetune" else "dense"
        extra = ["--family", "street", "--labelled", "--gt", gt, "-o", "rig=kitti"]
    return [tool("datagen"), "run", *common, *extra]


def generate(p: Preset, out: Path, pretrain_root: Path, log: Path) -> tuple[dict[str, Path], list[str]]:
    sets = {"pretrain": (p.n_pretrain, pretrain_root), "finetune": (p.n_finetune, out / "data" / "finetune"),
            "eval": (p.n_eval, out / "data" / "eval")}
    dirs, commands = {}, {}
    for kind, (n, dest) in sets.items():
        commands[kind] = datagen_command(p, kind, n, dest)
        run(commands[kind], log)
        dirs[kind] = dest / "synthetic"
    # what a person looks at first: the pre-training shards, as `datagen inspect` shows them
    run([tool("datagen"), "inspect", str(dirs["pretrain"]), "--preview", str(out / "shards_preview.png"),
         "--samples", "4", "--json", str(out / "shards_summary.json")], log)
    return dirs, commands["eval"]


def train(p: Preset, data: dict[str, Path], out: Path, log: Path) -> dict[str, list[Path]]:
    """Run directories per variant, one per fine-tuning seed (pre-training runs once)."""
    common = ["--model", p.model, "--batch-size", str(p.batch_size), "--crop", p.crop]
    pre = out / "runs" / "pretrain"
    run([tool("trainer"), "pretrain", "--shards", str(data["pretrain"]), "--out", str(pre),
         "--steps", str(p.pretrain_steps), "--lr", str(p.pretrain_lr), *common], log)
    runs: dict[str, list[Path]] = {"pretrain_only": [pre], "finetune_only": [], "pretrain_sup": [], "full": []}
    for seed in range(p.seeds):
        ft = ["--shards", str(data["finetune"]), "--steps", str(p.finetune_steps), "--lr", str(p.finetune_lr),
              "--seed", str(seed), *common]
        suffix = f"-seed{seed}" if p.seeds > 1 else ""
        variants = {"finetune_only": [], "pretrain_sup": ["--init", str(pre), "--lambda-ssi", "0", "--lambda-reg", "0"],
                    "full": ["--init", str(pre)]}
        for v, extra in variants.items():
            run_dir = out / "runs" / f"{v}{suffix}"
            run([tool("trainer"), "finetune", *ft, *extra, "--out", str(run_dir)], log)
            runs[v].append(run_dir)
    return runs


# ----------------------------------------------------------------------------------------------------
# scoring


def nearest_fill(sparse: np.ndarray) -> np.ndarray:
    """Every pixel takes the depth of the nearest LiDAR point (Euclidean in pixels)."""
    if not np.any(sparse > 0):
        return np.zeros_like(sparse)
    _, (iy, ix) = distance_transform_edt(sparse <= 0, return_indices=True)
    return sparse[iy, ix]


def teacher_fit(teacher: np.ndarray | None, sparse: np.ndarray, max_depth_m: float = 120.0) -> np.ndarray:
    """The teacher made metric by the LiDAR alone: s, b fitted by least squares so that s t + b matches
    1 / depth at the LiDAR points, depth = 1 / (s t + b) where that lies in 0.1 m .. max_depth_m; the
    nearest LiDAR point elsewhere (the teacher's sky, a failed fit). What distillation could give at most
    without learning, and an honest baseline for it."""
    fill = nearest_fill(sparse)
    if teacher is None:
        return fill
    pts = (sparse > 0) & (teacher > 0)
    if pts.sum() < 2:
        return fill
    A = np.stack([teacher[pts], np.ones(pts.sum())], 1).astype(np.float64)
    (a, b), *_ = np.linalg.lstsq(A, 1.0 / sparse[pts].astype(np.float64), rcond=None)
    disp = a * teacher.astype(np.float64) + b
    ok = (teacher > 0) & (disp >= 1.0 / max_depth_m) & (disp <= 10.0)
    return np.where(ok, 1.0 / np.where(ok, disp, 1.0), fill).astype(np.float32)


def region_errors(pred: np.ndarray, gt: np.ndarray, region: np.ndarray) -> dict | None:
    m = (gt > 0) & region
    if not m.any():
        return None
    err = np.where(pred[m] > 0, pred[m], 1 / 256) - gt[m]
    return {"rmse_m": float(np.sqrt(np.mean(err**2))), "mae_m": float(np.mean(np.abs(err)))}


def unlabelled_rows(finetune_dir: Path) -> int:
    """How many rows from the top never hold a label in any fine-tuning sample."""
    top = None
    for s in iter_samples(finetune_dir):
        rows = np.flatnonzero((s.gt > 0).any(axis=1))
        first = int(rows[0]) if len(rows) else s.height
        top = first if top is None else min(top, first)
    return top or 0


def target_density(eval_dir: Path) -> float:
    """Mean share of the held-out frames' pixels that carry a LiDAR point."""
    return float(np.mean([np.mean(s.sparse > 0) for s in iter_samples(eval_dir)]))


def score(preds: dict[str, list[Path]], eval_dir: Path, top_rows: int, out: Path, n_previews: int) -> dict:
    """Per-scene errors: {variant: {region: {metric: array (seeds x scenes)}}}, scenes in shard order.

    preds maps each learned variant to one prediction folder per seed; "nearest" and "teacher" (see
    teacher_fit) are computed here. The
    no-label region is the top `top_rows` rows. Writes previews of the first n_previews scenes.
    """
    errs = {v: {r: {m: [] for m in METRICS} for r in REGIONS} for v, _ in VARIANTS}
    shown = []
    for s in iter_samples(eval_dir):
        region = np.zeros_like(s.gt, dtype=bool)
        region[:top_rows] = True
        maps = {"nearest": [nearest_fill(s.sparse)], "teacher": [teacher_fit(s.teacher, s.sparse)]}
        for v, dirs in preds.items():
            maps[v] = [decode_depth_png((d / f"{s.key}.png").read_bytes()) for d in dirs]
        for v, per_seed in maps.items():
            for name, reg in (("overall", np.ones_like(region)), ("no_label", region)):
                e = [region_errors(pred, s.gt, reg) for pred in per_seed]
                for m in METRICS:
                    errs[v][name][m].append([x[m] if x else np.nan for x in e])
        if len(shown) < n_previews:
            shown.append((s, {v: ms[0] for v, ms in maps.items()}))
    previews(shown, out / "previews", top_rows)
    return {v: {r: {m: np.asarray(x, np.float64).T for m, x in d.items()} for r, d in rs.items()}
            for v, rs in errs.items()}


def bootstrap_ci(diff: np.ndarray, n: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `diff` (one value per scene) over n resamples of the scenes."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(errs: dict, n_boot: int) -> dict:
    """Per variant: the metrics (mean over scenes, then over seeds), each seed's, and the difference from
    the full method with its bootstrap interval (per-scene errors averaged over the seeds first)."""
    out = {}
    for v, _ in VARIANTS:
        entry = {"metrics": {}, "per_seed": {}, "vs_full": {}}
        for r in REGIONS:
            arr = {m: errs[v][r][m] for m in METRICS}
            scenes = int(np.isfinite(arr["rmse_m"][0]).sum())
            entry["metrics"][r] = {m: float(np.nanmean(a)) for m, a in arr.items()} | {"images": scenes}
            entry["per_seed"][r] = {m: np.nanmean(a, axis=1).tolist() for m, a in arr.items()}
            if v == "full":
                continue
            entry["vs_full"][r] = {}
            for m, a in arr.items():
                diff = np.nanmean(a, axis=0) - np.nanmean(errs["full"][r][m], axis=0)
                diff = diff[np.isfinite(diff)]
                lo, hi = bootstrap_ci(diff, n_boot)
                entry["vs_full"][r][m] = {"mean": float(diff.mean()), "ci95": [lo, hi],
                                          "significant": bool(lo > 0 or hi < 0)}
        out[v] = entry
    return out


def previews(shown, dest: Path, top_rows: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for s, maps in shown:
        row1 = {f"{s.key}: RGB": s.rgb, "LiDAR input": ("dots", s.rgb, s.sparse), "GT (true depth)": s.gt,
                "nearest": maps["nearest"]}
        row2 = {v: maps[v] for v in ("finetune_only", "pretrain_only", "pretrain_sup", "full")}
        row3 = {f"{v} error": np.where(s.gt > 0, maps[v] - s.gt, np.nan)
                for v in ("nearest", "finetune_only", "pretrain_sup", "full")}
        contact_sheet([row1, row2, row3], str(dest / f"{s.key}.png"), limits=depth_limits(s.gt),
                      title=f"{s.key}: the top {top_rows} rows never had a training label")


def table(summary: dict) -> str:
    """Markdown: the metrics of every variant and, for the others, the difference from the full method
    with its 95% interval; * marks a difference whose interval excludes 0."""
    def cell(v, r, m):
        val = summary[v]["metrics"][r][m]
        if v == "full":
            return f"{val:.3f}"
        d = summary[v]["vs_full"][r][m]
        star = "*" if d["significant"] else ""
        return f"{val:.3f} ({d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]{star})"

    lines = ["| variant | RMSE (m) | MAE (m) | RMSE, rows without labels (m) | MAE, rows without labels (m) |",
             "|---|---:|---:|---:|---:|"]
    for v, desc in VARIANTS:
        lines.append(f"| {v}: {desc} | " + " | ".join(cell(v, r, m) for r in REGIONS for m in METRICS) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# the job


def checkpoint_of(run_dir: Path | None) -> str | None:
    """The newest complete checkpoint file of a run directory (what `trainer eval --ckpt` takes)."""
    if run_dir is None:
        return None
    return str(latest_checkpoint(run_dir) or run_dir)


def machine() -> dict:
    """What produced the numbers: the commit, the CPU count, torch and the device."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"git_commit": commit, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "gpu": gpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--out", type=Path, default=None)
    for f in ("n_pretrain", "n_finetune", "n_eval", "pretrain_steps", "finetune_steps", "batch_size", "workers",
              "seeds", "bootstrap"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--crop", default=None, help="training crop HxW (multiples of 32)")
    ap.add_argument("--pretrain-lr", type=float, default=None)
    ap.add_argument("--finetune-lr", type=float, default=None)
    ap.add_argument("--pretrain-shards", type=Path, default=None,
                    help="where the unlabelled set goes (demo: shards/, i.e. shards/synthetic)")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    for k, v in vars(args).items():
        if v is not None and hasattr(p, k):
            setattr(p, k, v)
    out = args.out or ROOT / "runs" / ("demo" if args.preset == "demo" else f"synthetic-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text("")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    t0 = time.time()
    timings = {}
    pretrain_root = args.pretrain_shards or (ROOT / "shards" if args.preset == "demo" else out / "data" / "pretrain")
    data, heldout_command = generate(p, out, pretrain_root, log)
    timings["generate_s"] = time.time() - t0
    runs = train(p, data, out, log)
    timings["train_s"] = time.time() - t0 - timings["generate_s"]
    preds: dict[str, list[Path]] = {}
    for v, run_dirs in runs.items():
        preds[v] = []
        for run_dir in run_dirs:
            dest = out / "predictions" / run_dir.name
            run([tool("trainer"), "predict", "--ckpt", str(run_dir), "--shards", str(data["eval"]),
                 "--out", str(dest), "--previews", "0"], log)
            preds[v].append(dest)
    top_rows = unlabelled_rows(data["finetune"])
    errs = score(preds, data["eval"], top_rows, out, p.previews)
    summary = summarize(errs, p.bootstrap)
    timings["total_s"] = time.time() - t0
    density = target_density(data["eval"])
    results = {
        "preset": args.preset, "config": asdict(p), "timings": timings, "machine": machine(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "heldout_command": heldout_command,
        "no_label_region": f"top {top_rows} of {p.height} rows (above every label of the fine-tuning set)",
        "no_label_rows": top_rows,
        "target_lidar_density": density,
        "seeds": list(range(p.seeds)),
        "variants": {v: {"description": d, "checkpoint": checkpoint_of((runs.get(v) or [None])[0]),
                         "checkpoints": [checkpoint_of(r) for r in runs.get(v, [])], **summary[v]}
                     for v, d in VARIANTS},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = table(summary)
    (out / "results.md").write_text(md + "\n")
    print()
    print(md)
    print(f"\nValues: mean over {p.n_eval} held-out scenes (and {p.seeds} fine-tuning seed(s)); in brackets the "
          "difference from the full method with its 95% bootstrap interval over scenes; * = significant "
          f"(interval excludes 0). Held-out LiDAR density {100 * density:.1f}% of pixels; the top {top_rows} "
          f"rows never had a label. Total {timings['total_s'] / 60:.1f} min (data {timings['generate_s']:.0f} s). "
          f"Results: {out / 'results.json'}; previews: {out / 'previews'}")


if __name__ == "__main__":
    main()
