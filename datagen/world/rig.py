"""The synthetic benchmark's target rig: a KITTI-like camera and LiDAR fixed to a car.

The synthetic world plays KITTI's role in the paper's second stage. Its labelled scenes are seen
through one fixed rig, unlike the pre-training scenes (random cameras, random LiDAR patterns and
mounts): that difference is the domain gap between internet photos and KITTI.

- Camera: KITTI's colour camera scaled to the frame (fx = fy = 0.58 W, principal point as KITTI's);
  `frame_scale` is fx / 721.54 px, the ratio to a full KITTI frame.
- LiDAR: the Velodyne HDL-64E on KITTI's mount, scaled with the frame so that its points fall on the
  image as densely as on a full KITTI frame (~4-5% of pixels): a frame at scale s keeps every
  (1/s)-th ring and an azimuth step 1/s times coarser. (At full KITTI size the sensor is hdl64 itself.)
  Without the scaling, 64 rings on a 384-pixel-wide frame cover a third of its pixels, and plain
  nearest-neighbour filling is then hard to beat.
- Ground truth: semi-dense, as KITTI's: the scans of the frame and of the 5 frames either side (the
  car moving ~1 m per frame) are registered into the frame, points that disagree with the camera's
  view are dropped (KITTI filters them against stereo), and the true depth is the label at every
  pixel a kept point falls on. So, as in KITTI, nothing above the top laser's reach has a label and
  far surfaces are sparsely labelled.
"""

from __future__ import annotations

import numpy as np

from shared.scan.lidar import KITTI_MOUNT, Mount, project_scan, simulate_scan
from shared.scan.mesh import Mesh
from shared.scan.patterns import LIDAR_PRESETS, LidarPattern

KITTI_FX_PX = 721.5377          # KITTI raw colour camera 2 (P_rect_02), 1242 px wide frames
ACCUMULATED_FRAMES = 5          # KITTI's GT: the frame and 5 either side (11 scans)
ACCUMULATION_STEP_M = 1.0       # the car's travel between two frames (~10 m/s at 10 Hz)
GT_TOL_M, GT_TOL_REL = 0.05, 0.01  # a registered point is kept where it agrees with the camera's view


def frame_scale(K: np.ndarray) -> float:
    """Size of this frame relative to a full KITTI frame, from the focal length."""
    return float(K[0, 0]) / KITTI_FX_PX


def scaled_pattern(pattern: LidarPattern, scale: float) -> LidarPattern:
    """A spinning pattern whose pixel footprint in a frame at `scale` matches the original's at scale 1:
    every (1/scale)-th ring and an azimuth step 1/scale times larger. scale >= 1 returns the pattern."""
    if not pattern.spinning:
        raise ValueError(f"only spinning patterns can be scaled, got {pattern.name!r}")
    if scale >= 1.0:
        return pattern
    idx = np.unique(np.round(np.arange(0.0, pattern.n_rings, 1.0 / scale)).astype(int))
    idx = idx[idx < pattern.n_rings]
    return LidarPattern(f"{pattern.name}@{scale:.3f}", pattern.elevations_deg[idx].copy(),
                        pattern.azimuth_step_deg / scale)


def kitti_pattern(K: np.ndarray) -> LidarPattern:
    """The rig's LiDAR: hdl64 scaled to the frame of K."""
    return scaled_pattern(LIDAR_PRESETS["hdl64"], frame_scale(K))


def accumulated_gt(world: Mesh, depth_m: np.ndarray, K: np.ndarray, pattern: LidarPattern,
                   rng: np.random.Generator, mount: Mount = KITTI_MOUNT,
                   frames: int = ACCUMULATED_FRAMES, step_m: float = ACCUMULATION_STEP_M) -> np.ndarray:
    """Pixels a KITTI-style accumulated GT labels (bool H x W): where a point of the 2 * frames + 1 scans,
    taken from the mount moved by k * step_m along the optical axis (k = -frames .. frames), lands and
    agrees with the camera-visible depth (|z - depth| <= GT_TOL_M + GT_TOL_REL * depth). Exact world,
    no noise: the label values are the true depth."""
    height, width = depth_m.shape
    labelled = np.zeros((height, width), bool)
    for k in range(-frames, frames + 1):
        pose = Mount(mount.R_cam_from_lidar, mount.t_cam_from_lidar + np.array([0.0, 0.0, k * step_m]))
        scan = simulate_scan(world, pattern, pose, K, width, height, rng)
        z = project_scan(scan.points_cam, K, width, height, "zbuffer", depth_m=depth_m,
                         tol_m=GT_TOL_M, tol_rel=GT_TOL_REL)
        labelled |= (z > 0) & (np.abs(z - depth_m) <= GT_TOL_M + GT_TOL_REL * depth_m)
    return labelled & (depth_m > 0)
