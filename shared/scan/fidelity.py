"""How close a simulated scan comes to the scan of the exact world, ray by ray.

On the synthetic world the exact mesh is known, so the scan of it from the same pattern, mount and
rays is the truth for the pipeline's path (dense depth -> single-view surface -> scan). Both scans
cast the same rays (`scan_ray_set`); `scan_ranges` gives each ray's return range (inf = none), and
`scan_fidelity` compares two such arrays:

- a return: a first hit with min_range <= range <= max_range whose point projects into the image
  (the only returns a sparse depth map can hold);
- counterpart: the same ray returns in both scans and |simulated - true range| <= rel_tol * true range
  (rel_tol = 1%);
- recall: share of the true returns that have a counterpart;
- spurious: share of the simulated returns that have none (no true return on that ray, or one at
  another range);
- see-through points: true returns landing on a pixel whose camera depth is nearer than the point's
  depth by more than see_through_m (1 m): the LiDAR saw past a foreground edge the camera saw;
  see-through fidelity: share of them that have a counterpart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.camera import as_K, project
from shared.scan.heightfield import GridSurface, cast_surface
from shared.scan.lidar import Mount, cast_rays, scan_window
from shared.scan.mesh import Mesh
from shared.scan.patterns import LidarPattern


@dataclass
class ScanRays:
    """The rays of one scan, camera frame."""

    origin: np.ndarray      # 3
    directions: np.ndarray  # N x 3, unit
    ring: np.ndarray        # N


def scan_ray_set(pattern: LidarPattern, mount: Mount, K: np.ndarray, width: int, height: int, phase_deg: float = 0.0,
                 min_range_m: float = 0.5) -> ScanRays:
    """Every ray of the pattern inside the scan's azimuth window (as simulate_scan casts them)."""
    lo, hi, _ = scan_window(mount, K, width, height, min_range_m)
    d, ring = pattern.rays(lo, hi, phase_deg)
    return ScanRays(mount.t_cam_from_lidar.copy(), d @ mount.R_cam_from_lidar.T, ring)


def scan_ranges(surface: Mesh | GridSurface, rays: ScanRays, min_range_m: float = 0.5,
                max_range_m: float = 120.0) -> np.ndarray:
    """Range of each ray's return (inf where the first hit is missing or outside the range limits)."""
    if isinstance(surface, GridSurface):
        r, _ = cast_surface(surface, rays.origin, rays.directions, t_max=max_range_m)
    else:
        r = cast_rays(surface, rays.origin, rays.directions)
    return np.where((r >= min_range_m) & (r <= max_range_m), r, np.inf)


def _returns(rays: ScanRays, r: np.ndarray, K: np.ndarray, camera_depth: np.ndarray,
             see_through_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Which rays return a point inside the image, and which of those are see-through points."""
    height, width = camera_depth.shape
    inside, see = np.zeros(len(r), bool), np.zeros(len(r), bool)
    idx = np.flatnonzero(np.isfinite(r))
    uv, z = project(rays.origin + r[idx, None] * rays.directions[idx], K)
    with np.errstate(invalid="ignore"):
        u, v = np.floor(uv[:, 0] + 0.5), np.floor(uv[:, 1] + 0.5)
        ok = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    cam = np.asarray(camera_depth, np.float64)[v[ok].astype(np.int64), u[ok].astype(np.int64)]
    inside[idx[ok]] = True
    see[idx[ok]] = (cam > 0) & (cam < z[ok] - see_through_m)
    return inside, see


def scan_fidelity(true_r: np.ndarray, sim_r: np.ndarray, rays: ScanRays, K: np.ndarray, camera_depth: np.ndarray, *,
                  rel_tol: float = 0.01, see_through_m: float = 1.0) -> dict:
    """Recall, spurious share and see-through fidelity of sim_r against true_r (see the module docstring).

    true_r, sim_r: range per ray of `rays` (inf = no return). camera_depth: H x W depth the camera sees
    (the exact one), 0 = nothing (sky). Shares are nan when their denominator is 0. Also the counts
    and the share of see-through points among each scan's returns.
    """
    K = as_K(K)
    true_r, sim_r = np.asarray(true_r, np.float64), np.asarray(sim_r, np.float64)
    t_in, t_see = _returns(rays, true_r, K, camera_depth, see_through_m)
    s_in, s_see = _returns(rays, sim_r, K, camera_depth, see_through_m)
    with np.errstate(invalid="ignore"):
        match = np.isfinite(true_r) & np.isfinite(sim_r) & (np.abs(sim_r - true_r) <= rel_tol * true_r)

    def share(num, den) -> float:
        return float(num) / float(den) if den else float("nan")

    n_true, n_sim, n_see = int(t_in.sum()), int(s_in.sum()), int(t_see.sum())
    n_match, n_spur, n_see_match = int((match & t_in).sum()), int((s_in & ~match).sum()), int((match & t_see).sum())
    return {"n_true": n_true, "n_sim": n_sim, "n_see_through": n_see, "n_match_true": n_match,
            "n_spurious": n_spur, "n_see_match": n_see_match, "recall": share(n_match, n_true),
            "spurious": share(n_spur, n_sim), "see_through": share(n_see_match, n_see),
            "see_through_share_true": share(n_see, n_true), "see_through_share_sim": share(s_see.sum(), n_sim)}
