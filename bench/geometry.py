"""Per-image cost of the geometry stages on one core, old path vs new, and the simulated hdl64 density.

    python bench/geometry.py            # 5 street scenes per size (Poisson: 2), density over 10 scenes
    python bench/geometry.py --quick    # 2 scenes (Poisson: 1), density over 3 scenes
    python bench/geometry.py --quick --json geometry.json   # also the numbers as JSON

Prints a Markdown table of milliseconds per image (median over scenes) at 640 x 480 and 1280 x 960
(street camera, 81 deg wide) and 1216 x 352 (KITTI cam 2 after the bottom crop). The paths, all hdl64
from the KITTI mount with the projection to sparse depth:
- old grid path: grid mesh -> triangle culling + Open3D BVH -> rays (simulate_sparse_depth with
  caster="open3d", hidden=False: the code before the height-field caster, byte for byte);
- new grid path: the grid's faces -> the height-field walk (shared.scan.heightfield), no BVH;
- new grid + hidden: the same with the hidden-geometry layer (shared.scan.hidden), the default for
  offset mounts;
- Poisson path: Poisson mesh -> Open3D.
Ratios are taken within the same run (the machine may be shared: absolute numbers move, ratios less).
Also the cost of the first call in a fresh process (numba compiling the casters, or loading them from
its cache), as a Ray worker pays it once. Everything is pinned to one thread, as the pipeline runs
one image per core.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

# the repository first: run as `python bench/geometry.py`, bench/ is on the path and bench/datagen.py
# would shadow the datagen package
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from datagen.world.scenes import default_K, render_scene  # noqa: E402
from shared.camera import make_K  # noqa: E402
from shared.scan.heightfield import grid_surface  # noqa: E402
from shared.scan.hidden import hidden_layer  # noqa: E402
from shared.scan.lidar import KITTI_MOUNT, project_scan, simulate_scan, simulate_sparse_depth  # noqa: E402
from shared.scan.mesh import grid_mesh, poisson_mesh  # noqa: E402
from shared.scan.patterns import LIDAR_PRESETS  # noqa: E402
from shared.scan.spec import ScanSpec  # noqa: E402

KITTI_K = make_K(721.5, 721.5, 609.6, 172.9 - 23.0)  # cam 2, 1242 x 375 cropped to the bottom 1216 x 352
SIZES = {"640x480": (640, 480, None), "1280x960": (1280, 960, None), "1216x352": (1216, 352, KITTI_K)}
OLD = "FULL old grid path (grid mesh + culled BVH + hdl64 + projection)"
NEW = "FULL new grid path (height field + hdl64 + projection)"
HIDDEN = "FULL new grid + hidden geometry"
POISSON = "FULL poisson path (mesh + hdl64 + projection)"
RATIOS = {  # name: (numerator row, denominator row)
    "old grid path / new grid path": (OLD, NEW),
    "old grid path / new grid + hidden": (OLD, HIDDEN),
    "new grid + hidden / old grid path (goal <= 1.3)": (HIDDEN, OLD),
    "poisson path / new grid + hidden": (POISSON, HIDDEN),
}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1000.0


def bench_size(width: int, height: int, K, n_scenes: int, n_poisson: int) -> dict[str, float]:
    K = default_K("street", width, height) if K is None else K
    rows: dict[str, list[float]] = {}

    def add(name, ms):
        rows.setdefault(name, []).append(ms)

    def full(depth, seed, **kw):
        return simulate_sparse_depth(depth, K, np.random.default_rng(seed), ScanSpec(lidar="hdl64", **kw),
                                     mount=KITTI_MOUNT)

    s = render_scene(999, "street", width, height, K)  # warm-up (imports, first BVH, compiled casters)
    full(s.depth_m, 0, hidden=True)
    hdl = LIDAR_PRESETS["hdl64"]
    for seed in range(n_scenes):
        scene, ms = timed(lambda s=seed: render_scene(s, "street", width, height, K))
        add("synthetic render (street)", ms)
        depth = scene.depth_m
        mesh, ms = timed(lambda d=depth: grid_mesh(d, K))
        add("grid mesh (old: indexed triangles)", ms)
        _, ms = timed(lambda d=depth: grid_surface(d, K))
        add("grid surface (new: faces of the height field)", ms)
        layer1, ms = timed(lambda d=depth: hidden_layer(d, K, KITTI_MOUNT.t_cam_from_lidar))
        add("hidden-geometry layer", ms)
        surf = grid_surface(depth, K)
        for name, pat in LIDAR_PRESETS.items():
            _, ms = timed(lambda p=pat, s=seed, g=surf: simulate_scan(g, p, KITTI_MOUNT, K, width, height,
                                                                      np.random.default_rng(s)))
            add(f"scan {name} (new: height field)", ms)
        scan, ms = timed(lambda m=mesh, s=seed: simulate_scan(m, hdl, KITTI_MOUNT, K, width, height,
                                                              np.random.default_rng(s)))
        add("scan hdl64 (old: culling + Open3D BVH)", ms)
        _, ms = timed(lambda s=scan: project_scan(s.points_cam, K, width, height))
        add("projection hdl64 (none)", ms)
        _, ms = timed(lambda d=depth, s=seed: full(d, s, caster="open3d", hidden=False))
        add(OLD, ms)
        _, ms = timed(lambda d=depth, s=seed: full(d, s, hidden=False))
        add(NEW, ms)
        _, ms = timed(lambda d=depth, s=seed: full(d, s, hidden=True))
        add(HIDDEN, ms)
        if seed < n_poisson:
            _, ms = timed(lambda d=depth: poisson_mesh(d, K))
            add("poisson mesh (depth 8)", ms)
            _, ms = timed(lambda d=depth, s=seed: full(d, s, mesh="poisson"))
            add(POISSON, ms)
        del layer1
    return {k: float(np.median(v)) for k, v in rows.items()}


def kitti_density(n: int) -> dict[str, tuple[float, float, float]]:
    """Pixel density of hdl64 in KITTI cam 2 from the KITTI mount, without and with hidden geometry."""
    out = {}
    for hidden in (False, True):
        dens = []
        for seed in range(n):
            s = render_scene(1000 + seed, "street", 1216, 352, KITTI_K)
            _, info = simulate_sparse_depth(s.depth_m, KITTI_K, np.random.default_rng(seed),
                                            ScanSpec(lidar="hdl64", hidden=hidden), mount=KITTI_MOUNT)
            dens.append(info["density"])
        out["grid + hidden" if hidden else "grid"] = (float(np.mean(dens)), float(np.min(dens)), float(np.max(dens)))
    return out


FIRST_CALL = """
import time, numpy as np
t0 = time.perf_counter()
from shared.scan.lidar import simulate_sparse_depth
from shared.scan.spec import ScanSpec
from shared.camera import make_K
t1 = time.perf_counter()
args = (np.full((32, 32), 5.0, np.float32), make_K(30.0, 30.0, 15.5, 15.5), np.random.default_rng(0))
simulate_sparse_depth(*args, ScanSpec(mount="kitti"))
t2 = time.perf_counter()
simulate_sparse_depth(*args, ScanSpec(mount="kitti"))
t3 = time.perf_counter()
print((t1 - t0) * 1000, (t2 - t1 - (t3 - t2)) * 1000)
"""


def first_call_cost() -> dict[str, float]:
    """ms of the first simulate_sparse_depth call in a fresh process beyond a warm one, with an empty numba
    cache (it compiles) and then with the cache it wrote (it loads); and the import time."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
        for name in ("compile (empty cache)", "load (cached)"):
            res = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, env=env, cwd=ROOT,
                                 check=True)
            imp, first = (float(x) for x in res.stdout.split())
            out[f"first call: {name}"] = first
            out[f"import shared.scan.lidar ({name.split()[0]})"] = imp
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer scenes")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    n_scenes, n_poisson, n_density = (2, 1, 3) if args.quick else (5, 2, 10)

    first = first_call_cost()
    results = {name: bench_size(w, h, K, n_scenes, n_poisson) for name, (w, h, K) in SIZES.items()}
    stages = list(next(iter(results.values())))
    print(f"\nms per image, one thread, median over {n_scenes} street scenes (Poisson: {n_poisson}); "
          "the machine may be shared: compare the ratios\n")
    print("| stage | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for st in stages:
        print(f"| {st} | " + " | ".join(f"{results[s][st]:.1f}" for s in results) + " |")
    ratios = {name: {s: results[s][a] / results[s][b] for s in results} for name, (a, b) in RATIOS.items()}
    for name, r in ratios.items():
        print(f"| **{name}** | " + " | ".join(f"{r[s]:.2f}x" for s in results) + " |")
    print("\nfirst call in a fresh process (numba): " + ", ".join(f"{k} {v:.0f} ms" for k, v in first.items()))
    dens = kitti_density(n_density)
    print(f"\nhdl64 into KITTI cam 2 (1216 x 352, fx 721.5, KITTI mount), {n_density} street scenes: pixel density "
          + "; ".join(f"{k} {100 * m:.2f}% (min {100 * lo:.2f}%, max {100 * hi:.2f}%)" for k, (m, lo, hi) in dens.items())
          + "; real KITTI raw: ~4-6%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ms_per_image": results, "scenes": n_scenes, "poisson_scenes": n_poisson, "ratios": ratios,
                       "first_call_ms": first, "kitti_density": {k: {"mean": m, "min": lo, "max": hi, "scenes": n_density}
                                                                 for k, (m, lo, hi) in dens.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
