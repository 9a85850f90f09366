"""Per-image cost of the geometry stages on one core, and the simulated hdl64 density on KITTI-like views.

    python bench/geometry.py            # 5 street scenes per size (Poisson: 2), density over 10 scenes
    python bench/geometry.py --quick    # 2 scenes (Poisson: 1), density over 3 scenes
    python bench/geometry.py --quick --json geometry.json   # also the numbers as JSON

Prints a Markdown table of milliseconds per image (median over scenes) at 640 x 480 (default street
camera, 81 deg) and 1216 x 352 (KITTI cam 2 after the bottom crop). Rows: synthetic render, grid mesh,
Poisson mesh (depth 8, Open3D normals), the scan per preset on the grid mesh (culling + BVH + rays),
the same scan without culling (the naive reference), projection, and the full one-call paths
(simulate_sparse_depth with mesh="grid" and mesh="poisson", hdl64, KITTI mount). Everything is pinned
to one thread, as the pipeline runs one image per core.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

# the repository first: run as `python bench/geometry.py`, bench/ is on the path and bench/datagen.py
# would shadow the datagen package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from datagen.lidar import KITTI_MOUNT, LIDAR_PRESETS, project_scan, simulate_scan, simulate_sparse_depth  # noqa: E402
from datagen.mesh import grid_mesh, poisson_mesh  # noqa: E402
from datagen.synthetic import default_K, render_scene  # noqa: E402
from shared.camera import make_K  # noqa: E402

KITTI_K = make_K(721.5, 721.5, 609.6, 172.9 - 23.0)  # cam 2, 1242 x 375 cropped to the bottom 1216 x 352
SIZES = {"640x480": (640, 480, None), "1216x352": (1216, 352, KITTI_K)}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1000.0


def bench_size(width: int, height: int, K, n_scenes: int, n_poisson: int) -> dict[str, float]:
    K = default_K("street", width, height) if K is None else K
    rows: dict[str, list[float]] = {}

    def add(name, ms):
        rows.setdefault(name, []).append(ms)

    render_scene(999, "street", width, height, K)  # warm-up (imports, first BVH)
    for seed in range(n_scenes):
        scene, ms = timed(lambda s=seed: render_scene(s, "street", width, height, K))
        add("synthetic render (street)", ms)
        depth = scene.depth_m
        mesh, ms = timed(lambda d=depth: grid_mesh(d, K))
        add("grid mesh", ms)
        for name, pat in LIDAR_PRESETS.items():
            rng = np.random.default_rng(seed)
            scan, ms = timed(lambda p=pat, r=rng, m=mesh: simulate_scan(m, p, KITTI_MOUNT, K, width, height, r))
            add(f"scan {name} (grid mesh)", ms)
            if name == "hdl64":
                _, ms = timed(lambda s=scan: project_scan(s.points_cam, K, width, height))
                add("projection hdl64 (none)", ms)
                _, ms = timed(lambda s=scan, d=depth: project_scan(s.points_cam, K, width, height, "zbuffer", depth_m=d))
                add("projection hdl64 (zbuffer, depth map)", ms)
                _, ms = timed(lambda p=pat, m=mesh, s=seed: simulate_scan(m, p, KITTI_MOUNT, K, width, height,
                                                                          np.random.default_rng(s), cull=False))
                add("scan hdl64, no culling (naive)", ms)
        _, ms = timed(lambda d=depth, s=seed: simulate_sparse_depth(d, K, np.random.default_rng(s), pattern="hdl64",
                                                                    mount=KITTI_MOUNT, mesh="grid"))
        add("FULL grid path (mesh + hdl64 + projection)", ms)
        if seed < n_poisson:
            _, ms = timed(lambda d=depth: poisson_mesh(d, K))
            add("poisson mesh (depth 8)", ms)
            _, ms = timed(lambda d=depth, s=seed: simulate_sparse_depth(d, K, np.random.default_rng(s), pattern="hdl64",
                                                                        mount=KITTI_MOUNT, mesh="poisson"))
            add("FULL poisson path (mesh + hdl64 + projection)", ms)
    return {k: float(np.median(v)) for k, v in rows.items()}


def kitti_density(n: int) -> tuple[float, float, float]:
    dens = []
    for seed in range(n):
        s = render_scene(1000 + seed, "street", 1216, 352, KITTI_K)
        _, info = simulate_sparse_depth(s.depth_m, KITTI_K, np.random.default_rng(seed), pattern="hdl64",
                                        mount=KITTI_MOUNT, mesh="grid")
        dens.append(info["density"])
    return float(np.mean(dens)), float(np.min(dens)), float(np.max(dens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer scenes")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    n_scenes, n_poisson, n_density = (2, 1, 3) if args.quick else (5, 2, 10)

    results = {name: bench_size(w, h, K, n_scenes, n_poisson) for name, (w, h, K) in SIZES.items()}
    stages = list(next(iter(results.values())))
    print(f"\nms per image, one thread, median over {n_scenes} street scenes (Poisson: {n_poisson})\n")
    print("| stage | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for st in stages:
        print(f"| {st} | " + " | ".join(f"{results[s][st]:.1f}" for s in results) + " |")
    ratio = [results[s]["FULL poisson path (mesh + hdl64 + projection)"] / results[s]["FULL grid path (mesh + hdl64 + projection)"]
             for s in results]
    print("| poisson path / grid path | " + " | ".join(f"{r:.1f}x" for r in ratio) + " |")
    cull = [results[s]["scan hdl64, no culling (naive)"] / results[s]["scan hdl64 (grid mesh)"] for s in results]
    print("| naive scan / culled scan (hdl64) | " + " | ".join(f"{r:.1f}x" for r in cull) + " |")
    mean, lo, hi = kitti_density(n_density)
    print(f"\nhdl64 into KITTI cam 2 (1216 x 352, fx 721.5, KITTI mount, grid mesh), {n_density} street scenes: "
          f"pixel density {100 * mean:.2f}% (min {100 * lo:.2f}%, max {100 * hi:.2f}%); real KITTI raw: ~4-6%")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"ms_per_image": results, "scenes": n_scenes, "poisson_scenes": n_poisson,
                       "poisson_vs_grid": dict(zip(results, ratio, strict=True)),
                       "naive_scan_vs_culled": dict(zip(results, cull, strict=True)),
                       "kitti_density": {"mean": mean, "min": lo, "max": hi, "scenes": n_density}}, f, indent=2)


if __name__ == "__main__":
    main()
