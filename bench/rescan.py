"""The loader with a new scan per frame (`trainer pretrain --lidar`) against the stored scans, in one run.

    python bench/rescan.py                  # about 2 minutes on 2 cores
    python bench/rescan.py --quick --json r.json

What it measures, each figure beside its reference from the same run:
- loader samples/s of ONE worker (the ShardStream in-process: decode, crop, flip, jitter, collate), stored
  scans vs a new scan per frame (hdl64 from a random mount with hidden geometry, datagen run's default; and
  a random spinning pattern with the realistic sensor), at the demo's frame (384 x 128, crop 64 x 192) and
  at KITTI's (1216 x 352, crop 256 x 1216);
- what the network consumes: samples/s of a CPU training step (forward, L1, backward, AdamW) of `tiny`
  and `bpnet-s` at the demo crop and batch 8, so the table says whether one worker keeps one such process
  fed; and, for a GPU, how many workers the published speed of a bpnet step asks for (the estimate and its
  assumptions are printed with it);
- the caster on rough surfaces: the scan's ms per 640 x 480 image on smooth synthetic streets vs on the
  pseudo depth of a random tiny Depth Anything run on noisy photo-like images (rough, like a real teacher's
  maps of foliage and texture), and their ratio.

Shards are written here: synthetic streets (the oracle's pseudo depth) with the project's own writer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datagen.camera import sample_intrinsics  # noqa: E402
from datagen.pseudo_depth import teacher_to_depth  # noqa: E402
from datagen.teachers.oracle import oracle_teacher  # noqa: E402
from datagen.world.scenes import render_scene  # noqa: E402
from shared.scan.lidar import simulate_sparse_depth  # noqa: E402
from shared.scan.spec import ScanSpec  # noqa: E402
from shared.shard import Sample, ShardWriter  # noqa: E402
from trainer.data import DataConfig, ShardStream  # noqa: E402
from trainer.losses import pretrain_loss  # noqa: E402
from trainer.model import build_model  # noqa: E402
from trainer.train import param_groups  # noqa: E402

SCANS = {"stored": None, "hdl64, random mount": ScanSpec(),
         "random pattern, realistic sensor": ScanSpec(lidar="random", sensor="realistic")}
FRAMES = {"demo 384x128, crop 64x192": ((384, 128), (64, 192)),
          "KITTI 1216x352, crop 256x1216": ((1216, 352), (256, 1216))}
BATCH = 8
# The GPU side is an estimate (no GPU here): the FLOPs of a bpnet training step at 256 x 1216, counted by
# torch's FlopCounterMode on a smaller frame and scaled by the pixels (its convolutions scale linearly; the
# propagation ops are not counted, so the estimate errs towards a faster GPU and more workers), run at
# GPU_TFLOPS effective: a quarter of an A100's 312 dense bf16 TFLOP/s, a typical utilisation for
# convolutional networks of this size.
GPU_TFLOPS = 78.0


def write_shards(root: Path, size: tuple[int, int], n: int) -> None:
    w, h = size
    root.mkdir(parents=True, exist_ok=True)
    with ShardWriter(root / "bench-000000.tar") as wr:
        for i in range(n):
            s = render_scene(i, "street", w, h)
            rng = np.random.default_rng(i)
            depth, _ = teacher_to_depth(oracle_teacher(s.depth_m, rng), "disparity", rng, scene="outdoor")
            spec = ScanSpec(mount="kitti")
            sparse, info = simulate_sparse_depth(depth, s.K, rng, spec, rgb=s.rgb)
            wr.write(Sample(f"bench-{i:04d}", s.rgb, s.K, depth=depth, sparse=sparse,
                            meta={"source": "bench", "source_path": str(i), "lidar": {"spec": spec.to_dict()}}))


def loader_rate(root: Path, crop: tuple[int, int], scan, batches: int) -> float:
    """Samples/s of one in-process reader (what each DataLoader worker does), after one warm-up batch."""
    cfg = DataConfig(shards=str(root), batch_size=BATCH, crop_hw=crop, train=True, workers=0, seed=0,
                     shuffle_buffer=8, rescan=scan)
    it = iter(ShardStream(cfg, rank=0, world_size=1))
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH / (time.perf_counter() - t)


def step_rate(name: str, crop: tuple[int, int], steps: int) -> float:
    """Samples/s of a CPU training step of a network at batch BATCH."""
    torch.manual_seed(0)
    model = build_model(name).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    h, w = crop
    g = torch.Generator().manual_seed(0)
    rgb = torch.randn(BATCH, 3, h, w, generator=g)
    depth = torch.rand(BATCH, 1, h, w, generator=g) * 50 + 2
    sparse = torch.where(torch.rand(BATCH, 1, h, w, generator=g) < 0.05, depth, torch.zeros_like(depth))
    K = torch.tensor([[60.0, 0, w / 2], [0, 60.0, h / 2], [0, 0, 1]]).expand(BATCH, 3, 3).contiguous()

    def step():
        loss = pretrain_loss(model(rgb, sparse, K), depth, depth > 0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - t)


def bpnet_step_tflop(hw=(256, 1216), counted_hw=(64, 320)) -> float:
    """TFLOP of one bpnet forward + backward of one sample at hw (counted at counted_hw, scaled by pixels)."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = counted_hw
    model = build_model("bpnet").train()
    rgb, depth = torch.randn(1, 3, h, w), torch.rand(1, 1, h, w) * 50 + 2
    sparse = torch.where(torch.rand(1, 1, h, w) < 0.05, depth, torch.zeros_like(depth))
    K = torch.tensor([[[60.0, 0, w / 2], [0, 60.0, h / 2], [0, 0, 1]]])
    with FlopCounterMode(display=False) as counter:
        pretrain_loss(model(rgb, sparse, K), depth, depth > 0).backward()
    return counter.get_total_flops() * (hw[0] * hw[1]) / (h * w) / 1e12


def rough_vs_smooth(n: int) -> dict:
    """ms of one default scan (hdl64, random mount, hidden geometry) of a 640 x 480 pseudo depth map."""
    sys.path.insert(0, str(ROOT / "tests" / "datagen"))
    from fixtures import _image  # the tests' photo-like images: gradients with pixel noise

    from datagen.teachers.runner import DepthTeacher, save_random_teacher

    torch.set_num_threads(1)
    w, h = 640, 480
    with tempfile.TemporaryDirectory() as tmp:
        teacher = DepthTeacher(str(save_random_teacher(Path(tmp) / "tiny")), device="cpu", batch_size=1)
        maps = {"smooth (synthetic street)": [], "rough (random tiny teacher on noisy images)": []}
        for i in range(n):
            s = render_scene(100 + i, "street", w, h)
            rng = np.random.default_rng(i)
            maps["smooth (synthetic street)"].append(
                (teacher_to_depth(oracle_teacher(s.depth_m, rng), "disparity", rng, scene="outdoor")[0], s.K))
            rgb = np.asarray(_image(i, (w, h)))
            disp = teacher.predict([rgb])[0]
            maps["rough (random tiny teacher on noisy images)"].append(
                (teacher_to_depth(disp, "disparity", rng, scene="any")[0], sample_intrinsics(w, h, rng)))
    spec = ScanSpec()
    simulate_sparse_depth(*maps["smooth (synthetic street)"][0], np.random.default_rng(0), spec)  # compile
    out = {}
    for name, items in maps.items():
        times = []
        for depth, K in items:
            best = np.inf
            for rep in range(3):
                t = time.perf_counter()
                simulate_sparse_depth(depth, K, np.random.default_rng(rep), spec)
                best = min(best, time.perf_counter() - t)
            times.append(best * 1000)
        out[name] = float(np.mean(times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    batches = 3 if args.quick else 8
    res: dict = {"batch": BATCH, "loader_samples_per_s": {}, "step_samples_per_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for fname, (size, crop) in FRAMES.items():
            root = Path(tmp) / fname.split()[0]
            write_shards(root, size, BATCH * (batches + 1))
            res["loader_samples_per_s"][fname] = {s: loader_rate(root, crop, spec, batches) for s, spec in SCANS.items()}
    demo_crop = FRAMES["demo 384x128, crop 64x192"][1]
    for name in ("tiny", "bpnet-s"):
        res["step_samples_per_s"][f"{name} at {demo_crop[0]}x{demo_crop[1]}, 1 thread"] = step_rate(
            name, demo_crop, 1 if args.quick else 3)
    res["caster_ms_640x480"] = rough_vs_smooth(2 if args.quick else 4)
    ms = list(res["caster_ms_640x480"].values())
    res["rough_over_smooth"] = ms[1] / ms[0]
    kitti = res["loader_samples_per_s"]["KITTI 1216x352, crop 256x1216"]
    tflop = bpnet_step_tflop()
    gpu_rate = GPU_TFLOPS / tflop
    res["gpu_estimate"] = {
        "bpnet_step_tflop_per_sample_256x1216": tflop, "assumed_effective_tflops": GPU_TFLOPS,
        "bpnet_samples_per_s_per_gpu": gpu_rate,
        "workers_per_gpu_stored": gpu_rate / kitti["stored"],
        "workers_per_gpu_new_scan": {s: gpu_rate / r for s, r in kitti.items() if s != "stored"}}
    lines = ["| frame | " + " | ".join(SCANS) + " |", "|---|" + "---:|" * len(SCANS)]
    for fname, rates in res["loader_samples_per_s"].items():
        base = rates["stored"]
        lines.append(f"| {fname} | " + " | ".join(
            f"{r:.1f}" + ("" if s == "stored" else f" ({r / base:.2f}x)") for s, r in rates.items()) + " |")
    print("loader samples/s, one worker (in brackets: vs stored scans)\n" + "\n".join(lines))
    for k, v in res["step_samples_per_s"].items():
        print(f"training step {k}: {v:.1f} samples/s")
    for k, v in res["caster_ms_640x480"].items():
        print(f"scan of a 640x480 map, {k}: {v:.1f} ms")
    print(f"rough / smooth: {res['rough_over_smooth']:.2f}x")
    g = res["gpu_estimate"]
    print(f"GPU estimate: a bpnet step is {g['bpnet_step_tflop_per_sample_256x1216']:.2f} TFLOP per 256x1216 sample; "
          f"at {GPU_TFLOPS:.0f} effective TFLOP/s that is {g['bpnet_samples_per_s_per_gpu']:.1f} samples/s per GPU, "
          f"which {g['workers_per_gpu_stored']:.1f} workers feed with stored scans and "
          + ", ".join(f"{v:.1f} with {k}" for k, v in g["workers_per_gpu_new_scan"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
