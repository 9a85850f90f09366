"""Training throughput: forward + backward samples/s and peak memory per network, and the shard
loader's samples/s per worker, in one run.

    python bench/train.py                         # CPU: tiny, bpnet-s, bpnet at 256 x 320
    python bench/train.py --device cuda           # GPU, bf16 autocast as the trainer uses it
    python bench/train.py --json bench/train.json
    python bench/train.py --quick                 # one timed step per network (tiny: 2), fewer loader batches

Each network runs in its own subprocess so that its peak memory (CPU: peak RSS above the process's
RSS after building the model; GPU: torch.cuda.max_memory_allocated) is its own. A training step is
the trainer's: forward, pretrain loss, backward, clip, AdamW step. The loader is measured on shards
written here (random content, the real codecs) at workers 0 (in-process), 1 and 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
from trainer.losses import pretrain_loss  # noqa: E402
from trainer.model import build_model  # noqa: E402
from trainer.train import param_groups  # noqa: E402

# (model, batch, timed iterations): the full bpnet takes tens of seconds a step on a CPU
MODELS = [("tiny", 2, 5), ("bpnet-s", 2, 3), ("bpnet", 1, 1)]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_model(name: str, batch: int, iters: int, hw: tuple[int, int], device: str) -> dict:
    """Runs inside the child process."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(name).to(dev).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    h, w = hw
    g = torch.Generator().manual_seed(0)
    rgb = torch.randn(batch, 3, h, w, generator=g)
    depth = torch.rand(batch, 1, h, w, generator=g) * 40 + 2
    sparse = torch.where(torch.rand(batch, 1, h, w, generator=g) < 0.05, depth, torch.zeros_like(depth))
    K = torch.tensor([[0.9 * w, 0, w / 2], [0, 0.9 * w, h / 2], [0, 0, 1]]).expand(batch, 3, 3).contiguous()
    rgb, depth, sparse, K = (t.to(dev) for t in (rgb, depth, sparse, K))
    amp = dev.type == "cuda"
    base_rss = rss_mib()
    if amp:
        torch.cuda.reset_peak_memory_stats(dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            preds = model(rgb, sparse, K)
        loss = pretrain_loss([p.float() for p in preds], depth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        if amp:
            torch.cuda.synchronize(dev)

    step()  # warm-up: allocator, KD-tree, autotuning
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    best = min(times)
    out = {"model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch,
           "hw": f"{h}x{w}", "iters": iters, "s_per_step": best, "samples_per_s": batch / best,
           "device": str(dev), "threads": torch.get_num_threads()}
    if amp:
        out["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        out["peak_mib"] = peak - base_rss
    return out


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hw", default="256x320", help="frame HxW (multiples of 32)")
    ap.add_argument("--models", default=",".join(m for m, _, _ in MODELS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the model runs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="one timed step per network (tiny: 2)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    hw = tuple(int(x) for x in args.hw.lower().split("x"))
    if args.child:  # one model, in this fresh process
        if args.threads:
            torch.set_num_threads(args.threads)
        name, batch, iters = args.child.split(",")
        print(json.dumps(bench_model(name, int(batch), int(iters), hw, args.device)))
        return

    results = {"models": [], "loader": []}
    wanted = args.models.split(",")
    for name, batch, iters in MODELS:
        if name not in wanted:
            continue
        if args.quick:
            iters = 2 if name == "tiny" else 1
        cmd = [sys.executable, __file__, "--child", f"{name},{batch},{iters}", "--device", args.device,
               "--hw", args.hw] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ})
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results["models"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results["loader"] = bench_loader(hw, batches=6 if args.quick else 12)

    print(f"\n## Training step (forward + backward + AdamW), {args.hw}, {args.device}\n")
    print("| model | params (M) | batch | s/step | samples/s | peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in results["models"]:
        print(f"| {r['model']} | {r['params_m']:.2f} | {r['batch']} | {r['s_per_step']:.3f} | "
              f"{r['samples_per_s']:.2f} | {r['peak_mib']:.0f} |")
    tiny = next((r for r in results["models"] if r["model"] == "tiny"), None)
    if tiny:
        print("\nratio to tiny: " + ", ".join(f"{r['model']} {tiny['samples_per_s'] / r['samples_per_s']:.1f}x slower"
                                             for r in results["models"] if r is not tiny))
    print(f"\n## Shard loader (decode + crop + flip + jitter + collate), crop {args.hw}, batch 4\n")
    print("| workers | samples/s | per worker |")
    print("|---|---|---|")
    for r in results["loader"]:
        print(f"| {r['workers']} | {r['samples_per_s']:.1f} | {r['per_worker']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
