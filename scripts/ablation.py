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
  accumulated from 11 scans (nothing above the top laser's reach), held-out scenes from a seed
  nobody trained or tuned on, with dense GT, and a small validation set like them from a fourth seed.

Steps, each a call of the project's own command lines (so this is also an end-to-end test of them):
1. `datagen run --source synthetic` for the four sets (pre-training, fine-tuning, held-out, validation).
2. `trainer pretrain` once per pre-training seed (--pretrain-seeds), then `trainer finetune` for: no
   pre-training (full losses), pre-training then L_sup only, pre-training then L_sup + L_SSI + L_reg
   (the full method); each fine-tuning once per training seed (--seeds), fine-tuning seed s starting
   from pre-training seed s (or from the one pre-training run). Every run is validated on the
   validation set every --val-every steps (`--val-shards`: log.csv, RUN/best, RUN/curves.png).
3. `trainer predict` on the held-out scenes (each run's latest checkpoint, or with --checkpoint best the
   one with the lowest validation RMSE); RMSE and MAE per image, overall and in the rows that never had
   a training label (above every label of the fine-tuning set), against nearest-neighbour interpolation
   and IP-Basic (trainer.baselines) of the sparse input, the teacher fitted to the scan, and the
   pre-trained model used zero-shot.
4. For every variant, its difference from the full method with a 95% interval that resamples both the
   training runs (seeds) and the held-out scenes (hierarchical_bootstrap_ci), and each seed's own
   difference; a difference is called significant only when the interval excludes 0 AND every seed's
   difference has the same sign (both flags are reported apart).

The demo writes its unlabelled set to shards/synthetic (datagen's default output) and everything
else under --out (default runs/demo): the labelled sets, one run directory (with checkpoints) per
variant and seed, predictions, previews/, curves.png (every run's learning curves), shards_preview.png,
results.json and results.md.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.depth import decode_depth_png  # noqa: E402
from shared.preview import contact_sheet, depth_limits  # noqa: E402
from shared.shard import iter_samples  # noqa: E402
from trainer.baselines import ip_basic, nearest_fill  # noqa: E402, F401 (nearest_fill: also this module's API)
from trainer.checkpoint import best_checkpoint, latest_checkpoint  # noqa: E402
from trainer.curves import plot_runs  # noqa: E402
from trainer.metrics import fill_invalid_like_devkit, rmse_mae_m  # noqa: E402
from trainer.validate import unlabelled_rows  # noqa: E402, F401 (also this module's API)


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
    bootstrap: int = 2000   # resamples of the held-out scenes (and of the training seeds)
    pretrain_seeds: int = 1  # pre-training runs, seeds 0 .. pretrain_seeds-1: 1, or as many as `seeds`
    n_val: int = 16         # validation scenes (their own datagen seed; target rig, dense GT)
    val_every: int = 50     # steps between validations of every training run (and at each run's end); one
    #                         validation of 16 small frames costs about 3-5 training steps (docs/trainer.md)
    lambda_ssi: float = 1.0  # the teacher terms' weights in the variants that use them (full, finetune_only)
    lambda_reg: float = 0.5


PRESETS = {
    # demo: under 15 min on 2 CPU cores. The tiny network on 64x192 crops is what fits; the images stay
    # 384x128 and predictions are made on the whole frame. Two seeds of every learned variant (two
    # pre-training runs; fine-tuning seed s starts from pre-training seed s's best validation checkpoint).
    # Steps from the validation curves of a 300 + 120 step run (docs/trainer.md, "Choosing the budget"):
    # fine-tuning's validation RMSE did not improve after step 50 in any pre-trained run, pre-training's
    # flattened by 150-250 steps in one seed and kept swinging in the other. The teacher terms at a tenth
    # of the trainer's weights, as the cpu preset (below): checked on the demo's validation scenes, both
    # seeds (docs/trainer.md, "Choosing the teacher terms' weights").
    "demo": Preset(width=384, height=128, n_pretrain=300, n_finetune=48, n_eval=32, model="tiny",
                   crop="64x192", batch_size=8, pretrain_steps=250, finetune_steps=60,
                   pretrain_lr=2e-3, finetune_lr=1e-3, shard_size=50, n_val=16, val_every=50,
                   seeds=2, pretrain_seeds=2, lambda_ssi=0.1, lambda_reg=0.05),
    # cpu: the demo's frame and crop with ~5x the data, the bpnet-s network, two fine-tuning seeds from
    # one pre-training run (a second pre-training run would not fit); under 2 h on 2 CPU cores
    # (`make bench-synthetic SCALE=cpu`; its table and curves are in the README). The teacher terms'
    # weights are a tenth of the trainer's defaults (lambda_ssi 0.1, lambda_reg 0.05): chosen on the
    # validation seed from a sweep of 1, 0.3, 0.1, 0.03 and the 1/m penalty, fine-tuning seed 0 from the
    # same pre-training run (docs/trainer.md, "Choosing the teacher terms' weights").
    "cpu": Preset(width=384, height=128, n_pretrain=1500, n_finetune=200, n_eval=100, model="bpnet-s",
                  crop="64x192", batch_size=8, pretrain_steps=1000, finetune_steps=200,
                  pretrain_lr=1e-3, finetune_lr=5e-4, shard_size=100, seeds=2, n_val=32, val_every=50,
                  lambda_ssi=0.1, lambda_reg=0.05),
    # bench: for a GPU. The teacher terms' weights are the cpu scale's choice, carried over (the cause it
    # fixes, L_reg in metres pulling far pixels to the teacher, does not depend on the scale): validate them
    # again at this scale (--lambda-ssi, --lambda-reg) before reading its table as a tuned result.
    "bench": Preset(width=608, height=192, n_pretrain=4000, n_finetune=400, n_eval=200, model="bpnet-s",
                    crop="192x608", batch_size=8, pretrain_steps=4000, finetune_steps=1500,
                    pretrain_lr=1e-3, finetune_lr=5e-4, shard_size=100, seeds=3, n_val=32, val_every=250,
                    lambda_ssi=0.1, lambda_reg=0.05),
}

VARIANTS = [
    ("nearest", "sparse input densified by nearest-neighbour interpolation (no learning)"),
    ("ip_basic", "IP-Basic (Ku et al. 2018): classical image processing of the sparse input (no learning)"),
    ("teacher", "the teacher's map, scale and shift fitted in disparity to the LiDAR points (no learning)"),
    ("finetune_only", "fine-tuning only, L_sup + L_SSI + L_reg (no pre-training)"),
    ("pretrain_only", "pre-training only (zero-shot)"),
    ("pretrain_sup", "pre-training, then fine-tuning with L_sup only"),
    ("full", "pre-training, then fine-tuning with L_sup + L_SSI + L_reg (the full method)"),
]
REGIONS = ("overall", "no_label")
METRICS = ("rmse_m", "mae_m")
SEEDS = {"pretrain": 1, "finetune": 2, "eval": 3, "val": 4}  # datagen --seed of each set: four disjoint worlds
LEARNED = ("finetune_only", "pretrain_only", "pretrain_sup", "full")


# ----------------------------------------------------------------------------------------------------
# running the project's commands


def tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def run(cmd: list[str], log: Path, every_s: float = 5.0, tag: str = "", env: dict | None = None) -> float:
    """Run one command, its whole output into `log`; on the console its log lines and, at most every
    `every_s` seconds, its latest progress-bar state (step, loss, time left), so no minute is silent.
    `tag` prefixes its console and log lines (runs in parallel); `env`: extra environment variables. Returns
    its wall time in seconds."""
    pre = f"[{tag}] " if tag else ""
    print(pre + "$ " + shlex.join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(pre + "$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, bufsize=0,
                                env={**os.environ, **env} if env else None)
        pending, last_shown, status = b"", 0.0, ""
        while chunk := proc.stdout.read(4096):
            pending += chunk
            *pieces, pending = re.split(rb"(\r|\n)", pending)
            for text, sep in zip(pieces[::2], pieces[1::2], strict=True):
                line = text.decode(errors="replace").strip()
                if not line:
                    continue
                if sep == b"\n":  # a log line: keep it
                    f.write(pre + line + "\n")
                    print("  " + pre + line, flush=True)
                else:  # a progress-bar redraw: show the latest one every few seconds
                    status = line
            if status and time.time() - last_shown >= every_s:
                print("  " + pre + status, flush=True)
                f.write(pre + status + "\n")
                last_shown, status = time.time(), ""
        proc.wait()
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        sys.exit(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))
    print(f"  {pre}done in {time.time() - t0:.0f} s", flush=True)
    return time.time() - t0


def run_all(cmds: dict[str, list[str]], log: Path, jobs: int, env: dict | None = None) -> dict[str, float]:
    """Run the named commands, `jobs` at a time (each its own process); their wall times by name. A failed
    command ends the job (run's sys.exit) once the others in flight have finished."""
    if jobs <= 1 or len(cmds) <= 1:
        return {name: run(cmd, log, env=env) for name, cmd in cmds.items()}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(run, cmd, log, tag=name, env=env) for name, cmd in cmds.items()}
        return {name: f.result() for name, f in futures.items()}


def datagen_command(p: Preset, kind: str, n: int, dest: Path) -> list[str]:
    """The `datagen run` argv of one set (pretrain, finetune, eval or val)."""
    common = ["--source", "synthetic", "--out", str(dest), "--limit", str(n), "--seed", str(SEEDS[kind]),
              "--width", str(p.width), "--height", str(p.height), "--workers", str(p.workers),
              "--shard-size", str(p.shard_size), "--progress", "log"]
    if kind == "pretrain":  # internet photos: every family, a random camera, LiDAR pattern and mount
        extra = ["--family", "mixed", "-o", "camera=random", "--lidar", "random", "--mount", "random"]
    else:  # the target: KITTI-like street scenes through one fixed rig
        gt = "accumulated" if kind == "finetune" else "dense"
        extra = ["--family", "street", "--labelled", "--gt", gt, "-o", "rig=kitti"]
    return [tool("datagen"), "run", *common, *extra]


def generate(p: Preset, out: Path, pretrain_root: Path, log: Path, stage_s: dict,
             pretrain: bool = True) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """The four sets (their directories) and the datagen command of each; wall times into stage_s. Without
    `pretrain` (--pretrained runs given) the unlabelled set is neither made nor inspected."""
    sets = {"pretrain": (p.n_pretrain, pretrain_root), "finetune": (p.n_finetune, out / "data" / "finetune"),
            "eval": (p.n_eval, out / "data" / "eval"), "val": (p.n_val, out / "data" / "val")}
    if not pretrain:
        del sets["pretrain"]
    dirs, commands = {}, {}
    for kind, (n, dest) in sets.items():
        commands[kind] = datagen_command(p, kind, n, dest)
        stage_s[f"datagen_{kind}"] = run(commands[kind], log)
        dirs[kind] = dest / "synthetic"
    if not pretrain:
        return dirs, commands
    # what a person looks at first: the pre-training shards, as `datagen inspect` shows them
    stage_s["datagen_inspect"] = run(
        [tool("datagen"), "inspect", str(dirs["pretrain"]), "--preview", str(out / "shards_preview.png"),
         "--samples", "4", "--json", str(out / "shards_summary.json")], log)
    return dirs, commands


def parallelism(jobs: int | None, threads: int | None, runs: int) -> tuple[int, int | None]:
    """(runs at a time, torch threads per run) for `runs` runs. Default: one run per CPU core, at most 4,
    each on cores // (runs side by side) threads (so a lone run keeps every core). Small networks use two
    cores poorly: measured on 2 cores, two one-thread runs side by side train 1.75x (tiny) and 1.5x
    (bpnet-s) the samples per second of one two-thread run (batch 8, 64x192). A run's result depends on its
    seed and thread count (float rounding), not on what runs beside it."""
    cores = os.cpu_count() or 1
    jobs = max(1, min(cores, 4)) if jobs is None else jobs
    if jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {jobs}")
    side_by_side = max(1, min(jobs, runs))
    return jobs, threads or max(1, cores // side_by_side)


def check_seeds(p: Preset) -> None:
    if p.seeds < 1 or p.pretrain_seeds not in (1, p.seeds):
        raise SystemExit(f"--pretrain-seeds must be 1 or equal to --seeds ({p.seeds}): fine-tuning seed s starts "
                         f"from pre-training seed s, or all from the one pre-training run; got {p.pretrain_seeds}")


def run_args(p: Preset, data: dict[str, Path], top_rows: int) -> list[str]:
    """The trainer options every training run of the preset shares: network, batch, crop, validation."""
    return ["--model", p.model, "--batch-size", str(p.batch_size), "--crop", p.crop, "--val-shards", str(data["val"]),
            "--val-every", str(p.val_every), "--val-top-rows", str(top_rows)]


def train(p: Preset, data: dict[str, Path], out: Path, log: Path, top_rows: int, stage_s: dict,
          threads: int | None = None, use: str = "latest", jobs: int = 1,
          pretrained: list[Path] | None = None) -> dict[str, list[Path]]:
    """Run directories per variant: one per pre-training seed for pretrain_only, one per fine-tuning seed for
    the others. Every run is validated on data["val"] (its top `top_rows` rows too). Fine-tuning seed s
    starts from pre-training seed s (or from the one pre-training run), from its latest checkpoint or, with
    use="best", from the one with the lowest validation RMSE. `jobs` runs at a time: the pre-training runs,
    then the fine-tuning runs (each run's result depends only on its own seed and --threads, not on what
    runs beside it). Wall times into stage_s. `pretrained`: existing pre-training runs (one per pre-training
    seed) to fine-tune from instead of training them."""
    check_seeds(p)
    common = run_args(p, data, top_rows)

    def threads_of(runs: int) -> list[str]:
        return ["--threads", str(parallelism(jobs, threads, runs)[1])]

    if pretrained:
        if len(pretrained) != p.pretrain_seeds:
            raise SystemExit(f"--pretrained names {len(pretrained)} run(s); --pretrain-seeds is {p.pretrain_seeds}")
        pre_runs = list(pretrained)
    else:
        pre_runs = [out / "runs" / ("pretrain" if p.pretrain_seeds == 1 else f"pretrain-seed{ps}")
                    for ps in range(p.pretrain_seeds)]
        stage_s.update(run_all({pre.name: [tool("trainer"), "pretrain", "--shards", str(data["pretrain"]), "--out",
                                           str(pre), "--steps", str(p.pretrain_steps), "--lr", str(p.pretrain_lr),
                                           "--seed", str(ps), *common, *threads_of(p.pretrain_seeds)]
                                for ps, pre in enumerate(pre_runs)}, log, jobs))
    runs: dict[str, list[Path]] = {"pretrain_only": pre_runs, "finetune_only": [], "pretrain_sup": [], "full": []}
    cmds = {}
    for seed in range(p.seeds):
        pre = pre_runs[seed % len(pre_runs)]
        init = str(pre / "best") if use == "best" else str(pre)
        ft = ["--shards", str(data["finetune"]), "--steps", str(p.finetune_steps), "--lr", str(p.finetune_lr),
              "--seed", str(seed), *common]
        suffix = f"-seed{seed}" if p.seeds > 1 else ""
        teacher = ["--lambda-ssi", str(p.lambda_ssi), "--lambda-reg", str(p.lambda_reg)]
        variants = {"finetune_only": teacher, "pretrain_sup": ["--init", init, "--lambda-ssi", "0", "--lambda-reg", "0"],
                    "full": ["--init", init, *teacher]}
        for v, extra in variants.items():
            run_dir = out / "runs" / f"{v}{suffix}"
            cmds[run_dir.name] = [tool("trainer"), "finetune", *ft, *extra, "--out", str(run_dir),
                                  *threads_of(3 * p.seeds)]
            runs[v].append(run_dir)
    stage_s.update(run_all(cmds, log, jobs))
    return runs


# ----------------------------------------------------------------------------------------------------
# scoring


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
    """RMSE and MAE (m) over the GT pixels inside region (trainer.metrics.rmse_mae_m: what validation
    during training computes too); None when there is none."""
    return rmse_mae_m(pred, gt, region)


def ip_basic_fill(sparse: np.ndarray) -> np.ndarray:
    """IP-Basic with its published settings, scored as `trainer baseline` + `trainer score` score it: pixels it
    leaves without a value (0, or negative: points beyond its 100 m pivot) filled as the KITTI devkit does."""
    return fill_invalid_like_devkit(np.maximum(ip_basic(sparse), 0))


def target_density(eval_dir: Path) -> float:
    """Mean share of the held-out frames' pixels that carry a LiDAR point."""
    return float(np.mean([np.mean(s.sparse > 0) for s in iter_samples(eval_dir)]))


def score(preds: dict[str, list[Path]], eval_dir: Path, top_rows: int, out: Path, n_previews: int) -> dict:
    """Per-scene errors: {variant: {region: {metric: array (seeds x scenes)}}}, scenes in shard order.

    preds maps each learned variant to one prediction folder per seed; "nearest", "ip_basic" (see
    ip_basic_fill) and "teacher" (see teacher_fit) are computed here. The no-label region is the top
    `top_rows` rows. Writes previews of the first n_previews scenes.
    """
    errs = {v: {r: {m: [] for m in METRICS} for r in REGIONS} for v, _ in VARIANTS}
    shown = []
    for s in iter_samples(eval_dir):
        region = np.zeros_like(s.gt, dtype=bool)
        region[:top_rows] = True
        maps = {"nearest": [nearest_fill(s.sparse)], "ip_basic": [ip_basic_fill(s.sparse)],
                "teacher": [teacher_fit(s.teacher, s.sparse)]}
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


def hierarchical_bootstrap_ci(diff: np.ndarray, n: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `diff` (training seeds x scenes: one variant's per-scene error
    minus the full method's, run by run) when both the scenes and the training runs are resampled.

    Each resample draws the scenes with replacement, then the seeds (rows) with replacement, independently
    (scenes and seeds are crossed: every run is scored on every scene); its statistic is the mean of diff
    over the drawn seeds and the drawn scenes. The scene draws come first from the same generator as
    bootstrap_ci's, so with one seed, or seeds that do not differ, it is bootstrap_ci of the seed-averaged
    difference. Seed-to-seed spread widens the interval: a difference that a second training run could
    reverse is not called significant by the interval alone."""
    diff = np.atleast_2d(np.asarray(diff, np.float64))
    n_seeds, n_scenes = diff.shape
    rng = np.random.default_rng(seed)
    scenes = rng.integers(0, n_scenes, size=(n, n_scenes))
    seeds = rng.integers(0, n_seeds, size=(n, n_seeds))
    weights = np.zeros((n, n_seeds))
    np.add.at(weights, (np.arange(n)[:, None], seeds), 1.0 / n_seeds)
    per_scene = weights @ diff  # each resample's seed-averaged difference of every scene
    means = np.take_along_axis(per_scene, scenes, axis=1).mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_runs(a: np.ndarray, full: np.ndarray) -> np.ndarray:
    """seeds x scenes differences a - full, run matched with run: equal seed counts pair seed s with seed s
    (fine-tuning seed s of every variant used data-order seed s and pre-training seed s); a single run (no
    learning, or one pre-training run) is compared with each of the other's runs."""
    if len(a) == len(full) or len(a) == 1 or len(full) == 1:
        return a - full
    raise ValueError(f"cannot pair {len(a)} runs with the full method's {len(full)}: give --pretrain-seeds 1 or "
                     "as many as --seeds")


def compare(a: np.ndarray, full: np.ndarray, n_boot: int) -> dict:
    """One variant against the full method on one metric (arrays seeds x scenes): the mean difference, the
    interval over seeds and scenes (ci95) and over scenes only (ci95_scenes, seeds averaged first), each
    seed's difference, and the flags: ci_excludes_0, seeds_agree (every seed's difference has the mean's
    sign, none is 0) and significant (both)."""
    diff = paired_runs(np.atleast_2d(a), np.atleast_2d(full))
    diff = diff[:, np.all(np.isfinite(diff), axis=0)]  # scenes scored in every run
    if diff.shape[1] == 0:
        nan = float("nan")
        return {"mean": nan, "ci95": [nan, nan], "significant": False, "ci_excludes_0": False,
                "seeds_agree": False, "per_seed": [nan] * len(diff), "ci95_scenes": [nan, nan]}
    lo, hi = hierarchical_bootstrap_ci(diff, n_boot)
    lo_s, hi_s = bootstrap_ci(diff.mean(axis=0), n_boot)
    mean = float(diff.mean())
    per_seed = diff.mean(axis=1)
    excludes = bool(lo > 0 or hi < 0)
    agree = bool(np.all(np.sign(per_seed) == np.sign(mean)) and mean != 0)
    return {"mean": mean, "ci95": [lo, hi], "significant": excludes and agree, "ci_excludes_0": excludes,
            "seeds_agree": agree, "per_seed": per_seed.tolist(), "ci95_scenes": [lo_s, hi_s]}


def summarize(errs: dict, n_boot: int) -> dict:
    """Per variant: the metrics (mean over scenes, then over seeds), each seed's, and the difference from
    the full method (compare: an interval over training seeds and scenes, each seed's difference)."""
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
            entry["vs_full"][r] = {m: compare(a, errs["full"][r][m], n_boot) for m, a in arr.items()}
        out[v] = entry
    return out


def previews(shown, dest: Path, top_rows: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for s, maps in shown:
        row1 = {f"{s.key}: RGB": s.rgb, "LiDAR input": ("dots", s.rgb, s.sparse), "GT (true depth)": s.gt,
                "nearest": maps["nearest"], "ip_basic": maps["ip_basic"]}
        row2 = {v: maps[v] for v in ("finetune_only", "pretrain_only", "pretrain_sup", "full")}
        row3 = {f"{v} error": np.where(s.gt > 0, maps[v] - s.gt, np.nan)
                for v in ("nearest", "ip_basic", "finetune_only", "pretrain_sup", "full")}
        contact_sheet([row1, row2, row3], str(dest / f"{s.key}.png"), limits=depth_limits(s.gt),
                      title=f"{s.key}: the top {top_rows} rows never had a training label")


TABLE_NOTE = ("In brackets: the difference from the full method and its 95% interval, which resamples the "
              "training seeds and the held-out scenes; * = significant: the interval excludes 0 and every seed's "
              "difference has the same sign; ° = the interval excludes 0 but the seeds disagree.")


def table(summary: dict) -> str:
    """Markdown: the metrics of every variant and, for the others, the difference from the full method
    with its 95% interval; * marks a significant difference (interval excludes 0 and every seed agrees),
    ° one whose interval excludes 0 while some seed disagrees (TABLE_NOTE)."""
    def cell(v, r, m):
        val = summary[v]["metrics"][r][m]
        if v == "full":
            return f"{val:.3f}"
        d = summary[v]["vs_full"][r][m]
        star = "*" if d["significant"] else "°" if d["ci_excludes_0"] else ""
        return f"{val:.3f} ({d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]{star})"

    lines = ["| variant | RMSE (m) | MAE (m) | RMSE, rows without labels (m) | MAE, rows without labels (m) |",
             "|---|---:|---:|---:|---:|"]
    for v, desc in VARIANTS:
        lines.append(f"| {v}: {desc} | " + " | ".join(cell(v, r, m) for r in REGIONS for m in METRICS) + " |")
    return "\n".join(lines)


def rounding_spread(a: dict, b: dict) -> dict:
    """Two results.json of one configuration that differ only in float rounding (e.g. --threads 1 and 2):
    per learned variant, region and metric, the largest difference between the two runs of the same seed
    (max_abs_diff) beside the spread between the seeds of the first (seed_spread: max - min of its per-seed
    values; None with one seed). A difference of float rounding alone far below the seed spread means a
    second seed is the larger source of noise."""
    out = {}
    for v in LEARNED:
        out[v] = {}
        for r in REGIONS:
            out[v][r] = {}
            for m in METRICS:
                pa, pb = (np.asarray(x["variants"][v]["per_seed"][r][m], np.float64) for x in (a, b))
                if pa.shape != pb.shape:
                    raise ValueError(f"{v}: {len(pa)} seed(s) against {len(pb)}: compare runs of one configuration")
                out[v][r][m] = {"max_abs_diff": float(np.max(np.abs(pa - pb))),
                                "seed_spread": float(pa.max() - pa.min()) if len(pa) > 1 else None}
    return out


def rounding_table(spread: dict) -> str:
    """Markdown of rounding_spread: 'rounding / seeds' per cell, in metres."""
    def cell(d):
        seeds = "n/a" if d["seed_spread"] is None else f"{d['seed_spread']:.4f}"
        return f"{d['max_abs_diff']:.4f} / {seeds}"

    lines = ["| variant | RMSE (m) | MAE (m) | RMSE, rows without labels (m) | MAE, rows without labels (m) |",
             "|---|---:|---:|---:|---:|"]
    for v, regions in spread.items():
        lines.append(f"| {v} | " + " | ".join(cell(regions[r][m]) for r in REGIONS for m in METRICS) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# the job


def checkpoint_of(run_dir: Path | None, use: str = "latest") -> str | None:
    """The checkpoint file of a run directory that was scored: its latest, or with use="best" the one with
    the lowest validation RMSE (what `trainer eval --ckpt RUN` / `RUN/best` take)."""
    if run_dir is None:
        return None
    found = best_checkpoint(run_dir) if use == "best" else latest_checkpoint(run_dir)
    return str(found or run_dir)


def machine() -> dict:
    """What produced the numbers: the commit, the CPU count, torch, the device, and the load average at the end
    (1, 5, 15 min: on a shared machine other jobs slow every stage)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"git_commit": commit, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "gpu": gpu,
            "load_average": list(os.getloadavg())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--out", type=Path, default=None)
    for f in ("n_pretrain", "n_finetune", "n_eval", "n_val", "pretrain_steps", "finetune_steps", "batch_size",
              "workers", "seeds", "pretrain_seeds", "val_every", "bootstrap"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--crop", default=None, help="training crop HxW (multiples of 32)")
    ap.add_argument("--pretrain-lr", type=float, default=None)
    ap.add_argument("--finetune-lr", type=float, default=None)
    ap.add_argument("--lambda-ssi", type=float, default=None, help="L_SSI's weight in the full method (and "
                    "fine-tuning only)")
    ap.add_argument("--lambda-reg", type=float, default=None, help="L_reg's weight, likewise")
    ap.add_argument("--pretrained", type=Path, nargs="+", default=None, metavar="RUN",
                    help="fine-tune from these pre-training runs (one per --pretrain-seeds, e.g. an earlier "
                         "ablation's runs/pretrain) instead of making the unlabelled set and pre-training")
    ap.add_argument("--pretrain-shards", type=Path, default=None,
                    help="where the unlabelled set goes (demo: shards/, i.e. shards/synthetic)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of every training run (trainer --threads): e.g. 1 and 2 to see how far "
                         "runs differ by float rounding alone")
    ap.add_argument("--jobs", type=int, default=None,
                    help="training and prediction runs at a time (default: one per CPU core, at most 4), each on "
                         "cores/jobs threads unless --threads says")
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"), default=None,
                    help="only compare two results.json of one configuration run with different --threads: "
                         "the largest per-seed difference (float rounding) beside the spread between seeds")
    ap.add_argument("--checkpoint", choices=("latest", "best"), default="best",
                    help="which checkpoint of each run is scored and fine-tuned from: its latest, or the one with "
                         "the lowest validation RMSE (RUN/best)")
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(f.read_text()) for f in args.compare)
        print(rounding_table(rounding_spread(a, b)))
        print("\nEach cell: the largest difference between the two results' runs of the same seed / the spread "
              "(max - min) between the seeds of the first, in metres.")
        return
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
    check_seeds(p)
    t0 = time.time()
    timings, stage_s = {"load_average_at_start": list(os.getloadavg())}, {}
    pretrain_root = args.pretrain_shards or (ROOT / "shards" if args.preset == "demo" else out / "data" / "pretrain")
    data, commands = generate(p, out, pretrain_root, log, stage_s, pretrain=not args.pretrained)
    timings["generate_s"] = time.time() - t0
    top_rows = unlabelled_rows(data["finetune"])
    jobs = parallelism(args.jobs, args.threads, 1)[0]
    runs = train(p, data, out, log, top_rows, stage_s, args.threads, args.checkpoint, jobs, args.pretrained)
    timings["train_s"] = time.time() - t0 - timings["generate_s"]
    preds = {v: [out / "predictions" / r.name for r in run_dirs] for v, run_dirs in runs.items()}
    predict = {f"predict_{r.name}": [tool("trainer"), "predict", "--ckpt",
                                     str(r / "best" if args.checkpoint == "best" else r), "--shards",
                                     str(data["eval"]), "--out", str(out / "predictions" / r.name), "--previews", "0"]
               for run_dirs in runs.values() for r in run_dirs}
    threads = parallelism(jobs, args.threads, len(predict))[1]
    stage_s.update(run_all(predict, log, jobs, {"OMP_NUM_THREADS": str(threads)}))
    t_score = time.time()
    errs = score(preds, data["eval"], top_rows, out, p.previews)
    summary = summarize(errs, p.bootstrap)
    plot_runs({v: runs[v] for v in LEARNED}, out / "curves.png",
              title=f"{args.preset}: training loss and validation ({p.n_val} scenes, seed {SEEDS['val']}) per run")
    stage_s["score_and_curves"] = time.time() - t_score
    timings["total_s"] = time.time() - t0
    timings["stages_s"] = stage_s
    density = target_density(data["eval"])
    results = {
        "preset": args.preset, "config": asdict(p), "timings": timings, "machine": machine(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "pretrained": [str(r) for r in args.pretrained] if args.pretrained else None,
        "heldout_command": commands["eval"],
        "val_command": commands["val"],
        "no_label_region": f"top {top_rows} of {p.height} rows (above every label of the fine-tuning set)",
        "no_label_rows": top_rows,
        "target_lidar_density": density,
        "seeds": list(range(p.seeds)),
        "pretrain_seeds": list(range(p.pretrain_seeds)),
        "threads": args.threads or "per run: CPU cores // runs side by side (each run's log.txt line has --threads)",
        "jobs": jobs,
        "checkpoint_choice": args.checkpoint,
        "curves": str(out / "curves.png"),
        "variants": {v: {"description": d, "checkpoint": checkpoint_of((runs.get(v) or [None])[0], args.checkpoint),
                         "checkpoints": [checkpoint_of(r, args.checkpoint) for r in runs.get(v, [])], **summary[v]}
                     for v, d in VARIANTS},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = table(summary)
    (out / "results.md").write_text(md + "\n\n" + TABLE_NOTE + "\n")
    print()
    print(md)
    print(f"\nValues: mean over {p.n_eval} held-out scenes (and {p.seeds} fine-tuning seed(s), {p.pretrain_seeds} "
          f"pre-training seed(s)). {TABLE_NOTE} Held-out LiDAR density {100 * density:.1f}% of pixels; the top "
          f"{top_rows} rows never had a label. Total {timings['total_s'] / 60:.1f} min (data "
          f"{timings['generate_s']:.0f} s, training {timings['train_s']:.0f} s). Results: {out / 'results.json'}; "
          f"previews: {out / 'previews'}; learning curves: {out / 'curves.png'}")


if __name__ == "__main__":
    main()
