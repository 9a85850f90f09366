"""The paper's ablation on the synthetic world, where the true depth is known everywhere.

    python scripts/ablation.py --preset demo   # `make demo`: minutes on 2 CPU cores
    python scripts/ablation.py --preset cpu    # `make bench-synthetic SCALE=cpu`: ~1.5 h on 2 CPU cores
    python scripts/ablation.py --preset bench  # `make bench-synthetic`: larger, for more time or a GPU

Steps, each a call of the project's own command lines (so this is also an end-to-end test of them):
1. `datagen run --source synthetic`: unlabelled street scenes (pre-training: RGB, simulated LiDAR,
   pseudo depth from the oracle teacher), a small labelled set with `--gt semi` (KITTI-like: no
   labels in the upper 30-40% of each image, random holes), and held-out scenes from another seed
   with `--gt dense` for evaluation.
2. `trainer pretrain`, then `trainer finetune` for: no pre-training (full losses), pre-training then
   L_sup only, pre-training then L_sup + L_SSI + L_reg (the full method).
3. `trainer predict` on the held-out scenes; RMSE and MAE overall and in the region that never had
   training labels (the top 30% of rows), against plain nearest-neighbour interpolation of the
   sparse input and the pre-trained model used zero-shot.

The demo writes its unlabelled set to shards/synthetic (datagen's default output) and everything
else under --out (default runs/demo): the labelled sets, one run directory (with checkpoints) per
variant, predictions, previews/, shards_preview.png and results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.depth import decode_depth_png  # noqa: E402
from shared.shard import iter_samples  # noqa: E402

NO_LABEL_FRACTION = 0.30  # the semi GT never labels rows above 30% of the height (see sources/synthetic.py)


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
    workers: int = 2
    previews: int = 3


PRESETS = {
    # demo: ~11 min on 2 CPU cores. The tiny network on 64x192 crops is what fits; the images stay
    # 384x128 and predictions are made on the whole frame.
    "demo": Preset(width=384, height=128, n_pretrain=300, n_finetune=48, n_eval=24, model="tiny",
                   crop="64x192", batch_size=8, pretrain_steps=300, finetune_steps=120,
                   pretrain_lr=2e-3, finetune_lr=1e-3, shard_size=50),
    # cpu: the demo's frame and crop at ~5x the data and ~4x the steps, with the bpnet-s network;
    # about 1.5 h on 2 CPU cores (`make bench-synthetic SCALE=cpu`; its table is in the README).
    "cpu": Preset(width=384, height=128, n_pretrain=1500, n_finetune=200, n_eval=100, model="bpnet-s",
                  crop="64x192", batch_size=8, pretrain_steps=1200, finetune_steps=400,
                  pretrain_lr=1e-3, finetune_lr=5e-4, shard_size=100),
    "bench": Preset(width=608, height=192, n_pretrain=4000, n_finetune=400, n_eval=100, model="bpnet-s",
                    crop="192x608", batch_size=8, pretrain_steps=4000, finetune_steps=1500,
                    pretrain_lr=1e-3, finetune_lr=5e-4, shard_size=100),
}

VARIANTS = [
    ("nearest", "sparse input densified by nearest-neighbour interpolation (no learning)"),
    ("finetune_only", "fine-tuning only, L_sup + L_SSI + L_reg (no pre-training)"),
    ("pretrain_only", "pre-training only (zero-shot)"),
    ("pretrain_sup", "pre-training, then fine-tuning with L_sup only"),
    ("full", "pre-training, then fine-tuning with L_sup + L_SSI + L_reg (the full method)"),
]


def tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def run(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    print(f"  done in {time.time() - t0:.0f} s", flush=True)


def generate(p: Preset, out: Path, pretrain_root: Path, log: Path) -> dict[str, Path]:
    sets = {
        "pretrain": ([], 1, p.n_pretrain, pretrain_root),
        "finetune": (["--labelled", "--gt", "semi"], 2, p.n_finetune, out / "data" / "finetune"),
        "eval": (["--labelled", "--gt", "dense"], 3, p.n_eval, out / "data" / "eval"),
    }
    dirs = {}
    for name, (extra, seed, n, dest) in sets.items():
        run([tool("datagen"), "run", "--source", "synthetic", "--out", str(dest), "--limit", str(n),
             "--seed", str(seed), "--family", "street", "--width", str(p.width), "--height", str(p.height),
             "--workers", str(p.workers), "--shard-size", str(p.shard_size), "--progress", "log", *extra], log)
        dirs[name] = dest / "synthetic"
    # what a person looks at first: the pre-training shards, as `datagen inspect` shows them
    run([tool("datagen"), "inspect", str(dirs["pretrain"]), "--preview", str(out / "shards_preview.png"),
         "--samples", "4", "--json", str(out / "shards_summary.json")], log)
    return dirs


def train(p: Preset, data: dict[str, Path], out: Path, log: Path) -> dict[str, Path]:
    common = ["--model", p.model, "--batch-size", str(p.batch_size), "--crop", p.crop, "--quiet"]
    runs = {v: out / "runs" / v for v in ("pretrain", "finetune_only", "pretrain_sup", "full")}
    run([tool("trainer"), "pretrain", "--shards", str(data["pretrain"]), "--out", str(runs["pretrain"]),
         "--steps", str(p.pretrain_steps), "--lr", str(p.pretrain_lr), *common], log)
    ft = ["--shards", str(data["finetune"]), "--steps", str(p.finetune_steps), "--lr", str(p.finetune_lr), *common]
    run([tool("trainer"), "finetune", *ft, "--out", str(runs["finetune_only"])], log)
    run([tool("trainer"), "finetune", *ft, "--init", str(runs["pretrain"]), "--out", str(runs["pretrain_sup"]),
         "--lambda-ssi", "0", "--lambda-reg", "0"], log)
    run([tool("trainer"), "finetune", *ft, "--init", str(runs["pretrain"]), "--out", str(runs["full"])], log)
    return {"pretrain_only": runs["pretrain"], "finetune_only": runs["finetune_only"],
            "pretrain_sup": runs["pretrain_sup"], "full": runs["full"]}


def nearest_fill(sparse: np.ndarray) -> np.ndarray:
    """Every pixel takes the depth of the nearest LiDAR point (Euclidean in pixels)."""
    from scipy.ndimage import distance_transform_edt

    if not np.any(sparse > 0):
        return np.zeros_like(sparse)
    _, (iy, ix) = distance_transform_edt(sparse <= 0, return_indices=True)
    return sparse[iy, ix]


def region_errors(pred: np.ndarray, gt: np.ndarray, region: np.ndarray) -> dict | None:
    m = (gt > 0) & region
    if not m.any():
        return None
    err = np.where(pred[m] > 0, pred[m], 1 / 256) - gt[m]
    return {"rmse_m": float(np.sqrt(np.mean(err**2))), "mae_m": float(np.mean(np.abs(err)))}


def evaluate(preds: dict[str, Path], eval_dir: Path, out: Path, n_previews: int) -> dict:
    """RMSE/MAE per image, then mean over images (the KITTI devkit's order), overall and in the
    no-label region, for every variant."""
    per: dict[str, dict[str, list]] = {v: {"overall": [], "no_label": []} for v, _ in VARIANTS}
    shown = []
    for s in iter_samples(eval_dir):
        gt = s.gt
        region = np.zeros_like(gt, dtype=bool)
        region[: int(NO_LABEL_FRACTION * s.height)] = True
        maps = {"nearest": nearest_fill(s.sparse)}
        for v, pdir in preds.items():
            maps[v] = decode_depth_png((pdir / f"{s.key}.png").read_bytes())
        for v, pred in maps.items():
            for name, reg in (("overall", np.ones_like(region)), ("no_label", region)):
                e = region_errors(pred, gt, reg)
                if e is not None:
                    per[v][name].append(e)
        if len(shown) < n_previews:
            shown.append((s, maps))
    results = {}
    for v, _ in VARIANTS:
        results[v] = {
            name: {k: float(np.mean([e[k] for e in lst])) for k in ("rmse_m", "mae_m")} | {"images": len(lst)}
            for name, lst in per[v].items()
        }
    previews(shown, out / "previews")
    return results


def previews(shown, dest: Path) -> None:
    from shared.preview import contact_sheet, depth_limits

    dest.mkdir(parents=True, exist_ok=True)
    for s, maps in shown:
        row1 = {f"{s.key}: RGB": s.rgb, "LiDAR input": ("dots", s.rgb, s.sparse), "GT (true depth)": s.gt,
                "nearest": maps["nearest"]}
        row2 = {v: maps[v] for v in ("finetune_only", "pretrain_only", "pretrain_sup", "full")}
        row3 = {f"{v} error": np.where(s.gt > 0, maps[v] - s.gt, np.nan)
                for v in ("nearest", "finetune_only", "pretrain_sup", "full")}
        contact_sheet([row1, row2, row3], str(dest / f"{s.key}.png"), limits=depth_limits(s.gt),
                      title=f"{s.key}: top {int(NO_LABEL_FRACTION * 100)}% of rows never had training labels")


def checkpoint_of(run_dir: Path | None) -> str | None:
    """The newest complete checkpoint file of a run directory (what `trainer eval --ckpt` takes)."""
    if run_dir is None:
        return None
    latest = run_dir / "latest"
    name = latest.read_text().strip() if latest.is_file() else None
    if name and (run_dir / f"{name}.safetensors").is_file():
        return str(run_dir / f"{name}.safetensors")
    found = sorted(run_dir.glob("ckpt-*.safetensors"))
    return str(found[-1]) if found else str(run_dir)


def machine() -> dict:
    """What produced the numbers: the commit, the CPU count, torch and the device."""
    import platform

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"git_commit": commit, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "gpu": gpu}


def table(results: dict) -> str:
    lines = ["| variant | RMSE (m) | MAE (m) | RMSE no-label region (m) | MAE no-label region (m) |",
             "|---|---:|---:|---:|---:|"]
    for v, desc in VARIANTS:
        r = results[v]
        lines.append(f"| {v}: {desc} | {r['overall']['rmse_m']:.3f} | {r['overall']['mae_m']:.3f} | "
                     f"{r['no_label']['rmse_m']:.3f} | {r['no_label']['mae_m']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--out", type=Path, default=None)
    for f in ("n_pretrain", "n_finetune", "n_eval", "pretrain_steps", "finetune_steps", "batch_size", "workers"):
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
    data = generate(p, out, pretrain_root, log)
    timings["generate_s"] = time.time() - t0
    ckpts = train(p, data, out, log)
    timings["train_s"] = time.time() - t0 - timings["generate_s"]
    preds = {}
    for v, run_dir in ckpts.items():
        preds[v] = out / "predictions" / v
        run([tool("trainer"), "predict", "--ckpt", str(run_dir), "--shards", str(data["eval"]),
             "--out", str(preds[v]), "--previews", "0"], log)
    metrics = evaluate(preds, data["eval"], out, p.previews)
    timings["total_s"] = time.time() - t0
    results = {
        "preset": args.preset, "config": asdict(p), "timings": timings, "machine": machine(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "no_label_region": f"top {NO_LABEL_FRACTION:.0%} of rows",
        "variants": {v: {"description": d, "checkpoint": checkpoint_of(ckpts.get(v)),
                         "metrics": metrics[v]} for v, d in VARIANTS},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(table(metrics))
    print(f"\n{p.n_eval} held-out scenes; total {timings['total_s'] / 60:.1f} min "
          f"(data {timings['generate_s']:.0f} s). Results: {out / 'results.json'}; previews: {out / 'previews'}")


if __name__ == "__main__":
    main()
