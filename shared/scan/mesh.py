"""A surface mesh from a depth map, for the simulated LiDAR to ray-cast against.

Two methods, both returning a Mesh in camera coordinates (x right, y down, z forward, metres):

- grid (default): every 2 x 2 block of pixels becomes two triangles between the back-projected pixel
  centres. Exact to the depth map (its surface passes through every valid pixel's 3D point, so a ray
  from the camera centre recovers the depth map) and fast. Triangles are dropped where the depth map
  is not a surface: an invalid corner (sky, no teacher value), a relative depth jump above
  `max_rel_jump` (an occlusion edge: the two sides are different objects) or a face seen at a grazing
  angle above `max_grazing_deg` (the "rubber sheet" a small jump leaves behind).
  Note the two criteria measure nearly the same thing: a face spanning one pixel with relative depth
  change r per pixel is seen at a grazing angle of about atan(r * f) (f = focal length in pixels).
  So at f ~ 700 a 10% jump is ~89.2 deg. The grazing limit also decides where a level ground plane
  at camera height h ends: z = h * tan(limit) (what the default keeps: docs/pipeline.md, "Mesh").
  A grid mesh holds only what the camera saw, so a LiDAR mounted away from the camera finds holes
  (no return) behind foreground edges, never the hidden background a real scan shows there; the
  hidden-geometry layer (shared.scan.hidden) is a guess of that background, meshed by the same rules.
- poisson: the paper's choice. Points with Open3D normals oriented towards the camera, screened
  Poisson reconstruction, and trimming of the vertices with the lowest density (the surface Poisson
  invents far from any sample). Smooth, watertight-ish, so it also closes surfaces the camera did
  not see (parallax points appear) at the cost of detail and seconds of CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from shared.camera import as_K


@dataclass
class Mesh:
    """Triangle mesh: vertices float32 N x 3 (metres, camera frame), triangles int32 M x 3.

    Triangles are wound counter-clockwise as seen from the camera for the grid method, so their
    normals (v1 - v0) x (v2 - v0) point towards it; ray casting does not depend on the winding.
    """

    vertices: np.ndarray
    triangles: np.ndarray

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float32).reshape(-1, 3)
        self.triangles = np.ascontiguousarray(self.triangles, dtype=np.int32).reshape(-1, 3)

    @property
    def n_triangles(self) -> int:
        return len(self.triangles)

    @staticmethod
    def concat(meshes: list[Mesh]) -> Mesh:
        verts, tris, offset = [], [], 0
        for m in meshes:
            verts.append(m.vertices)
            tris.append(m.triangles + offset)
            offset += len(m.vertices)
        if not verts:
            return Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))
        return Mesh(np.concatenate(verts), np.concatenate(tris))

    def transformed(self, R: np.ndarray, t: np.ndarray) -> Mesh:
        """The mesh with every vertex mapped by p -> R p + t."""
        v = self.vertices.astype(np.float64) @ np.asarray(R, np.float64).T + np.asarray(t, np.float64)
        return Mesh(v, self.triangles.copy())


def _compact(points: np.ndarray, tris: np.ndarray) -> Mesh:
    """Keep only the vertices some triangle uses, renumbering the triangles."""
    used = np.zeros(len(points), bool)
    used[tris.ravel()] = True
    remap = np.cumsum(used, dtype=np.int64) - 1
    return Mesh(points[used], remap[tris])


@dataclass
class GridFaces:
    """The grid mesh of a depth map before it is indexed: per 2 x 2 block of pixels, which of its two
    triangles are kept and along which diagonal the block is split.

    z, x, y: the (strided) pixels' camera-frame coordinates, h x w float32 (z = 0: invalid pixel).
    keep0, keep1: (h-1) x (w-1) bool, triangle 0 = (00, 10, 11 | 01) and 1 = (11, 01, 00 | 10) of each
    block, corners named by (row, column) offset, the third corner after the bar when use_b.
    use_b: (h-1) x (w-1) bool, the block is split along the 01-10 diagonal (else 00-11).
    us, vs: float32 (u - cx) / fx and (v - cy) / fy of the grid's columns and rows (x = us * z).
    stride: the grid's pixel step.
    """

    z: np.ndarray
    x: np.ndarray
    y: np.ndarray
    keep0: np.ndarray
    keep1: np.ndarray
    use_b: np.ndarray
    us: np.ndarray
    vs: np.ndarray
    stride: int

    @property
    def n_triangles(self) -> int:
        return int(np.count_nonzero(self.keep0)) + int(np.count_nonzero(self.keep1))


# The two triangles of a block as corners (a, b, third on diagonal a, third on diagonal b), corners
# 0..3 = 00, 01, 10, 11: counter-clockwise seen from the camera (u right, v down) for either diagonal.
BLOCK_TRIANGLES = ((0, 2, 3, 1), (3, 1, 0, 2))


def grid_faces(depth_m: np.ndarray, K: np.ndarray, *, max_rel_jump: float = 0.1,
               max_grazing_deg: float = 88.0, stride: int = 1) -> GridFaces:
    """The per-block tests of grid_mesh (see there), block by block in one compiled pass."""
    K = as_K(K)
    z = np.asarray(depth_m, dtype=np.float32)[::stride, ::stride]
    h, w = z.shape
    z = np.where(np.isfinite(z) & (z > 0), z, np.float32(0))
    us = (np.arange(0, w * stride, stride, dtype=np.float32) - np.float32(K[0, 2])) / np.float32(K[0, 0])
    vs = (np.arange(0, h * stride, stride, dtype=np.float32) - np.float32(K[1, 2])) / np.float32(K[1, 1])
    x, y = us[None, :] * z, vs[:, None] * z
    keep0, keep1, use_b = (np.zeros((max(h - 1, 0), max(w - 1, 0)), bool) for _ in range(3))
    if h >= 2 and w >= 2:
        cos_max = np.float32(math.cos(math.radians(max_grazing_deg)))
        _block_tests(z, x, y, np.float32(max_rel_jump), cos_max * cos_max, keep0, keep1, use_b)
    return GridFaces(z, x, y, keep0, keep1, use_b, us, vs, stride)


@njit(cache=True, nogil=True)
def _block_tests(z, x, y, max_rel_jump, cos2, keep0, keep1, use_b):
    """For each 2 x 2 block: the diagonal with the smaller depth difference, then for each triangle the
    jump test and the grazing test |n . c| > cos(max_grazing) |n| |c| (n its normal, c its centroid ray,
    squared). All arithmetic in float32, in the order the vectorised numpy form used (same bits)."""
    h, w = z.shape
    inf = np.float32(np.inf)
    for i in range(h - 1):
        for j in range(w - 1):
            Z = (z[i, j], z[i, j + 1], z[i + 1, j], z[i + 1, j + 1])  # corners 00, 01, 10, 11
            X = (x[i, j], x[i, j + 1], x[i + 1, j], x[i + 1, j + 1])
            Y = (y[i, j], y[i, j + 1], y[i + 1, j], y[i + 1, j + 1])
            jump_a = abs(Z[0] - Z[3]) if (Z[0] > 0 and Z[3] > 0) else inf  # diagonal 00-11
            jump_b = abs(Z[1] - Z[2]) if (Z[1] > 0 and Z[2] > 0) else inf  # diagonal 01-10
            ub = jump_b < jump_a
            use_b[i, j] = ub
            for k in range(2):  # BLOCK_TRIANGLES
                if k == 0:
                    a, b, c = 0, 2, (1 if ub else 3)
                else:
                    a, b, c = 3, 1, (2 if ub else 0)
                za, zb, zc = Z[a], Z[b], Z[c]
                zmin = min(min(za, zb), zc)
                zmax = max(max(za, zb), zc)
                if not (zmin > 0 and zmax - zmin <= max_rel_jump * zmin):
                    continue
                xa, xb, xc = X[a], X[b], X[c]
                ya, yb, yc = Y[a], Y[b], Y[c]
                e1x, e1y, e1z = xb - xa, yb - ya, zb - za
                e2x, e2y, e2z = xc - xa, yc - ya, zc - za
                nx, ny, nz = e1y * e2z - e1z * e2y, e1z * e2x - e1x * e2z, e1x * e2y - e1y * e2x
                cx, cy, cz = xa + xb + xc, ya + yb + yc, za + zb + zc  # 3 x centroid: the viewing ray
                dot = abs(nx * cx + ny * cy + nz * cz)
                norm2 = (nx * nx + ny * ny + nz * nz) * (cx * cx + cy * cy + cz * cz)
                if dot * dot > cos2 * norm2:  # also drops degenerate faces
                    if k == 0:
                        keep0[i, j] = True
                    else:
                        keep1[i, j] = True


def faces_to_mesh(f: GridFaces) -> Mesh:
    """Index the kept triangles of a GridFaces and keep only the valid pixels as vertices."""
    h, w = f.z.shape
    tris = []
    for (a, b, ca, cb), k in zip(BLOCK_TRIANGLES, (f.keep0, f.keep1), strict=True):
        q = np.flatnonzero(k).astype(np.int32)
        i00 = (q // (w - 1)) * w + q % (w - 1)
        ids = (i00, i00 + 1, i00 + w, i00 + w + 1)  # 00, 01, 10, 11
        third = np.where(f.use_b.ravel()[q], ids[cb], ids[ca])
        tris.append(np.stack([ids[a], ids[b], third], axis=1))
    tris = np.concatenate(tris) if tris else np.zeros((0, 3), np.int32)
    if len(tris) == 0:
        return Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))
    # Every corner of a kept triangle is valid, so numbering the valid pixels compacts the vertices.
    valid = f.z.ravel() > 0
    remap = np.cumsum(valid, dtype=np.int32) - 1
    pts = np.stack([f.x.ravel()[valid], f.y.ravel()[valid], f.z.ravel()[valid]], axis=1)
    return Mesh(pts, remap[tris])


def grid_mesh(depth_m: np.ndarray, K: np.ndarray, *, max_rel_jump: float = 0.1,
              max_grazing_deg: float = 88.0, stride: int = 1) -> Mesh:
    """Triangulate the pixel grid of a depth map (0 or non-finite = invalid). See the module docstring.

    max_grazing_deg must lie in (0, 90). stride > 1 uses every stride-th pixel (at its true pixel coordinates): stride**2 fewer triangles.
    Each 2 x 2 block is split along the diagonal with the smaller depth difference, so a block with
    one bad corner still keeps the triangle on its three good ones. The tests run block by block in
    one compiled pass (grid_faces), and triangle indices are built only for the triangles kept
    (faces_to_mesh).
    """
    return faces_to_mesh(grid_faces(depth_m, K, max_rel_jump=max_rel_jump, max_grazing_deg=max_grazing_deg,
                                    stride=stride))


def _grid_normals(pts: np.ndarray) -> np.ndarray:
    """Normals from the image neighbours of each pixel (central differences), H x W x 3."""
    du = np.zeros_like(pts)
    dv = np.zeros_like(pts)
    du[:, 1:-1] = pts[:, 2:] - pts[:, :-2]
    du[:, 0], du[:, -1] = pts[:, 1] - pts[:, 0], pts[:, -1] - pts[:, -2]
    dv[1:-1] = pts[2:] - pts[:-2]
    dv[0], dv[-1] = pts[1] - pts[0], pts[-1] - pts[-2]
    n = np.cross(du, dv)
    n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
    return n


def poisson_mesh(depth_m: np.ndarray, K: np.ndarray, *, depth: int = 8, density_quantile: float = 0.05,
                 stride: int = 1, normals: str = "open3d", knn: int = 30, scale: float = 1.1,
                 n_threads: int = 1) -> Mesh:
    """Screened Poisson reconstruction of the back-projected depth map. See the module docstring.

    depth: octree depth (the grid is at most 2^depth per side over the scene's bounding cube, so a
        scene 100 m deep at depth 8 has ~0.4 m cells: detail below that is smoothed away).
    density_quantile: vertices whose Poisson density (how many samples support them) is in the lowest
        this fraction are removed, with their triangles.
    normals: "open3d" (PCA over knn neighbours, then oriented towards the camera centre, as the paper)
        or "grid" (cross product of image neighbours: much faster, same orientation rule).
    n_threads: Poisson's threads (1: the pipeline runs one image per core; -1: all).
    """
    import open3d as o3d

    K = as_K(K)
    z = np.asarray(depth_m, dtype=np.float64)[::stride, ::stride]
    h, w = z.shape
    valid = np.isfinite(z) & (z > 0)
    if valid.sum() < 16:
        return Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))
    us = (np.arange(0, w * stride, stride) - K[0, 2]) / K[0, 0]
    vs = (np.arange(0, h * stride, stride) - K[1, 2]) / K[1, 1]
    zz = np.where(valid, z, 0.0)
    pts = np.stack([us[None, :] * zz, vs[:, None] * zz, zz], axis=-1)

    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts[valid]))
    if normals == "open3d":
        pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=knn))
        pcd.orient_normals_towards_camera_location(np.zeros(3))
    elif normals == "grid":
        nrm = _grid_normals(pts)[valid]
        nrm[np.einsum("ij,ij->i", nrm, pts[valid]) > 0] *= -1.0  # towards the camera centre
        pcd.normals = o3d.utility.Vector3dVector(nrm)
    else:
        raise ValueError(f"normals must be 'open3d' or 'grid', got {normals!r}")

    mesh, dens = o3d.geometry.TriangleMesh.create_from_point_cloud_poisson(
        pcd, depth=depth, scale=scale, n_threads=n_threads)
    dens = np.asarray(dens)
    verts = np.asarray(mesh.vertices)
    tris = np.asarray(mesh.triangles)
    if len(tris) == 0:
        return Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))
    keep_v = dens >= np.quantile(dens, density_quantile)
    tris = tris[keep_v[tris].all(1)]
    return _compact(verts.astype(np.float32), tris)


def build_mesh(depth_m: np.ndarray, K: np.ndarray, method: str = "grid", **kw) -> Mesh:
    """grid_mesh or poisson_mesh by name; keyword arguments go to the chosen one."""
    if method == "grid":
        return grid_mesh(depth_m, K, **kw)
    if method == "poisson":
        return poisson_mesh(depth_m, K, **kw)
    raise ValueError(f"mesh method must be 'grid' or 'poisson', got {method!r}")
