"""GPU check: every CUDA path of the project run once, checked and measured, in one command.

    make gpu-check                                  # = python bench/gpu_check.py: a CUDA GPU, <= 7.5 minutes
    python bench/gpu_check.py --parts 2,3           # a subset (numbers below)
    python bench/gpu_check.py --cpu --out /tmp/r.md # every part at tiny sizes on the CPU (`make test` runs this)

Parts (each in its own process, with its own time limit; a part that fails, raises or hangs is recorded
and the others still run):
  1 teacher   Depth Anything V2 Large (random weights, built from its config: no download) through
              DepthTeacher, fp32 vs bf16: images/s at 518 px for batch 1, 8, 32 (end to end and forward
              only), the share of the processor's pre-processing, bf16 vs fp32 difference, peak memory
  2 trainer   bpnet (89.9M) forward+backward at 256x1216, batch 2, bf16 autocast as trainer/train.py:
              s/step, peak memory, finite loss; eval forward on the GPU vs the CPU on 64x96 (fp32); the
              fused CSPN chain (trainer.ops.propagate) and the folded inference network against their
              step-by-step references on the GPU
  3 knn4      every method of trainer.ops.knn4 on CUDA vs the CPU KD-tree (where scipy is missing: the CPU
              bucketed search): identical indices on 20 random cases (ties, <4 points, empty), time at
              256x1216 / 15k points and 1248x1408 / 60k points
  4 ddp       `torchrun --nproc_per_node 1` pre-training for 5 steps on shards of 8 images made by
              `datagen run --executor local`, and an nccl process group with DDP around bpnet (train.py forms
              a process group only for 2+ processes, and NCCL refuses two ranks on one GPU)
  5 datagen   `datagen run` over 64 images with a tiny random Depth Anything on the GPU (--executor: Ray
              where it is installed, else in one process): shards validate, 64 manifest rows, images/s
Parts 4 and 5 make their own photos (a folder of JPEGs) and use a Depth Anything teacher: the synthetic world
renders with Open3D and its oracle teacher needs scipy, which a lent machine may lack.
It writes bench/RESULTS-gpu.md (GPU, driver, CUDA, torch, commit, date; a table per part) whatever
happens, prints progress as it goes, and exits 1 if any check failed (2: no CUDA device at all, or a carry
bundle this Python cannot use; then it writes a report only where --out says, so a CPU machine never
replaces a GPU run's results). --cpu runs the same code at tiny sizes on the CPU (gloo instead of nccl,
`tiny` network, 8 images) and writes its report to --out or a temporary file, never to bench/RESULTS-gpu.md.

On a GPU node with the internet (a cluster's), `make setup && make gpu-check`.

On a lent GPU machine (no internet; a copy of the working tree without .git, plus at most 64 MiB of carried
git-ignored files; its python3 has torch with CUDA, transformers and numpy, and no Ray, Open3D or
webdataset): what it lacks travels as the carry bundle, bench/gpu-bundle/ (bench/gpu_bundle.py: Pillow,
isal, webdataset, typer, tqdm, numba and what they need, about 53 MiB). The script finds it next to itself
and unpacks the wheels this Python lacks into a temporary folder (no pip, no venv; the machine's own
packages are left as they are). Before the GPU is lent, here (PyPI):

    make gpu-bundle                 # the lent machines' python3 is CPython 3.12; GPU_PYTHON=3.x for another

The moment it is lent, one call of the device tool, carrying the bundle (carry: ["bench/gpu-bundle"],
timeout_s 560: the parts' limits add up to 450 s):

    set -o pipefail; python3 bench/gpu_check.py --commit <hash> --out "$OUT/RESULTS-gpu.md" 2>&1 | tee "$OUT/gpu-check.log"

then copy the report to bench/RESULTS-gpu.md here. If a part fails, rerun only that one (--parts N).

Rehearsed on the 2-core CPU machine in a fresh virtual environment holding only torch, transformers and
numpy (`python -m venv /tmp/min && /tmp/min/bin/pip install torch==2.13.0 transformers numpy`), with a bundle
for its Python (`make gpu-bundle GPU_PYTHON=3.11`): `/tmp/min/bin/python bench/gpu_check.py --cpu` found the
bundle, unpacked what that environment lacked and passed all five parts (README, "GPU check", has the
figures).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds to 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GPU_RESULTS = ROOT / "bench" / "RESULTS-gpu.md"
DEFAULT_BUNDLE = ROOT / "bench" / "gpu-bundle"  # `make gpu-bundle`; git-ignored, carried to a lent machine

from bench.gpu_bundle import BundleError  # noqa: E402 (standard library only, like everything above)
from bench.gpu_bundle import activate as activate_bundle  # noqa: E402

# bf16 vs fp32 teacher outputs: max |bf16 - fp32| / max |fp32| over an image. The same random Large on
# the CPU gave 0.014 (one 518 px image); real weights are smoother. Above this something is wrong.
TEACHER_BF16_TOL = 0.05
EVAL_TOL = 1e-4  # GPU vs CPU eval forward, fp32 both (the bound)
LARGE_PARAMS_M = 335.3  # Depth-Anything-V2-Large as published
BPNET_PARAMS_M = 89.9


@dataclass(frozen=True)
class Sizes:
    """What each part runs on: the issue's sizes on a GPU, tiny ones on the CPU."""

    device: str
    teacher_arch: str  # a shape of bench/teacher.py's ARCHS
    teacher_px: int
    teacher_batches: tuple[int, ...]
    teacher_images: int
    model: str  # trainer network preset
    train_hw: tuple[int, int]
    train_batch: int
    train_steps: int  # timed steps after one warm-up
    eval_hw: tuple[int, int]
    knn_max_hw: tuple[int, int]  # the 20 random cases are at most this big
    knn_timed: tuple[tuple[int, int, int], ...]  # (H, W, points)
    ddp_backend: str
    ddp_model: str
    ddp_crop: str
    ddp_batch: int
    pretrain_steps: int  # of `trainer pretrain` under torchrun
    ddp_steps: int  # of the DDP worker
    shard_hw: tuple[int, int]  # the images of parts 4 and 5 (H, W)
    scenes: int  # images of part 5 (part 4: 8)
    workers: int  # Ray workers of part 5 when it runs on Ray
    executor: str = "local"  # part 5's datagen executor (main sets it: --executor); part 4 always runs local


GPU = Sizes(device="cuda", teacher_arch="large", teacher_px=518, teacher_batches=(1, 8, 32), teacher_images=64,
            model="bpnet", train_hw=(256, 1216), train_batch=2, train_steps=3, eval_hw=(64, 96),
            knn_max_hw=(96, 160), knn_timed=((256, 1216, 15_000), (1248, 1408, 60_000)), ddp_backend="nccl",
            ddp_model="bpnet", ddp_crop="128x256", ddp_batch=4, pretrain_steps=5, ddp_steps=5, shard_hw=(192, 608),
            scenes=64, workers=min(16, os.cpu_count() or 1))
CPU = Sizes(device="cpu", teacher_arch="tiny", teacher_px=56, teacher_batches=(1, 2), teacher_images=2,
            model="tiny", train_hw=(64, 96), train_batch=2, train_steps=1, eval_hw=(64, 96),
            knn_max_hw=(24, 40), knn_timed=((32, 64, 100),), ddp_backend="gloo", ddp_model="tiny",
            ddp_crop="32x64", ddp_batch=2, pretrain_steps=2, ddp_steps=2, shard_hw=(64, 128), scenes=8, workers=2)

# part number -> (function name, title, time limit in s on a GPU); the limits add up to 7.5 minutes
PARTS = {
    1: ("part_teacher", "teacher: Depth Anything V2 through DepthTeacher, fp32 vs bf16", 120),
    2: ("part_trainer", "trainer: forward+backward under bf16 autocast; eval forward, device vs CPU", 90),
    3: ("part_knn", "4-NN: knn4 methods on the device vs the CPU KD-tree", 75),
    4: ("part_ddp", "torchrun pre-training, 1 process; DDP process group", 90),
    5: ("part_datagen", "datagen run with the teacher on the device", 75),
}
CPU_LIMIT_S = 120  # per part in --cpu mode (each takes 5-25 s on 2 idle cores; a shared, busy machine is 4x slower)


# -----------------------------------------------------------------------------
# results: rows of (what, value, status, note), one table per part


class Rows:
    """One part's results. Saved to JSON after every row, so a part killed at its time limit keeps what
    it measured; printed as they come, so the log shows progress."""

    def __init__(self, path: Path, deadline: float):
        self.path, self.deadline, self.rows = path, deadline, []

    def add(self, what: str, value="", status: str = "", note: str = "") -> None:
        self.rows.append({"what": what, "value": str(value), "status": status, "note": note})
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1))
        os.replace(tmp, self.path)  # whole or not at all, even when the part is killed mid-write
        print(f"    {status or 'info':5s} {what}: {value}" + (f"  ({note})" if note else ""), flush=True)

    def check(self, what: str, ok: bool, value="", note: str = "") -> bool:
        self.add(what, value, "PASS" if ok else "FAIL", note)
        return ok

    def measure(self, what: str, value, note: str = "") -> None:
        self.add(what, value, "", note)

    def skip(self, what: str, why: str) -> None:
        self.add(what, "not measured", "SKIP", why)

    def left(self) -> float:
        return self.deadline - time.time()

    @contextlib.contextmanager
    def step(self, what: str):
        """Run a block; an exception becomes an ERROR row (with the traceback's tail) and the part goes on."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 (the point: record it, keep going)
            self.add(what, f"{type(exc).__name__}: {exc}"[:300], "ERROR", tail(traceback.format_exc(), 6))


def tail(text: str, lines: int) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def failed(rows: list[dict]) -> bool:
    return any(r["status"] in ("FAIL", "ERROR") for r in rows)


def table(rows: list[dict]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["| check / measurement | value | status | note |", "|---|---|---|---|"]
    out += [f"| {cell(r['what'])} | {cell(r['value'])} | {r['status'] or '-'} | {cell(r['note'])} |" for r in rows]
    return out


# -----------------------------------------------------------------------------
# helpers shared by the parts


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn, *args, **kw):
    """(fn(*args, **kw), its wall time in s), the device's queue drained before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn(*args, **kw)
    sync(device)
    return out, time.perf_counter() - t


def reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> str:
    import torch

    if torch.device(device).type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def synthetic_batch(b: int, h: int, w: int, device, seed: int = 0) -> dict:
    """A pre-training batch as trainer.data makes one: uint8 RGB, 5% sparse points, dense depth, K."""
    import torch

    g = torch.Generator().manual_seed(seed)
    depth = 1 + 79 * torch.rand(b, 1, h, w, generator=g)
    sparse = depth * (torch.rand(b, 1, h, w, generator=g) < 0.05)
    rgb_raw = torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
    K = torch.tensor([[0.58 * w, 0, (w - 1) / 2], [0, 0.58 * w, 0.46 * (h - 1)], [0, 0, 1]]).expand(b, 3, 3)
    return {k: v.to(device) for k, v in dict(rgb_raw=rgb_raw, sparse=sparse, depth=depth, K=K.clone()).items()}


def train_step(model, opt, batch: dict, amp: bool):
    """One pre-training step as trainer/train.py takes it: the forward under bf16 autocast (the network keeps
    its geometry in fp32, trainer.model.in_float32), L_pre in fp32, clipping, AdamW.
    Returns (loss, grad norm, dtype of the full-resolution prediction) as Python values."""
    import torch

    from trainer.losses import pretrain_loss
    from trainer.model import network_inputs

    rgb, sparse, scale = network_inputs(batch["rgb_raw"], batch["sparse"])
    with torch.autocast(batch["sparse"].device.type, dtype=torch.bfloat16, enabled=amp):
        preds = model(rgb, sparse, batch["K"])
    loss = pretrain_loss([p.float() / scale for p in preds], batch["depth"], batch["depth"] > 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt.step()
    return loss.item(), norm.item(), preds[-1].dtype


def run_logged(cmd: list, timeout: float) -> subprocess.CompletedProcess:
    """A command of the project (a CLI, torchrun) from the repository root; stdout and stderr kept. At the
    time limit it gets SIGTERM first (torchrun passes it on; Ray's driver stops the cluster it started)."""
    print(f"    $ {' '.join(str(c) for c in cmd)}", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        err += f"\n[stopped at its time limit of {timeout:.0f} s]"
    print(f"    (exit {proc.returncode} after {time.perf_counter() - t:.1f} s)", flush=True)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]


def datagen_cli(executor: str) -> list[str]:
    return [sys.executable, "-m", "datagen.cli", "run", "--source", "folder", "--progress", "log", "--executor",
            executor]


# -----------------------------------------------------------------------------
# part 1: the teacher


def preprocess(teacher, images) -> None:
    """What a shard task does to each image before the teacher's model process sees it (resize on the CPU,
    normalise too when the replica is on the CPU): datagen.teachers.runner.TeacherFeed.pack."""
    from datagen.teachers.runner import TeacherFeed

    TeacherFeed(teacher.info(), len(images)).pack(images)


def forwards(model, x, n: int) -> None:
    import torch

    with torch.inference_mode():
        for _ in range(n):
            model(pixel_values=x)


def part_teacher(rows: Rows, s: Sizes, work: Path) -> None:
    import numpy as np
    import torch

    from bench.teacher import save_random_da
    from datagen.teachers.runner import DepthTeacher

    dev = s.device
    model_dir = work / f"da-{s.teacher_arch}"
    print(f"    building a random Depth Anything V2 {s.teacher_arch} and saving it to {model_dir}", flush=True)
    save_random_da(model_dir, s.teacher_arch, s.teacher_px)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (s.teacher_px, s.teacher_px, 3), dtype=np.uint8) for _ in range(s.teacher_images)]
    outputs = {}
    for dtype in ("fp32", "bf16"):
        with rows.step(f"{dtype} teacher"):
            teacher = DepthTeacher(str(model_dir), device=dev, dtype=dtype, batch_size=1)
            if dtype == "fp32":
                n = sum(p.numel() for p in teacher.model.parameters()) / 1e6
                if s.teacher_arch == "large":
                    rows.check("parameters (published: 335.3M)", round(n, 1) == LARGE_PARAMS_M, f"{n:.2f}M")
                else:
                    rows.measure("parameters", f"{n:.3f}M")
            for b in s.teacher_batches:
                if rows.left() < 15:
                    rows.skip(f"{dtype} batch {b}", "part time limit near")
                    continue
                teacher.batch_size = b
                teacher.predict(images[:b])  # warm-up: allocator, kernel choice
                reset_peak(dev)
                outputs[dtype], t = timed(dev, teacher.predict, images)
                _, t_pre = timed("cpu", preprocess, teacher, images)  # the shard task's share
                x = torch.randn(b, 3, s.teacher_px, s.teacher_px, device=dev, dtype=teacher.dtype)
                reps = max(1, 8 // b)
                forwards(teacher.model, x, 1)
                _, fwd = timed(dev, forwards, teacher.model, x, reps)
                fwd_ips = b * reps / fwd
                rows.measure(f"{dtype} batch {b}: images/s end to end", f"{len(images) / t:.1f}",
                             f"forward only {fwd_ips:.1f}/s; pre-processing {100 * t_pre / t:.0f}% of the time "
                             f"({1e3 * t_pre / len(images):.1f} ms/image, one CPU thread); peak {peak_gib(dev)}")
            del teacher
            reset_peak(dev)
    if "fp32" in outputs and "bf16" in outputs:
        a, b = outputs["bf16"], outputs["fp32"]
        finite = all(np.isfinite(x).all() for x in a + b)
        rows.check("bf16 and fp32 outputs finite, same shapes", finite and [x.shape for x in a] == [x.shape for x in b],
                   f"{len(a)} maps of {a[0].shape[0]}x{a[0].shape[1]}")
        rel = max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-12)) for x, y in zip(a, b, strict=True))
        mean = max(float(np.abs(x - y).mean() / max(np.abs(y).mean(), 1e-12)) for x, y in zip(a, b, strict=True))
        rows.check(f"bf16 vs fp32: max |diff| / max |fp32| (worst image) < {TEACHER_BF16_TOL}",
                   rel < TEACHER_BF16_TOL, f"{rel:.2e}", f"mean |diff| / mean |fp32|: {mean:.2e}")


# -----------------------------------------------------------------------------
# part 2: the trainer


def part_trainer(rows: Rows, s: Sizes, work: Path) -> None:
    import copy

    import torch

    from trainer.model import build_model, network_inputs

    dev = torch.device(s.device)
    torch.manual_seed(0)
    model = build_model(s.model).to(dev).train()
    n = sum(p.numel() for p in model.parameters()) / 1e6
    if s.model == "bpnet":
        rows.check(f"{s.model} parameters (issue: 89.9M)", round(n, 1) == BPNET_PARAMS_M, f"{n:.2f}M")
    else:
        rows.measure(f"{s.model} parameters", f"{n:.3f}M")
    with rows.step("training steps"):
        h, w = s.train_hw
        batch = synthetic_batch(s.train_batch, h, w, dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
        reset_peak(dev)
        losses, norms, times = [], [], []
        for i in range(s.train_steps + 1):  # the first is a warm-up (allocator, autotuning)
            if i > 1 and rows.left() < 2 * max(times):
                break
            t = time.perf_counter()
            loss, norm, out_dtype = train_step(model, opt, batch, amp=True)
            times.append(time.perf_counter() - t)
            losses.append(loss)
            norms.append(norm)
        what = f"{s.model} {h}x{w} batch {s.train_batch}, bf16 autocast"
        rows.check(f"{what}: loss and grad norm finite", all(map(math.isfinite, losses + norms)),
                   ", ".join(f"{v:.4g}" for v in losses))
        rows.check("full-resolution prediction is fp32 under autocast", out_dtype == torch.float32, str(out_dtype))
        timed = sorted(times[1:]) or times
        rows.measure(f"{what}: s/step", f"{timed[len(timed) // 2]:.3f}",
                     f"median of {len(timed)} after a warm-up of {times[0]:.2f} s; peak {peak_gib(dev)}")
    del model, opt
    reset_peak(dev)

    with rows.step("eval forward, device vs CPU"):
        h, w = s.eval_hw
        torch.manual_seed(1)
        ref_model = build_model(s.model).eval()
        b = synthetic_batch(1, h, w, "cpu", seed=1)
        rgb, sparse, _ = network_inputs(b["rgb_raw"], b["sparse"])
        with torch.no_grad():
            ref = ref_model(rgb, sparse, b["K"])
        dev_model = copy.deepcopy(ref_model).to(dev)

        def rel_diff() -> float:
            with torch.no_grad():
                out = dev_model(rgb.to(dev), sparse.to(dev), b["K"].to(dev))
            return max(float((o.cpu() - r).abs().max() / r.abs().max()) for o, r in zip(out, ref, strict=True))

        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            strict = rel_diff()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        note = "max over the 6 outputs of max |diff| / max |CPU|; TF32 off"
        if dev.type == "cpu":
            note += "; --cpu: both on the CPU, this only runs the code"
        rows.check(f"eval {h}x{w} fp32, {dev.type} vs CPU, relative difference <= {EVAL_TOL:g}",
                   strict <= EVAL_TOL, f"{strict:.2e}", note)
        if dev.type == "cuda":
            rows.measure("the same with torch's default TF32 settings", f"{rel_diff():.2e}",
                         f"cudnn.allow_tf32={tf32[1]}, matmul.allow_tf32={tf32[0]}")

    with rows.step("the fused CSPN chain and the inference network on the device"):
        fused_paths_on_device(rows, s, dev)


def fused_paths_on_device(rows: Rows, s: Sizes, dev) -> None:
    """trainer.ops.propagate (one CSPN chain in one autograd node) against the chain written out with
    KernelHead's normalisation and local_conv, forward and gradients; trainer.model.for_inference (norms
    folded into the convolutions) against eval mode; both on the device, fp32, TF32 off."""
    import copy

    import torch

    from trainer.model import build_model, for_inference, network_inputs
    from trainer.ops import local_conv, propagate

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        g = torch.Generator().manual_seed(3)
        h, w = s.eval_hw
        k, steps = 7, 6
        x = (torch.rand(2, 1, h, w, generator=g) * 30 + 2).to(dev).requires_grad_()
        h0 = torch.where(torch.rand(2, 1, h, w, generator=g) < 0.05, 20.0, 0.0).to(dev)
        raw = torch.randn(2, k * k - 1, h, w, generator=g).to(dev).requires_grad_()
        m = torch.rand(2, 1, h, w, generator=g).to(dev).requires_grad_()
        v = raw / (raw.abs().sum(1, keepdim=True) + 1e-6)
        kernel = torch.cat([v[:, :k * k // 2], 1 - v.sum(1, keepdim=True), v[:, k * k // 2:]], 1)
        ref = x
        for _ in range(steps):
            ref = (1 - m) * local_conv(ref, kernel) + m * h0
        out = propagate(x, h0, raw, m, steps)[1]
        fwd = float((out - ref).abs().max() / ref.abs().max())
        g_out = torch.autograd.grad(out.square().sum(), (x, raw, m))
        g_ref = torch.autograd.grad(ref.square().sum(), (x, raw, m))
        bwd = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g_out, g_ref, strict=True))
        rows.check(f"propagate (7x7, {steps} steps, {h}x{w}) vs the step-by-step chain, relative difference "
                   f"<= {EVAL_TOL:g}", max(fwd, bwd) <= EVAL_TOL, f"forward {fwd:.1e}, gradients {bwd:.1e}")

        torch.manual_seed(1)
        model = build_model(s.model).to(dev).eval()
        b = synthetic_batch(1, h, w, "cpu", seed=2)
        rgb, sparse, _ = network_inputs(b["rgb_raw"], b["sparse"])
        with torch.no_grad():
            ref_out = model(rgb.to(dev), sparse.to(dev), b["K"].to(dev))
            fast_out = for_inference(copy.deepcopy(model))(rgb.to(dev), sparse.to(dev), b["K"].to(dev))
        diff = max(float((a - r).abs().max() / r.abs().max()) for a, r in zip(fast_out, ref_out, strict=True))
        rows.check(f"for_inference (norms folded) vs eval mode, {h}x{w}, relative difference <= {EVAL_TOL:g}",
                   diff <= EVAL_TOL, f"{diff:.2e}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


# -----------------------------------------------------------------------------
# part 3: the 4-NN


def knn_case(i: int, max_hw: tuple[int, int], seed: int = 0):
    """Random case i (batch 2): densities from 0.2% to 50%, regular grids (many exact ties), 1-3 points,
    an empty image. Returns (sparse B x 1 x H x W on the CPU, description)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + i)
    h = int(torch.randint(8, max_hw[0] + 1, (1,), generator=g))
    w = int(torch.randint(8, max_hw[1] + 1, (1,), generator=g))
    depth = 1 + 79 * torch.rand(2, 1, h, w, generator=g)
    kind = ("random", "grid", "few", "empty", "random")[i % 5]
    if kind == "random":
        frac = (0.002, 0.02, 0.1, 0.5)[(i // 5) % 4]
        mask = torch.rand(2, 1, h, w, generator=g) < frac
        what = f"random {frac:.1%}"
    elif kind == "grid":
        step = 2 + (i // 5) % 4
        mask = torch.zeros(2, 1, h, w, dtype=torch.bool)
        mask[..., ::step, ::step] = True
        what = f"grid every {step} px (ties)"
    elif kind == "few":
        mask = torch.zeros(2, 1, h * w, dtype=torch.bool)
        for b in range(2):
            mask[b, 0, torch.randperm(h * w, generator=g)[: 1 + (i + b) % 3]] = True
        mask = mask.view(2, 1, h, w)
        what = "1-3 points"
    else:
        mask = torch.rand(2, 1, h, w, generator=g) < 0.05
        mask[1] = False
        what = "second image empty"
    return depth * mask, f"{h}x{w} {what}"


def points_sparse(h: int, w: int, n: int, seed: int = 0):
    """1 x 1 x H x W with exactly n valid pixels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(h * w)
    flat[torch.randperm(h * w, generator=g)[:n]] = 1 + 79 * torch.rand(n, generator=g)
    return flat.view(1, 1, h, w)


def part_knn(rows: Rows, s: Sizes, work: Path) -> None:
    import torch

    from trainer import ops

    dev = torch.device(s.device)
    methods = [m for m in ops.KNN4_METHODS if m != "kdtree"] + ["auto"]
    # the reference: the KD-tree (scipy); where scipy is missing (the carry bundle leaves it out), the CPU run
    # of the bucketed search, which make test holds equal to the KD-tree and to the exhaustive search
    ref, REF = ("kdtree", "KD-tree") if ops.have_scipy() else ("bucket", "CPU bucketed search")
    rows.measure(f"methods checked against the {REF}", ", ".join(methods), f"trainer.ops.KNN4_METHODS on {dev}"
                 + ("" if ref == "kdtree" else "; scipy is not installed here: no KD-tree"))
    cases = [knn_case(i, s.knn_max_hw) for i in range(20)]
    refs = [ops.knn4(sp, method=ref) for sp, _ in cases]
    for m in methods:
        with rows.step(f"{m}: 20 random cases"):
            bad = []
            for (sp, what), (idx, off) in zip(cases, refs, strict=True):
                i2, o2 = ops.knn4(sp.to(dev), method=m)
                if not (torch.equal(i2.cpu(), idx) and torch.equal(o2.cpu(), off)):
                    bad.append(what)
            rows.check(f"{m} on {dev.type}: indices and offsets equal to the {REF}'s, 20 cases",
                       not bad, f"{20 - len(bad)}/20 equal", "differ: " + "; ".join(bad[:3]) if bad else "")
    for h, w, n in s.knn_timed:
        with rows.step(f"{h}x{w}, {n} points"):
            sp = points_sparse(h, w, n)
            (idx, off), t_tree = timed("cpu", ops.knn4, sp, method=ref)
            rows.measure(f"{h}x{w}, {n} points: {REF} on the CPU" + (" (1 worker)" if ref == "kdtree" else "")
                         + ", s", f"{t_tree:.3f}")
            sp_dev = sp.to(dev)
            for m in methods:
                if m == "auto":
                    continue
                if rows.left() < 10 + 3 * t_tree:
                    rows.skip(f"{h}x{w}, {n} points: {m}", "part time limit near")
                    continue
                (i2, o2), first = timed(dev, ops.knn4, sp_dev, method=m)
                same = torch.equal(i2.cpu(), idx) and torch.equal(o2.cpu(), off)
                again = timed(dev, ops.knn4, sp_dev, method=m)[1] if rows.left() > 3 * first + 10 else None
                t = again if again is not None else first
                rows.check(f"{h}x{w}, {n} points: {m} on {dev.type} equal to the {REF}", same,
                           f"{t:.3f} s", f"{t_tree / t:.1f}x the {REF}'s speed"
                           + ("" if again is not None else "; first call, no repeat (time limit)"))


# -----------------------------------------------------------------------------
# part 4: torchrun and the DDP process group


def make_images(folder: Path, n: int, hw: tuple[int, int]) -> Path:
    """n photos for `datagen run --source folder`: a sky gradient over a ground that darkens towards the
    horizon, with a few boxes (deterministic, distinct). The folder source needs neither Open3D (the synthetic
    world renders with it) nor scipy (its oracle teacher uses it), which a lent machine may lack."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    h, w = hw
    v, u = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    for i in range(n):
        rng = np.random.default_rng(i)
        horizon = rng.uniform(0.3, 0.5)
        sky = np.stack([0.5 + 0.3 * v, 0.6 + 0.3 * v, np.full_like(v, 0.9)], -1)
        ground = (0.25 + 0.5 * (v - horizon))[..., None] * rng.uniform(0.6, 1.0, 3)
        img = np.where((v < horizon)[..., None], sky, ground)
        for _ in range(4):
            y0, x0 = rng.uniform(horizon * 0.8, 0.9), rng.uniform(0, 0.9)
            box = (v > y0) & (v < y0 + rng.uniform(0.05, 0.3)) & (u > x0) & (u < x0 + rng.uniform(0.03, 0.2))
            img[box] = rng.uniform(0.1, 0.9, 3)
        img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img{i:03d}.jpg", quality=95)
    return folder


def make_shards(s: Sizes, work: Path, n: int, executor: str, timeout: float):
    """`datagen run --source folder` over n images with a tiny random Depth Anything (on the device); returns
    (the CompletedProcess, the shard folder)."""
    from datagen.teachers.runner import save_random_teacher

    teacher = save_random_teacher(work / "tiny-da")
    images = make_images(work / "images", n, s.shard_hw)
    cmd = [*datagen_cli(executor), "--root", images, "--teacher", teacher, "--out", work / "shards",
           "--shard-size", max(1, n // s.workers)]
    if executor == "ray":
        cmd += ["--workers", s.workers]
    return run_logged(cmd, timeout), work / "shards" / "folder"


def part_ddp(rows: Rows, s: Sizes, work: Path) -> None:
    proc, shards = make_shards(s, work, 8, "local", rows.left() / 3)
    if rows.check("datagen run --executor local: 8 images, tiny random Depth Anything", proc.returncode == 0,
                  f"exit {proc.returncode}", tail(proc.stderr, 3) if proc.returncode else ""):
        pretrain_under_torchrun(rows, s, work, shards)
    with rows.step(f"{s.ddp_backend} process group"):
        ddp_steps(rows, s, work)


def pretrain_under_torchrun(rows: Rows, s: Sizes, work: Path, shards: Path) -> None:
    summary_path = work / "pretrain.json"
    cmd = [*torchrun(), "-m", "trainer.cli", "pretrain", "--shards", shards, "--model", s.ddp_model,
           "--steps", s.pretrain_steps, "--batch-size", s.ddp_batch, "--crop", s.ddp_crop, "--out", work / "run",
           "--workers", 1, "--device", s.device, "--quiet", "--log-every", 1, "--ckpt-every", s.pretrain_steps,
           "--json", summary_path]
    proc = run_logged(cmd, rows.left() / 2)
    ok = proc.returncode == 0 and summary_path.is_file()
    if not rows.check(f"torchrun --nproc_per_node 1 trainer pretrain, {s.pretrain_steps} steps", ok,
                      f"exit {proc.returncode}", "" if ok else tail(proc.stdout + proc.stderr, 4)):
        return
    sm = json.loads(summary_path.read_text())
    amp = s.device == "cuda"
    rows.check("steps, device, bf16 autocast, finite loss, checkpoint",
               sm["steps"] == s.pretrain_steps and sm["device"].startswith(s.device) and sm["amp_bf16"] == amp
               and math.isfinite(sm["final_loss"]) and Path(sm["checkpoint"] or "").is_file(),
               f"{sm['steps']} steps on {sm['device']}, amp_bf16={sm['amp_bf16']}, "
               f"loss {sm['first_loss']:.4g} -> {sm['final_loss']:.4g}",
               f"{sm['samples_per_s']:.2f} samples/s ({s.ddp_model}, crop {s.ddp_crop}; train.py's figure, "
               "with the loader's first batch)")
    rows.measure("world size of that run", sm["world_size"],
                 "trainer/train.py forms a process group (nccl on a GPU) only for 2+ processes, and NCCL refuses "
                 "two ranks on one GPU: the next rows form one here")


def ddp_steps(rows: Rows, s: Sizes, work: Path) -> None:
    """The collectives trainer/train.py uses, on the backend it would pick, around DDP: in this process, as
    rank 0 of 1 (the rendezvous through a file, no port)."""
    import torch
    import torch.distributed as dist

    from trainer.model import build_model

    dev = torch.device(s.device, 0) if s.device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(s.ddp_backend, store=dist.FileStore(str(work / "pg-store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model(s.ddp_model).to(dev)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
        h, w = (int(v) for v in s.ddp_crop.split("x"))
        batch = synthetic_batch(s.ddp_batch, h, w, dev)
        losses = []
        for _ in range(s.ddp_steps):
            loss, _, _ = train_step(ddp, opt, batch, amp=True)
            t = torch.tensor([loss], device=dev)
            dist.all_reduce(t)
            losses.append(t.item() / dist.get_world_size())
        rows.check(f"{dist.get_backend()} process group + DDP({s.ddp_model}), {s.ddp_steps} bf16-autocast steps, "
                   "all_reduce of the loss", dist.get_backend() == s.ddp_backend and all(map(math.isfinite, losses)),
                   ", ".join(f"{v:.4g}" for v in losses))
        gathered = [None]
        dist.all_gather_object(gathered, {"rank": dist.get_rank(), "rng": torch.get_rng_state()[:4].tolist()})
        dist.barrier()
        rows.check("all_gather_object (of RNG states, as checkpoints do) and barrier", gathered[0]["rank"] == 0,
                   f"gathered from rank {gathered[0]['rank']}")
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# part 5: datagen with the teacher on the device


def table_counts(out: Path) -> tuple[int, int, str]:
    """(manifest rows, failure rows, where they were read): manifest.parquet and failures.parquet, or, where
    pyarrow is missing and datagen wrote no tables, the shards' sidecars they are made from."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.rows.json"))]
        return (sum(len(r["manifest"]) for r in rows), sum(len(r["failures"]) for r in rows),
                "from the sidecars: pyarrow is not installed, datagen wrote no tables")
    return pq.read_table(out / "manifest.parquet").num_rows, pq.read_table(out / "failures.parquet").num_rows, ""


def part_datagen(rows: Rows, s: Sizes, work: Path) -> None:
    from shared.shard import iter_samples, list_shards, validate_shard

    proc, out = make_shards(s, work, s.scenes, s.executor, rows.left() - 5)
    log = proc.stdout + proc.stderr
    if not rows.check(f"datagen run --executor {s.executor}: {s.scenes} images, tiny random Depth Anything",
                      proc.returncode == 0, f"exit {proc.returncode}", tail(log, 4) if proc.returncode else ""):
        return
    # "teacher M: 1 replica(s) on cuda:0, bfloat16" (Ray) or "teacher M: in this process on cuda, bfloat16"
    placed = re.search(r"(?:replica\(s\)|in this process) on (\S+), (\S+)", log)
    rows.check(f"teacher on {s.device}", bool(placed) and placed.group(1).startswith(s.device),
               placed.group(0) if placed else "no teacher log line")
    speed = re.search(r"([\d.]+) images/s over ([\d.]+) s \(([\d.]+) s in all\)", log)
    if speed:
        rows.measure("images/s (first to last shard task)", speed.group(1),
                     f"{speed.group(2)} s of work, {speed.group(3)} s with the start-up; "
                     + (f"{s.workers} Ray workers" if s.executor == "ray" else "one process (--executor local)")
                     + f", {s.shard_hw[0]}x{s.shard_hw[1]}")
    shards = list_shards(str(out))
    errors = [e for p in shards for e in validate_shard(p).errors]
    rows.check("shards validate", bool(shards) and not errors, f"{len(shards)} shards",
               "; ".join(errors[:2]))
    manifest, failures, where = table_counts(out)
    rows.check(f"manifest has {s.scenes} rows, no failures", manifest == s.scenes and failures == 0,
               f"{manifest} rows, {failures} failures", where)
    want = "bfloat16" if s.device == "cuda" else "float32"  # DepthTeacher's default dtype on that device
    dtypes = sorted({smp.meta["teacher"]["dtype"] for smp in iter_samples(str(out))})
    rows.check(f"samples record the teacher's dtype {want}", dtypes == [want], ", ".join(dtypes))


# -----------------------------------------------------------------------------
# the driver: each part in a child process with a time limit, then the report


def run_part(argv: list[str], limit: float) -> tuple[list[dict], float]:
    """Run one part's child process; its rows, plus a FAIL/ERROR row when it hung, crashed or raised.

    The child gets its own process group, so that at the limit torchrun, Ray and the datagen CLI it
    started go with it (SIGTERM first: Ray's driver then stops the local cluster it started)."""
    rows_path = Path(argv[argv.index("--rows") + 1]) if "--rows" in argv else None
    last = collections.deque(maxlen=40)
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def echo() -> None:
        for line in proc.stdout:
            last.append(line.rstrip())
            print(line.rstrip(), flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError):  # whatever the part left behind (a stray Ray worker)
        os.killpg(proc.pid, signal.SIGTERM)
    reader.join(timeout=5)
    took = time.time() - t0
    rows = []
    if rows_path is not None and rows_path.is_file():
        with contextlib.suppress(ValueError):
            rows = json.loads(rows_path.read_text())
    log_tail = " / ".join(list(last)[-6:])
    if timed_out:
        rows.append({"what": "part time limit", "value": f"killed after {limit:.0f} s", "status": "FAIL",
                     "note": log_tail})
    elif proc.returncode != 0:
        rows.append({"what": "part process", "value": f"exit {proc.returncode}", "status": "ERROR", "note": log_tail})
    elif not rows:
        rows.append({"what": "part process", "value": "no results", "status": "ERROR", "note": log_tail})
    return rows, took


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here: pass --commit)"


def environment(commit: str | None) -> dict:
    """The machine and the software, without creating a CUDA context in this (the parent) process."""
    import torch

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    env = {"date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "commit": commit or git_commit(), "host": platform.node(), "CPU cores": str(os.cpu_count()),
           "python": platform.python_version(), "torch": torch.__version__,
           "CUDA (torch build)": str(torch.version.cuda), "cuDNN": str(torch.backends.cudnn.version()),
           "transformers": version("transformers"), "ray": version("ray"),
           "numba / scipy / pyarrow / webdataset": " / ".join(version(p) for p in ("numba", "scipy", "pyarrow",
                                                                                 "webdataset"))}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
        env["GPU"] = "; ".join(smi) + " (name, driver, memory)"
    except (OSError, subprocess.SubprocessError):
        env["GPU"] = "none found (nvidia-smi)"
    env["torch.cuda.is_available()"] = str(torch.cuda.is_available())
    return env


def write_report(path: Path, cpu: bool, env: dict, results: dict, total_s: float) -> None:
    command = " ".join(["python bench/gpu_check.py", *sys.argv[1:]])
    lines = ["# GPU check" + (" (--cpu: tiny sizes on the CPU, this only shows that the code runs)" if cpu else ""),
             "", f"Generated by `{command}` in {total_s:.0f} s. Each part runs in its own process with its own "
             "time limit; a FAIL or ERROR row makes the script exit 1. The script's docstring says what each "
             "part does and how to run it on a lent GPU machine.", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in env.items()), "",
             "| part | result | seconds | time limit (s) |", "|---|---|---:|---:|"]
    for n, (rows, took, limit) in results.items():
        lines.append(f"| {n}. {PARTS[n][1]} | {'FAIL' if failed(rows) else 'PASS'} | {took:.1f} | {limit:.0f} |")
    for n, (rows, _, _) in results.items():
        lines += ["", f"## Part {n}: {PARTS[n][1]}", "", *table(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the test of this script)")
    ap.add_argument("--parts", default="1,2,3,4,5", help="comma-separated part numbers")
    ap.add_argument("--out", type=Path, help="report path (GPU default: bench/RESULTS-gpu.md; --cpu: a temp file)")
    ap.add_argument("--budget", type=float, default=1.0, help="multiply every part's time limit by this")
    ap.add_argument("--commit", help="commit to record when the tree has no .git (a copy on another machine)")
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE if DEFAULT_BUNDLE.is_dir() else None,
                    help="wheels to use for what this Python lacks (bench/gpu_bundle.py; default: bench/gpu-bundle "
                    "when it exists)")
    ap.add_argument("--no-bundle", action="store_true", help="use this Python's packages only")
    ap.add_argument("--executor", choices=("auto", "local", "ray"), default="auto",
                    help="part 5's datagen executor; auto: ray where it is installed, else local")
    ap.add_argument("--part", type=int, help=argparse.SUPPRESS)  # internal: run one part in this process
    ap.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    executor = args.executor
    if executor == "auto":
        executor = "ray" if importlib.util.find_spec("ray") is not None else "local"
    sizes = replace(CPU if args.cpu else GPU, executor=executor)

    if args.part:  # a child: run one part, every row saved as it comes (the parent activated the bundle)
        rows = Rows(args.rows, args.deadline)
        with rows.step(f"part {args.part}"):
            globals()[PARTS[args.part][0]](rows, sizes, args.work)
        return 0

    out = args.out or (Path(tempfile.gettempdir()) / "dmd3c-gpu-check-cpu.md" if args.cpu else GPU_RESULTS)
    if args.cpu and out.resolve() == GPU_RESULTS.resolve():
        ap.error(f"--cpu never writes {GPU_RESULTS.relative_to(ROOT)}: that file holds the GPU run's results")
    parts = [int(p) for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(parts) - set(PARTS)):
        ap.error(f"unknown part(s) {unknown}; parts are {sorted(PARTS)}")
    t_start = time.time()
    bundle = None
    if args.bundle is not None and not args.no_bundle:
        try:  # before anything imports what the bundle may provide; the children get it through PYTHONPATH
            bundle = activate_bundle(args.bundle)
        except BundleError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = environment(args.commit)
    env["datagen executor (part 5)"] = executor
    if bundle is not None:
        env["carry bundle"] = (f"{args.bundle}: unpacked {', '.join(bundle['used']) or 'nothing'}; this Python's "
                               f"own: {', '.join(bundle['kept']) or 'nothing'}")
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    results: dict[int, tuple[list[dict], float, float]] = {}
    if not args.cpu and env["torch.cuda.is_available()"] != "True":
        env["FAILED before any part"] = (f"torch {env['torch']} (CUDA build: {env['CUDA (torch build)']}) sees no "
                                         "CUDA device. Install a CUDA build of torch, or run with --cpu.")
        print(env["FAILED before any part"], flush=True)
        if args.out:  # never replace a GPU run's results with "no GPU here" unasked
            write_report(out, args.cpu, env, results, time.time() - t_start)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for n in parts:
            limit = (CPU_LIMIT_S if args.cpu else PARTS[n][2]) * args.budget
            work = Path(tmp) / f"part{n}"
            work.mkdir()
            print(f"\n== part {n}/{len(PARTS)}: {PARTS[n][1]} (time limit {limit:.0f} s)", flush=True)
            argv = [sys.executable, __file__, "--part", str(n), "--rows", str(work / "rows.json"), "--work",
                    str(work), "--deadline", str(time.time() + limit), "--executor", executor,
                    "--no-bundle"] + (["--cpu"] if args.cpu else [])
            rows, took = run_part(argv, limit)
            results[n] = (rows, took, limit)
            print(f"== part {n}: {'FAIL' if failed(rows) else 'PASS'} in {took:.1f} s", flush=True)
            write_report(out, args.cpu, env, results, time.time() - t_start)  # after every part: a kill loses little
            shutil.rmtree(work, ignore_errors=True)
    total = time.time() - t_start
    write_report(out, args.cpu, env, results, total)
    bad = [n for n, (rows, _, _) in results.items() if failed(rows)]
    print(f"\n{'FAILED parts: ' + ', '.join(map(str, bad)) if bad else 'all parts passed'} "
          f"in {total:.0f} s; report: {out}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
