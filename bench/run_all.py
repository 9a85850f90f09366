"""Every benchmark in one command (`make bench`): bench/results.json and bench/RESULTS.md.

    python bench/run_all.py            # quick settings: under 10 minutes on 2 cores
    python bench/run_all.py --full     # each script's full settings (longer)
    python bench/run_all.py --only geometry,ops

Each script runs in its own subprocess (a fresh interpreter, so one's threads, caches and peak memory do
not leak into the next), with --quick where it has it and --json to a temporary file; this collects the
JSON into results.json with the machine (cores, torch, GPU) and the time each script took, and writes a
Markdown table per area, every measurement beside its naive reference from the same run:

    geometry       old grid path (culled Open3D BVH) vs the height-field caster, with and without hidden
                   geometry, vs Poisson; first-call (numba compile) cost
    scan_fidelity  simulated scans vs the exact world's: recall, spurious, see-through, per mount and surface
    datagen        images/s at 1 and 2 workers vs the plain single-process loop; per-stage ms of one
                   640x480 and 1280x960 image, old vs new encoding, and the projected 16-core node
    teacher        batched DepthTeacher vs one image at a time (CPU; and GPU when there is one); the teacher
                   actor's CPU per image outside the forward pass, before / after the pre-processing moved out
    loader         samples/s at 0, 1, 2 DataLoader workers vs in-process
    training       samples/s of a training step, old (bench/legacy.py) vs new in one process, peak memory, and
                   the losses' agreement (quick: tiny and bpnet-s at the cpu preset; with --full also fine-tuning,
                   bpnet at 256x320 and bpnet's forward at 352x1216)
    rescan         one loader worker with a new scan per frame (trainer pretrain --lidar) vs the stored scans,
                   against a training step's consumption; the caster on rough vs smooth surfaces
    ops            4-NN bucketed and KD-tree vs exhaustive; local_conv vs the naive autograd loop; forwards
    onnx           the ONNX export vs the PyTorch network at 352 x 1216: export time, inference time (onnxruntime
                   with the 4-NN search outside the graph vs PyTorch as predict runs it), relative error
    calibration    the oracle teacher's AbsRel and delta1 per scene family vs Depth Anything V2's published ones

A script that fails or runs past its time limit is recorded as such; the others still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# script, extra arguments, time limit (s); --quick is added unless --full
SCRIPTS = {
    "geometry": ("geometry.py", [], 300),
    "scan_fidelity": ("scan_fidelity.py", [], 300),
    "datagen": ("datagen.py", [], 360),
    "teacher": ("teacher.py", [], 180),
    "train": ("train.py", [], 600),
    "rescan": ("rescan.py", [], 420),
    "ops": ("ops.py", [], 240),
    "onnx": ("onnx_export.py", [], 600),
    "calibration": ("teacher_calibration.py", [], 300),
}


def machine() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        info["load_average_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def run_script(name: str, script: str, args: list[str], limit_s: int, quick: bool, tmp: Path) -> dict:
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(out)] + (["--quick"] if quick else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as exc:
        return {"status": f"timeout after {limit_s} s", "seconds": time.monotonic() - t0,
                "stdout": (exc.stdout or b"")[-3000:].decode(errors="replace") if isinstance(exc.stdout, bytes)
                else (exc.stdout or "")[-3000:]}
    seconds = time.monotonic() - t0
    print(f"   {seconds:.0f} s, exit {proc.returncode}", flush=True)
    if proc.returncode != 0 or not out.exists():
        return {"status": f"failed (exit {proc.returncode})", "seconds": seconds,
                "stderr": proc.stderr[-3000:], "stdout": proc.stdout[-2000:]}
    return {"status": "ok", "seconds": seconds, "data": json.loads(out.read_text()), "stdout": proc.stdout}


# ---------------------------------------------------------------------------------------------------------
# Markdown, one table per area


def fmt(x, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def md_geometry(d: dict) -> str:
    ms = d["ms_per_image"]
    sizes = list(ms)
    rows = [[st, *(fmt(ms[s][st], 1) for s in sizes)] for st in ms[sizes[0]]]
    rows += [[f"**{name}**", *(ratio(r[s]) for s in sizes)] for name, r in d["ratios"].items()]
    dens = "; ".join(f"{k} {100 * v['mean']:.2f}% (min {100 * v['min']:.2f}%, max {100 * v['max']:.2f}%)"
                     for k, v in d["kitti_density"].items())
    first = ", ".join(f"{k} {v:.0f} ms" for k, v in d.get("first_call_ms", {}).items())
    return (table(["stage (ms per image, one thread)", *sizes], rows)
            + f"\n\nmedian over {d['scenes']} street scenes (Poisson: {d['poisson_scenes']}), hdl64 from the KITTI "
              f"mount; the old grid path (culled Open3D BVH) is the naive reference. First call in a fresh "
              f"process: {first}. hdl64 density into KITTI cam 2: {dens}.")


def md_fidelity(d: dict) -> str:
    rows = [[r["family"], r["mount"], r["path"], f"{100 * r['recall']:.2f}%", f"{100 * r['spurious']:.2f}%",
             f"{100 * r['see_through']:.1f}% ({r['n_see_through']})", f"{100 * r['see_through_share_true']:.2f}%",
             r["scenes"], fmt(r["ms"], 0)] for r in d["table"]]
    g = d["goals"]
    return (table(["family", "mount", "surface", "recall", "spurious", "see-through fidelity",
                   "see-through share of true returns", "scenes", "ms / scene"], rows)
            + f"\n\nhdl64, exact dense depth, held-out scenes; truth: the exact world's scan of the same rays. Goals "
              f"(street, kitti, grid + hidden): recall >= {100 * g['recall']:.0f}%, spurious <= "
              f"{100 * g['spurious']:.0f}%, see-through >= {100 * g['see_through']:.0f}%.")


def md_datagen(d: dict) -> str:
    rows_in = d["rows"]
    ref = next(r["images_per_s"] for r in rows_in if r["workers"] == "plain, 1 process")
    rows = [[r["job"], r["workers"], fmt(r["images_per_s"]), ratio(r["images_per_s"] / ref),
             fmt(r.get("command_s"), 1), fmt(r.get("peak_rss_mb"), 0)] for r in rows_in]
    w, h = d["size"]
    mem = d.get("peak_rss_mb", {})
    return (table([f"job ({w}x{h})", "workers", "images/s", "vs single-process loop", "command s", "peak RSS MB"], rows)
            + f"\n\nscaling 2 vs 1 worker: oracle {d['scaling_oracle']:.2f}x, tiny DA {d['scaling_tiny_DA']:.2f}x; "
              f"plain loop in 2 processes {d['scaling_plain']:.2f}x (what the machine gave two processes). "
              f"Peak RSS of the whole job: " + ", ".join(f"{n} inputs {v:.0f} MB" for n, v in mem.items()) + "."
            + ("\n\n### Real-size images, per stage (bench/datagen.py)\n\n" + d["real_size"]["markdown"]
               if "real_size" in d else ""))


def md_teacher(d: dict, device: str) -> str:
    rows = [[r["model"], r["device"], r["dtype"], r["path"], fmt(r["images_per_s"]), fmt(r["median"]),
             ratio(r["vs_batch_1"])] for r in d["rows"]]
    text = (table(["model", "device", "dtype", "path", f"images/s (best of {d['reps']})", "median",
                   "vs unbatched (batch 1)"], rows)
            + f"\n\n{d['images']} images of {d['size']}, {d['threads']} CPU threads ({device}).")
    if d.get("actor"):  # the teacher actor's CPU per image outside the forward pass, before / after
        spec = importlib.util.spec_from_file_location("bench_teacher", HERE / "teacher.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        text += "\n" + module.format_overhead(d["actor"], d["images"])
    return text


def md_loader(d: dict) -> str:
    base = next((r["samples_per_s"] for r in d["loader"] if r["workers"] == 0), None)
    rows = [[r["workers"], fmt(r["samples_per_s"], 1), fmt(r["per_worker"], 1),
             ratio(r["samples_per_s"] / base) if base else ""] for r in d["loader"]]
    hw = d["loader"][0]["hw"] if d["loader"] else ""
    return (table(["DataLoader workers", "samples/s", "per worker", "vs in-process (0 workers)"], rows)
            + f"\n\ndecode + crop + flip + jitter + collate, crop {hw}, batch 4, PNG members.")


def md_rescan(d: dict) -> str:
    scans = list(next(iter(d["loader_samples_per_s"].values())))
    rows = [[frame] + [fmt(r, 1) + ("" if s == "stored" else f" ({ratio(r / rates['stored'])})") for s, r in rates.items()]
            for frame, rates in d["loader_samples_per_s"].items()]
    g = d["gpu_estimate"]
    steps = "; ".join(f"{k}: {fmt(v, 1)}" for k, v in d["step_samples_per_s"].items())
    cast = "; ".join(f"{k}: {fmt(v, 1)} ms" for k, v in d["caster_ms_640x480"].items())
    return (table([f"frame (batch {d['batch']})", *scans], rows)
            + f"\n\nSamples/s of one loader worker (in brackets: vs the stored scans). What a CPU training step "
              f"consumes, samples/s: {steps}. A GPU (an estimate: a bpnet step is "
              f"{fmt(g['bpnet_step_tflop_per_sample_256x1216'])} TFLOP per 256x1216 sample, run at "
              f"{fmt(g['assumed_effective_tflops'], 0)} effective TFLOP/s: {fmt(g['bpnet_samples_per_s_per_gpu'], 1)} "
              f"samples/s) needs {fmt(g['workers_per_gpu_stored'], 1)} workers with the stored scans, "
              + ", ".join(f"{fmt(v, 1)} with {k}" for k, v in g["workers_per_gpu_new_scan"].items())
              + f". The scan of a 640x480 map: {cast} (rough / smooth {ratio(d['rough_over_smooth'])}).")


def md_training(d: dict) -> str:
    spec = importlib.util.spec_from_file_location("bench_train", HERE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown(d)


def md_ops(d: dict) -> str:
    rows = [[r["what"], r["size"], fmt(r["seconds"], 4), ratio(r["ratio"])] for r in d["rows"]]
    return (table(["what", "size", "seconds (median)", "ratio"], rows)
            + f"\n\n{d['device']}, {d['threads']} threads, {d['repeats']} repeat(s). Ratio: 4-NN rows, speed-up over "
              "the exhaustive search (brute-force nearest neighbours, the naive reference; its time / the row's); "
              "local_conv rows, time vs the naive k*k autograd loop; forward rows, time vs the first preset.")


def md_onnx(d: dict) -> str:
    rows = [[r["model"], r["frame"], r["threads"], f"{fmt(r['export_s'], 0)} s", r["nodes"], f"{fmt(r['torch_s'])} s",
             f"{fmt(r['onnx_s'])} s ({fmt(r['onnx_neighbours_s'])} s)", ratio(r["onnx_vs_torch"]),
             f"{r['max_rel_err']:.1e}"] for r in d["rows"]]
    return (table(["model", "frame", "threads", "export", "nodes", "PyTorch (predict's path)",
                   "onnxruntime (of which the 4-NN outside the graph)", "speed vs PyTorch", "max relative error"], rows)
            + "\n\nRandom weights with calibrated batch norms, 5% of pixels with a point; relative error: the largest "
              "|onnxruntime - PyTorch| over the largest depth. Both include every 4-NN search.")


def md_calibration(d: dict) -> str:
    rows = [[fam, f"{r['size'][0]}x{r['size'][1]}", fmt(r["strength"], 3),
             "{:.4f} [{:.4f}, {:.4f}]".format(*r["absrel"]), "{:.4f} [{:.4f}, {:.4f}]".format(*r["delta1"]),
             f"{r['reference']['dataset']} {r['reference']['absrel']:.3f} / {r['reference']['delta1']:.3f}",
             ", ".join(f"{m} {v:.0f}%" for m, v in r["mode_share_pct"].items())]
            for fam, r in d["families"].items()]
    return (table(["family", "size", "strength", "AbsRel (95% CI)", "delta1 (95% CI)", "DA V2-L reference",
                   "share of AbsRel, each mode alone"], rows)
            + f"\n\n{d['scenes']} scenes per family (seed {d['seed']}); the oracle teacher of datagen/teachers/oracle.py scored as "
              "Depth Anything's zero-shot relative depth (affine fit in disparity, shared/relative_depth.py).")


def write_markdown(results: dict, path: Path) -> None:
    m = results["machine"]
    parts = ["# Benchmarks (`make bench`)", "",
             f"Generated by `python bench/run_all.py` ({'full' if results['full'] else 'quick'} settings) in "
             f"{results['total_s']:.0f} s. Machine: {m['cpu_count']} CPUs ({m['usable_cores']} usable), torch "
             f"{m['torch']}, " + (f"GPU {', '.join(m['gpu'])}" if m.get("gpu") else "no GPU")
             + (f", load average at start {m['load_average_start'][0]:.1f}" if "load_average_start" in m else "")
             + ". On a shared machine the numbers move from run to run; the ratios, measured in the same run, "
               "move less. The CUDA paths have their own check and report: `make gpu-check` writes "
               "`bench/RESULTS-gpu.md`.", ""]
    sections = [("Geometry stages", "geometry", md_geometry), ("Simulated scan fidelity", "scan_fidelity", md_fidelity),
                ("Data generation", "datagen", md_datagen),
                ("Teacher (CPU)", "teacher", lambda d: md_teacher(d, "cpu")),
                ("Teacher (GPU)", "teacher_cuda", lambda d: md_teacher(d, "cuda")),
                ("Shard loader", "train", md_loader), ("A new scan per frame (loader)", "rescan", md_rescan),
                ("Training step", "train", md_training),
                ("Training step (GPU)", "train_cuda", md_training), ("Propagation ops", "ops", md_ops),
                ("Propagation ops (GPU)", "ops_cuda", md_ops), ("ONNX export", "onnx", md_onnx),
                ("Oracle teacher calibration", "calibration", md_calibration)]
    for title, key, render in sections:
        r = results["scripts"].get(key)
        if r is None:
            continue
        parts += [f"## {title}", ""]
        if r["status"] != "ok":
            parts += [f"**{r['status']}** after {r['seconds']:.0f} s (see results.json).", ""]
            continue
        try:
            parts += [render(r["data"]), ""]
        except (KeyError, TypeError, StopIteration, ZeroDivisionError) as exc:
            parts += [f"(could not tabulate: {type(exc).__name__}: {exc})", ""]
    parts += ["## Time per script", "",
              table(["script", "status", "seconds"],
                    [[k, v["status"], f"{v['seconds']:.0f}"] for k, v in results["scripts"].items()]), ""]
    path.write_text("\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the scripts' full settings instead of --quick")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(SCRIPTS))
    ap.add_argument("--out", type=Path, default=HERE, help="where results.json and RESULTS.md go")
    args = ap.parse_args()
    t0 = time.monotonic()
    results = {"full": args.full, "machine": machine(), "scripts": {}}
    jobs = [(k, *SCRIPTS[k]) for k in (args.only.split(",") if args.only else SCRIPTS)]
    if not args.full:  # the full bpnet takes minutes a step on 2 busy cores: its training row needs --full
        jobs = [(k, s, a + ["--models", "tiny,bpnet-s"] if k == "train" else a, t) for k, s, a, t in jobs]
    if results["machine"]["cuda"]:  # the GPU rows beside the CPU ones
        jobs += [("teacher_cuda", "teacher.py", ["--device", "cuda"], 240),
                 ("train_cuda", "train.py", ["--device", "cuda"], 300), ("ops_cuda", "ops.py", ["--device", "cuda"], 240)]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name, script, extra, limit in jobs:
            r = run_script(name, script, extra, limit, not args.full, Path(tmp))
            results["scripts"][name] = r
            if r["status"] != "ok":
                print(f"   {name}: {r['status']}\n{r.get('stderr', '')[-1500:]}", flush=True)
    results["total_s"] = time.monotonic() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    for r in results["scripts"].values():
        r.pop("stdout", None) if r["status"] == "ok" else None
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, args.out / "RESULTS.md")
    ok = sum(r["status"] == "ok" for r in results["scripts"].values())
    print(f"\n{ok}/{len(results['scripts'])} scripts ok; total {results['total_s']:.0f} s "
          f"({results['total_s'] / 60:.1f} min); wrote {args.out / 'results.json'} and {args.out / 'RESULTS.md'}")
    sys.exit(0 if ok == len(results["scripts"]) else 1)


if __name__ == "__main__":
    main()
