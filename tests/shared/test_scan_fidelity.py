"""The scan-fidelity metrics on a case worked out by hand."""

import numpy as np
import pytest

from shared.camera import make_K
from shared.scan.fidelity import ScanRays, scan_fidelity, scan_ranges, scan_ray_set
from shared.scan.heightfield import grid_surface
from shared.scan.lidar import Mount
from shared.scan.patterns import LIDAR_PRESETS

W, H = 8, 6
K = make_K(10.0, 10.0, 3.5, 2.5)


def _ray_at(u, v):
    d = np.array([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], 1.0])
    return d / np.linalg.norm(d)


def test_fidelity_on_a_hand_computed_case():
    # Six rays from the camera centre through pixels (1,1) (2,1) (3,1) (4,1) (5,1), and one outside the view.
    dirs = np.array([_ray_at(u, 1) for u in (1, 2, 3, 4, 5)] + [_ray_at(-20, 1)])
    rays = ScanRays(np.zeros(3), dirs, np.zeros(6, np.int32))
    inf = np.inf
    true_r = np.array([10.0, 10.0, inf, 20.0, 8.0, 5.0])
    sim_r = np.array([10.05, 10.2, 5.0, inf, 8.0, 5.0])
    # ray 0: counterpart (0.5% off); ray 1: 2% off, no counterpart; ray 2: simulated only; ray 3: true only;
    # ray 4: counterpart; ray 5: both, but outside the image: not a return of either scan.
    depth = np.full((H, W), 30.0)
    z = lambda i, r: r * dirs[i][2]  # noqa: E731  (camera depth of ray i's point at range r)
    depth[1, 1] = z(0, 10.0) - 1.5  # the camera sees something 1.5 m nearer: ray 0 is a see-through point
    depth[1, 4] = z(3, 20.0) - 3.0  # and ray 3 too
    depth[1, 5] = z(4, 8.0) - 0.5   # only 0.5 m nearer: ray 4 is not
    f = scan_fidelity(true_r, sim_r, rays, K, depth)
    assert (f["n_true"], f["n_sim"], f["n_see_through"]) == (4, 4, 2)
    assert f["recall"] == pytest.approx(2 / 4)          # rays 0 and 4 of true 0, 1, 3, 4
    assert f["spurious"] == pytest.approx(2 / 4)        # rays 1 and 2 of simulated 0, 1, 2, 4
    assert f["see_through"] == pytest.approx(1 / 2)     # ray 0 reproduced, ray 3 missed
    assert f["see_through_share_true"] == pytest.approx(2 / 4)
    assert f["see_through_share_sim"] == pytest.approx(1 / 4)  # ray 0 (ray 2 lands at 5 m, in front)
    # a sky pixel (depth 0) in front of a true point does not make it a see-through point
    depth[1, 1] = 0
    assert scan_fidelity(true_r, sim_r, rays, K, depth)["n_see_through"] == 1


def test_a_scan_of_its_own_surface_is_perfect():
    depth = np.full((H * 10, W * 10), 6.0, np.float32)
    Kb = make_K(50.0, 50.0, 39.5, 29.5)
    surf = grid_surface(depth, Kb)
    rays = scan_ray_set(LIDAR_PRESETS["vlp16"], Mount(), Kb, W * 10, H * 10, 0.05)
    r = scan_ranges(surf, rays)
    f = scan_fidelity(r, r, rays, Kb, depth)
    assert f["n_true"] > 100 and f["recall"] == 1.0 and f["spurious"] == 0.0
    assert np.isnan(f["see_through"])  # no see-through points on a plain wall
    # the same rays against the Open3D mesh give the same returns
    r2 = scan_ranges(surf.to_mesh(), rays)
    assert scan_fidelity(r2, r, rays, Kb, depth)["recall"] == 1.0
