"""Training and inference speed of BP-Net, old against new in one run: samples/s of a training step and of
a forward, peak memory, and whether the new code computes what the old did; and the shard loader.

    python bench/train.py                         # CPU, every case below; threads: torch's default
    python bench/train.py --threads 1             # one thread: the least noisy on a shared machine
    python bench/train.py --quick                 # tiny and bpnet-s only, 8 steps
    python bench/train.py --models bpnet --json bench/train.json
    python bench/train.py --device cuda           # bf16 autocast as the trainer uses it

"old" is the trainer's network, losses, optimizer and EMA at bench/legacy.py's REFERENCE_COMMIT (read from
git), "new" the current ones. Each case runs in its own subprocess, which builds both networks with the
same weights and alternates their steps on the same batches (a new batch per step, seeded), so that a
shared machine's load falls on both alike; the table gives the best and median step of each (wall clock
and the process's CPU time) and their ratio. The losses of the first --loss-steps steps of the two are
compared (both train from the same seed on the same batches; the old network at another thread count is
the yardstick of float rounding). Peak memory (CPU: peak RSS above the RSS after building the model; GPU:
max_memory_allocated) is measured in a subprocess per case and path. A training step is the trainer's:
forward, loss (pre-training L1, or fine-tuning's L_sup + L_SSI + L_reg with the gradient pulls), backward,
clipping, AdamW, EMA. Inference is eval and predict's forward (the new: trainer.model.for_inference).
The loader is measured on shards written here (random content, the real codecs) at 0, 1 and 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.camera import make_K  # noqa: E402
from shared.shard import Sample, ShardWriter  # noqa: E402
from trainer.data import DataConfig, make_loader  # noqa: E402

# (model, batch, crop, stage, rounds, quick rounds): the cpu preset of scripts/ablation.py trains bpnet-s
# (the demo: tiny) at batch 8 on 64 x 192 crops; bpnet is timed at 256 x 320, and its forward at KITTI's
# 352 x 1216 frame, which feeds `trainer eval`, `predict` and the export
CASES = [("tiny", 8, "64x192", "pretrain", 20, 8), ("bpnet-s", 8, "64x192", "pretrain", 20, 8),
         ("bpnet-s", 8, "64x192", "finetune", 20, 0), ("bpnet", 1, "256x320", "pretrain", 3, 0),
         ("bpnet", 1, "352x1216", "inference", 3, 0)]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_batch(batch: int, hw: tuple[int, int], stage: str = "pretrain", seed: int = 0) -> dict:
    """A synthetic batch as the loader gives it: normalised RGB, 5% LiDAR, a smooth dense depth; for
    fine-tuning also GT on 30% of the pixels and a disparity teacher (affine in 1/depth, with noise)."""
    h, w = hw
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(0, 1, w).view(1, 1, 1, w)
    depth = (5 + 40 * yy.flip(2) + 5 * torch.sin(6 * xx) + torch.rand(batch, 1, h, w, generator=g)).contiguous()
    sparse = torch.where(torch.rand(batch, 1, h, w, generator=g) < 0.05, depth, torch.zeros_like(depth))
    K = torch.tensor([[0.9 * w, 0, w / 2], [0, 0.9 * w, h / 2], [0, 0, 1]]).expand(batch, 3, 3).contiguous()
    out = {"rgb": torch.randn(batch, 3, h, w, generator=g), "sparse": sparse, "K": K, "depth": depth}
    if stage == "finetune":
        out["gt"] = torch.where(torch.rand(batch, 1, h, w, generator=g) < 0.3, depth, torch.zeros_like(depth))
        out["teacher"] = (0.8 / depth + 0.02 + 0.001 * torch.randn(batch, 1, h, w, generator=g)).clamp(min=1e-4)
    return out


def modules_of(path: str):
    """(model, losses, train) modules: the reference commit's for "old" (bench/legacy.py), else the current."""
    if path == "old":
        from bench.legacy import load_legacy

        old = load_legacy()
        return old.model, old.losses, old.train
    import trainer.losses
    import trainer.model
    import trainer.train

    return trainer.model, trainer.losses, trainer.train


def make_step(name: str, path: str, stage: str, device: str = "cpu", seed: int = 0):
    """(model, step): step(inputs) is one training step of the trainer on a batch of make_batch's (forward
    under bf16 autocast on a GPU, the stage's loss with the gradient pulls when fine-tuning, backward, clip
    0.1, AdamW, EMA), returning the loss; for stage "inference" it is eval and predict's forward, returning
    the finest output. path "old": bench/legacy.py's network, losses, optimizer and EMA; "new": the current."""
    model_mod, losses_mod, train_mod = modules_of(path)
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = model_mod.build_model(name).to(dev)
    part = torch.profiler.record_function  # ranges for bench/profile_train.py; free when not profiling

    if stage == "inference":
        model = model_mod.for_inference(model) if hasattr(model_mod, "for_inference") else model.eval()

        @torch.no_grad()
        def forward(inputs: dict) -> torch.Tensor:
            return model(inputs["rgb"], inputs["sparse"], inputs["K"])[-1]

        return model, forward

    model.train()
    cfg = train_mod.TrainConfig(lr=1e-4)
    if hasattr(train_mod, "make_optimizer"):
        opt = train_mod.make_optimizer(model, cfg)
    else:  # the reference's train(): fused on a GPU only
        opt = torch.optim.AdamW(train_mod.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                fused=dev.type == "cuda")
    avg = train_mod.EMA(model, 0.999)
    loss_cfg = losses_mod.DistillLossConfig()
    amp = dev.type == "cuda"

    def step(inputs: dict) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            preds = model(inputs["rgb"], inputs["sparse"], inputs["K"])
        preds = [p.float() for p in preds]
        with part("part:loss"):
            if stage == "pretrain":
                loss = losses_mod.pretrain_loss(preds, inputs["depth"])
            else:
                loss, _ = losses_mod.distill_loss(preds, inputs, loss_cfg, pulls=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with part("part:optimizer (clip, AdamW, EMA)"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            avg.update(model)
        return loss.detach()

    return model, step


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _on(inputs: dict, dev: torch.device) -> dict:
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def speed_case(name: str, batch: int, hw: tuple[int, int], stage: str, rounds: int, device: str) -> dict:
    """Runs in the child: old and new alternating, round after round, on the same batches; on a CPU also the
    old network at another thread count (untimed), whose divergence from the old is float rounding alone."""
    dev = torch.device(device)
    threads = torch.get_num_threads()
    other = 2 if threads == 1 else 1
    models, steps = {}, {}
    for path in ("old", "new") + (("yardstick",) if dev.type == "cpu" else ()):
        models[path], steps[path] = make_step(name, "old" if path == "yardstick" else path, stage, device)
    wall = {"old": [], "new": []}
    cpu = {"old": [], "new": []}
    outs = {k: [] for k in steps}
    for i in range(rounds + 1):  # round 0 warms up (allocator, KD-tree, autotuning) and is not timed
        inputs = _on(make_batch(batch, hw, stage, seed=i), dev)
        order = ["old", "new"] if i % 2 else ["new", "old"]  # neither always runs second, on a warmer cache
        for path in order + (["yardstick"] if "yardstick" in steps else []):
            torch.set_num_threads(other if path == "yardstick" else threads)
            _sync(dev)
            t, c = time.perf_counter(), time.process_time()
            out = steps[path](inputs)
            _sync(dev)
            t, c = time.perf_counter() - t, time.process_time() - c
            if i and path in wall:
                wall[path].append(t)
                cpu[path].append(c)
            outs[path].append(out.float().cpu() if stage == "inference" else float(out))
        torch.set_num_threads(threads)

    def rel(a, b) -> float:  # the largest relative difference over the steps (losses) or a forward's pixels
        if stage == "inference":
            return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True))
        return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b, strict=True))

    res = {"model": name, "batch": batch, "hw": f"{hw[0]}x{hw[1]}", "stage": stage, "rounds": rounds,
           "device": str(dev), "threads": threads,
           "params_m": sum(p.numel() for p in models["old"].parameters()) / 1e6,
           "max_rel_diff": rel(outs["new"], outs["old"]),
           "yardstick_threads": other if "yardstick" in steps else None,
           "yardstick_max_rel_diff": rel(outs["yardstick"], outs["old"]) if "yardstick" in steps else None}
    if stage != "inference":
        res["losses"] = {k: outs[k] for k in ("old", "new")}
    for path in ("old", "new"):
        res[path] = {"wall_best": min(wall[path]), "wall_median": statistics.median(wall[path]),
                     "cpu_best": min(cpu[path]), "cpu_median": statistics.median(cpu[path]),
                     "samples_per_s": batch / min(wall[path])}
    res["speedup_wall"] = res["old"]["wall_best"] / res["new"]["wall_best"]
    res["speedup_wall_median"] = res["old"]["wall_median"] / res["new"]["wall_median"]
    res["speedup_cpu"] = res["old"]["cpu_best"] / res["new"]["cpu_best"]
    return res


def memory_case(name: str, batch: int, hw: tuple[int, int], stage: str, path: str, device: str) -> dict:
    """Runs in the child: the peak memory of two steps of one path, above the process after building it."""
    dev = torch.device(device)
    inputs = _on(make_batch(batch, hw, stage), dev)
    _, step = make_step(name, path, stage, device)
    base = rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(2):
        step(inputs)
    _sync(dev)
    if dev.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20}
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}


def write_bench_shards(root: Path, n_shards: int, per_shard: int, hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    h, w = hw
    for s in range(n_shards):
        with ShardWriter(root / f"bench-{s:06d}.tar") as wr:
            for j in range(per_shard):
                depth = rng.uniform(2, 60, (h, w)).astype(np.float32)
                wr.write(Sample(key=f"bench-{s}-{j}", rgb=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                                K=make_K(0.9 * w, 0.9 * w, w / 2, h / 2), teacher=1 / depth, depth=depth,
                                sparse=np.where(rng.random((h, w)) < 0.05, depth, 0).astype(np.float32),
                                gt=np.where(rng.random((h, w)) < 0.3, depth, 0).astype(np.float32),
                                meta={"source": "bench"}))


def bench_loader(hw: tuple[int, int], workers_list=(0, 1, 2), batches: int = 12, batch: int = 4) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_shards(Path(tmp), 4, 16, (hw[0] + 32, hw[1] + 64))  # a bit larger: real random crops
        for workers in workers_list:
            cfg = DataConfig(tmp, batch_size=batch, crop_hw=hw, workers=workers, shuffle_buffer=16)
            it = iter(make_loader(cfg))
            next(it)  # worker start-up is not throughput
            t = time.perf_counter()
            for _ in range(batches):
                next(it)
            dt = time.perf_counter() - t
            del it
            sps = batches * batch / dt
            rows.append({"workers": workers, "samples_per_s": sps, "per_worker": sps / max(workers, 1),
                         "hw": f"{hw[0]}x{hw[1]}"})
    return rows


def run_child(kind: str, case: tuple, args, path: str = "old") -> dict | None:
    name, batch, hw, stage, rounds = case
    cmd = [sys.executable, __file__, "--child", f"{kind},{name},{batch},{hw},{stage},{rounds},{path}",
           "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ})
    if proc.returncode != 0:
        print(f"{kind} {name} {stage} {path}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: dict) -> str:
    """The old-vs-new table (bench/run_all.py's "Training step" section too)."""
    lines = ["| case | batch | frame | old samples/s | new samples/s | speed-up, best step (median) | "
             "speed-up, CPU time | peak MiB, old / new | largest relative difference, new vs old (old at "
             "another thread count: float rounding) |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results["cases"]:
        what = {"pretrain": "training step", "finetune": "training step, fine-tuning losses",
                "inference": "forward (eval, predict)"}[r["stage"]]
        diff = f"{r['max_rel_diff']:.1e}"
        if r.get("yardstick_max_rel_diff") is not None:
            diff += f" ({r['yardstick_max_rel_diff']:.1e} at {r['yardstick_threads']} thread(s))"
        diff += f", {'outputs' if r['stage'] == 'inference' else 'losses'} of {r['rounds'] + 1} " \
                f"{'forwards' if r['stage'] == 'inference' else 'steps'}"
        mem = f"{r.get('peak_mib_old', float('nan')):.0f} / {r.get('peak_mib_new', float('nan')):.0f}"
        lines.append(f"| {r['model']} {what} | {r['batch']} | {r['hw']} | {r['old']['samples_per_s']:.3g} | "
                     f"{r['new']['samples_per_s']:.3g} | {r['speedup_wall']:.2f}x ({r['speedup_wall_median']:.2f}x) "
                     f"| {r['speedup_cpu']:.2f}x | {mem} | {diff} |")
    first = results["cases"][0] if results["cases"] else {}
    lines.append(f"\n{first.get('device', '')}, {first.get('threads', '')} torch thread(s). Old: the trainer at "
                 f"{results.get('reference', '')[:10]} (bench/legacy.py); new: this tree. Old and new alternate "
                 "step by step in one process on the same batches, from the same weights; the speed-ups are the "
                 "ratios of the best (and the median) step's wall time and of the best step's CPU time.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=None, help="comma-separated subset of tiny,bpnet-s,bpnet")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the model runs (default: torch's)")
    ap.add_argument("--rounds", type=int, default=None, help="timed steps per path (default: per case)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--loader-hw", default="256x320", help="crop HxW of the loader benchmark")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny and bpnet-s pre-training, 8 steps each")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:  # one case, in this fresh process
        kind, name, batch, hw, stage, rounds, path = args.child.split(",")
        hw_t = tuple(int(x) for x in hw.split("x"))
        if kind == "speed":
            out = speed_case(name, int(batch), hw_t, stage, int(rounds), args.device)
        else:
            out = memory_case(name, int(batch), hw_t, stage, path, args.device)
        print(json.dumps(out))
        return

    from bench.legacy import REFERENCE_COMMIT

    wanted = set(args.models.split(",")) if args.models else None
    results = {"reference": REFERENCE_COMMIT, "cases": [], "loader": []}
    for name, batch, hw, stage, rounds, quick_rounds in CASES:
        if (wanted and name not in wanted) or (args.quick and not quick_rounds):
            continue
        case = (name, batch, hw, stage, args.rounds or (quick_rounds if args.quick else rounds))
        t0 = time.monotonic()
        r = run_child("speed", case, args)
        if r is None:
            continue
        if not args.no_memory:
            for path in ("old", "new"):
                m = run_child("memory", case, args, path)
                r[f"peak_mib_{path}"] = m["peak_mib"] if m else float("nan")
        r["seconds"] = time.monotonic() - t0
        results["cases"].append(r)
        print(f"{name} {stage} {hw}: {r['speedup_wall']:.2f}x (CPU time {r['speedup_cpu']:.2f}x), "
              f"{r['seconds']:.0f} s", file=sys.stderr, flush=True)
    lhw = tuple(int(x) for x in args.loader_hw.lower().split("x"))
    results["loader"] = bench_loader(lhw, batches=6 if args.quick else 12)

    print(f"\n## BP-Net, old vs new ({args.device})\n")
    print(markdown(results))
    print(f"\n## Shard loader (decode + crop + flip + jitter + collate), crop {args.loader_hw}, batch 4\n")
    print("| workers | samples/s | per worker |")
    print("|---|---|---|")
    for r in results["loader"]:
        print(f"| {r['workers']} | {r['samples_per_s']:.1f} | {r['per_worker']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
