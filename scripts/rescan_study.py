"""What a new scan every epoch does, measured on the synthetic world (`trainer pretrain --lidar`).

    python scripts/rescan_study.py --preset demo --seeds 4     # ~70 min on 2 CPU cores (measured, 4 seeds)
    python scripts/rescan_study.py --data runs/demo            # reuse an ablation's sets (and its shards)

Three pre-training variants, each run with the same shards, steps, learning rate and seeds (data order,
crops and flips are the same in all three; only the scan of each frame differs):
- stored:  the scan each shard was written with (a random pattern and mount per scene, ideal sensor),
           the same for every epoch: the trainer without --lidar;
- resim:   a new scan of every frame each epoch from the same family (--lidar random --mount random
           --sensor ideal): stored vs resim is the effect of drawing scans anew, nothing else;
- target:  a new scan each epoch, always with the target rig's LiDAR (its scaled hdl64 as a pattern file,
           KITTI's mount, the realistic sensor): the target's pattern only vs random patterns (resim).

Each pre-training run is then fine-tuned with the full method (L_sup + L_SSI + L_reg at the preset's
weights, fine-tuning seed s from pre-training seed s's best validation checkpoint), as scripts/ablation.py
does. Every run is scored:
- on the held-out target-rig scenes (the ablation's held-out set: seed 3, dense GT), zero-shot and after
  fine-tuning, overall and in the rows without labels (above every label of the fine-tuning set);
- under the field's sparsity sweep: the same held-out world seen through the full hdl64 (64 rings,
  `-o rig=native`), thinned to 64/32/16/8 lines by `trainer eval --sweep`'s protocol (shared.sparsity),
  with nearest-neighbour filling of the same input beside it.
Differences come with 95% intervals that resample the training seeds and the scenes (scripts/ablation.py's
compare): significant = the interval excludes 0 and every seed's difference has the same sign.

Writes under --out (default runs/rescan-<preset>): runs/, target_lidar.json, results.json, results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import ablation  # noqa: E402  (scripts/ablation.py: the presets, data sets, runners and statistics)

from shared.shard import iter_samples  # noqa: E402
from shared.sparsity import parse_sweep  # noqa: E402
from trainer.baselines import nearest_fill  # noqa: E402
from trainer.metrics import rmse_mae_m  # noqa: E402
from trainer.validate import unlabelled_rows  # noqa: E402

VARIANTS = {
    "stored": "the shards' own scans (one per scene, every epoch the same)",
    "resim": "a new scan each epoch, random patterns and mounts, ideal sensor (the shards' family)",
    "target": "a new scan each epoch, the target rig's LiDAR only (scaled hdl64, KITTI mount, realistic sensor)",
}
COMPARISONS = (("resim", "stored"), ("target", "stored"), ("target", "resim"))
SWEEP = "lines:64,32,16,8"
STAGES = ("zero_shot", "finetuned")


def target_lidar(eval_dir: Path, dest: Path) -> Path:
    """The target rig's LiDAR as a pattern file: hdl64 scaled to the held-out frames' K (datagen.world.rig)."""
    from datagen.world.rig import kitti_pattern
    from shared.scan.patterns import save_pattern

    K = next(iter_samples(eval_dir)).K
    save_pattern(kitti_pattern(np.asarray(K, np.float64)), dest)
    return dest


def lidar_args(variant: str, target_file: Path) -> list[str]:
    if variant == "stored":
        return []
    if variant == "resim":
        return ["--lidar", "random", "--mount", "random", "--sensor", "ideal"]
    return ["--lidar", str(target_file), "--mount", "kitti", "--sensor", "realistic"]


def sweep_set_command(p: ablation.Preset, dest: Path) -> list[str]:
    """The held-out world (its datagen seed and size) through the full hdl64: the sweep's input."""
    cmd = ablation.datagen_command(p, "eval", p.n_eval, dest)
    return [*cmd[:cmd.index("rig=kitti")], "rig=native"]


def data_sets(p: ablation.Preset, out: Path, reuse: Path | None, pretrain_shards: Path | None,
              log: Path, stage_s: dict) -> dict[str, Path]:
    """pretrain / finetune / eval / val (the ablation's, made or reused) and sweep (made here)."""
    if reuse:
        data = {k: reuse / "data" / k / "synthetic" for k in ("finetune", "eval", "val")}
        own = reuse / "data" / "pretrain" / "synthetic"
        data["pretrain"] = pretrain_shards or (own if own.is_dir() else ROOT / "shards" / "synthetic")
        missing = [str(d) for d in data.values() if not d.is_dir()]
        if missing:
            raise SystemExit(f"--data {reuse}: missing {', '.join(missing)} (an ablation's --out; its unlabelled "
                             "set is data/pretrain/synthetic there or shards/synthetic, else --pretrain-shards)")
    else:
        data, _ = ablation.generate(p, out, out / "data" / "pretrain", log, stage_s)
    sweep_dir = out / "data" / "sweep"
    if not (sweep_dir / "synthetic").is_dir():
        stage_s["datagen_sweep"] = ablation.run(sweep_set_command(p, sweep_dir), log)
    data["sweep"] = sweep_dir / "synthetic"
    return data


def train(p: ablation.Preset, data: dict[str, Path], out: Path, log: Path, top_rows: int, target_file: Path,
          jobs: int, stage_s: dict) -> dict[str, dict[str, list[Path]]]:
    """{stage: {variant: [run dir per seed]}}; a run whose `latest` exists is not trained again."""
    common = ablation.run_args(p, data, top_rows)
    threads = ["--threads", str(ablation.parallelism(jobs, None, 2)[1])]
    runs: dict[str, dict[str, list[Path]]] = {s: {v: [] for v in VARIANTS} for s in STAGES}
    pre_cmds, ft_cmds = {}, {}
    for v in VARIANTS:
        for seed in range(p.seeds):
            pre = out / "runs" / f"pretrain-{v}-seed{seed}"
            ft = out / "runs" / f"full-{v}-seed{seed}"
            runs["zero_shot"][v].append(pre)
            runs["finetuned"][v].append(ft)
            if not (pre / "latest").is_file():
                pre_cmds[pre.name] = [ablation.tool("trainer"), "pretrain", "--shards", str(data["pretrain"]),
                                      "--out", str(pre), "--steps", str(p.pretrain_steps), "--lr", str(p.pretrain_lr),
                                      "--seed", str(seed), *lidar_args(v, target_file), *common, *threads]
            if not (ft / "latest").is_file():
                ft_cmds[ft.name] = [ablation.tool("trainer"), "finetune", "--shards", str(data["finetune"]),
                                    "--steps", str(p.finetune_steps), "--lr", str(p.finetune_lr), "--seed", str(seed),
                                    "--init", str(pre / "best"), "--lambda-ssi", str(p.lambda_ssi),
                                    "--lambda-reg", str(p.lambda_reg), "--out", str(ft), *common, *threads]
    stage_s.update(ablation.run_all(pre_cmds, log, jobs))
    stage_s.update(ablation.run_all(ft_cmds, log, jobs))
    return runs


def errors_of(run_dir: Path, shards: Path, protocols: list, top_rows: int | None, baseline: bool = False) -> dict:
    """{protocol: {region: {metric: [per scene]}}} of a run's best checkpoint (its EMA weights, as eval and
    predict use them) under "model". With `baseline` (it depends on the input alone, so one run is enough):
    the same for nearest filling of each protocol's input under "nearest", and each protocol's mean input
    density (share of the frame's pixels) under "density"."""
    from trainer.evaluate import InferenceOptions

    opts = InferenceOptions()
    model, info = opts.load(ablation.checkpoint_of(run_dir, "best"))
    result = {"model": {}, **({"nearest": {}, "density": {}} if baseline else {})}
    for proto in protocols:
        maps = {who: {r: {m: [] for m in ablation.METRICS} for r in ablation.REGIONS} for who in result
                if who != "density"}
        dens = []
        for pred in opts.predictions(model, info, shards, "gt", sparsity=proto):
            dens.append(pred.density)
            region = np.zeros_like(pred.gt, dtype=bool)
            region[:top_rows or 0] = True
            depths = {"model": pred.depth_m, **({"nearest": nearest_fill(pred.sparse)} if baseline else {})}
            for name, reg in (("overall", np.ones_like(region)), ("no_label", region)):
                for who, depth in depths.items():
                    e = rmse_mae_m(depth, pred.gt, reg)
                    for m in ablation.METRICS:
                        maps[who][name][m].append(e[m] if e else np.nan)
        for who, per in maps.items():
            result[who][proto.name] = per
        if baseline:
            result["density"][proto.name] = float(np.mean(dens))
    return result


def stacked(per_run: list[dict]) -> dict:
    """{protocol: {region: {metric: array runs x scenes}}} from errors_of's per-run tables."""
    return {proto: {r: {m: np.asarray([pr[proto][r][m] for pr in per_run], np.float64) for m in ablation.METRICS}
                    for r in ablation.REGIONS} for proto in per_run[0]}


def stats(arr: np.ndarray) -> dict:
    """mean over scenes then seeds, and each seed's mean (arr: seeds x scenes)."""
    return {"mean": float(np.nanmean(arr)), "per_seed": np.nanmean(arr, axis=1).tolist()}


def summarize(errs: dict, n_boot: int) -> dict:
    """errs[stage][set][variant][protocol][region][metric]: seeds x scenes arrays (the nearest baseline as the
    variant "nearest", one row). Per cell: every variant's mean, and each comparison's difference."""
    out = {}
    for stage, sets in errs.items():
        for set_name, by_variant in sets.items():
            for proto in next(iter(by_variant.values())):
                regions = ("overall", "no_label") if set_name == "heldout" else ("overall",)
                for r in regions:
                    for m in ablation.METRICS:
                        cell = {v: stats(by_variant[v][proto][r][m]) for v in by_variant}
                        for a, b in COMPARISONS:
                            cell[f"{a}-{b}"] = ablation.compare(by_variant[a][proto][r][m], by_variant[b][proto][r][m],
                                                                n_boot)
                        out.setdefault(stage, {}).setdefault(set_name, {}).setdefault(proto, {}) \
                            .setdefault(r, {})[m] = cell
    return out


def fmt_diff(c: dict) -> str:
    mark = "*" if c["significant"] else ("°" if c["ci_excludes_0"] else "")
    return f"{c['mean']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]{mark}"


def tables(summary: dict, densities: dict) -> str:
    """Markdown: per stage, the held-out target-rig rows (overall, no-label) and the sweep rows, RMSE and MAE
    of each variant and the differences with their intervals; each input with its density (% of pixels)."""
    lines = []
    for stage, sets in summary.items():
        lines += [f"### {stage.replace('_', ' ')}", "",
                  "| input | region | metric | " + " | ".join(VARIANTS) + " | nearest | "
                  + " | ".join(f"{a} - {b}" for a, b in COMPARISONS) + " |",
                  "|" + "---|" * (4 + len(VARIANTS) + len(COMPARISONS))]
        for set_name, protos in sets.items():
            for proto, regions in protos.items():
                label = (("target rig" if set_name == "heldout" else proto)
                         + f" ({100 * densities[set_name][proto]:.1f}%)")
                for r, metrics in regions.items():
                    for m, cell in metrics.items():
                        lines.append(f"| {label} | {r} | {m[:-2].upper()} | "
                                     + " | ".join(f"{cell[v]['mean']:.3f}" for v in VARIANTS)
                                     + f" | {cell['nearest']['mean']:.3f} | "
                                     + " | ".join(fmt_diff(cell[f'{a}-{b}']) for a, b in COMPARISONS) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(ablation.PRESETS), default="demo")
    ap.add_argument("--seeds", type=int, default=3, help="pre-training (and fine-tuning) seeds per variant")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None,
                    help="reuse an ablation's --out: its data/{finetune,eval,val} and unlabelled set")
    ap.add_argument("--pretrain-shards", type=Path, default=None,
                    help="with --data: the unlabelled set (default: its data/pretrain/synthetic, else shards/synthetic)")
    ap.add_argument("--jobs", type=int, default=None, help="training runs at a time (default: one per core, <= 4)")
    for f in ("n_pretrain", "n_finetune", "n_eval", "n_val", "pretrain_steps", "finetune_steps", "val_every",
              "bootstrap"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None, help="as the ablation's (the preset's)")
    args = ap.parse_args()
    p = ablation.PRESETS[args.preset]
    for k, v in vars(args).items():
        if v is not None and hasattr(p, k):
            setattr(p, k, v)
    p.pretrain_seeds = p.seeds
    out = args.out or ROOT / "runs" / f"rescan-{args.preset}"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    t0, stage_s = time.time(), {}
    data = data_sets(p, out, args.data, args.pretrain_shards, log, stage_s)
    top_rows = unlabelled_rows(data["finetune"])
    target_file = target_lidar(data["eval"], out / "target_lidar.json")
    jobs = ablation.parallelism(args.jobs, None, 2)[0]
    runs = train(p, data, out, log, top_rows, target_file, jobs, stage_s)
    t_score = time.time()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    sets = {"heldout": (data["eval"], parse_sweep("full"), top_rows), "sweep": (data["sweep"], parse_sweep(SWEEP), None)}
    errs: dict = {stage: {s: {} for s in sets} for stage in runs}
    nearest, densities = {}, {}
    for stage, by_variant in runs.items():
        for v, run_dirs in by_variant.items():
            print(f"scoring {stage} {v} ({len(run_dirs)} runs)", flush=True)
            for set_name, (shards, protocols, rows) in sets.items():
                per_run = [errors_of(r, shards, protocols, rows, baseline=set_name not in nearest and i == 0)
                           for i, r in enumerate(run_dirs)]
                if set_name not in nearest:  # the same input for every run: one row, shared by both stages
                    nearest[set_name] = stacked([per_run[0]["nearest"]])
                    densities[set_name] = per_run[0]["density"]
                errs[stage][set_name][v] = stacked([pr["model"] for pr in per_run])
    for stage in errs:
        for set_name in sets:
            errs[stage][set_name]["nearest"] = nearest[set_name]
    summary = summarize(errs, p.bootstrap)
    stage_s["score"] = time.time() - t_score
    results = {"preset": args.preset, "config": {**ablation.asdict(p)}, "seeds": list(range(args.seeds)),
               "variants": VARIANTS, "comparisons": [f"{a}-{b}" for a, b in COMPARISONS], "sweep": SWEEP,
               "no_label_rows": top_rows, "target_lidar": str(target_file), "input_density": densities,
               "data": {k: str(d) for k, d in data.items()},
               "runs": {s: {v: [str(r) for r in rs] for v, rs in by.items()} for s, by in runs.items()},
               "timings": {"total_s": time.time() - t0, "stages_s": stage_s}, "machine": ablation.machine(),
               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "summary": summary}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = tables(summary, densities)
    n_scenes = errs["zero_shot"]["heldout"]["stored"]["full"]["overall"]["rmse_m"].shape[1]
    note = (f"Means over {n_scenes} held-out scenes and {args.seeds} seeds per variant (metres). Differences: mean "
            "and 95% interval over seeds and scenes; * significant (interval excludes 0 and every seed agrees), "
            "° interval excludes 0 but the seeds disagree. nearest: nearest-neighbour filling of the same input.")
    (out / "results.md").write_text(md + "\n" + note + "\n")
    print(md + "\n" + note)
    print(f"total {(time.time() - t0) / 60:.1f} min; {out / 'results.json'}")


if __name__ == "__main__":
    main()
