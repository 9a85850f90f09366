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
  at camera height h ends: z = h * tan(limit); 85 deg cut KITTI-like ground at 19 m and the simulated
  hdl64 density to 4.0% (exact mesh: 4.5%); the default 88 deg keeps ground to 47 m (density 4.4%).
  A grid mesh holds only what the camera saw, so a LiDAR mounted away from the camera finds holes
  (no return) behind foreground edges, never the hidden background a real scan shows there.
- poisson: the paper's choice. Points with Open3D normals oriented towards the camera, screened
  Poisson reconstruction, and trimming of the vertices with the lowest density (the surface Poisson
  invents far from any sample). Smooth, watertight-ish, so it also closes surfaces the camera did
  not see (parallax points appear) at the cost of detail and seconds of CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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


def grid_mesh(depth_m: np.ndarray, K: np.ndarray, *, max_rel_jump: float = 0.1,
              max_grazing_deg: float = 88.0, stride: int = 1) -> Mesh:
    """Triangulate the pixel grid of a depth map (0 or non-finite = invalid). See the module docstring.

    max_grazing_deg must lie in (0, 90). stride > 1 uses every stride-th pixel (at its true pixel coordinates): stride**2 fewer triangles.
    Each 2 x 2 block is split along the diagonal with the smaller depth difference, so a block with
    one bad corner still keeps the triangle on its three good ones. All tests run on whole arrays of
    blocks (structure of arrays), and triangle indices are built only for the triangles kept.
    """
    K = as_K(K)
    z = np.asarray(depth_m, dtype=np.float32)[::stride, ::stride]
    h, w = z.shape
    empty = Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))
    if h < 2 or w < 2:
        return empty
    z = np.where(np.isfinite(z) & (z > 0), z, np.float32(0))
    us = (np.arange(0, w * stride, stride, dtype=np.float32) - np.float32(K[0, 2])) / np.float32(K[0, 0])
    vs = (np.arange(0, h * stride, stride, dtype=np.float32) - np.float32(K[1, 2])) / np.float32(K[1, 1])
    x, y = us[None, :] * z, vs[:, None] * z

    def corners(a: np.ndarray) -> tuple[np.ndarray, ...]:
        return a[:-1, :-1], a[:-1, 1:], a[1:, :-1], a[1:, 1:]

    z00, z01, z10, z11 = corners(z)
    inf = np.float32(np.inf)
    jump_a = np.where((z00 > 0) & (z11 > 0), np.abs(z00 - z11), inf)  # diagonal 00-11
    jump_b = np.where((z01 > 0) & (z10 > 0), np.abs(z01 - z10), inf)  # diagonal 01-10
    use_b = jump_b < jump_a
    # Both triangles of a block, counter-clockwise seen from the camera (u right, v down), written so
    # that two corners are the same for either diagonal: (00, 10, 11 | 01) and (11, 01, 00 | 10).
    cos_max = np.float32(math.cos(math.radians(max_grazing_deg)))
    X, Y, Z = corners(x), corners(y), (z00, z01, z10, z11)  # each indexed 0..3 = 00, 01, 10, 11
    keep = []
    for a, b, ca, cb in ((0, 2, 3, 1), (3, 1, 0, 2)):  # corners a, b, then ca (diagonal a) or cb (b)
        za, zb, zc = Z[a], Z[b], np.where(use_b, Z[cb], Z[ca])
        zmin = np.minimum(np.minimum(za, zb), zc)
        zmax = np.maximum(np.maximum(za, zb), zc)
        ok = (zmin > 0) & (zmax - zmin <= max_rel_jump * zmin)
        xa, xb, xc = X[a], X[b], np.where(use_b, X[cb], X[ca])
        ya, yb, yc = Y[a], Y[b], np.where(use_b, Y[cb], Y[ca])
        e1x, e1y, e1z = xb - xa, yb - ya, zb - za
        e2x, e2y, e2z = xc - xa, yc - ya, zc - za
        nx, ny, nz = e1y * e2z - e1z * e2y, e1z * e2x - e1x * e2z, e1x * e2y - e1y * e2x
        cx, cy, cz = xa + xb + xc, ya + yb + yc, za + zb + zc  # 3 x centroid: the viewing ray
        dot = np.abs(nx * cx + ny * cy + nz * cz)
        norm2 = (nx * nx + ny * ny + nz * nz) * (cx * cx + cy * cy + cz * cz)
        keep.append(ok & (dot * dot > cos_max * cos_max * norm2))  # also drops degenerate faces

    tris = []
    for (a, b, ca, cb), k in zip(((0, 2, 3, 1), (3, 1, 0, 2)), keep, strict=True):
        q = np.flatnonzero(k).astype(np.int32)
        i00 = (q // (w - 1)) * w + q % (w - 1)
        ids = (i00, i00 + 1, i00 + w, i00 + w + 1)  # 00, 01, 10, 11
        third = np.where(use_b.ravel()[q], ids[cb], ids[ca])
        tris.append(np.stack([ids[a], ids[b], third], axis=1))
    tris = np.concatenate(tris)
    if len(tris) == 0:
        return empty
    # Every corner of a kept triangle is valid, so numbering the valid pixels compacts the vertices.
    valid = z.ravel() > 0
    remap = np.cumsum(valid, dtype=np.int32) - 1
    pts = np.stack([x.ravel()[valid], y.ravel()[valid], z.ravel()[valid]], axis=1)
    return Mesh(pts, remap[tris])


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
