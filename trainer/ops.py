"""BP-Net's two custom CUDA operations, in plain PyTorch so that they run on any device.

knn4: for every pixel, the 4 nearest valid sparse pixels (the original `BpOps.Dist` + `BpDist`).
local_conv: a per-pixel, per-channel KxK convolution (the original `BpOps.Conv2dLocal_F/B`).

Semantics of the original 4-NN kernel, reproduced exactly here:
- a pixel is valid when its depth is > 1e-3; valid pixels are numbered in row-major order (m = 0..M-1);
- squared distances are taken on the integer pixel grid, so they are exact integers and tie very often;
- each pixel keeps its 4 smallest distances, sorted ascending; an equal distance is inserted *before*
  the entries already kept, so among ties the later point index comes first (and wins the last slot);
- with fewer than 4 valid points the missing slots repeat the last (farthest) neighbour found.
With 0 valid points the original reads out of bounds; here every slot points at the pixel itself with
a (0, 0) offset, so the network sees "no neighbour information" and stays finite.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import Tensor

NUM_NEIGHBOURS = 4
KNN4_METHODS = ("kdtree", "brute")  # what knn4(method=...) accepts besides "auto"; bench/gpu_check.py checks each
VALID_DEPTH = 1e-3  # the original's threshold for a valid sparse pixel (metres, or its unit)


# -----------------------------------------------------------------------------
# 4 nearest valid pixels


def _order_key(d2: Tensor | np.ndarray, m: Tensor | np.ndarray, num_points: int):
    """One integer that sorts by (squared distance ascending, point index descending)."""
    return d2 * num_points + (num_points - 1 - m)


def _pad_repeat_last(sel: np.ndarray | Tensor, k: int):
    """Fill the slots beyond the found neighbours with the last one found, as the original does."""
    if sel.shape[1] >= k:
        return sel[:, :k]
    last = sel[:, -1:]
    reps = [last] * (k - sel.shape[1])
    if isinstance(sel, Tensor):
        return torch.cat([sel, *reps], dim=1)
    return np.concatenate([sel, *reps], axis=1)


def knn4_points_kdtree(px: np.ndarray, py: np.ndarray, height: int, width: int, workers: int = 1) -> np.ndarray:
    """Indices (N x 4, into the point list) of the 4 nearest points of every pixel, via a KD-tree.

    A KD-tree breaks distance ties arbitrarily, so we query k > 4 neighbours and widen k for the pixels
    whose k-th neighbour is still as near as their 4th: then every point tied with the 4th is in hand
    and the original's tie rule can be applied to the candidates.
    """
    num_points = len(px)
    assert num_points > 0
    px = px.astype(np.int64)
    py = py.astype(np.int64)
    tree = cKDTree(np.stack([px, py], axis=1).astype(np.float64))
    qy, qx = np.divmod(np.arange(height * width, dtype=np.int64), width)
    out = np.empty((height * width, NUM_NEIGHBOURS), dtype=np.int64)
    todo = np.arange(height * width)
    k = min(num_points, 2 * NUM_NEIGHBOURS)
    while todo.size:
        _, cand = tree.query(np.stack([qx[todo], qy[todo]], axis=1).astype(np.float64), k=k, workers=workers)
        cand = cand.reshape(len(todo), k).astype(np.int64)
        d2 = (px[cand] - qx[todo, None]) ** 2 + (py[cand] - qy[todo, None]) ** 2
        order = np.argsort(_order_key(d2, cand, num_points), axis=1)
        cand = np.take_along_axis(cand, order, axis=1)
        d2 = np.take_along_axis(d2, order, axis=1)
        kept = min(k, NUM_NEIGHBOURS)
        # d2.max() is the k-th distance: if it exceeds the 4th, no unseen point can tie with the 4th
        done = (d2[:, -1] > d2[:, kept - 1]) if k < num_points else np.ones(len(todo), dtype=bool)
        out[todo[done]] = _pad_repeat_last(cand[done, :kept], NUM_NEIGHBOURS)
        todo = todo[~done]
        k = min(num_points, 2 * k)
    return out


def knn4_points_brute(px: Tensor, py: Tensor, height: int, width: int, chunk_elems: int = 1 << 24) -> Tensor:
    """Same as `knn4_points_kdtree`, by exhaustive search over chunks of pixels, on px's device.

    Memory is bounded by chunk_elems pixel-point pairs (int64). Exact because distances are integers
    and the tie rule is folded into one integer key.
    """
    num_points = px.numel()
    assert num_points > 0
    device = px.device
    px = px.long()
    py = py.long()
    m = torch.arange(num_points, device=device)
    n_pix = height * width
    step = max(1, chunk_elems // num_points)
    kept = min(num_points, NUM_NEIGHBOURS)
    out = torch.empty(n_pix, NUM_NEIGHBOURS, dtype=torch.long, device=device)
    for start in range(0, n_pix, step):
        q = torch.arange(start, min(n_pix, start + step), device=device)
        qy, qx = q // width, q % width
        d2 = (px[None] - qx[:, None]).square_() + (py[None] - qy[:, None]).square_()
        key = _order_key(d2, m[None], num_points)
        sel = torch.topk(key, kept, dim=1, largest=False, sorted=True).indices
        out[start:start + len(q)] = _pad_repeat_last(sel, NUM_NEIGHBOURS)
    return out


@torch.no_grad()
def knn4(sparse: Tensor, method: str = "auto", valid_depth: float = VALID_DEPTH,
         chunk_elems: int = 1 << 24, workers: int = 1) -> tuple[Tensor, Tensor]:
    """The 4 nearest valid pixels of every pixel of a B x 1 x H x W sparse depth map.

    Returns (idx, offset), the original's (args, Ofnum):
      idx    B x 4 x (H*W) int64: flat pixel index (row * W + col) of each neighbour, nearest first;
      offset B x 2 x 4 x (H*W), sparse's dtype: (dx, dy) = neighbour's (col, row) - pixel's (col, row).
    method: "kdtree" (scipy, on the CPU), "brute" (chunked exhaustive search on sparse's device),
    or "auto" (kdtree for CPU tensors, brute otherwise). Both give identical results.
    """
    if method == "auto":
        method = "kdtree" if sparse.device.type == "cpu" else "brute"
    if method not in ("kdtree", "brute"):
        raise ValueError(f"unknown knn4 method {method!r}")
    B, _, H, W = sparse.shape
    N = H * W
    device = sparse.device
    idx = torch.empty(B, NUM_NEIGHBOURS, N, dtype=torch.long, device=device)
    valid = (sparse.reshape(B, N) > valid_depth)
    for b in range(B):
        flat = torch.nonzero(valid[b]).squeeze(1)  # row-major, as masked_select orders them
        if flat.numel() == 0:
            idx[b] = torch.arange(N, device=device).expand(NUM_NEIGHBOURS, N)
            continue
        if method == "kdtree":
            flat_np = flat.cpu().numpy()
            nearest = knn4_points_kdtree(flat_np % W, flat_np // W, H, W, workers=workers)
            nearest = torch.from_numpy(nearest).to(device)
        else:
            nearest = knn4_points_brute(flat % W, flat // W, H, W, chunk_elems=chunk_elems)
        idx[b] = flat[nearest].T
    q = torch.arange(N, device=device)
    qy, qx = q // W, q % W
    dx = (idx % W) - qx
    dy = (idx // W) - qy
    offset = torch.stack([dx, dy], dim=1).to(sparse.dtype)
    return idx, offset


# -----------------------------------------------------------------------------
# per-pixel local convolution


class _LocalConv(torch.autograd.Function):
    """k*k shifted multiply-adds, forward and backward, in the CUDA kernel's summation order (kernel row,
    then column). Only x and the weights are saved, like the CUDA op: neither a K*K-times larger
    unfolded copy of x nor k*k autograd nodes per call, which keeps the many CSPN steps cheap."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.k = k
        B, C, H, W = x.shape
        r = k // 2
        xp = F.pad(x, (r, r, r, r))
        w = weight.view(B, C, k * k, H, W)
        out = torch.zeros_like(x)
        for u in range(k):
            for v in range(k):
                out.addcmul_(xp[:, :, u:u + H, v:v + W], w[:, :, u * k + v])
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        k = ctx.k
        B, C, H, W = x.shape
        r = k // 2
        g = grad_out.contiguous()
        w = weight.view(B, C, k * k, H, W)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gxp = x.new_zeros(B, C, H + 2 * r, W + 2 * r)
            for u in range(k):
                for v in range(k):
                    gxp[:, :, u:u + H, v:v + W].addcmul_(g, w[:, :, u * k + v])
            grad_x = gxp[:, :, r:r + H, r:r + W].contiguous()
        if ctx.needs_input_grad[1]:
            xp = F.pad(x, (r, r, r, r))
            grad_w = weight.new_empty(B, C, k * k, H, W)
            for u in range(k):
                for v in range(k):
                    torch.mul(xp[:, :, u:u + H, v:v + W], g, out=grad_w[:, :, u * k + v])
            grad_w = grad_w.view(B, C * k * k, H, W)
        return grad_x, grad_w, None


def local_conv(x: Tensor, weight: Tensor, k: int | None = None) -> Tensor:
    """out[b, c, i, j] = sum_{u,v} x[b, c, i+u-r, j+v-r] * weight[b, c*k*k + u*k + v, i, j], zero padded.

    x: B x C x H x W; weight: B x (C*k*k) x H x W, laid out channel-major, then kernel row, then kernel
    column (the original's layout, and F.unfold's: the result equals unfold, multiply, sum over the k*k).
    k is odd; if None it is inferred from the shapes.
    """
    B, C, H, W = x.shape
    if k is None:
        k = int(round((weight.shape[1] // C) ** 0.5))
    if k % 2 != 1 or weight.shape != (B, C * k * k, H, W):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} with odd k={k}")
    return _LocalConv.apply(x.contiguous(), weight.contiguous(), k)
