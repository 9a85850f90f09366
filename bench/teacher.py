"""Teacher throughput (batched DepthTeacher vs one image at a time vs transformers' own pipeline), and the
model process's CPU time per image outside the network, before and after the pre/post-processing moved out.

    python bench/teacher.py                          # tiny random DA on CPU (+ any DA V2 found in the HF cache)
    python bench/teacher.py --model depth-anything/Depth-Anything-V2-Large-hf --device cuda
    python bench/teacher.py --arch large --device cuda   # random weights, the real Large architecture
    python bench/teacher.py --quick --json teacher.json  # 8 images, 2 reps, no pipeline row; rows as JSON

Prints a Markdown table of images/s (best and median of interleaved repetitions) and the ratio to
batch 1 measured in the same run. Speed does not
depend on the weights, so `--arch` measures a real architecture where no weights can be downloaded.

The second table (`--overhead-sizes`, on by default) times, on one CPU thread with the tiny architecture at
the real 518 px input, what the teacher actor spends per image besides the forward pass: before, the actor
ran transformers' processor on every image and upsampled every map (the reference, kept here as
`legacy_actor`); now the shard task does both (`TeacherFeed.pack` / `unpack`, timed as task CPU) and the
actor only runs the network (`DepthTeacher.run`). Goal: <= 2 ms per image in the actor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark must never download

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datagen.teachers.runner import DepthTeacher, TeacherFeed, TeacherUnavailable, _cached_snapshot  # noqa: E402

V2_IDS = [f"depth-anything/Depth-Anything-V2-{s}-hf" for s in ("Small", "Base", "Large")]

# Depth Anything V2 shapes as published in the -hf configs; "tiny" is the test model
ARCHS = {
    "tiny": dict(hidden=32, layers=4, heads=2, out=[1, 2, 3, 4], neck=[8, 16, 32, 32], fusion=16, head=8),
    "small": dict(hidden=384, layers=12, heads=6, out=[3, 6, 9, 12], neck=[48, 96, 192, 384], fusion=64, head=32),
    "base": dict(hidden=768, layers=12, heads=12, out=[3, 6, 9, 12], neck=[96, 192, 384, 768], fusion=128, head=32),
    "large": dict(hidden=1024, layers=24, heads=16, out=[5, 12, 18, 24], neck=[256, 512, 1024, 1024], fusion=256,
                  head=32),
}


def save_random_da(path: Path, arch: str, input_px: int) -> None:
    """A randomly initialised Depth Anything of the given shape plus a V2-style processor, saved to `path`."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    a = ARCHS[arch]
    torch.manual_seed(0)
    backbone = Dinov2Config(image_size=518, patch_size=14, hidden_size=a["hidden"], num_hidden_layers=a["layers"],
                            num_attention_heads=a["heads"], out_indices=a["out"], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=a["hidden"],
                                 neck_hidden_sizes=a["neck"], fusion_hidden_size=a["fusion"],
                                 head_hidden_size=a["head"])
    DepthAnythingForDepthEstimation(config).save_pretrained(path)
    DPTImageProcessorPil(size={"height": input_px, "width": input_px}, keep_aspect_ratio=True, ensure_multiple_of=14,
                         resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                         do_pad=False).save_pretrained(path)


def timed(fn, images, device: str) -> float:
    """Images per second for one call; predict returns numpy, so GPU work is done when it returns."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(images)
    return len(images) / (time.perf_counter() - t0)


def bench_one(name: str, spec: str, images, device: str | None, batch: int, with_pipeline: bool,
              reps: int) -> list[tuple]:
    """Interleaved repetitions of each path; best and median of `reps` (shared CPUs are noisy)."""
    teacher = DepthTeacher(spec, device=device, batch_size=1)
    dev = teacher.device

    def predict_with(b):
        def fn(ims):
            teacher.batch_size = b
            return teacher.predict(ims)
        return fn

    paths = {}
    if with_pipeline:
        from transformers import AutoImageProcessor, pipeline

        processor = AutoImageProcessor.from_pretrained(spec)
        pipe = pipeline("depth-estimation", model=teacher.model, image_processor=processor, device=dev)
        paths["HF pipeline, 1 by 1"] = lambda ims: [pipe(Image.fromarray(im)) for im in ims]
    paths["DepthTeacher batch 1"] = predict_with(1)
    paths[f"DepthTeacher batch {batch}"] = predict_with(batch)
    for fn in paths.values():  # warm-up: allocator, kernel selection, lazy imports
        fn(images[: max(2, batch)])
    runs = {p: [] for p in paths}
    for _ in range(reps):
        for p, fn in paths.items():
            runs[p].append(timed(fn, images, dev))
    base = max(runs["DepthTeacher batch 1"])
    dtype = teacher.info()["dtype"]
    return [(name, dev, dtype, p, max(r), float(np.median(r)), max(r) / base) for p, r in runs.items()]


def photos(sizes: list[tuple[int, int]], n: int) -> dict[tuple[int, int], list[np.ndarray]]:
    """Photo-like images (gradients, texture, noise) per size: random noise is not what a resize sees."""
    rng = np.random.default_rng(0)
    out = {}
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)], axis=-1)
        out[(h, w)] = [np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]
    return out


def legacy_actor(processor, model, images: list[np.ndarray], batch: int) -> list[np.ndarray]:
    """The teacher actor before the split (the reference): transformers' processor on every image, batches
    per tensor size, transformers' post-processing (upsampling to the image) in the actor."""
    out: list = [None] * len(images)
    pending: dict[tuple, list] = {}

    def run(queue):
        x = torch.from_numpy(np.stack([p for _, p in queue]))
        with torch.inference_mode():
            pred = model(pixel_values=x).predicted_depth.float()
            res = processor.post_process_depth_estimation(SimpleNamespace(predicted_depth=pred),
                                                          target_sizes=[images[i].shape[:2] for i, _ in queue])
        for (i, _), r in zip(queue, res, strict=True):
            out[i] = r["predicted_depth"].numpy()

    for i, image in enumerate(images):
        px = processor(images=[image], return_tensors=None, input_data_format="channels_last")["pixel_values"][0]
        queue = pending.setdefault(px.shape, [])
        queue.append((i, np.ascontiguousarray(px, dtype=np.float32)))
        if len(queue) == batch:
            run(queue)
            queue.clear()
    for queue in pending.values():
        if queue:
            run(queue)
    return out


class ForwardClock:
    """CPU seconds spent inside model.forward (one thread: the process clock is this thread's)."""

    def __init__(self, model):
        self.seconds, self._forward = 0.0, model.forward

        def timed(*a, **kw):
            t0 = time.process_time()
            try:
                return self._forward(*a, **kw)
            finally:
                self.seconds += time.process_time() - t0

        model.forward = timed


def actor_overhead(sizes: list[tuple[int, int]], n: int, batch: int, reps: int) -> list[dict]:
    """CPU ms per image: the actor outside the forward pass, the forward, and the shard task's share, before
    (legacy_actor) and after (TeacherFeed in the task + DepthTeacher.run in the actor); best of `reps`."""
    from transformers import AutoImageProcessor

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_random_da(Path(tmp), "tiny", 518)
        teacher = DepthTeacher(tmp, device="cpu", batch_size=batch)
        processor = AutoImageProcessor.from_pretrained(tmp)
        clock = ForwardClock(teacher.model)
        feed = TeacherFeed(teacher.info(), batch)
        gpu_feed = TeacherFeed({**teacher.info(), "device": "cuda"}, batch)  # packing only: no GPU needed
        for hw, images in photos(sizes, n).items():
            best = {}
            for _ in range(reps):
                clock.seconds, t0 = 0.0, time.process_time()
                before = legacy_actor(processor, teacher.model, images, batch)
                runs = {"before": (time.process_time() - t0, clock.seconds, 0.0, 0.0)}
                t0 = time.process_time()
                packed = feed.pack(images)  # the shard task
                t1 = time.process_time()
                clock.seconds = 0.0
                answer = teacher.run(packed)  # the actor
                t2 = time.process_time()
                after = [m for m, _ in feed.unpack(packed, answer)]  # the shard task
                t3 = time.process_time()
                gpu_feed.pack(images)  # what a task does for a GPU replica: the resize only
                runs["after"] = (t2 - t1, clock.seconds, (t1 - t0) + (t3 - t2), time.process_time() - t3)
                for path, (total, fwd, task, gpu_task) in runs.items():
                    row = (max(total - fwd, 0.0), fwd, task, gpu_task)
                    if path not in best or row[0] < best[path][0]:
                        best[path] = row
            worst = max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(after, before, strict=True))
            for path, (actor, fwd, task, gpu_task) in best.items():
                rows.append({"size": f"{hw[1]}x{hw[0]}", "path": path, "actor_ms": 1e3 * actor / n,
                             "forward_ms": 1e3 * fwd / n, "task_ms": 1e3 * task / n,
                             "task_gpu_replica_ms": 1e3 * gpu_task / n, "max_rel_diff": worst})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="hub id or local folder of a real depth model")
    ap.add_argument("--arch", choices=list(ARCHS), default="tiny", help="random-weight architecture to bench")
    ap.add_argument("--input-px", type=int, default=518, help="processor target size for --arch (V2 uses 518)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or 'auto'")
    ap.add_argument("--n", type=int, default=16, help="images per measurement")
    ap.add_argument("--size", default="240x320", help="HxW of the input images")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions per path")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="8 images, 2 repetitions, no HF pipeline row")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--overhead-sizes", default="480x640,960x1280",
                    help="HxW list for the actor-overhead table ('' to skip)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.reps = 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = None if args.device == "auto" else args.device
    h, w = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(args.n)]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            rows += bench_one(args.model, args.model, images, device, args.batch, True, args.reps)
        else:
            save_random_da(Path(tmp), args.arch, args.input_px)
            name = f"random {args.arch} ({args.input_px} px)"
            rows += bench_one(name, tmp, images, device, args.batch, not args.quick, args.reps)
            for repo in V2_IDS:  # real weights only if already on disk: a benchmark never downloads
                try:
                    if _cached_snapshot(repo) is not None:
                        rows += bench_one(repo, repo, images, device, args.batch, False, args.reps)
                except TeacherUnavailable:
                    pass

    print(f"\nTeacher throughput, {args.n} images of {h}x{w}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads\n")
    print(f"| model | device | dtype | path | images/s (best of {args.reps}) | median | best vs batch 1 |")
    print("|---|---|---|---|---:|---:|---:|")
    for name, dev, dtype, path, best, median, ratio in rows:
        print(f"| {name} | {dev} | {dtype} | {path} | {best:.2f} | {median:.2f} | {ratio:.2f}x |")
    if not args.model and not any(r[0] in V2_IDS for r in rows):
        print("\n(no Depth Anything V2 weights in the local HF cache; pass --model to bench real ones)")
    threads = torch.get_num_threads()
    actor = []
    if args.overhead_sizes:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.overhead_sizes.split(",")]
        actor = actor_overhead(sizes, n=args.n, batch=min(args.batch, 4), reps=args.reps)
        print(format_overhead(actor, args.n))
    if args.json:
        keys = ("model", "device", "dtype", "path", "images_per_s", "median", "vs_batch_1")
        with open(args.json, "w") as f:
            json.dump({"images": args.n, "size": args.size, "reps": args.reps, "threads": threads,
                       "rows": [dict(zip(keys, r, strict=True)) for r in rows], "actor": actor}, f, indent=2)


def format_overhead(rows: list[dict], n: int) -> str:
    """The actor-overhead rows as Markdown, with the before/after ratio of each size."""
    out = [f"\nTeacher actor CPU per image outside the forward pass (tiny Depth Anything at 518 px, CPU, 1 thread, "
           f"best of the repetitions, {n} images per size)\n",
           "| image | path | actor outside forward (ms/img) | forward (ms/img) | shard task, CPU replica (ms/img) "
           "| shard task, GPU replica (ms/img) | actor before / after |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        before = next(x for x in rows if x["size"] == r["size"] and x["path"] == "before")
        ratio = f"{before['actor_ms'] / max(r['actor_ms'], 1e-9):.1f}x" if r["path"] == "after" else ""
        what = ("before: processor + upsampling in the actor" if r["path"] == "before"
                else "after: TeacherFeed in the task, network only in the actor")
        gpu = f"{r['task_gpu_replica_ms']:.2f}" if r["path"] == "after" else "0.00"
        out.append(f"| {r['size']} | {what} | {r['actor_ms']:.2f} | {r['forward_ms']:.1f} | {r['task_ms']:.2f} "
                   f"| {gpu} | {ratio} |")
    if rows:
        out.append(f"\nlargest relative difference between the maps of the two paths: "
                   f"{max(r['max_rel_diff'] for r in rows):.1e}. Shard task, GPU replica: the resize only "
                   "(normalisation and upsampling run on the GPU); the actor's own CPU share there is the "
                   "transfers and kernel launches, not measurable without a GPU.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
