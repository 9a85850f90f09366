"""Teacher throughput: batched DepthTeacher vs one image at a time vs transformers' own pipeline.

    python bench/teacher.py                          # tiny random DA on CPU (+ any DA V2 found in the HF cache)
    python bench/teacher.py --model depth-anything/Depth-Anything-V2-Large-hf --device cuda
    python bench/teacher.py --arch large --device cuda   # random weights, the real Large architecture
    python bench/teacher.py --quick --json teacher.json  # 8 images, 2 reps, no pipeline row; rows as JSON

Prints a Markdown table of images/s (best and median of interleaved repetitions) and the ratio to
batch 1 measured in the same run. Speed does not
depend on the weights, so `--arch` measures a real architecture where no weights can be downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark must never download

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datagen.teacher import DepthTeacher, TeacherUnavailable, _cached_snapshot  # noqa: E402

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
        from PIL import Image
        from transformers import pipeline

        pipe = pipeline("depth-estimation", model=teacher.model, image_processor=teacher.processor, device=dev)
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
    if args.json:
        import json

        keys = ("model", "device", "dtype", "path", "images_per_s", "median", "vs_batch_1")
        with open(args.json, "w") as f:
            json.dump({"images": args.n, "size": args.size, "reps": args.reps, "threads": torch.get_num_threads(),
                       "rows": [dict(zip(keys, r, strict=True)) for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
