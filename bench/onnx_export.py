"""ONNX export (trainer export --onnx) against the PyTorch network it came from, in one run.

    python bench/onnx_export.py                   # bpnet-s and bpnet at 352 x 1216 (KITTI's frame), CPU
    python bench/onnx_export.py --quick --json onnx.json   # bpnet-s only, 2 repeats

Per model (random weights, batch norms calibrated on random frames: trainer.onnx_export.calibrate_batchnorm):
the export's wall time and node count; the inference time at 352 x 1216 (5% of pixels with a point) of
PyTorch as `trainer predict` runs it (norms folded, channels-last: trainer.model.for_inference) and of
onnxruntime (CPU provider) on the same frame and thread count, both including the 4-NN searches (PyTorch
inside the forward, ONNX outside the graph: trainer.onnx_export.neighbours, timed on its own too); and
the largest |onnxruntime - PyTorch| relative to the largest depth on that frame. (Not bench/onnx.py: a
script of that name would shadow the onnx package for everything it imports.)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.model import build_model, for_inference, network_inputs  # noqa: E402
from trainer.onnx_export import (  # noqa: E402
    INPUT_NAMES,
    _session,
    calibrate_batchnorm,
    example_inputs,
    export_graph,
    graph_module,
    neighbours,
)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def bench_model(name: str, hw: tuple[int, int], repeats: int, threads: int, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = calibrate_batchnorm(build_model(name))
    path = tmp / f"{name}.onnx"
    # no refusal here: a random network amplifies two runtimes' rounding far more than a trained one (the
    # CLI's check, on trained networks, measured 2e-6 to 4e-6); the error is reported instead
    report = export_graph(model, path, check=False)
    session = _session(path, threads)
    rgb, sparse, K, *nbrs = example_inputs(*hw, seed=7)
    fast = for_inference(copy.deepcopy(model))
    x, s, scale = network_inputs(rgb, sparse)

    def torch_run():
        return fast(x, s, K)[-1] / scale

    def onnx_run():
        feeds = dict(zip(INPUT_NAMES, (rgb, sparse, K, *neighbours(sparse)), strict=True))
        return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]

    ref = graph_module(model)(rgb, sparse, K, *nbrs).numpy()
    got = onnx_run()
    t_torch, t_onnx = timed(torch_run, repeats), timed(onnx_run, repeats)
    t_knn = timed(lambda: neighbours(sparse), repeats)
    return {"model": name, "frame": f"{hw[0]}x{hw[1]}", "threads": threads, "export_s": report["export_s"],
            "nodes": report["nodes"], "opset": report["opset"],
            "max_rel_err": float(abs(got - ref).max() / abs(ref).max()), "torch_s": t_torch, "onnx_s": t_onnx,
            "onnx_neighbours_s": t_knn, "onnx_vs_torch": t_torch / t_onnx}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bpnet-s,bpnet")
    ap.add_argument("--quick", action="store_true", help="bpnet-s only, 2 repeats")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: torch's")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    models = ["bpnet-s"] if args.quick else args.models.split(",")
    repeats = 2 if args.quick else args.repeats
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            rows.append(bench_model(name, (352, 1216), repeats, threads, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| model | frame | threads | export | nodes | PyTorch | onnxruntime (of which 4-NN) | PyTorch / ORT "
          "| max rel. error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['frame']} | {r['threads']} | {r['export_s']:.0f} s | {r['nodes']} | "
              f"{r['torch_s']:.2f} s | {r['onnx_s']:.2f} s ({r['onnx_neighbours_s']:.2f} s) | "
              f"{r['onnx_vs_torch']:.2f}x | {r['max_rel_err']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
