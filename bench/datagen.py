"""Datagen throughput and memory: `datagen run` at 1 and 2 workers, against a plain single-process loop.

    python bench/datagen.py            # full: ~3 minutes on 2 cores
    python bench/datagen.py --quick    # smaller inputs and counts: ~1.5 minutes
    python bench/datagen.py --json bench/datagen.json
    python bench/datagen.py --real-only      # only the real-size per-stage run below (~1 minute)

Rows:
- oracle: the synthetic world with the oracle teacher (rendering, disparity -> depth, grid mesh, ray-cast
  LiDAR, PNG encoding): all CPU work in the shard tasks.
- tiny DA: a folder of JPEGs through a tiny random Depth Anything in one teacher replica (an actor): decode,
  teacher, geometry, encoding.
- plain: the same oracle job as a loop in one process, no Ray (the naive reference), and split over two
  processes: the scaling the machine gives two processes at that moment (on a shared machine other jobs
  take cores too, and no pipeline can beat that ratio).
Real-size run (640 x 480 and 1280 x 960): the CPU ms of one image per stage on one core (JPEG decode, the
teacher's pre/post-processing in the shard task, disparity -> depth, mesh + scan + projection, encoding
old and new; and apart, the teacher actor's CPU outside the model forward), images/s per core and projected for a 16-core node, beside the teacher GPU's expected rate.
Images/s is measured from the first shard task to the last (Ray start-up and model loading excluded; the
wall time of the whole command is shown beside). Peak memory is the largest sum of RSS over the job's
process tree (driver, raylet, GCS, workers, teacher), sampled every 0.1 s, for 100 and for 1000 inputs
(--quick: 100 and 300): bounded memory means the two are about equal. Each run is a fresh subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark must never download
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(spec: str) -> None:
    """Run one job in this process and print its summary as JSON (the parent measures memory)."""
    from datagen.job.pipeline import run
    from datagen.job.settings import RunConfig

    summary = run(RunConfig(**json.loads(spec)))
    print("SUMMARY " + json.dumps({**asdict(summary), "images_per_s": summary.images_per_s}), flush=True)


def tree_rss(proc) -> int:
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_job(cfg: dict) -> dict:
    """`datagen run` as a subprocess with the given RunConfig fields; returns its summary plus peak RSS."""
    import psutil

    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"datagen run failed ({proc.returncode}):\n{err[-3000:]}")
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith("SUMMARY "))
    return {**json.loads(line[len("SUMMARY "):]), "peak_rss_mb": peak[0] / 2**20, "command_s": time.monotonic() - t0}


def plain_loop(n: int, size: tuple[int, int], shard_size: int, out: str, part: int = 0, parts: int = 1):
    """The naive reference: the oracle job's shards one after the other in this process (with parts > 1:
    every parts-th shard, from `part`). Returns (images, start, end) in wall-clock time, after a warm-up."""
    from datagen.job.pipeline import process_shard
    from datagen.job.settings import RunConfig
    from datagen.sources import get_source
    from datagen.teachers.runner import OracleTeacher

    opts = {"width": size[0], "height": size[1], "seed": 0}
    items = get_source("synthetic", None, count=n, **opts).items()
    cfg = RunConfig(source="synthetic", source_options=opts)
    Path(out, "warm").mkdir(parents=True, exist_ok=True)
    process_shard(cfg, 10**6 + part, items[:1], None, OracleTeacher().info(), str(Path(out, "warm")))  # imports
    t0, done = time.time(), 0
    for i in range(part * shard_size, n, shard_size * parts):
        chunk = items[i:i + shard_size]
        process_shard(cfg, i // shard_size, chunk, None, OracleTeacher().info(), out)
        done += len(chunk)
    return done, t0, time.time()


def plain_processes(n: int, size: tuple[int, int], shard_size: int, out: Path, procs: int) -> float:
    """The plain loop split over `procs` processes: the scaling this machine allows right now (other
    jobs on a shared machine take cores too), measured from the first start to the last end."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(procs) as pool:
        futs = [pool.submit(plain_loop, n, size, shard_size, str(out), p, procs) for p in range(procs)]
        res = [f.result() for f in futs]
    return sum(r[0] for r in res) / (max(r[2] for r in res) - min(r[1] for r in res))


def make_images(root: Path, n: int, size: tuple[int, int]) -> None:
    """n different JPEGs (smooth gradients plus noise) for the folder source."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        rng = np.random.default_rng(i)
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1) * rng.uniform(0.5, 1.0)
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"img_{i:05d}.jpg", quality=90)


def save_tiny_da(path: Path) -> None:
    from datagen.teachers.runner import save_random_teacher

    save_random_teacher(path)


# ---------------------------------------------------------------------------------------------------------
# Real-size run: the CPU cost of one image, stage by stage, on one core


REAL_SIZES = [(640, 480), (1280, 960)]  # COCO's typical size, and the largest after max_size 1280
NODE_CORES = 16  # a typical GPU node has 12-16 CPU cores per GPU
TEACHER_GPU_IMG_S = 1000 / 13  # Depth Anything V2 Large, fp32, 518 px, one A100: its authors' ~13 ms per image


def best_ms(fn, reps: int) -> float:
    """Best of `reps` calls after one warm-up, in ms (the least disturbed by other jobs on a shared machine)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def legacy_depth_png(depth_m):
    """The depth encoder before the direct PNG writer, as it was: float64 checks, PIL at zlib level 3."""
    import numpy as np

    from shared.depth import uint16_png_pil

    d = np.asarray(depth_m).astype(np.float64)
    assert np.all(np.isfinite(d)) and d.min(initial=0.0) >= 0
    q = np.rint(d * 256.0)
    q[(q == 0) & (d > 0)] = 1
    return uint16_png_pil(q.astype(np.uint16))


def legacy_disparity_png(disp):
    """The disparity encoder before the direct PNG writer, as it was (see legacy_depth_png)."""
    import numpy as np

    from shared.depth import uint16_png_pil

    d = np.asarray(disp, dtype=np.float64)
    valid = np.isfinite(d) & (d > 0)
    q = np.zeros(d.shape, dtype=np.uint16)
    lo, hi = float(d[valid].min()), float(d[valid].max())
    q[valid] = np.rint(1.0 + (d[valid] - lo) / (hi - lo) * 65534.0).astype(np.uint16)
    return uint16_png_pil(q), {"min": lo, "max": hi}


def legacy_encode_sample(sample) -> dict:
    """encode_sample with the old PNG path: the naive reference of the encoding row."""
    from unittest import mock

    import shared.shard

    with mock.patch.object(shared.shard, "encode_depth_png", legacy_depth_png), \
            mock.patch.object(shared.shard, "encode_disparity_png", legacy_disparity_png):
        return shared.shard.encode_sample(sample)


def teacher_split_ms(teacher, images: list, reps: int) -> tuple[float, float]:
    """CPU ms per image of the teacher's two halves in `datagen run` (CPU replica): the shard task's
    (TeacherFeed.pack + unpack: resize, normalise, upsample back) and the actor's outside the model
    forward (DepthTeacher.run). Best of reps, after a warm-up."""
    from bench.teacher import ForwardClock
    from datagen.teachers.runner import TeacherFeed

    feed, clock = TeacherFeed(teacher.info(), len(images)), ForwardClock(teacher.model)
    best_task = best_actor = float("inf")
    for _ in range(reps + 1):
        t0 = time.process_time()
        packed = feed.pack(images)
        t1 = time.process_time()
        clock.seconds = 0.0
        answer = teacher.run(packed)
        t2 = time.process_time()
        feed.unpack(packed, answer)
        t3 = time.process_time()
        best_task = min(best_task, (t1 - t0) + (t3 - t2))
        best_actor = min(best_actor, max(t2 - t1 - clock.seconds, 0.0))
    return 1000 * best_task / len(images), 1000 * best_actor / len(images)


def real_size_run(tmp: Path, reps: int) -> dict:
    """Per-stage CPU ms of one image at each REAL_SIZES size, on one core, old vs new encoding.

    The photo is the synthetic world rendered at that size and saved as a JPEG (quality 95); the teacher
    is the tiny random Depth Anything with its processor set to 518 px as the real V2 processors are (its
    forward is not counted: only the CPU work around it); depth, geometry and encoding run on the oracle
    disparity of the same scene, so the depth map has real structure. Geometry is whatever
    `shared.scan.lidar.simulate_sparse_depth` does with `datagen run`'s default LiDAR settings.
    """
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor

    from datagen.camera import sample_intrinsics
    from datagen.disparity import disparity_to_depth
    from datagen.job.settings import RunConfig
    from datagen.sources.base import load_rgb
    from datagen.teachers.oracle import oracle_teacher
    from datagen.teachers.runner import DepthTeacher
    from datagen.world.scenes import render_scene
    from shared.scan.lidar import simulate_sparse_depth
    from shared.shard import Sample, decode_sample, encode_sample

    torch.set_num_threads(1)  # one core: the figure a node multiplies by its cores
    save_tiny_da(tmp / "tiny_da_518")
    processor = AutoImageProcessor.from_pretrained(tmp / "tiny_da_518")
    processor.size = {"height": 518, "width": 518}
    processor.save_pretrained(tmp / "tiny_da_518")
    teacher = DepthTeacher(str(tmp / "tiny_da_518"), device="cpu", batch_size=4)
    cfg = RunConfig()
    spec = cfg.scan  # datagen run's default scan
    out = {"reps": reps, "node_cores": NODE_CORES, "teacher_gpu_img_s": TEACHER_GPU_IMG_S,
           "lidar": spec.to_dict(), "sizes": {}}
    for w, h in REAL_SIZES:
        scene = render_scene(3, "street", w, h)
        photo = tmp / f"photo_{w}x{h}.jpg"
        Image.fromarray(scene.rgb).save(photo, quality=95)
        rgb = load_rgb(photo)
        disp = oracle_teacher(scene.depth_m, np.random.default_rng(0))
        depth, _ = disparity_to_depth(disp, np.random.default_rng(1))
        K = sample_intrinsics(w, h, np.random.default_rng(2))
        sparse, info = simulate_sparse_depth(depth, K, np.random.default_rng(3), spec)
        sample = Sample("bench", rgb, K, teacher=disp, depth=depth, sparse=sparse)
        new, old = encode_sample(sample), legacy_encode_sample(sample)
        a, b = decode_sample(new), decode_sample(old)
        assert all(np.array_equal(getattr(a, m), getattr(b, m)) for m in ("rgb", "teacher", "depth", "sparse"))
        stages = {
            "JPEG decode": best_ms(lambda p=photo: load_rgb(p), reps),
            "disparity -> depth": best_ms(lambda d=disp: disparity_to_depth(d, np.random.default_rng(1)), reps),
            "mesh + scan + projection (old: Open3D BVH over the grid mesh, no hidden layer)": best_ms(
                lambda d=depth, k=K: simulate_sparse_depth(d, k, np.random.default_rng(3),
                                                           dataclasses.replace(spec, hidden=False), caster="open3d"),
                reps),
            "mesh + scan + projection (new: height-field walk, hidden layer)": best_ms(
                lambda d=depth, k=K: simulate_sparse_depth(d, k, np.random.default_rng(3), spec), reps),
            "encode the sample (old: PIL, zlib level 3)": best_ms(lambda s=sample: legacy_encode_sample(s), reps),
            "encode the sample (new: direct PNG writer)": best_ms(lambda s=sample: encode_sample(s), reps),
        }
        task_ms, actor = teacher_split_ms(teacher, [rgb] * 4, reps)
        stages["teacher pre/post-processing (shard task)"] = task_ms
        size_kb = {k: sum(len(v) for n, v in enc.items() if not n.startswith("__")) / 1024
                   for k, enc in (("old", old), ("new", new))}
        out["sizes"][f"{w}x{h}"] = {"stages_ms": stages, "teacher_outside_model_ms": actor,
                                    "sample_kb": size_kb, "photo_kb": photo.stat().st_size / 1024,
                                    "lidar_points": int(np.count_nonzero(sparse)), "mesh": info.get("mesh")}
        print(f"real size {w}x{h}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items())
              + f"; teacher actor outside the model {actor:.1f} ms/image", flush=True)
    return out


def real_size_table(r: dict) -> str:
    """Markdown: per-stage ms, shard-task totals of the old and the new path, images/s per core and per node,
    the teacher. Old path: Open3D geometry, PIL encoding (the teacher's pre-processing then ran in the actor,
    not in the task); new path: height-field geometry with the hidden layer, the direct PNG writer, and the
    teacher's pre/post-processing moved into the task."""
    sizes = list(r["sizes"])
    st = {s: r["sizes"][s]["stages_ms"] for s in sizes}
    olds = [k for k in st[sizes[0]] if "(old:" in k]
    news = [k for k in st[sizes[0]] if "(new:" in k or "(shard task)" in k]
    common = [k for k in st[sizes[0]] if k not in olds and k not in news]
    total = {s: {"old": sum(st[s][k] for k in (*common, *olds)), "new": sum(st[s][k] for k in (*common, *news))}
             for s in sizes}
    cores = r["node_cores"]
    rows = [[k, *(f"{st[s][k]:.1f}" for s in sizes)] for k in (*common, *olds, *news)]
    for old, new in zip(olds, [k for k in news if "(new:" in k], strict=True):
        rows.append([f"{old.split(' (')[0]}, old / new", *(f"{st[s][old] / st[s][new]:.1f}x" for s in sizes)])
    rows.append(["sample size, old -> new (KB)", *(f"{r['sizes'][s]['sample_kb']['old']:.0f} -> "
                                                   f"{r['sizes'][s]['sample_kb']['new']:.0f}" for s in sizes)])
    for v in ("old", "new"):
        rows.append([f"**shard-task total, {v} path**", *(f"**{total[s][v]:.1f}**" for s in sizes)])
    rows.append(["shard-task total, old / new", *(f"{total[s]['old'] / total[s]['new']:.1f}x" for s in sizes)])
    for v in ("old", "new"):
        rows.append([f"images/s per core, {v}", *(f"{1000 / total[s][v]:.1f}" for s in sizes)])
    for v in ("old", "new"):
        rows.append([f"images/s of a {cores}-core node, {v} (projected: {cores} x per core)",
                     *(f"{cores * 1000 / total[s][v]:.0f}" for s in sizes)])
    rows.append(["teacher actor: CPU ms per image outside the model forward (tiny DA, 518 px input)",
                 *(f"{r['sizes'][s]['teacher_outside_model_ms']:.1f}" for s in sizes)])
    rows.append(["teacher actor cap, images/s per replica (1000 / the row above)",
                 *(f"{1000 / max(r['sizes'][s]['teacher_outside_model_ms'], 1e-3):.0f}" for s in sizes)])
    rows.append(["teacher GPU rate, DA V2 Large fp32 on an A100 (published ~13 ms/image; not measured here)",
                 *(f"~{r['teacher_gpu_img_s']:.0f}" for s in sizes)])
    header = "| stage (ms per image, one core, best of {}) | {} |\n|---|{}".format(
        r["reps"], " | ".join(sizes), "---:|" * len(sizes))
    body = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    return (header + "\n" + body + "\n\nA bf16 / batched H100 or H200 teacher is faster than the A100 fp32 figure; "
            "that rate is not measured here. The node projection assumes the shard tasks scale linearly over its "
            "cores (the 2-worker rows above show what this machine gave).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    ap.add_argument("--real-only", action="store_true", help="only the real-size per-stage run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.real_only:
        with tempfile.TemporaryDirectory(prefix="bench-datagen-") as tmp:
            real = real_size_run(Path(tmp), 2 if args.quick else 3)
        print("\n" + real_size_table(real))
        if args.json:
            args.json.write_text(json.dumps({"real_size": real}, indent=2))
        return
    n_speed = 96
    size = (160, 96) if args.quick else (320, 192)
    mem_counts = (100, 300) if args.quick else (100, 1000)
    shard = 8  # 12 shards of 8: an even split over 1 or 2 workers, per-shard costs (fsync, scheduling) amortised
    results: dict = {"quick": args.quick, "cores": os.cpu_count(), "size": list(size), "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-datagen-") as tmp:
        tmp = Path(tmp)
        syn = dict(source="synthetic", source_options={"width": size[0], "height": size[1]}, limit=n_speed,
                   shard_size=shard, progress="none")
        make_images(tmp / "images", n_speed, size)
        save_tiny_da(tmp / "tiny_da")
        da = dict(source="folder", root=str(tmp / "images"), teacher=str(tmp / "tiny_da"), shard_size=shard,
                  teacher_batch=4, progress="none")
        ref = plain_processes(n_speed, size, shard, tmp / "plain1", 1)
        ref2 = plain_processes(n_speed, size, shard, tmp / "plain2", 2)
        results["rows"].append({"job": "oracle", "workers": "plain, 1 process", "images_per_s": ref})
        results["rows"].append({"job": "oracle", "workers": "plain, 2 processes", "images_per_s": ref2})
        results["scaling_plain"] = ref2 / ref
        print(f"plain loop (no Ray): {ref:.2f} images/s in 1 process, {ref2:.2f} in 2", flush=True)
        for name, cfg in (("oracle", syn), ("tiny DA", da)):
            per = {}
            for workers in (1, 2):
                r = run_job({**cfg, "workers": workers, "out": str(tmp / f"{name}-{workers}".replace(" ", "_"))})
                per[workers] = r["images_per_s"]
                results["rows"].append({"job": name, "workers": workers, "images_per_s": r["images_per_s"],
                                        "command_s": r["command_s"], "peak_rss_mb": r["peak_rss_mb"]})
                print(f"{name}, {workers} worker(s): {r['images_per_s']:.2f} images/s "
                      f"(command {r['command_s']:.1f} s)", flush=True)
            results[f"scaling_{name.replace(' ', '_')}"] = per[2] / per[1]
        mem = {}
        for n in mem_counts:
            r = run_job({"source": "synthetic", "source_options": {"width": 96, "height": 64}, "limit": n,
                         "shard_size": 16, "workers": 2, "progress": "none", "out": str(tmp / f"mem-{n}")})
            mem[n] = r["peak_rss_mb"]
            print(f"memory, {n} inputs: peak {r['peak_rss_mb']:.0f} MB ({r['images_per_s']:.1f} images/s)", flush=True)
        results["peak_rss_mb"] = {str(n): v for n, v in mem.items()}
        results["real_size"] = real_size_run(tmp, 2 if args.quick else 3)
        results["real_size"]["markdown"] = real_size_table(results["real_size"])  # for bench/run_all.py
    try:
        results["load_average"] = os.getloadavg()
    except OSError:
        pass
    rows = results["rows"]
    print(f"\n| job ({size[0]}x{size[1]}) | workers | images/s | vs plain loop |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['job']} | {r['workers']} | {r['images_per_s']:.2f} | {r['images_per_s'] / ref:.2f}x |")
    print(f"\nscaling 2 vs 1 worker: oracle {results['scaling_oracle']:.2f}x, tiny DA {results['scaling_tiny_DA']:.2f}x "
          f"(target >= 1.7x on 2 cores); the plain loop in 2 processes: {results['scaling_plain']:.2f}x "
          f"(what the machine gave two processes during this run)")
    a, b = mem_counts
    print(f"peak memory (RSS, driver + Ray + workers): {a} inputs {mem[a]:.0f} MB, {b} inputs {mem[b]:.0f} MB "
          f"(ratio {mem[b] / mem[a]:.2f})")
    print("\nreal-size run, per image:\n" + results["real_size"]["markdown"])
    if "load_average" in results:
        print("load average during the run: " + ", ".join(f"{x:.1f}" for x in results["load_average"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
