"""Hidden geometry: the background behind occluding depth edges, as a second depth layer.

A depth map holds only what the camera saw. A LiDAR mounted away from the camera looks past the
foreground edges the camera saw and finds the background there (KITTI's scans are full of such
points projected onto foreground objects). `hidden_layer` guesses that background so the ray caster
(shared.scan.heightfield, layer 1 of the GridSurface) has something to hit instead of a hole.

Method (per occluding edge pixel pair, vectorised over the image in a compiled loop):
1. Occluding edge: 4-neighbours s, e with z(s) > (1 + max_rel_jump) z(e): the grid mesh is cut
   between them, s is on the far side. s must be a surface pixel: its neighbour on the far side
   continues smoothly (no cut), which skips the mixed pixels of a blurred edge.
2. Where the LiDAR looks past the edge: a ray from the LiDAR origin o grazing the foreground edge
   point E (pixel e at depth z(e)) continues to the background's depth at Q = o + l (E - o). Q
   projects onto the epipolar line of e, on the far side of e from the LiDAR's view; if that side is
   not across the edge (into the foreground), the LiDAR cannot look past this edge and nothing is done.
3. The band: march pixel by pixel from e along that epipolar direction into the foreground, for as
   long as the LiDAR can see past the edge to the background there: distance <= |proj(Q) - e| + 1 px,
   with Q recomputed from the nearest foreground depth met so far and the background depth at the
   current pixel, so the band's width follows the baseline and the depth ratio.
4. The background there: the plane through s, extended. On a plane, inverse depth is affine in the
   image, so the hidden inverse depth at pixel p is 1/z(s) + g . (p - s), g the gradient of 1/z at s
   from s's smooth neighbours on its own side (central where both are smooth, else one-sided, else 0).
   The march stops where the extended plane recedes to the horizon (inverse depth <= 0) or would not
   be behind the foreground by more than the cut (then the camera would have seen it).
5. Layer 1 holds these hidden depths plus the seed pixels s at their own depth, so its grid mesh
   joins the visible background at the edge. A pixel reached from several edges keeps the value from
   the nearest one (march distance).

Failure modes (what this cannot know):
- Thin-sheet assumption: the foreground is the visible surface only. A real object has a body; the
  LiDAR sees its top or side faces where this layer puts background (e.g. over a car's bonnet), so
  the extension can add returns a real sensor would get from the object itself.
- Planar extrapolation: background that bends, ends or changes behind the foreground (a wall corner,
  the kerb behind a car, a second object in the gap) is continued as the plane at the edge.
- One hidden layer: where hidden surfaces stack (pole in front of a car in front of a wall), the
  nearest edge's background wins, the others get holes.
- Brightness and teacher errors: the far side's depth is the teacher's; a blurred teacher edge gives
  mixed pixels, skipped as seeds, so the plane comes from the first clean background pixel.
- Edges against the sky (invalid depth) have no background to extend.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from shared.camera import as_K


def hidden_layer(depth_m: np.ndarray, K: np.ndarray, lidar_origin: np.ndarray, *, max_rel_jump: float = 0.1,
                 max_band_frac: float = 0.5) -> np.ndarray:
    """Layer-1 depth (H x W float32, 0 = none): the background behind occluding edges that a LiDAR at
    lidar_origin (camera frame, metres) can see past. See the module docstring.

    max_band_frac caps a band at this fraction of the image's longer side.
    """
    K = as_K(K)
    z = np.asarray(depth_m, dtype=np.float32)
    z = np.where(np.isfinite(z) & (z > 0), z, np.float32(0))
    out = np.zeros_like(z)
    o = np.asarray(lidar_origin, dtype=np.float64).reshape(3)
    h, w = z.shape
    if h < 2 or w < 2 or not np.any(o):
        return out  # a LiDAR at the camera centre sees nothing the camera does not
    dist = np.full(z.shape, np.inf, np.float32)
    _march(z, K[0, 0], K[1, 1], K[0, 2], K[1, 2], o, float(max_rel_jump), max_band_frac * max(h, w), out, dist)
    return out


@njit(cache=True, nogil=True)
def _smooth(z, i0, j0, i1, j1, jump):
    """Both pixels valid and not cut apart by the grid's jump rule."""
    a, b = z[i0, j0], z[i1, j1]
    return a > 0.0 and b > 0.0 and abs(a - b) <= jump * min(a, b)


@njit(cache=True, nogil=True)
def _gradient(z, i, j, jump):
    """Gradient of inverse depth at (i, j) from the smooth neighbours: (d/du, d/dv)."""
    h, w = z.shape
    g = np.zeros(2)
    for axis in range(2):
        di, dj = (0, 1) if axis == 0 else (1, 0)
        fwd = i + di < h and j + dj < w and _smooth(z, i, j, i + di, j + dj, jump)
        bwd = i - di >= 0 and j - dj >= 0 and _smooth(z, i, j, i - di, j - dj, jump)
        if fwd and bwd:
            g[axis] = 0.5 * (1.0 / z[i + di, j + dj] - 1.0 / z[i - di, j - dj])
        elif fwd:
            g[axis] = 1.0 / z[i + di, j + dj] - 1.0 / z[i, j]
        elif bwd:
            g[axis] = 1.0 / z[i, j] - 1.0 / z[i - di, j - dj]
    return g


@njit(cache=True, nogil=True)
def _reach(eu, ev, zf, zb, fx, fy, cx, cy, o):
    """Pixel where the LiDAR ray grazing the foreground point at pixel (eu, ev), depth zf, reaches depth zb."""
    ex, ey = (eu - cx) / fx * zf, (ev - cy) / fy * zf
    lam = (zb - o[2]) / (zf - o[2])
    qx, qy, qz = o[0] + lam * (ex - o[0]), o[1] + lam * (ey - o[1]), o[2] + lam * (zf - o[2])
    return fx * qx / qz + cx, fy * qy / qz + cy


@njit(cache=True, nogil=True)
def _march(z, fx, fy, cx, cy, o, jump, max_band, out, dist):
    h, w = z.shape
    for i in range(h):
        for j in range(w):
            zs = z[i, j]
            if zs <= 0.0:
                continue
            for nb in range(4):
                di, dj = ((0, 1), (0, -1), (1, 0), (-1, 0))[nb]
                ie, je = i + di, j + dj
                ib, jb = i - di, j - dj
                if ie < 0 or ie >= h or je < 0 or je >= w or ib < 0 or ib >= h or jb < 0 or jb >= w:
                    continue
                ze = z[ie, je]
                if ze <= 0.0 or zs <= ze * (1.0 + jump) or not _smooth(z, i, j, ib, jb, jump):
                    continue
                if ze - o[2] <= 1e-3:
                    continue  # the foreground point is level with or behind the LiDAR
                # the direction in which the LiDAR looks past the edge
                qu, qv = _reach(float(je), float(ie), ze, zs, fx, fy, cx, cy, o)
                du, dv = qu - je, qv - ie
                if du * dj + dv * di <= 0.0:
                    continue
                m = max(abs(du), abs(dv))
                su, sv = du / m, dv / m
                step_len = math.sqrt(su * su + sv * sv)
                g = _gradient(z, i, j, jump)
                inv_s = 1.0 / zs
                if dist[i, j] > -1.0:  # the seed itself, at its own depth: joins layer 1 to the background
                    out[i, j] = zs
                    dist[i, j] = -1.0
                zf = ze
                k = 0
                while True:
                    pu, pv = je + k * su, ie + k * sv
                    pj, pi = int(math.floor(pu + 0.5)), int(math.floor(pv + 0.5))
                    if pj < 0 or pj >= w or pi < 0 or pi >= h or k * step_len > max_band:
                        break
                    zp = z[pi, pj]
                    if zp <= 0.0:
                        break
                    inv = inv_s + g[0] * (pj - j) + g[1] * (pi - i)
                    if inv <= 0.0:
                        break
                    zh = 1.0 / inv
                    if zh <= zp * (1.0 + jump):
                        break
                    zf = min(zf, zp)
                    ru, rv = _reach(float(je), float(ie), zf, zh, fx, fy, cx, cy, o)
                    if k * step_len > math.sqrt((ru - je) ** 2 + (rv - ie) ** 2) + 1.0:
                        break
                    if k < dist[pi, pj]:
                        out[pi, pj] = zh
                        dist[pi, pj] = k
                    k += 1
