"""The BP-Net ops against plain references written here, loop by loop."""

import sys

import numpy as np
import pytest
import torch

import trainer.ops as ops
from trainer.ops import knn4, knn4_points_brute, knn4_points_bucket, local_conv, propagate


def reference_knn4(sparse: np.ndarray):
    """The original CUDA kernel's rule, literally: scan points in row-major order, insert a point before
    the first kept entry whose distance is >= its own, keep 4; repeat the last found to fill."""
    H, W = sparse.shape
    pts = [(x, y) for y in range(H) for x in range(W) if sparse[y, x] > 1e-3]
    idx = np.zeros((4, H * W), dtype=np.int64)
    off = np.zeros((2, 4, H * W), dtype=np.float32)
    for y in range(H):
        for x in range(W):
            best, arg = [1e20] * 4, [0] * 4
            for m, (px, py) in enumerate(pts):
                d = (px - x) ** 2 + (py - y) ** 2
                for i in range(4):
                    if best[i] >= d:
                        best.insert(i, d)
                        arg.insert(i, m)
                        best, arg = best[:4], arg[:4]
                        break
            for i in range(4):
                if best[i] >= 1e20:
                    arg[i] = arg[i - 1]
            for i in range(4):
                px, py = pts[arg[i]]
                idx[i, y * W + x] = py * W + px
                off[:, i, y * W + x] = (px - x, py - y)
    return idx, off


def sparse_map(H, W, coords, rng=None):
    s = np.zeros((H, W), dtype=np.float32)
    for y, x in coords:
        s[y, x] = 1.0 + (rng.random() * 50 if rng is not None else y + x)
    return s


def cases():
    rng = np.random.default_rng(0)
    H, W = 12, 17
    many = [(int(y), int(x)) for y, x in zip(*np.nonzero(rng.random((H, W)) < 0.2), strict=True)]
    # a regular lattice and a symmetric cross: almost every pixel sees exact ties at its 4th distance
    lattice = [(y, x) for y in range(0, H, 3) for x in range(1, W, 3)]
    cross = [(6, 8), (0, 8), (11, 8), (6, 0), (6, 16), (3, 8), (9, 8), (6, 5), (6, 11)]
    # 12 points at squared distance 25 from the centre (more ties than a first k=8 KD-tree query holds)
    ring = [(6 + dy, 6 + dx) for dy in range(-5, 6) for dx in range(-5, 6) if dy * dy + dx * dx == 25]
    return {
        "ring_ties": (13, 13, ring),
        "one": (H, W, [(5, 7)]),
        "three": (H, W, [(0, 0), (11, 16), (4, 9)]),
        "four_borders": (H, W, [(0, 0), (0, 16), (11, 0), (11, 16)]),
        "many": (H, W, many),
        "lattice_ties": (H, W, lattice),
        "cross_ties": (H, W, cross),
        "dense": (5, 6, [(y, x) for y in range(5) for x in range(6)]),
    }


@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("method", ["kdtree", "bucket", "brute"])
def test_knn4_matches_reference(name, method):
    H, W, coords = cases()[name]
    s = sparse_map(H, W, coords, np.random.default_rng(1))
    ref_idx, ref_off = reference_knn4(s)
    idx, off = knn4(torch.from_numpy(s)[None, None], method=method, chunk_elems=37)  # many small chunks
    assert idx.shape == (1, 4, H * W) and off.shape == (1, 2, 4, H * W)
    np.testing.assert_array_equal(idx[0].numpy(), ref_idx)
    np.testing.assert_array_equal(off[0].numpy(), ref_off)


def test_knn4_ties_go_to_later_point():
    # four points at squared distance 1 around pixel (2, 2) and one at 2; among ties the later
    # (row-major) point comes first.
    s = np.zeros((5, 5), dtype=np.float32)
    for y, x in [(1, 2), (2, 1), (2, 3), (3, 2), (1, 1)]:
        s[y, x] = 5.0
    idx, _ = knn4(torch.from_numpy(s)[None, None])
    got = idx[0, :, 2 * 5 + 2].tolist()
    # distance 1: (1,2)=7, (2,1)=11, (2,3)=13, (3,2)=17 -> later first: 17, 13, 11, 7; (1,1) at 2 is out
    assert got == [17, 13, 11, 7]


def test_knn4_zero_points_and_batch_and_threshold():
    s = torch.zeros(2, 1, 4, 6)
    s[1, 0, 2, 3] = 2.0
    s[1, 0, 0, 0] = 1e-3  # not valid: the original's threshold is strictly above 1e-3
    for method in ("kdtree", "bucket", "brute"):
        idx, off = knn4(s, method=method)
        np.testing.assert_array_equal(idx[0].numpy(), np.tile(np.arange(24), (4, 1)))
        assert torch.all(off[0] == 0)
        assert torch.all(idx[1] == 2 * 6 + 3)
        q = torch.arange(24)
        assert torch.equal(off[1, 0, 0], (3 - q % 6).float()) and torch.equal(off[1, 1, 3], (2 - q // 6).float())


def test_knn4_kdtree_equals_brute_on_random_maps():
    rng = np.random.default_rng(3)
    s = (rng.random((3, 1, 24, 40)) < np.array([0.01, 0.05, 0.3])[:, None, None, None]).astype(np.float32)
    s = torch.from_numpy(s * 10)
    a = knn4(s, method="kdtree")
    b = knn4(s, method="brute", chunk_elems=1000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def random_points(rng, H, W, kind):
    """Flat row-major indices of valid pixels: few, uniform, clustered, or on a lattice (many ties)."""
    if kind == "few":  # fewer than 4 points, or just 4
        return np.sort(rng.choice(H * W, rng.integers(1, min(H * W, 4) + 1), replace=False))
    if kind == "uniform":
        flat = np.flatnonzero(rng.random(H * W) < rng.choice([0.01, 0.05, 0.3, 1.0]))
        return flat if flat.size else np.array([rng.integers(H * W)])
    if kind == "cluster":  # a dense blob: its cells hold many points, the rest of the grid none
        cy, cx = rng.integers(0, H), rng.integers(0, W)
        ys, xs = np.clip(cy + rng.integers(-2, 3, 30), 0, H - 1), np.clip(cx + rng.integers(-2, 3, 30), 0, W - 1)
        return np.unique(ys * W + xs)
    step = int(rng.integers(2, 6))  # a lattice: integer distances tie everywhere
    yy, xx = np.meshgrid(np.arange(0, H, step), np.arange(int(rng.integers(0, step)), W, step), indexing="ij")
    flat = np.sort((yy * W + xx).ravel())
    return flat if flat.size else np.array([0])


@pytest.mark.parametrize("kind", ["few", "uniform", "cluster", "lattice"])
def test_knn4_bucket_equals_exhaustive_on_random_maps(kind):
    # 1-pixel, 1-row, 1-column and non-square images, cells from 1 pixel to larger than the image,
    # and chunks of a few pairs (every code path of the chunking); the exhaustive search is the reference
    rng = np.random.default_rng(["few", "uniform", "cluster", "lattice"].index(kind))
    shapes = [(1, 1), (1, 9), (7, 1), (2, 3)] + [(int(rng.integers(1, 30)), int(rng.integers(1, 45))) for _ in range(20)]
    for H, W in shapes:
        flat = torch.from_numpy(random_points(rng, H, W, kind))
        px, py = flat % W, flat // W
        ref = knn4_points_brute(px, py, H, W)
        for cell in (None, 1, 2, 5, 64):
            got = knn4_points_bucket(px, py, H, W, cell=cell, chunk_elems=int(rng.choice([40, 1 << 20])))
            assert torch.equal(got, ref), (kind, H, W, cell, flat.numel())


def test_knn4_auto_on_the_cpu_without_scipy_takes_the_bucketed_search(monkeypatch):
    """Where scipy is not installed (the GPU check's minimal environment), "auto" on the CPU takes the bucketed
    search instead of the KD-tree: the same indices and offsets, and the trainer imports without scipy."""
    rng = np.random.default_rng(3)
    sparse = torch.from_numpy(sparse_map(20, 30, [(int(x), int(y)) for x, y in rng.integers(0, 20, (40, 2))]))[None, None]
    ref = knn4(sparse, method="kdtree")
    calls = []
    bucket = ops.knn4_points_bucket
    monkeypatch.setattr(ops, "knn4_points_bucket", lambda *a, **k: calls.append(1) or bucket(*a, **k))
    for name in ("scipy", "scipy.spatial"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    ops.have_scipy.cache_clear()
    try:
        assert not ops.have_scipy()
        idx, off = knn4(sparse)
        with pytest.raises(ImportError):
            knn4(sparse, method="kdtree")
    finally:
        ops.have_scipy.cache_clear()
    assert calls and torch.equal(idx, ref[0]) and torch.equal(off, ref[1])


def test_knn4_bucket_one_pixel_and_empty_images():
    for value, expect in ((5.0, 0), (0.0, 0)):  # a valid lone pixel is its own 4 neighbours; so is an invalid one
        idx, off = knn4(torch.full((1, 1, 1, 1), value), method="bucket")
        assert idx.tolist() == [[[expect]] * 4] and torch.all(off == 0)


def test_knn4_bucket_looks_at_few_candidates(monkeypatch):
    # the point of buckets: each pixel weighs a few dozen nearby points, not all of them
    rng = np.random.default_rng(5)
    H, W, n = 96, 128, 600
    flat = torch.from_numpy(np.sort(rng.choice(H * W, n, replace=False)))
    pairs = []
    real = ops._merge_runs

    def counting(best, cells, lo, hi, grid, lx, chunk_elems):
        pairs.append(int((hi - lo).sum()) * grid.side ** 2)
        return real(best, cells, lo, hi, grid, lx, chunk_elems)

    monkeypatch.setattr(ops, "_merge_runs", counting)
    got = knn4_points_bucket(flat % W, flat // W, H, W)
    assert torch.equal(got, knn4_points_brute(flat % W, flat // W, H, W))
    assert sum(pairs) / (H * W) < 60, sum(pairs) / (H * W)  # exhaustive: 600 per pixel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_knn4_bucket_on_cuda_equals_cpu():
    rng = np.random.default_rng(7)
    s = torch.from_numpy((rng.random((2, 1, 64, 200)) < 0.05).astype(np.float32) * 10)
    idx, off = knn4(s.cuda())  # auto: the bucketed search on CUDA
    ref = knn4(s, method="brute")
    assert torch.equal(idx.cpu(), ref[0]) and torch.equal(off.cpu(), ref[1])


def reference_local_conv(x, w, k):
    B, C, H, W = x.shape
    r = k // 2
    out = torch.zeros_like(x)
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    acc = 0.0
                    for u in range(k):
                        for v in range(k):
                            ii, jj = i + u - r, j + v - r
                            if 0 <= ii < H and 0 <= jj < W:
                                acc += x[b, c, ii, jj] * w[b, c * k * k + u * k + v, i, j]
                    out[b, c, i, j] = acc
    return out


@pytest.mark.parametrize("k", [3, 5, 7])
def test_local_conv_matches_loop(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64)
    w = torch.randn(2, 2 * k * k, 5, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(local_conv(x, w, k), reference_local_conv(x, w, k), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local_conv(x, w), reference_local_conv(x, w, k), rtol=1e-12, atol=1e-12)
    cols = torch.nn.functional.unfold(x, k, padding=k // 2).view(2, 2, k * k, 5, 6)  # the original's definition
    torch.testing.assert_close(local_conv(x, w, k), (cols * w.view(2, 2, k * k, 5, 6)).sum(2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [3, 5])
def test_local_conv_gradcheck(k):
    g = torch.Generator().manual_seed(10 + k)
    x = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2 * k * k, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: local_conv(a, b, k), (x, w))


def test_local_conv_rejects_bad_layout():
    with pytest.raises(ValueError):
        local_conv(torch.zeros(1, 2, 4, 4), torch.zeros(1, 9, 4, 4), 3)


def reference_chain(h, h0, w, m, steps, eps=1e-6):
    """One CSPN chain as the original writes it: GenKernel's normalisation, then per step local_conv and
    the mask blend; the states after step steps // 2 and after the last."""
    v = w / (w.abs().sum(dim=1, keepdim=True) + eps)
    half = v.shape[1] // 2
    kernel = torch.cat([v[:, :half], 1 - v.sum(dim=1, keepdim=True), v[:, half:]], dim=1)
    x, mid = h, None
    for i in range(steps):
        x = (1.0 - m) * local_conv(x, kernel) + m * h0
        if i == steps // 2 - 1:
            mid = x
    return mid, x


def chain_inputs(k, dtype, seed=0, B=2, H=5, W=7):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(B, 1, H, W, generator=g, dtype=dtype) * 30 + 2
    h0 = torch.where(torch.rand(B, 1, H, W, generator=g) < 0.3, h, 0).to(dtype)
    w = torch.randn(B, k * k - 1, H, W, generator=g, dtype=dtype)
    w[0, 0, 0, 0] = 0.0  # |w| has a kink at 0: the gradient there is sign(0) = 0, as autograd's
    m = torch.rand(B, 1, H, W, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (h, h0, w, m)]


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("steps", [2, 3, 6])
def test_propagate_equals_the_step_by_step_chain(k, steps):
    # float32: the forward runs the same operations in the same order, so it is bitwise the reference's;
    # the hand-written backward sums in another order, so its gradients agree to rounding
    inputs = chain_inputs(k, torch.float32, seed=k * 10 + steps)
    got, ref = propagate(*inputs, steps), reference_chain(*inputs, steps)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))

    def grads(outs):
        loss = 0.3 * outs[0].sum() + (outs[1] ** 2).sum()  # both outputs carry a gradient
        return torch.autograd.grad(loss, inputs)

    for a, b in zip(grads(got), grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("k", [3, 7])
def test_propagate_gradcheck(k):
    inputs = chain_inputs(k, torch.float64, seed=k, H=4, W=5)
    assert torch.autograd.gradcheck(lambda *a: propagate(*a, 4), inputs)
    got = torch.autograd.grad(sum(o.sum() for o in propagate(*inputs, 4)), inputs)
    ref = torch.autograd.grad(sum(o.sum() for o in reference_chain(*inputs, 4)), inputs)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_propagate_rejects_bad_shapes():
    h = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError):
        propagate(h, h, torch.zeros(1, 7, 4, 4), h, 2)  # 7 is not k*k - 1
    with pytest.raises(ValueError):
        propagate(h, h, torch.zeros(1, 8, 4, 4), h, 1)
