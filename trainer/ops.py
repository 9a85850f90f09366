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

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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


@functools.cache
def have_scipy() -> bool:
    try:
        import scipy.spatial  # noqa: F401
    except ImportError:
        return False
    return True


def knn4_points_kdtree(px: np.ndarray, py: np.ndarray, height: int, width: int, workers: int = 1) -> np.ndarray:
    """Indices (N x 4, into the point list) of the 4 nearest points of every pixel, via a KD-tree.

    A KD-tree breaks distance ties arbitrarily, so we query k > 4 neighbours and widen k for the pixels
    whose k-th neighbour is still as near as their 4th: then every point tied with the 4th is in hand
    and the original's tie rule can be applied to the candidates.
    """
    from scipy.spatial import cKDTree  # lazy: without scipy, "auto" takes the bucketed search (have_scipy)

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


# Bucketed search. Points are binned on a grid of S x S-pixel cells, in two orders (row-major and
# column-major cell id), so that the cells at Chebyshev cell distance exactly r around a cell (its "ring"
# r) are four contiguous runs of points: the ring's top and bottom rows in the first order, its left and
# right columns in the second. Every cell searches its rings outwards (skipping empty ones, found with a
# summed-area table of the cell counts) and keeps each of its pixels' 4 best keys. A pixel is finished
# when its 4th-best squared distance is below the squared distance to the nearest cell not yet searched,
# so that no unseen point can enter its 4 or tie with them; a cell, when all its pixels are.
_EMPTY = 1 << 62  # the key of an empty slot: above every real key, and a real key added to it fits int64


@dataclass
class _Buckets:
    """The valid points binned on a gx x gy grid of side x side-pixel cells."""

    side: int
    gx: int
    gy: int
    px: Tensor
    py: Tensor
    points: Tensor  # point indices sorted by row-major cell id, then the same by column-major cell id
    row_start: Tensor  # gx*gy + 1: where each row-major cell's run starts in `points`
    col_start: Tensor  # gx*gy + 1: the same for column-major cells (offset by the number of points)
    sat: Tensor  # (gy + 1) x (gx + 1) summed-area table of the points per cell

    @staticmethod
    def build(px: Tensor, py: Tensor, height: int, width: int, side: int) -> _Buckets:
        gx, gy = -(-int(width) // side), -(-int(height) // side)
        cx, cy = px // side, py // side
        row_id, col_id = cy * gx + cx, cx * gy + cy
        counts = torch.bincount(row_id, minlength=gx * gy)
        sat = F.pad(counts.view(gy, gx).cumsum(0).cumsum(1), (1, 0, 1, 0))
        row_start = F.pad(counts.cumsum(0), (1, 0))
        col_start = F.pad(counts.view(gy, gx).T.reshape(-1).cumsum(0), (1, 0)) + px.numel()
        points = torch.cat([torch.argsort(row_id, stable=True), torch.argsort(col_id, stable=True)])
        return _Buckets(side, gx, gy, px, py, points, row_start, col_start, sat)

    def block_count(self, cx: Tensor, cy: Tensor, r: Tensor) -> Tensor:
        """Points in the cells within Chebyshev cell distance r of (cx, cy)."""
        x0, x1 = (cx - r).clamp(min=0), (cx + r + 1).clamp(max=self.gx)
        y0, y1 = (cy - r).clamp(min=0), (cy + r + 1).clamp(max=self.gy)
        s = self.sat
        return s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]

    def next_ring(self, cx: Tensor, cy: Tensor, r: Tensor) -> Tensor:
        """The first ring beyond r that holds a point (binary search on block counts; the caller makes
        sure some point lies beyond ring r)."""
        seen = self.block_count(cx, cy, r)
        lo, hi = r + 1, torch.full_like(r, max(self.gx, self.gy))
        for _ in range(max(self.gx, self.gy).bit_length()):
            mid = torch.div(lo + hi, 2, rounding_mode="floor")
            more = self.block_count(cx, cy, mid) > seen
            hi, lo = torch.where(more, mid, hi), torch.where(more, lo, mid + 1)
        return lo

    def ring_runs(self, cx: Tensor, cy: Tensor, r: Tensor, reach_d2: Tensor) -> tuple[Tensor, Tensor]:
        """[lo, hi) runs (Q x 4) into `points` holding the points of ring r (per cell) around each cell.

        Cells that cannot hold a point within squared distance reach_d2 of every pixel of the query cell
        are cut off the ends of each run (or the whole run is dropped): such points could not enter any
        of its pixels' best 4.
        """
        side, gx, gy = self.side, self.gx, self.gy
        gap = ((r - 1) * side + 1).clamp(min=0)  # pixels from the query cell to ring r, across its side
        budget = reach_d2 - gap * gap
        span = torch.minimum(_reach(budget.clamp(min=0), side), r)  # cells along the side worth a look
        runs = []
        for y, x in [(cy - r, None), (cy + r, None), (None, cx - r), (None, cx + r)]:
            if x is None:  # a row of the ring: cells (y, cx - span .. cx + span), contiguous row-major
                keep = (y >= 0) & (y < gy)
                a, b = (cx - span).clamp(min=0), (cx + span).clamp(max=gx - 1)
                base, start = y.clamp(0, gy - 1) * gx, self.row_start
            else:  # a column without its corners (in the rows already): contiguous column-major
                keep = (x >= 0) & (x < gx)
                inner = torch.minimum(span, r - 1)
                a, b = (cy - inner).clamp(min=0), (cy + inner).clamp(max=gy - 1)
                base, start = x.clamp(0, gx - 1) * gy, self.col_start
            keep &= (budget >= 0) & (a <= b) & ((r > 0) | (len(runs) == 0))  # ring 0: its one cell, once
            lo = torch.where(keep, start[(base + a).clamp(0, gx * gy)], 0)
            runs.append((lo, torch.where(keep, start[(base + b + 1).clamp(0, gx * gy)], 0)))
        return torch.stack([lo for lo, _ in runs], 1), torch.stack([hi for _, hi in runs], 1)


def bucket_size(px: Tensor, py: Tensor, height: int, width: int, points_per_cell: float = 2.0) -> int:
    """Cell side in pixels so that an occupied cell holds about `points_per_cell` points.

    A first guess spreads the points over the whole image; the occupied share of that grid corrects it
    for clustered points (a LiDAR's empty sky, a dense patch), which would otherwise crowd a few cells.
    Measured once on uniform points at 256 x 1216 and 1248 x 1408: 1.5 to 4 points per cell are within
    about 20% of each other in time, 2 the fastest.
    """
    num_points = px.numel()
    side = max(1, min(round((points_per_cell * height * width / num_points) ** 0.5), max(height, width)))
    gx = -(-width // side)
    occupied = torch.unique((py // side) * gx + px // side).numel()
    side = round(side * (points_per_cell * occupied / num_points) ** 0.5)
    return int(min(max(side, 1), max(height, width)))


def _reach(budget: Tensor, side: int) -> Tensor:
    """The largest k such that a cell k cells away (gap (k-1)*side+1 pixels; 0 when k = 0) can hold a point
    within squared distance `budget` (>= 0) of a pixel of the query cell. Exact integer square root."""
    s = budget.double().sqrt().floor().long()
    s = s - (s * s > budget).long()
    s = s + ((s + 1) * (s + 1) <= budget).long()
    return torch.div(s - 1, side, rounding_mode="floor") + 1


def _merge_runs(best: Tensor, cells: Tensor, lo: Tensor, hi: Tensor, grid: _Buckets, lx: Tensor,
                chunk_elems: int) -> None:
    """Fold the points of each cell's runs into its pixels' 4 best keys (best: cells x S*S x 4, in place).

    Cells are padded to their chunk's longest candidate list; sorting them by length first keeps the
    padding small when the points are clustered, and chunk_elems bounds the pixel-candidate pairs held.
    """
    side, px, py = grid.side, grid.px, grid.py
    num_points = px.numel()
    length = hi - lo
    end = length.cumsum(1)
    order = torch.argsort(end[:, -1], descending=True)
    totals = end[order, -1].tolist()
    i = 0
    while i < len(order):
        width = max(totals[i], 1)
        sel = order[i:i + max(1, chunk_elems // (side * side * width))]
        i += len(sel)
        j = torch.arange(width, device=px.device)
        run = (j[None, :, None] >= end[sel, None, :]).sum(-1)  # which run holds slot j (4: none)
        valid = run < 4
        run = run.clamp(max=3)
        pos = lo[sel].gather(1, run) + j - (end[sel] - length[sel]).gather(1, run)
        m = grid.points[torch.where(valid, pos, 0)]  # Q x width point indices
        c = cells[sel]
        # key = (dx^2 + dy^2) * M + tie, split into a column part and a row part so that the one
        # Q x S x S x width operation is a broadcast add; an empty slot gets a row part of _EMPTY
        qx = (c % grid.gx * side)[:, None] + lx  # Q x S pixel columns, and rows below
        qy = (torch.div(c, grid.gx, rounding_mode="floor") * side)[:, None] + lx
        col = (px[m][:, None, :] - qx[:, :, None]).square_() * num_points
        row = _order_key((py[m][:, None, :] - qy[:, :, None]).square_(), m[:, None, :], num_points)
        row.masked_fill_(~valid[:, None, :], _EMPTY)
        key = (row[:, :, None, :] + col[:, None, :, :]).view(len(sel), side * side, width)
        if width > NUM_NEIGHBOURS:
            key = torch.topk(key, NUM_NEIGHBOURS, dim=2, largest=False, sorted=False).values
        merged = torch.cat([best[c], key], dim=2)
        best[c] = torch.topk(merged, NUM_NEIGHBOURS, dim=2, largest=False, sorted=True).values


def knn4_points_bucket(px: Tensor, py: Tensor, height: int, width: int, cell: int | None = None,
                       chunk_elems: int = 1 << 24) -> Tensor:
    """Same as `knn4_points_brute`, by an exact search over grid buckets, on px's device.

    Work is about (pixels x points within a few cells) instead of (pixels x all points): each pixel
    looks at the points of its own cell and of rings of cells around it, ring by ring, until no unseen
    point can be as near as its 4th neighbour. Keys are the same integers as the exhaustive search's, so
    ties and the repeat-last rule come out identical. Python loops run over rings and chunks, not pixels.
    cell: bucket side in pixels (default `bucket_size`).
    """
    num_points = px.numel()
    assert num_points > 0
    device = px.device
    px, py = px.long(), py.long()
    side = cell or bucket_size(px, py, height, width)
    grid = _Buckets.build(px, py, height, width, side)
    num_cells = grid.gx * grid.gy
    lx = torch.arange(side, device=device)  # a pixel's column (and row) inside its cell
    best = torch.full((num_cells, side * side, NUM_NEIGHBOURS), _EMPTY, dtype=torch.long, device=device)
    reach_d2 = torch.full((num_cells,), _EMPTY, dtype=torch.long, device=device)  # a cell's worst 4th
    far = 2 * (height + width)  # farther than any pixel: the gap on a side with no cells left
    pending = torch.arange(num_cells, device=device)
    r = torch.zeros_like(pending)  # the ring each pending cell searches next
    while pending.numel():
        cx, cy = pending % grid.gx, torch.div(pending, grid.gx, rounding_mode="floor")
        lo, hi = grid.ring_runs(cx, cy, r, reach_d2[pending])
        some = (hi > lo).any(1)
        if some.any():
            _merge_runs(best, pending[some], lo[some], hi[some], grid, lx, chunk_elems)
        # every unsearched point lies beyond ring r on some side: at least `gap` pixels away in x or y
        rc = r[:, None]
        gap_x = torch.minimum(torch.where(cx[:, None] - rc > 0, lx + rc * side + 1, far),
                              torch.where(cx[:, None] + rc < grid.gx - 1, (rc + 1) * side - lx, far))
        gap_y = torch.minimum(torch.where(cy[:, None] - rc > 0, lx + rc * side + 1, far),
                              torch.where(cy[:, None] + rc < grid.gy - 1, (rc + 1) * side - lx, far))
        gap = torch.minimum(gap_y[:, :, None], gap_x[:, None, :]).flatten(1)
        inside = (((cy * side)[:, None] + lx < height)[:, :, None]
                  & ((cx * side)[:, None] + lx < width)[:, None, :]).flatten(1)
        key4 = best[pending, :, NUM_NEIGHBOURS - 1]
        d2_4 = torch.where(key4 >= _EMPTY, _EMPTY, torch.div(key4, num_points, rounding_mode="floor"))
        seen_all = grid.block_count(cx, cy, r) == num_points
        done = ((d2_4 < gap * gap) | seen_all[:, None] | ~inside).all(1)
        reach_d2[pending] = torch.where(inside, d2_4, 0).amax(1)
        pending, cx, cy, r = pending[~done], cx[~done], cy[~done], r[~done]
        r = grid.next_ring(cx, cy, r)
    m = num_points - 1 - best % num_points
    m = torch.where(best >= _EMPTY, -1, m)
    for i in range(1, NUM_NEIGHBOURS):  # repeat the last found into empty slots (fewer than 4 points)
        m[..., i] = torch.where(m[..., i] < 0, m[..., i - 1], m[..., i])
    m = m.view(grid.gy, grid.gx, side, side, NUM_NEIGHBOURS).permute(0, 2, 1, 3, 4)
    return m.reshape(grid.gy * side, grid.gx * side, -1)[:height, :width].reshape(height * width, -1)


@torch.no_grad()
def knn4(sparse: Tensor, method: str = "auto", valid_depth: float = VALID_DEPTH,
         chunk_elems: int = 1 << 24, workers: int = 1) -> tuple[Tensor, Tensor]:
    """The 4 nearest valid pixels of every pixel of a B x 1 x H x W sparse depth map.

    Returns (idx, offset), the original's (args, Ofnum):
      idx    B x 4 x (H*W) int64: flat pixel index (row * W + col) of each neighbour, nearest first;
      offset B x 2 x 4 x (H*W), sparse's dtype: (dx, dy) = neighbour's (col, row) - pixel's (col, row).
    method: "kdtree" (scipy, on the CPU), "bucket" (grid-bucketed exact search on sparse's device),
    "brute" (chunked exhaustive search on sparse's device, the reference), or "auto" (kdtree for CPU
    tensors, bucket otherwise, and on the CPU too where scipy is not installed). All give identical results.
    """
    if method == "auto":
        method = "kdtree" if sparse.device.type == "cpu" and have_scipy() else "bucket"
    if method not in ("kdtree", "bucket", "brute"):
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
        elif method == "bucket":
            nearest = knn4_points_bucket(flat % W, flat // W, H, W, chunk_elems=chunk_elems)
        else:
            nearest = knn4_points_brute(flat % W, flat // W, H, W, chunk_elems=chunk_elems)
        idx[b] = flat[nearest].T
    q = torch.arange(N, device=device)
    return idx, knn4_offset(idx, q % W, q // W, sparse.dtype)


def knn4_offset(idx: Tensor, cols: Tensor, rows: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """B x 2 x 4 x N (dx, dy) of knn4's B x 4 x N flat indices: each neighbour's (col, row) minus its
    pixel's, with cols and rows the N pixels' column and row (gathered, not divided: an exported graph
    with a symbolic width keeps it that way)."""
    return torch.stack([cols[idx] - cols, rows[idx] - rows], dim=1).to(dtype)


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


# -----------------------------------------------------------------------------
# the CSPN's propagation steps, fused


def _taps(v: Tensor, centre: Tensor, k: int) -> list[Tensor]:
    """The k*k per-pixel weights in kernel order (row, then column): the k*k-1 maps of v around the centre."""
    half = (k * k - 1) // 2
    return [centre if t == half else v[:, t - (t > half):t - (t > half) + 1] for t in range(k * k)]


class _Propagate(torch.autograd.Function):
    """All steps of one CSPN chain in one autograd node (see `propagate`).

    The forward runs the operations of the kernel's normalisation (the original's GenKernel), then per
    step `local_conv`'s shifted multiply-adds and the mask blend, in their order, so its values are those
    of that composition. The backward is written out: the weights' gradient accumulates in one buffer over
    the steps (autograd would keep a k*k-channel gradient per step and add them up), and the
    normalisation's backward is a few passes instead of autograd's chain through abs, sum, division,
    centre and concatenation. Saved: the raw and normalised weights and two maps per step.
    """

    @staticmethod
    def forward(ctx, h: Tensor, h0: Tensor, w: Tensor, m: Tensor, steps: int, mid: int, eps: float):
        B, T, H, W = w.shape
        k = int(round((T + 1) ** 0.5))
        r = k // 2
        v = w / (w.abs().sum(dim=1, keepdim=True) + eps)
        taps = _taps(v, 1 - v.sum(dim=1, keepdim=True), k)
        xs, outs, x, x_mid = [], [], h, None
        for i in range(steps):
            xp = F.pad(x, (r, r, r, r))
            out = torch.zeros_like(x)
            for u in range(k):
                for c in range(k):
                    out.addcmul_(xp[:, :, u:u + H, c:c + W], taps[u * k + c])
            xs.append(x)
            outs.append(out)
            x = (1.0 - m) * out + m * h0
            if i == mid:
                x_mid = x
        ctx.steps, ctx.mid, ctx.k, ctx.eps = steps, mid, k, eps
        ctx.save_for_backward(w, v, m, h0, *xs, *outs)
        return x_mid, x

    @staticmethod
    def backward(ctx, g_mid: Tensor, g_end: Tensor):
        w, v, m, h0, *rest = ctx.saved_tensors
        steps, mid, k = ctx.steps, ctx.mid, ctx.k
        xs, outs = rest[:steps], rest[steps:]
        B, _, H, W = w.shape
        r = k // 2
        gv, gc = torch.zeros_like(v), torch.zeros_like(m)  # gradients of the k*k-1 weights and the centre
        g_taps = _taps(gv, gc, k)
        taps = _taps(v, 1 - v.sum(dim=1, keepdim=True), k)
        keep = 1.0 - m
        gx, gm, gh0 = g_end.contiguous(), torch.zeros_like(m), torch.zeros_like(m)
        for i in range(steps - 1, -1, -1):  # gx: the gradient of the state after step i
            if i == mid:
                gx = gx + g_mid
            gm.addcmul_(gx, h0 - outs[i])
            gh0.addcmul_(gx, m)
            g_out = gx * keep
            xp = F.pad(xs[i], (r, r, r, r))
            gxp = g_out.new_zeros(B, 1, H + 2 * r, W + 2 * r)
            for u in range(k):
                for c in range(k):
                    g_taps[u * k + c].addcmul_(xp[:, :, u:u + H, c:c + W], g_out)
                    gxp[:, :, u:u + H, c:c + W].addcmul_(g_out, taps[u * k + c])
            gx = gxp[:, :, r:r + H, r:r + W]
        # centre = 1 - sum(v): its gradient reaches every v; v = w / S with S = sum |w| + eps:
        # d/dw_t = (G_t - sign(w_t) * sum_u G_u v_u) / S
        g = gv.sub_(gc)
        s = w.abs().sum(dim=1, keepdim=True) + ctx.eps
        gw = (g - torch.sign(w) * (g * v).sum(dim=1, keepdim=True)) / s
        return gx.contiguous(), gh0, gw, gm, None, None, None


def propagate(h: Tensor, h0: Tensor, w: Tensor, m: Tensor, steps: int, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """One CSPN chain of BP-Net: the states after step steps // 2 and after the last step of

        x_0 = h,   x_{i+1} = (1 - m) * local_conv(x_i, K) + m * h0,

    K the per-pixel kernel of the raw head output w (B x (k*k-1) x H x W): w / (sum |w| + eps) around a
    centre of 1 - the sum of those (the original's GenKernel, trainer.model.KernelHead). h, h0, m:
    B x 1 x H x W. The same values as that composition, in one autograd node (see _Propagate).
    """
    if h.shape[1] != 1 or w.dim() != 4 or int(round((w.shape[1] + 1) ** 0.5)) ** 2 != w.shape[1] + 1:
        raise ValueError(f"propagate takes a 1-channel state and k*k-1 weights, got {tuple(h.shape)}, {tuple(w.shape)}")
    if steps < 2:
        raise ValueError("propagate needs at least 2 steps (a midway and a last state)")
    if torch.compiler.is_exporting():
        return _propagate_graph(h, h0, w, m, steps, steps // 2 - 1, eps)
    return _Propagate.apply(h.contiguous(), h0.contiguous(), w.contiguous(), m.contiguous(), steps, steps // 2 - 1, eps)


def _propagate_graph(h: Tensor, h0: Tensor, w: Tensor, m: Tensor, steps: int, mid: int, eps: float):
    """`propagate` for an exported graph (torch.export, ONNX): each step's k*k shifted copies of the state
    come from one convolution with one-hot kernels (exact: every output is 1 * one input plus zeros), then a
    multiply and a sum over the taps, instead of k*k slices and multiply-adds: a graph of 6 nodes per step
    rather than 3 k^2, which is what keeps exporting bpnet (42 steps of 3 kernels) in seconds. The same
    values up to the order of the sum over the taps (float rounding)."""
    T = w.shape[1]
    k = int(round((T + 1) ** 0.5))
    r = k // 2
    v = w / (w.abs().sum(dim=1, keepdim=True) + eps)
    kernel = torch.cat(_taps(v, 1 - v.sum(dim=1, keepdim=True), k), dim=1)  # _Propagate's kernel, as channels
    shift = torch.eye(k * k, dtype=h.dtype, device=h.device).view(k * k, 1, k, k)
    x = x_mid = h
    for i in range(steps):
        out = (F.conv2d(F.pad(x, (r, r, r, r)), shift) * kernel).sum(dim=1, keepdim=True)
        x = (1.0 - m) * out + m * h0
        if i == mid:
            x_mid = x
    return x_mid, x
