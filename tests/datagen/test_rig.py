"""The synthetic benchmark's target rig: a sensor scaled with the frame, KITTI-like accumulated GT."""

import numpy as np
import pytest

from datagen.sources.synthetic import SyntheticSource, random_K
from datagen.world.rig import accumulated_gt, frame_scale, kitti_pattern, scaled_pattern
from datagen.world.scenes import default_K, render_scene
from shared.scan.lidar import KITTI_MOUNT, simulate_sparse_depth
from shared.scan.mesh import Mesh
from shared.scan.patterns import LIDAR_PRESETS, get_pattern
from shared.scan.spec import ScanSpec


def test_scaled_pattern_keeps_every_nth_ring_and_stretches_the_azimuth_step():
    hdl = LIDAR_PRESETS["hdl64"]
    assert scaled_pattern(hdl, 1.0) is hdl
    half = scaled_pattern(hdl, 0.5)
    np.testing.assert_array_equal(half.elevations_deg, hdl.elevations_deg[::2])
    assert half.azimuth_step_deg == pytest.approx(2 * hdl.azimuth_step_deg)
    assert scaled_pattern(hdl, 0.25).n_rings == 16
    with pytest.raises(ValueError, match="spinning"):
        scaled_pattern(get_pattern("livox:points=100", np.random.default_rng(0)), 0.5)


def test_the_scaled_rig_covers_the_frame_as_densely_as_a_full_kitti_frame():
    """~4% of the pixels at 384 x 128 as at 1216 x 352 (an unscaled hdl64 covers a third of a small frame)."""
    dens = {}
    for w, h in ((384, 128), (1216, 352)):
        s = render_scene(4, "street", w, h)
        assert frame_scale(s.K) == pytest.approx(0.58 * w / 721.5377, rel=1e-3)
        sparse, _ = simulate_sparse_depth(s.depth_m, s.K, np.random.default_rng(0), ScanSpec(mount="kitti"),
                                          pattern=kitti_pattern(s.K), surface=s.mesh)
        dens[w] = np.mean(sparse > 0)
    assert 0.03 < dens[384] < 0.08 and 0.03 < dens[1216] < 0.08
    assert dens[384] == pytest.approx(dens[1216], rel=0.25)
    s = render_scene(4, "street", 384, 128)
    full, _ = simulate_sparse_depth(s.depth_m, s.K, np.random.default_rng(0), ScanSpec(lidar="hdl64", mount="kitti"),
                                    surface=s.mesh)
    assert np.mean(full > 0) > 3 * dens[384]


def _ground_world(cam_h=1.6):
    """A flat ground plane 1.6 m below the camera from 0.5 to 200 m ahead (y down)."""
    v = np.array([[-100, cam_h, 0.5], [100, cam_h, 0.5], [100, cam_h, 200], [-100, cam_h, 200]], float)
    return Mesh(v, np.array([[0, 1, 2], [0, 2, 3]]))


def test_accumulated_gt_labels_true_surfaces_below_the_top_laser_only():
    w, h = 384, 128
    K = default_K("street", w, h)
    v = np.arange(h)[:, None].repeat(w, 1).astype(float)
    with np.errstate(divide="ignore"):
        depth = np.where(v > K[1, 2] + 0.5, 1.6 * K[1, 1] / (v - K[1, 2]), 0.0).astype(np.float32)
    depth[depth > 200] = 0
    pat = kitti_pattern(K)
    one = accumulated_gt(_ground_world(), depth, K, pat, np.random.default_rng(0), frames=0)
    many = accumulated_gt(_ground_world(), depth, K, pat, np.random.default_rng(0), frames=5)
    assert many.sum() > 3 * one.sum()  # 11 scans label more than one
    assert (depth[many] > 0).all()  # never the sky
    # the ground below the top ring's reach only: a LiDAR 0.08 m above the camera, top ring +2 deg
    assert not many[: int(K[1, 2])].any()
    assert many[int(K[1, 2]) + 10:].mean() > 0.2


def test_synthetic_source_target_rig_and_random_cameras():
    lab = SyntheticSource(labelled=True, gt="accumulated", rig="kitti", width=384, height=128, count=2)
    for it in lab.items():
        r = lab.load(it)
        assert r.meta["rig"] == "kitti" and r.meta["gt"] == "accumulated"
        assert 0.03 < np.mean(r.sparse > 0) < 0.08
        labelled = r.gt > 0
        np.testing.assert_array_equal(r.gt[labelled], r.true_depth[labelled])
        assert not labelled[: r.meta["gt_top_row"]].any() and labelled[r.meta["gt_top_row"]].any()
    cams = SyntheticSource(camera="random", width=96, height=64, count=3, family="room")
    Ks = [cams.load(it).K for it in cams.items()]
    assert len({round(K[0, 0], 6) for K in Ks}) == 3  # one camera per scene
    for K in Ks:
        hfov = 2 * np.degrees(np.arctan(48 / K[0, 0]))
        assert 45 <= hfov <= 100 and abs(K[0, 2] - 47.5) <= 0.05 * 96 + 1e-9
    np.testing.assert_array_equal(random_K(np.random.default_rng(5), 96, 64), random_K(np.random.default_rng(5), 96, 64))
    with pytest.raises(ValueError, match="rig"):
        SyntheticSource(labelled=True, rig="nuscenes")
    assert KITTI_MOUNT.t_cam_from_lidar[1] < 0  # the LiDAR above the camera (y down)
