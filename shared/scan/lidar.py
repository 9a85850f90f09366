"""Simulated LiDAR: one dense depth map and K in, the sparse depth a LiDAR beside the camera would give out.

`simulate_sparse_depth` is the one call the pipeline makes per image: surface from the depth map ->
scan (the pattern's rays from the mount, with the sensor's effects) -> projection to sparse depth. The
patterns (which rays) are in shared.scan.patterns, the sensor's effects in shared.scan.sensor; this module
holds the mount, the casting and the projection.

Mount: p_cam = R_cam_from_lidar @ p_lidar + t_cam_from_lidar; t is the LiDAR origin in camera
coordinates (metres). The LiDAR frame has the camera's axes (x right, y down, z forward), so the
identity mount means a sensor at the camera centre, aligned with it. KITTI's Velodyne sits ~0.08 m
above and ~0.27 m behind colour camera 2 and ~0.06 m to its right, so t ~ (0.06, -0.08, -0.27).
A spinning sensor sweeps 360 degrees, but only what the camera sees can become sparse depth, so only
azimuths inside the camera's horizontal field of view (as seen from the LiDAR, plus a parallax margin)
are cast: the rest would be thrown away by the projection anyway.

Two casters. The grid mesh of a depth map (and its hidden-geometry layer, shared.scan.hidden) is a
height field in the image grid: `simulate_scan` given a GridSurface walks each ray's projection across
the pixel grid (shared.scan.heightfield), exact for that mesh and with no BVH to build. Any other mesh
(Poisson, the synthetic world's exact geometry) goes to Open3D's RaycastingScene, as below.

Speed of the Open3D path: the cost of Open3D's RaycastingScene is its BVH build, linear in the
triangles (docs/own_sensor.md has the times), while the rays are cheap. A spinning pattern hits
only triangles whose angular extent, seen from the sensor, contains one of its ring elevations and one
of its azimuth samples, so `simulate_scan` builds the BVH over those alone (`cull=True`). The test is
exact for azimuth (the azimuths of a triangle's points lie between its vertices' azimuths) and for
elevation up to a small great-circle bulge (< 0.005 deg on triangles under 2 deg, covered by a 0.01 deg
margin); triangles larger than 2 deg are always kept.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from shared import sparsity
from shared.camera import as_K, project, rotation_from_rotvec
from shared.scan.heightfield import GridSurface, cast_surface, grid_surface
from shared.scan.hidden import hidden_layer
from shared.scan.mesh import Mesh, build_mesh
from shared.scan.patterns import LidarPattern, azimuth_deg, elevation_deg, get_pattern
from shared.scan.sensor import (
    SensorModel,
    brightness,
    edge_beams,
    get_sensor,
    keep_probability,
    mixed_ranges,
    noise_sigma,
    rim_directions,
)
from shared.scan.spec import ScanSpec

# ----------------------------------------------------------------------------------------------------
# Mount


@dataclass
class Mount:
    """Pose of the LiDAR in the camera frame: p_cam = R_cam_from_lidar @ p_lidar + t_cam_from_lidar."""

    R_cam_from_lidar: np.ndarray = field(default_factory=lambda: np.eye(3))
    t_cam_from_lidar: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self) -> None:
        self.R_cam_from_lidar = np.asarray(self.R_cam_from_lidar, dtype=np.float64).reshape(3, 3)
        self.t_cam_from_lidar = np.asarray(self.t_cam_from_lidar, dtype=np.float64).reshape(3)

    def to_dict(self) -> dict:
        return {"R_cam_from_lidar": self.R_cam_from_lidar.tolist(), "t_cam_from_lidar": self.t_cam_from_lidar.tolist()}


KITTI_MOUNT = Mount(np.eye(3), np.array([0.06, -0.08, -0.27]))


def sample_mount(rng: np.random.Generator, max_rot_deg: float = 1.0, p_above: float = 0.8) -> Mount:
    """A plausible rig: the LiDAR 2-30 cm above the camera (below with probability 1 - p_above), up to
    10 cm to either side and 30 cm behind to 5 cm ahead, rotated by up to max_rot_deg about each axis
    (mounting and calibration error). Draw order: side, up/down, height, depth, rotation."""
    above = rng.random() < p_above
    height = rng.uniform(0.02, 0.30)
    tx = rng.uniform(-0.10, 0.10)
    tz = rng.uniform(-0.30, 0.05)
    ty = -height if above else height
    rotvec = np.radians(rng.uniform(-max_rot_deg, max_rot_deg, size=3))
    return Mount(rotation_from_rotvec(rotvec), np.array([tx, ty, tz]))


# ----------------------------------------------------------------------------------------------------
# Ray casting


def make_scene(mesh: Mesh, triangles: np.ndarray | None = None, nthreads: int = 1):
    """An Open3D RaycastingScene over the mesh (or over a subset of its triangles)."""
    import open3d as o3d

    tris = mesh.triangles if triangles is None else triangles
    scene = o3d.t.geometry.RaycastingScene(nthreads=nthreads)
    if len(tris):
        scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(mesh.vertices, np.float32)),
                            o3d.core.Tensor(np.ascontiguousarray(tris, np.uint32)))
    return scene


def cast_rays(mesh, origins: np.ndarray, directions: np.ndarray, nthreads: int = 1) -> np.ndarray:
    """Distance along each ray to the first hit (float64, inf on a miss), in units of |direction|.

    mesh: a Mesh or a scene from make_scene (to reuse one BVH across calls). origins: 3 or N x 3.
    nthreads=1 by default: the pipeline runs one image per core; pass 0 for all cores.
    """
    return _cast_o3d(mesh, origins, directions, nthreads)[0]


def _cast_o3d(mesh, origins: np.ndarray, directions: np.ndarray, nthreads: int = 1,
              normals: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """cast_rays, and with normals=True also the unit normal of each triangle hit, facing the ray (N x 3)."""
    import open3d as o3d

    scene = make_scene(mesh, nthreads=nthreads) if isinstance(mesh, Mesh) else mesh
    d = np.asarray(directions, dtype=np.float32).reshape(-1, 3)
    o = np.broadcast_to(np.asarray(origins, dtype=np.float32).reshape(-1, 3), d.shape)
    if len(d) == 0:
        return np.zeros(0), (np.zeros((0, 3)) if normals else None)
    rays = o3d.core.Tensor(np.ascontiguousarray(np.concatenate([o, d], axis=1)))
    hit = scene.cast_rays(rays, nthreads=nthreads)
    t = hit["t_hit"].numpy().astype(np.float64)
    if not normals:
        return t, None
    n = hit["primitive_normals"].numpy().astype(np.float64)
    n[np.einsum("ij,ij->i", n, d) > 0] *= -1.0
    return t, n


@dataclass
class ScanResult:
    """Returns of one simulated scan, camera frame. All arrays have one row per returned point."""

    points_cam: np.ndarray      # N x 3 float64
    ring: np.ndarray            # N int32, index into the pattern's rings (-1 for unlabelled directions)
    range_m: np.ndarray         # N float64, measured range (noise included)
    directions_cam: np.ndarray  # N x 3 float64, unit ray directions
    origin_cam: np.ndarray      # 3, the LiDAR origin
    n_rays: int                 # rays cast
    n_triangles: int            # triangles in the BVH after culling (the surface's, for a GridSurface)
    ray_index: np.ndarray | None = None  # N int64, index of each return among the rays cast


def _camera_azimuth_window(K: np.ndarray, width: int, height: int, R: np.ndarray) -> tuple[float, float, float]:
    """Azimuth range (degrees, LiDAR frame) of the image border's viewing directions, and the axis azimuth.

    Angles are unwrapped around the optical axis's azimuth so a window never splits at +-180.
    """
    Kinv = np.linalg.inv(K)
    us = np.linspace(-0.5, width - 0.5, 65)
    vs = np.linspace(-0.5, height - 0.5, 65)
    border = np.concatenate([np.stack([us, np.full_like(us, vs[0])], 1), np.stack([us, np.full_like(us, vs[-1])], 1),
                             np.stack([np.full_like(vs, us[0]), vs], 1), np.stack([np.full_like(vs, us[-1]), vs], 1)])
    d_cam = np.concatenate([border, np.ones((len(border), 1))], 1) @ Kinv.T
    d_lid = d_cam @ R  # R^T d for row vectors
    axis = (Kinv @ np.array([K[0, 2], K[1, 2], 1.0])) @ R
    az0 = float(azimuth_deg(axis))
    rel = (azimuth_deg(d_lid) - az0 + 180.0) % 360.0 - 180.0
    return az0 + float(rel.min()), az0 + float(rel.max()), az0


def scan_window(mount: Mount, K: np.ndarray, width: int, height: int, min_range_m: float = 0.5,
                az_margin_deg: float | None = None) -> tuple[float, float, float]:
    """Azimuth window (lo, hi, degrees, LiDAR frame) of the rays a scan casts, and the camera axis's azimuth:
    the camera's horizontal view widened by az_margin_deg (default: see simulate_scan)."""
    t = mount.t_cam_from_lidar
    lo, hi, az0 = _camera_azimuth_window(as_K(K), width, height, mount.R_cam_from_lidar)
    if az_margin_deg is None:
        az_margin_deg = math.degrees(math.asin(min(1.0, float(np.linalg.norm(t)) / min_range_m))) + 0.5
    return lo - az_margin_deg, hi + az_margin_deg, az0


EL_EPS_DEG = 0.01   # covers the great-circle bulge of triangles under BIG_DEG (see module docstring)
BIG_DEG = 2.0       # triangles with a larger angular extent are never culled


def simulate_scan(mesh: Mesh | GridSurface, pattern: LidarPattern, mount: Mount, K: np.ndarray, width: int,
                  height: int, rng: np.random.Generator, *, min_range_m: float = 0.5, max_range_m: float = 120.0,
                  noise_std_m: float | None = None, dropout: float | None = None, az_margin_deg: float | None = None,
                  cull: bool = True, nthreads: int = 1, sensor: SensorModel | str | None = None,
                  rgb: np.ndarray | None = None) -> ScanResult:
    """Cast the pattern's rays (inside the camera's horizontal view) from the mount against the surface.

    mesh: a GridSurface (shared.scan.heightfield: the exact height-field walk, no BVH) or any Mesh (Open3D,
    with the triangle culling of the module docstring; cull=False builds the BVH over every triangle).
    A return needs a first hit with min_range_m <= range <= max_range_m (before noise). The sensor
    (shared.scan.sensor; default ideal) adds its effects; noise_std_m (Gaussian range noise along the ray)
    and dropout (each return lost with that probability), when given, replace the sensor's own.
    rgb (H x W x 3 uint8, the camera image) is needed by the sensor's dark-surface dropout.
    az_margin_deg widens the camera's azimuth window: by default the largest angle a point at
    min_range_m can be displaced by the mount offset, asin(|t| / min_range), + 0.5 deg.
    Draw order (same rng, same scan): azimuth phase, then the sensor's draws (shared.scan.sensor).
    """
    sensor = _with_overrides(get_sensor(sensor), noise_std_m, dropout)
    if sensor.needs_brightness and rgb is None:
        raise ValueError(f"sensor {sensor.name!r} has dark_dropout > 0: it needs the camera image (rgb=)")
    K = as_K(K)
    R, t = mount.R_cam_from_lidar, mount.t_cam_from_lidar
    empty = ScanResult(np.zeros((0, 3)), np.zeros(0, np.int32), np.zeros(0), np.zeros((0, 3)), t.copy(), 0, 0)
    phase = float(rng.uniform(0.0, pattern.azimuth_step_deg)) if pattern.spinning else 0.0
    lo, hi, az0 = scan_window(mount, K, width, height, min_range_m, az_margin_deg)
    if mesh.n_triangles == 0:
        return empty
    if isinstance(mesh, GridSurface):
        # The walk rejects a ray that cannot reach the surface in a few operations: no culling needed.
        d_lid, ring = pattern.rays(lo, hi, phase)
        n_triangles = mesh.n_triangles

        def cast(d: np.ndarray, normals: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
            return cast_surface(mesh, t, d, t_max=max_range_m)
    else:
        tris, (lo, hi, el_lo, el_hi) = _cull(mesh, pattern, R, t, phase, lo, hi, az0, cull)
        if len(tris) == 0:
            return empty
        d_lid, ring = pattern.rays(lo, hi, phase, el_lo, el_hi)
        n_triangles = len(tris)
        scene = make_scene(mesh, tris, nthreads=nthreads) if len(d_lid) else None

        def cast(d: np.ndarray, normals: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
            return _cast_o3d(scene, t, d, nthreads=nthreads, normals=normals)
    if len(d_lid) == 0:
        return empty
    d_cam = d_lid @ R.T
    r, nrm = cast(d_cam, sensor.needs_normals)

    ok = np.isfinite(r) & (r >= min_range_m) & (r <= max_range_m)
    if sensor.mixes:
        grid = (len(np.unique(ring)), len(ring) // len(np.unique(ring))) if pattern.spinning else None
        _mix_edge_beams(r, ok, d_cam, ring, grid, cast, sensor, max_range_m, rng)
    if sensor.noise_std_m > 0 or sensor.noise_rel > 0:
        r = r + rng.normal(0.0, noise_sigma(sensor, r))
    if sensor.dropout > 0:
        ok &= rng.random(len(r)) >= sensor.dropout
    if sensor.incidence_dropout > 0 or sensor.range_dropout > 0 or sensor.dark_dropout > 0:
        cos_inc = np.abs(np.einsum("ij,ij->i", nrm, d_cam)) if sensor.needs_normals else None
        bright = _brightness_at(rgb, K, t, r, d_cam) if sensor.needs_brightness else None
        ok &= rng.random(len(r)) < keep_probability(sensor, r, max_range_m, cos_inc, bright)
    ok &= r > 0
    pts = t + r[ok, None] * d_cam[ok]
    return ScanResult(pts, ring[ok], r[ok], d_cam[ok], t.copy(), len(d_cam), n_triangles, np.flatnonzero(ok))


def _with_overrides(sensor: SensorModel, noise_std_m: float | None, dropout: float | None) -> SensorModel:
    """The sensor with its uniform noise and dropout replaced by the explicit knobs that are given."""
    over = {k: float(v) for k, v in (("noise_std_m", noise_std_m), ("dropout", dropout)) if v is not None}
    return dataclasses.replace(sensor, **over) if over else sensor


def _cull(mesh: Mesh, pattern: LidarPattern, R: np.ndarray, t: np.ndarray, phase: float, lo: float, hi: float,
          az0: float, cull: bool) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The triangles a spinning pattern's rays can reach (all of them when not cull) and the ray window
    (azimuth lo, hi, elevation lo, hi) that covers them; see the module docstring."""
    lo0, hi0 = lo, hi
    # Angles of every vertex seen from the sensor, azimuth unwrapped around the camera's axis.
    v_lid = (mesh.vertices.astype(np.float64) - t) @ R
    v_az = ((azimuth_deg(v_lid) - az0 + 180.0) % 360.0 - 180.0 + az0).astype(np.float32)
    v_el = elevation_deg(v_lid).astype(np.float32)
    tris = mesh.triangles
    # Column by column: numpy's min/max over a length-3 axis is several times slower.
    cols = [np.ascontiguousarray(tris[:, i]) for i in range(3)]
    a0, a1, a2 = (v_az[c] for c in cols)
    az_min, az_max = np.minimum(np.minimum(a0, a1), a2), np.maximum(np.maximum(a0, a1), a2)
    e0, e1, e2 = (v_el[c] for c in cols)
    el_min, el_max = np.minimum(np.minimum(e0, e1), e2), np.maximum(np.maximum(e0, e1), e2)
    big = (az_max - az_min > BIG_DEG) | (el_max - el_min > BIG_DEG)
    if cull:
        keep = (az_max >= lo) & (az_min <= hi)
        if pattern.spinning:
            ring_el = np.sort(pattern.elevations_deg)
            has_ring = (np.searchsorted(ring_el, el_min - EL_EPS_DEG, "left")
                        < np.searchsorted(ring_el, el_max + EL_EPS_DEG, "right"))
            step = pattern.azimuth_step_deg
            has_az = (np.floor((az_max + EL_EPS_DEG - phase) / step)
                      >= np.ceil((az_min - EL_EPS_DEG - phase) / step))
            keep &= has_ring & has_az
        else:
            d_el = elevation_deg(pattern.directions)
            keep &= (el_max >= d_el.min() - EL_EPS_DEG) & (el_min <= d_el.max() + EL_EPS_DEG)
        keep |= big
        tris = tris[keep]
        if len(tris) == 0:
            return tris, (lo, hi, -90.0, 90.0)
        az_min, az_max, el_min, el_max, big = az_min[keep], az_max[keep], el_min[keep], el_max[keep], big[keep]
    # No ray outside the angular extent of the geometry can hit anything. The vertices' angles bound a
    # triangle's only when it is small: a large floor quad's corners can sit at -4 deg while the floor
    # below the sensor is at -90, so with any large triangle the elevation window stays open.
    lo, hi = max(lo, float(az_min.min()) - EL_EPS_DEG), min(hi, float(az_max.max()) + EL_EPS_DEG)
    el_lo, el_hi = float(el_min.min()) - EL_EPS_DEG, float(el_max.max()) + EL_EPS_DEG
    if big.any():
        lo, hi, el_lo, el_hi = lo0, hi0, -90.0, 90.0
    return tris, (lo, hi, el_lo, el_hi)


def _mix_edge_beams(r: np.ndarray, ok: np.ndarray, d_cam: np.ndarray, ring: np.ndarray, grid, cast,
                    sensor: SensorModel, max_range_m: float, rng: np.random.Generator) -> None:
    """Mixed returns (shared.scan.sensor): rim rays for the beams next to a range jump; where a beam's
    footprint straddles an edge, with probability mixed_returns its range becomes the footprint's mean.
    Changes r in place (only returns inside ok)."""
    idx = np.flatnonzero(edge_beams(np.where(ok, r, np.inf), grid))
    if len(idx) == 0:
        return
    rim_r, _ = cast(rim_directions(d_cam[idx], sensor.beam_divergence_mrad).reshape(-1, 3))
    rim_r = np.where(rim_r <= max_range_m, rim_r, np.inf).reshape(-1, 4)
    straddle, mean = mixed_ranges(r[idx], rim_r)
    mix = straddle & (rng.random(len(idx)) < sensor.mixed_returns)
    r[idx[mix]] = mean[mix]


def _brightness_at(rgb: np.ndarray, K: np.ndarray, origin: np.ndarray, r: np.ndarray, d_cam: np.ndarray) -> np.ndarray:
    """Brightness of the camera pixel (nearest, clamped to the image) each ray's hit projects to; 1 on a miss."""
    b = brightness(rgb)
    h, w = b.shape
    out = np.ones(len(r))
    hit = np.isfinite(r)
    uv, z = project(origin + r[hit, None] * d_cam[hit], K)
    with np.errstate(invalid="ignore"):
        u = np.clip(np.nan_to_num(np.floor(uv[:, 0] + 0.5)), 0, w - 1).astype(np.int64)
        v = np.clip(np.nan_to_num(np.floor(uv[:, 1] + 0.5)), 0, h - 1).astype(np.int64)
    out[hit] = b[v, u]
    return out


# ----------------------------------------------------------------------------------------------------
# Projection to a sparse depth map


def project_scan(points_cam: np.ndarray, K: np.ndarray, width: int, height: int, occlusion: str = "none", *,
                 mesh: Mesh | None = None, depth_m: np.ndarray | None = None, tol_m: float = 0.05,
                 tol_rel: float = 0.01, nthreads: int = 1) -> np.ndarray:
    """Sparse depth (H x W float32, 0 = no point) from camera-frame points; each goes to its nearest pixel.

    occlusion="none": no reasoning about what the camera can see. Points the LiDAR sees but the camera
        does not (behind a foreground edge, because the sensors sit apart) are kept, as in real KITTI
        scans. Only when two points land on one pixel is the nearer kept: a depth image holds one value.
    occlusion="zbuffer": additionally drop points hidden from the camera: with `mesh`, a ray from the
        camera centre towards each point that hits the mesh more than tol_m + tol_rel * distance before
        it (exact); else with `depth_m`, the camera-visible depth map, a point deeper than the map at its
        pixel by more than tol_m + tol_rel * map depth (pixels where the map is 0 keep their point).
    """
    K = as_K(K)
    pts = np.asarray(points_cam, dtype=np.float64).reshape(-1, 3)
    out = np.zeros((height, width), np.float32)
    if len(pts) == 0:
        return out
    uv, z = project(pts, K)
    with np.errstate(invalid="ignore"):
        u = np.floor(uv[:, 0] + 0.5)
        v = np.floor(uv[:, 1] + 0.5)
        inside = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    pts, z = pts[inside], z[inside]
    u, v = u[inside].astype(np.int64), v[inside].astype(np.int64)

    if occlusion == "zbuffer":
        if mesh is not None:
            dist = np.linalg.norm(pts, axis=1)
            frac = cast_rays(mesh, np.zeros(3), pts, nthreads=nthreads)  # in units of the point's distance
            visible = frac * dist >= dist - (tol_m + tol_rel * dist)
        elif depth_m is not None:
            d = np.asarray(depth_m, dtype=np.float64)[v, u]
            visible = (d <= 0) | ~np.isfinite(d) | (z <= d + tol_m + tol_rel * d)
        else:
            raise ValueError("occlusion='zbuffer' needs mesh= or depth_m=")
        z, u, v = z[visible], u[visible], v[visible]
    elif occlusion != "none":
        raise ValueError(f"occlusion must be 'none' or 'zbuffer', got {occlusion!r}")

    pix = v * width + u
    order = np.lexsort((z, pix))  # by pixel, nearest first
    pix, z = pix[order], z[order]
    first = np.ones(len(pix), bool)
    first[1:] = pix[1:] != pix[:-1]
    out.ravel()[pix[first]] = z[first]
    return out


# ----------------------------------------------------------------------------------------------------
# The one call the pipeline makes per image


def simulate_sparse_depth(depth_m: np.ndarray, K: np.ndarray, rng: np.random.Generator, spec: ScanSpec, *,
                          rgb: np.ndarray | None = None, pattern: LidarPattern | None = None,
                          mount: Mount | None = None, surface: Mesh | None = None, min_range_m: float = 0.5,
                          max_range_m: float = 120.0, mesh_kwargs: dict | None = None, nthreads: int = 1,
                          caster: str = "heightfield") -> tuple[np.ndarray, dict]:
    """Dense depth -> surface -> scan -> sparse depth (H x W float32, 0 = none), and what was drawn.

    spec (shared.scan.spec.ScanSpec) says which scan: pattern, mount, surface, occlusion, sensor. A pixel
    protocol ('points:N' / 'keypoints:N', keypoints of `rgb`) scans nothing: N pixels of depth_m, picked
    by shared.sparsity.simulate, the code `trainer eval --sparsity` uses.
    rgb: the camera image (the sensor's dark-surface dropout and keypoints read it).
    pattern, mount, surface: ready objects that replace the spec's spelling of the same thing, for callers
    that build their own: a LidarPattern (e.g. the target rig's scaled hdl64), a Mount, a Mesh (e.g. the
    synthetic world's exact geometry; the spec's mesh and hidden layer are then not used).
    The grid surface gets the hidden layer (shared.scan.hidden) when spec.hidden is True, or when it is
    None and the mount is offset from the camera centre. A spec whose sensor is None takes the pattern's
    own (a pattern file may name one), else ideal.
    caster: 'heightfield' (the exact grid walk, fast) or 'open3d' (the same grid triangles in a BVH:
    the reference; with hidden off, byte-identical to the scans before the height-field caster).
    Draw order: pattern (if random), mount (if random), then the scan's own draws.
    """
    depth_m = np.asarray(depth_m, dtype=np.float32)
    if spec.pixel_protocol:
        return sparsity.simulate(spec.lidar, depth_m, rng, rgb)
    height, width = depth_m.shape
    pat = pattern if pattern is not None else get_pattern(spec.lidar, rng)
    if mount is not None:
        mnt = mount
    elif spec.mount == "random":
        mnt = sample_mount(rng)
    elif spec.mount == "kitti":
        mnt = KITTI_MOUNT
    else:
        mnt = Mount()  # the LiDAR at the camera centre, axes aligned
    sens = _with_overrides(get_sensor(spec.sensor if spec.sensor is not None else pat.sensor), spec.noise_std_m,
                           spec.dropout)
    if caster not in ("heightfield", "open3d"):
        raise ValueError(f"caster must be 'heightfield' or 'open3d', got {caster!r}")
    mesh_kwargs = dict(mesh_kwargs or {})
    use_hidden = False
    if surface is not None:
        m, method = surface, "given"
    elif spec.mesh == "grid":
        method = spec.mesh
        use_hidden = bool(np.any(mnt.t_cam_from_lidar != 0)) if spec.hidden is None else bool(spec.hidden)
        layer1 = (hidden_layer(depth_m, K, mnt.t_cam_from_lidar, max_rel_jump=mesh_kwargs.get("max_rel_jump", 0.1))
                  if use_hidden else None)
        m = grid_surface(depth_m, K, layer1, **mesh_kwargs)
        if caster == "open3d":
            m = m.to_mesh()
    else:
        m, method = build_mesh(depth_m, K, spec.mesh, **mesh_kwargs), spec.mesh
    if spec.hidden and not use_hidden:
        raise ValueError(f"hidden geometry applies to the grid mesh, not to mesh={method!r}")
    scan = simulate_scan(m, pat, mnt, K, width, height, rng, min_range_m=min_range_m, max_range_m=max_range_m,
                         nthreads=nthreads, sensor=sens, rgb=rgb)
    sparse = project_scan(scan.points_cam, K, width, height, spec.occlusion, depth_m=depth_m)
    n_px = int(np.count_nonzero(sparse))
    info = {"preset": pat.name, "rings": pat.n_rings, "azimuth_step_deg": float(pat.azimuth_step_deg),
            "pattern": pat.to_dict(), "pose": mnt.to_dict(), "noise_std_m": float(sens.noise_std_m),
            "dropout": float(sens.dropout), "min_range_m": float(min_range_m), "max_range_m": float(max_range_m),
            "mesh": method, "n_triangles": int(m.n_triangles), "n_rays": int(scan.n_rays),
            "n_hits": int(len(scan.range_m)), "n_points": n_px, "density": n_px / float(width * height),
            "occlusion": spec.occlusion, "hidden_geometry": use_hidden, "sensor": sens.to_dict(),
            "caster": caster if method == "grid" else "open3d"}
    return sparse, info
