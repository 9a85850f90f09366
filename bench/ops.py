"""BP-Net's custom ops and forward passes, against naive references measured in the same run.

    python bench/ops.py                 # CPU
    python bench/ops.py --device cuda   # the bucketed 4-NN is the GPU path
    python bench/ops.py --quick --json ops.json   # 1 repeat, 8-row band; also the rows as JSON

Prints a Markdown table:
- 4-NN at KITTI size (256 x 1216, 15k points: uniform, on 64 scan lines, in one blob) and at 1248 x 1408 (60k
  points): the bucketed search and the KD-tree against the exhaustive search. The exhaustive search runs
  on a band of the first rows and is scaled to the whole image (stated in the table); all three give
  identical indices (checked).
- local_conv (shifted multiply-adds with a hand-written backward) vs the same loop under autograd
  (naive) and vs unfold-multiply-sum under autograd, forward and forward+backward, 256 x 1216, 7x7.
- forward (eval, no grad) of the `tiny`, `bpnet-s` and `bpnet` presets at 256 x 320, and the share of
  it spent in the 4-NN search.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trainer.model as tm  # noqa: E402
from trainer import ops  # noqa: E402
from trainer.model import build_model, normalize_rgb  # noqa: E402


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def once(fn, device: torch.device):
    """(seconds, result) of one call: for the exhaustive search, too slow to repeat."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def kitti_sparse(B: int, H: int, W: int, frac: float, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, 1, H, W, generator=g) < frac
    return (mask * (1 + 79 * torch.rand(B, 1, H, W, generator=g))).to(device)


def naive_local_conv(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    r = k // 2
    B, C, H, W = x.shape
    xp = F.pad(x, (r, r, r, r))
    w = w.view(B, C, k * k, H, W)
    out = torch.zeros_like(x)
    for u in range(k):
        for v in range(k):
            out = out + xp[:, :, u:u + H, v:v + W] * w[:, :, u * k + v]
    return out


def sample_points(H: int, W: int, n: int, device, pattern: str = "uniform", seed: int = 0) -> torch.Tensor:
    """A 1 x 1 x H x W sparse map with n valid pixels: spread uniformly; on 64 LiDAR-like scan lines over
    the lower 2/3 of the image (the top third empty, like a sky); or in one blob, a quarter of the image's
    width and half its height (the bucketed search's worst case: far pixels see the blob's whole side)."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "uniform":
        flat = torch.randperm(H * W, generator=g)[:n]
    elif pattern == "lines":
        rows = torch.linspace(H / 3, H - 1, 64).long()
        area = rows[:, None] * W + torch.arange(W)
        flat = area.flatten()[torch.randperm(area.numel(), generator=g)[:n]]
    else:
        area = (torch.arange(H // 4, H * 3 // 4)[:, None] * W + torch.arange(W // 8, W * 3 // 8)).flatten()
        flat = area[torch.randperm(area.numel(), generator=g)[:n]]
    sparse = torch.zeros(H * W)
    sparse[flat] = 1 + 79 * torch.rand(flat.numel(), generator=g)
    return sparse.view(1, 1, H, W).to(device)


# (H, W, points, pattern): KITTI's 256 x 1216 crop at its ~5% density, the 1248 x 1408 frame behind the
# "1.29 s per image" report of the original kernel, and KITTI size with the points on scan lines or in a blob
KNN_CASES = [(256, 1216, 15000, "uniform"), (1248, 1408, 60000, "uniform"), (256, 1216, 15000, "lines"),
             (256, 1216, 15000, "blob")]


def bench_knn(rows: list, device: torch.device, repeats: int, band: int):
    for H, W, n, pattern in KNN_CASES:
        bench_knn_case(rows, device, repeats, band, H, W, n, pattern)


def bench_knn_case(rows: list, device: torch.device, repeats: int, band: int, H: int, W: int, n: int, pattern: str):
    """Each 4-NN method against the exhaustive search, which on a whole large frame takes minutes on a
    CPU: it is timed on the first `band` pixel rows (a fixed subset) and scaled by H / band."""
    sparse = sample_points(H, W, n, device, pattern)
    flat = torch.nonzero(sparse.view(-1) > ops.VALID_DEPTH).squeeze(1)
    px, py = flat % W, flat // W
    size = f"{H}x{W}, {flat.numel()} pts" + {"uniform": "", "lines": ", 64 scan lines", "blob": ", one blob"}[pattern]
    t_bucket = timed(lambda: ops.knn4(sparse, method="bucket"), repeats, device)
    bucket = ops.knn4_points_bucket(px, py, H, W)
    rows_timed = min(band, H)
    t_brute, brute = once(lambda: ops.knn4_points_brute(px, py, rows_timed, W), device)  # rows 0..band-1
    t_brute *= H / rows_timed
    assert torch.equal(brute, bucket[: rows_timed * W]), "bucketed and exhaustive 4-NN disagree"
    rows.append((f"4-NN, exhaustive torch on {device} ({rows_timed} of {H} rows timed, scaled)", size, t_brute, 1.0))
    rows.append((f"4-NN, bucketed torch on {device} (cell {ops.bucket_size(px, py, H, W)} px)", size, t_bucket,
                 t_brute / t_bucket))
    cpu = sparse.cpu()
    tree = ops.knn4_points_kdtree(px.cpu().numpy(), py.cpu().numpy(), H, W)
    assert torch.equal(bucket.cpu(), torch.from_numpy(tree)), "bucketed and KD-tree 4-NN disagree"
    t_tree = timed(lambda: ops.knn4(cpu, method="kdtree"), repeats, torch.device("cpu"))
    where = "" if device.type == "cpu" else ", from the device tensor's CPU copy"
    rows.append((f"4-NN, KD-tree (scipy cKDTree, 1 worker{where})", size, t_tree, t_brute / t_tree))


def unfold_local_conv(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    B, C, H, W = x.shape
    cols = F.unfold(x, k, padding=k // 2).view(B, C, k * k, H, W)
    return (cols * w.view(B, C, k * k, H, W)).sum(2)


def bench_local_conv(rows: list, device: torch.device, repeats: int):
    H, W, k = 256, 1216, 7
    x = torch.randn(2, 1, H, W, device=device, requires_grad=True)
    w = torch.randn(2, k * k, H, W, device=device, requires_grad=True)
    for ref in (naive_local_conv, unfold_local_conv):
        torch.testing.assert_close(ops.local_conv(x, w, k), ref(x, w, k), rtol=1e-4, atol=1e-4)
    shape = f"2x1x{H}x{W}, k={k}"
    impls = [("naive k*k shifted adds, autograd", naive_local_conv), ("unfold-multiply-sum, autograd", unfold_local_conv),
             ("trainer.ops.local_conv", ops.local_conv)]

    def fwd(fn):
        with torch.no_grad():
            fn(x, w, k)

    def fwd_bwd(fn):
        fn(x, w, k).sum().backward()

    for label, run in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        base = None
        for name, fn in impls:
            t = timed(lambda fn=fn, run=run: run(fn), repeats, device)
            base = base or t
            rows.append((f"local_conv {label}, {name}", shape, t, None if base is t else t / base))


def time_forward(model, inputs, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median forward seconds, seconds spent in the 4-NN search during one forward)."""
    def run():
        with torch.no_grad():
            model(*inputs)

    t = timed(run, repeats, device)
    real_knn, knn_time = tm.knn4, [0.0]

    def counting_knn(*a, **kw):
        t0 = time.perf_counter()
        out = real_knn(*a, **kw)
        knn_time[0] += time.perf_counter() - t0
        return out

    tm.knn4 = counting_knn
    try:
        run()
    finally:
        tm.knn4 = real_knn
    return t, knn_time[0]


def bench_forward(rows: list, device: torch.device, repeats: int, presets: list[str]):
    H, W = 256, 320
    g = torch.Generator().manual_seed(0)
    rgb = normalize_rgb(torch.randint(0, 256, (1, 3, H, W), generator=g, dtype=torch.uint8)).to(device)
    sparse = kitti_sparse(1, H, W, 0.05, device)
    K = torch.tensor([[[300.0, 0, W / 2], [0, 300.0, H / 2], [0, 0, 1]]], device=device)
    base = None
    for name in presets:
        torch.manual_seed(0)
        model = build_model(name).to(device).eval()
        n_params = sum(p.numel() for p in model.parameters())
        t, t_knn = time_forward(model, (rgb, sparse, K), repeats, device)
        base = base or t
        rows.append((f"forward `{name}` ({n_params / 1e6:.1f} M params; 4-NN {t_knn:.2f} s of it)",
                     f"1x3x{H}x{W}", t, t / base))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--band", type=int, default=16, help="rows timed for the CPU exhaustive 4-NN")
    ap.add_argument("--presets", default="tiny,bpnet-s,bpnet")
    ap.add_argument("--quick", action="store_true", help="1 repeat and an 8-row band")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.band = 1, 8
    device = torch.device(args.device)
    rows: list = []
    bench_knn(rows, device, args.repeats, args.band)
    bench_local_conv(rows, device, args.repeats)
    bench_forward(rows, device, args.repeats, args.presets.split(","))
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| what | size | seconds (median) | ratio |")
    print("|---|---|---|---|")
    for what, size, t, ratio in rows:
        print(f"| {what} | {size} | {t:.4f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    print("\nratio: 4-NN rows, speed-up over the exhaustive search (its time / the row's); local_conv rows, time vs "
          "the naive autograd loop; forward rows, time vs the first preset.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "repeats": args.repeats, "rows": [{"what": w, "size": sz, "seconds": t, "ratio": r}
                                                         for w, sz, t, r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
