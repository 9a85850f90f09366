"""A layered height field in the image grid, and an exact ray caster for the union of its grid meshes.

The camera-view surface of one image is a stack of depth layers on the pixel grid: layer 0 is the dense
depth map the camera saw, layer 1 (optional, shared.scan.hidden) the background hidden behind occluding
edges. Each layer is meshed by the grid rules of shared.scan.mesh (grid_faces: same triangles, same
max_rel_jump and grazing cuts), and `GridSurface.to_mesh()` is exactly the union of those meshes.

Why not a BVH: a grid mesh is a height field in image space. Its vertices are back-projected pixel
centres, so every triangle projects into the image as the half-block it was built from, and a ray can
only hit a triangle whose block its own projection crosses. `cast_surface` therefore walks each ray's
projection across the blocks of the grid (a 2D DDA, nearest first) and tests the (at most two per
layer) triangles of each block it crosses, stopping at the first hit. No acceleration structure is
built, so the cost is the rays' walks, not the 600k triangles of a 640 x 480 image.

Details that make the walk exact and short:
- The ray is first clipped to the part that can hit anything: camera depth between the surface's
  smallest and largest vertex depth (a triangle's points lie between its vertices' depths), inside
  the frustum of the grid (pixel centres 0..w-1, 0..h-1), t in (0, t_max].
- Along a projected ray, inverse depth is affine in image position (perspective-correct
  interpolation), so the ray's depth range over each block is known from its entry and exit; a block
  whose corner depths cannot meet it is skipped without a triangle test.
- Blocks are visited in order of distance along the ray (the projective map of a segment is
  monotone), so the first block with a hit holds the nearest hit; one more block is tested for hits
  on a shared edge.
- Triangles are intersected in float64 (Moeller-Trumbore, edges included) from the same float32
  vertices grid_mesh builds.

Agreement with Open3D on the same mesh (tests/shared/test_scan_heightfield.py): hit distances within
2e-5 relative (Open3D casts in float32; the largest seen is 3e-6); hit/miss may differ only for rays
within float rounding of a triangle edge, where either answer is right (none in 320,000 random rays).

Compiled with numba because the walk stops at the first hit, which vectorised numpy cannot: a numpy
form would test every block of every clipped segment (millions for hdl64 at 640 x 480). With
cache=True the first call in a fresh process without a cache compiles the functions; later processes
load the cached machine code from __pycache__ (or NUMBA_CACHE_DIR). The pipeline's warm-up task
(datagen.job.pipeline.warm_up) makes that call while the teacher loads. Measured times of both:
docs/own_sensor.md, "Ray casting: a height-field walk".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from shared.camera import as_K
from shared.scan.mesh import GridFaces, Mesh, faces_to_mesh, grid_faces


@dataclass
class GridSurface:
    """Depth layers on one pixel grid, each with its grid-mesh faces; the surface is their union."""

    layers: list[GridFaces]
    K: np.ndarray  # of the full-resolution image (a layer's grid may be strided)

    @property
    def n_triangles(self) -> int:
        return sum(f.n_triangles for f in self.layers)

    @property
    def shape(self) -> tuple[int, int]:
        return self.layers[0].z.shape

    def to_mesh(self) -> Mesh:
        """The same triangles as a Mesh (for Open3D: the reference caster, and other uses)."""
        return Mesh.concat([faces_to_mesh(f) for f in self.layers])


def grid_surface(depth_m: np.ndarray, K: np.ndarray, hidden_m: np.ndarray | None = None, *,
                 max_rel_jump: float = 0.1, max_grazing_deg: float = 88.0, stride: int = 1) -> GridSurface:
    """Layer 0 from depth_m, layer 1 from hidden_m (same shape, 0 = none) when given; grid rules of each."""
    K = as_K(K)
    kw = dict(max_rel_jump=max_rel_jump, max_grazing_deg=max_grazing_deg, stride=stride)
    layers = [grid_faces(depth_m, K, **kw)]
    if hidden_m is not None:
        if np.shape(hidden_m) != np.shape(depth_m):
            raise ValueError(f"hidden layer has shape {np.shape(hidden_m)}, depth map {np.shape(depth_m)}")
        layers.append(grid_faces(hidden_m, K, **kw))
    return GridSurface(layers, K)


def _packed(surface: GridSurface) -> tuple[np.ndarray, np.ndarray]:
    """Layers as one L x h x w float32 depth array and one L x (h-1) x (w-1) uint8 face array
    (bit 0: triangle 0 kept, bit 1: triangle 1 kept, bit 2: block split along the 01-10 diagonal)."""
    z = np.stack([f.z for f in surface.layers])
    flags = np.stack([f.keep0.astype(np.uint8) | (f.keep1.astype(np.uint8) << 1) | (f.use_b.astype(np.uint8) << 2)
                      for f in surface.layers])
    return np.ascontiguousarray(z), np.ascontiguousarray(flags)


def cast_surface(surface: GridSurface, origin: np.ndarray, directions: np.ndarray,
                 t_max: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
    """First hit of each ray origin + t * direction (t in units of |direction|) with the surface.

    Returns t (float64, inf on a miss or beyond t_max) and the unit normal of the triangle hit (N x 3,
    facing the ray; zeros on a miss). origin: one point (3,), camera frame.
    """
    d = np.ascontiguousarray(np.asarray(directions, dtype=np.float64).reshape(-1, 3))
    o = np.asarray(origin, dtype=np.float64).reshape(3)
    t = np.full(len(d), np.inf)
    n = np.zeros((len(d), 3))
    h, w = surface.shape
    if len(d) == 0 or h < 2 or w < 2 or surface.n_triangles == 0:
        return t, n
    z, flags = _packed(surface)
    used = z[z > 0]
    s = surface.layers[0].stride
    K = surface.K
    _cast(z, flags, surface.layers[0].us, surface.layers[0].vs, K[0, 0] / s, K[1, 1] / s, K[0, 2] / s,
          K[1, 2] / s, float(used.min()), float(used.max()), o, d, float(t_max), t, n)
    return t, n


# ----------------------------------------------------------------------------------------------------
# The compiled walk


@njit(cache=True, nogil=True)
def _clip(a: float, b: float, t0: float, t1: float) -> tuple[float, float]:
    """Intersect [t0, t1] with {t : a + b t >= 0}."""
    if b > 0.0:
        t0 = max(t0, -a / b)
    elif b < 0.0:
        t1 = min(t1, -a / b)
    elif a < 0.0:
        t1 = -1.0
    return t0, t1


@njit(cache=True, nogil=True)
def _triangle(ax, ay, az, bx, by, bz, qx, qy, qz, ox, oy, oz, dx, dy, dz):
    """Moeller-Trumbore: distance along the ray to triangle (a, b, q), edges included; inf on a miss."""
    e1x, e1y, e1z = bx - ax, by - ay, bz - az
    e2x, e2y, e2z = qx - ax, qy - ay, qz - az
    px, py, pz = dy * e2z - dz * e2y, dz * e2x - dx * e2z, dx * e2y - dy * e2x
    det = e1x * px + e1y * py + e1z * pz
    if det == 0.0:
        return np.inf
    inv = 1.0 / det
    sx, sy, sz = ox - ax, oy - ay, oz - az
    u = (sx * px + sy * py + sz * pz) * inv
    if u < 0.0 or u > 1.0:
        return np.inf
    rx, ry, rz = sy * e1z - sz * e1y, sz * e1x - sx * e1z, sx * e1y - sy * e1x
    v = (dx * rx + dy * ry + dz * rz) * inv
    if v < 0.0 or u + v > 1.0:
        return np.inf
    t = (e2x * rx + e2y * ry + e2z * rz) * inv
    return t if t > 0.0 else np.inf


@njit(cache=True, nogil=True)
def _corner(z, us, vs, layer, i, j):
    """Vertex (row i, column j) of a layer as grid_faces builds it (float32 products), in float64."""
    zz = z[layer, i, j]
    return np.float64(us[j] * zz), np.float64(vs[i] * zz), np.float64(zz)


@njit(cache=True, nogil=True, inline="always")
def _axis_steps(cell: int, x0: float, dx: float) -> tuple[int, float, float]:
    """The walk along one image axis from x0 in `cell`, x moving by dx over the segment: the cell step
    (+1, -1 or 0), the segment fraction at the next cell border, and the fraction between borders."""
    if dx > 0.0:
        return 1, (cell + 1 - x0) / dx, 1.0 / dx
    if dx < 0.0:
        return -1, (cell - x0) / dx, -1.0 / dx
    return 0, np.inf, np.inf


@njit(cache=True, nogil=True, inline="always")
def _triangle_corners(z, us, vs, layer, i, j, f, k):
    """Corners (a, b, q) of triangle k (0 or 1) of block (i, j) of a layer, whose flags f say along which
    diagonal grid_faces cut the block: ax, ay, az, bx, by, bz, qx, qy, qz."""
    cr = (0, 0, 1, 1)  # block corners 00, 01, 10, 11 as (row, column) offsets
    cc = (0, 1, 0, 1)
    diag_b = (f & 4) != 0
    if k == 0:
        ca, cb, cq = 0, 2, (1 if diag_b else 3)
    else:
        ca, cb, cq = 3, 1, (2 if diag_b else 0)
    ax, ay, az = _corner(z, us, vs, layer, i + cr[ca], j + cc[ca])
    bx, by, bz = _corner(z, us, vs, layer, i + cr[cb], j + cc[cb])
    qx, qy, qz = _corner(z, us, vs, layer, i + cr[cq], j + cc[cq])
    return ax, ay, az, bx, by, bz, qx, qy, qz


@njit(cache=True, nogil=True)
def _cast(z, flags, us, vs, fx, fy, cx, cy, zlo, zhi, o, dirs, t_max, t_out, n_out):
    L, h, w = z.shape
    ox, oy, oz = o[0], o[1], o[2]
    eps = 1e-4  # px: the frustum is widened by this much, cells are clamped to the grid
    # block corners: 00, 01, 10, 11 as (row, column) offsets
    cr = (0, 0, 1, 1)
    cc = (0, 1, 0, 1)
    for r in range(dirs.shape[0]):
        dx, dy, dz = dirs[r, 0], dirs[r, 1], dirs[r, 2]
        t0, t1 = 0.0, t_max
        t0, t1 = _clip(oz - zlo, dz, t0, t1)
        t0, t1 = _clip(zhi - oz, -dz, t0, t1)
        t0, t1 = _clip(fx * ox + (cx + eps) * oz, fx * dx + (cx + eps) * dz, t0, t1)
        t0, t1 = _clip((w - 1 + eps - cx) * oz - fx * ox, (w - 1 + eps - cx) * dz - fx * dx, t0, t1)
        t0, t1 = _clip(fy * oy + (cy + eps) * oz, fy * dy + (cy + eps) * dz, t0, t1)
        t0, t1 = _clip((h - 1 + eps - cy) * oz - fy * oy, (h - 1 + eps - cy) * dz - fy * dy, t0, t1)
        if not t0 <= t1:
            continue
        z0, z1 = oz + t0 * dz, oz + t1 * dz
        u0, v0 = fx * (ox + t0 * dx) / z0 + cx, fy * (oy + t0 * dy) / z0 + cy
        u1, v1 = fx * (ox + t1 * dx) / z1 + cx, fy * (oy + t1 * dy) / z1 + cy
        iz0, iz1 = 1.0 / z0, 1.0 / z1
        du, dv = u1 - u0, v1 - v0
        j = min(max(int(math.floor(u0)), 0), w - 2)
        i = min(max(int(math.floor(v0)), 0), h - 2)
        sj, next_j, step_j = _axis_steps(j, u0, du)
        si, next_i, step_i = _axis_steps(i, v0, dv)
        s_in = 0.0
        best, bl, bi, bj, bk = np.inf, -1, 0, 0, 0
        extra = -1
        while True:
            s_out = min(next_j, next_i, 1.0)
            a_in = (1.0 - s_in) * iz0 + s_in * iz1
            a_out = (1.0 - s_out) * iz0 + s_out * iz1
            z_near = 1.0 / max(a_in, a_out)
            z_far = 1.0 / min(a_in, a_out)
            for layer in range(L):
                f = flags[layer, i, j]
                if f & 3 == 0:
                    continue
                zmin, zmax = np.inf, 0.0
                for c in range(4):
                    zc = z[layer, i + cr[c], j + cc[c]]
                    if zc > 0.0:
                        zmin = min(zmin, zc)
                        zmax = max(zmax, zc)
                if z_far < zmin * (1.0 - 1e-5) or z_near > zmax * (1.0 + 1e-5):
                    continue
                for k in range(2):
                    if f & (1 << k) == 0:
                        continue
                    ax, ay, az, bx, by, bz, qx, qy, qz = _triangle_corners(z, us, vs, layer, i, j, f, k)
                    tt = _triangle(ax, ay, az, bx, by, bz, qx, qy, qz, ox, oy, oz, dx, dy, dz)
                    if tt < best:
                        best, bl, bi, bj, bk = tt, layer, i, j, k
            if best < np.inf:
                extra += 1
                if extra >= 1:
                    break
            if s_out >= 1.0:
                break
            if next_j <= next_i:
                j += sj
                s_in = next_j
                next_j += step_j
            else:
                i += si
                s_in = next_i
                next_i += step_i
            if j < 0 or j > w - 2 or i < 0 or i > h - 2:
                break
        if best <= t_max:
            t_out[r] = best
            # the normal of the triangle hit, facing the ray
            ax, ay, az, bx, by, bz, qx, qy, qz = _triangle_corners(z, us, vs, bl, bi, bj, flags[bl, bi, bj], bk)
            e1x, e1y, e1z = bx - ax, by - ay, bz - az
            e2x, e2y, e2z = qx - ax, qy - ay, qz - az
            nx, ny, nz = e1y * e2z - e1z * e2y, e1z * e2x - e1x * e2z, e1x * e2y - e1y * e2x
            nn = math.sqrt(nx * nx + ny * ny + nz * nz)
            if nn > 0.0:
                if nx * dx + ny * dy + nz * dz > 0.0:
                    nn = -nn
                n_out[r, 0], n_out[r, 1], n_out[r, 2] = nx / nn, ny / nn, nz / nn
