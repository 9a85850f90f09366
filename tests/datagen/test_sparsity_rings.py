"""lines:N finds the ring of every point of our own scans, and `datagen run --lidar points:N|keypoints:N`
goes through the code that `trainer eval --sparsity` uses (shared.sparsity)."""

import numpy as np
import pytest

from datagen.job.settings import RunConfig
from datagen.sample import make_sample
from datagen.sources import get_source
from datagen.sources.kitti import velodyne_pose
from datagen.world.scenes import render_scene
from shared import sparsity as sp
from shared.camera import project
from shared.depth import as_stored_depth, as_stored_rgb
from shared.scan.lidar import KITTI_MOUNT, Mount, project_scan, simulate_scan
from shared.scan.patterns import LIDAR_PRESETS
from shared.scan.spec import ScanSpec

# KITTI 2011_09_26: rectified camera 2 from the Velodyne, in the project's LiDAR axes (x right, y down,
# z forward), from calib_velo_to_cam.txt and R_rect_00 of calib_cam_to_cam.txt: turned ~0.6 deg in
# pitch and in roll
R_VELO = np.array([7.533745e-03, -9.999714e-01, -6.166020e-04, 1.480249e-02, 7.280733e-04, -9.998902e-01,
                   9.998621e-01, 7.523790e-03, 1.480755e-02]).reshape(3, 3)
R_RECT = np.array([9.999239e-01, 9.837760e-03, -7.445048e-03, -9.869795e-03, 9.999421e-01, -4.278459e-03,
                   7.402527e-03, 4.351614e-03, 9.999631e-01]).reshape(3, 3)
FLU_FROM_RDF = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
KITTI_REAL = Mount(R_RECT @ R_VELO @ FLU_FROM_RDF, KITTI_MOUNT.t_cam_from_lidar)


def true_rings(scan, K, width, height) -> np.ndarray:
    """The ring of the point each pixel of project_scan's map holds (-1: none): the nearest, as there."""
    uv, z = project(scan.points_cam, K)
    u, v = np.floor(uv[:, 0] + 0.5), np.floor(uv[:, 1] + 0.5)
    ok = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    pix, z, ring = (v[ok] * width + u[ok]).astype(np.int64), z[ok], scan.ring[ok]
    order = np.lexsort((z, pix))
    pix, ring = pix[order], ring[order]
    first = np.r_[True, pix[1:] != pix[:-1]]
    out = np.full(height * width, -1, np.int64)
    out[pix[first]] = ring[first]
    return out.reshape(height, width)


@pytest.mark.parametrize("rig", ["kitti", "kitti-real-rotation"])
def test_hdl64_rings_from_the_kitti_mount_are_found_again(rig):
    """An HDL-64 scan of a street at KITTI's size and focal length: with the pose the sample records,
    >= 99% of the points go to their true ring; lines:16 keeps rings 0, 4, ..., 60 and nothing else."""
    mount = KITTI_MOUNT if rig == "kitti" else KITTI_REAL
    hdl64 = LIDAR_PRESETS["hdl64"]
    W, H = 1242, 375
    scene = render_scene(3, "street", W, H)  # f = 720 px, as KITTI's
    scan = simulate_scan(scene.mesh, hdl64, mount, scene.K, W, H, np.random.default_rng(0))
    sparse = project_scan(scan.points_cam, scene.K, W, H)
    truth = true_rings(scan, scene.K, W, H)
    lidar = {"pattern": hdl64.to_dict(), "pose": mount.to_dict()}  # what a sample's meta.json holds
    elev, R, t = sp.ring_table(lidar, "k")
    v, u, el = sp.lidar_elevations(sparse, scene.K, R, t)
    assert len(v) > 10_000 and np.mean(sp.assign_rings(el, elev) == truth[v, u]) >= 0.99
    kept = sp.apply("lines:16", sparse, key="k", K=scene.K, lidar=lidar) > 0
    assert np.isin(truth[kept], np.arange(0, 64, 4)).mean() >= 0.99
    assert kept.sum() >= 0.99 * np.isin(truth, np.arange(0, 64, 4)).sum()
    if rig == "kitti-real-rotation":  # the pose matters: the nominal rig (no rotation) misses most rings
        _, _, el0 = sp.lidar_elevations(sparse, scene.K, KITTI_MOUNT.R_cam_from_lidar, t)
        assert np.mean(sp.assign_rings(el0, elev) == truth[v, u]) < 0.5


def test_kitti_source_reads_the_velodyne_pose_of_the_drive_date(tmp_path):
    date = tmp_path / "2011_09_26"
    date.mkdir()
    (date / "calib_velo_to_cam.txt").write_text(
        "R: " + " ".join(f"{x:e}" for x in R_VELO.ravel()) + "\nT: -4.069766e-03 -7.631618e-02 -2.717806e-01\n")
    P2 = [721.5377, 0, 609.5593, 44.85728, 0, 721.5377, 172.854, 0.2163791, 0, 0, 1, 0.002745884]
    P3 = [721.5377, 0, 609.5593, -339.5242, 0, 721.5377, 172.854, 2.199936, 0, 0, 1, 0.002729905]
    (date / "calib_cam_to_cam.txt").write_text(
        "R_rect_00: " + " ".join(f"{x:e}" for x in R_RECT.ravel()) + "\n"
        + "".join(f"P_rect_0{c}: " + " ".join(f"{x:e}" for x in P) + "\n" for c, P in ((2, P2), (3, P3))))
    pose2, source = velodyne_pose(str(date), "image_02")
    assert source == "calibration"
    np.testing.assert_allclose(pose2["R_cam_from_lidar"], KITTI_REAL.R_cam_from_lidar, atol=1e-12)
    K = np.array(P2).reshape(3, 4)[:, :3]
    t2 = R_RECT @ [-4.069766e-03, -7.631618e-02, -2.717806e-01] + np.linalg.solve(K, np.array(P2).reshape(3, 4)[:, 3])
    np.testing.assert_allclose(pose2["t_cam_from_lidar"], t2, atol=1e-12)
    pose3, _ = velodyne_pose(str(date), "image_03")  # camera 3: 0.53 m to the right, the LiDAR to its left
    assert pose3["t_cam_from_lidar"][0] == pytest.approx(t2[0] + (-339.5242 - 44.85728) / 721.5377, abs=1e-3)
    nominal, source = velodyne_pose(str(tmp_path / "2011_09_28"), "image_02")
    assert source == "nominal" and nominal["t_cam_from_lidar"] == KITTI_MOUNT.t_cam_from_lidar.tolist()


@pytest.mark.parametrize("spec", ["points:300", "keypoints:60"])
def test_datagen_lidar_pixel_protocols_pick_pixels_of_the_pseudo_depth(spec):
    src = get_source("synthetic", None, count=1, width=160, height=96)
    record = src.load(src.items()[0])
    disparity = np.where(record.true_depth > 0, 1.0 / np.maximum(record.true_depth, 1e-6), 0).astype(np.float32)
    cfg = RunConfig(scan=ScanSpec(lidar=spec), seed=7)
    sample = make_sample(record, (disparity, {}), cfg, native_K=True, teacher_info={"model": "oracle"})
    n = int(spec.split(":")[1])
    assert sample.meta["lidar"]["preset"] == spec and sample.meta["lidar"]["n_points"] == np.count_nonzero(sample.sparse)
    has = sample.sparse > 0
    stored = as_stored_depth(sample.depth)  # the scan is cast from the depth as the shard stores it
    assert np.array_equal(sample.sparse[has], stored[has])  # values of the pseudo depth, where it has them
    if spec.startswith("points"):
        assert has.sum() == n
        again = make_sample(record, (disparity, {}), cfg, native_K=True, teacher_info={"model": "oracle"})
        assert np.array_equal(again.sparse, sample.sparse)  # seeded per sample
    else:  # the very keypoints eval's keypoints:N takes, found in the sample's own image as the shard stores it
        assert 0 < has.sum() <= n
        assert np.array_equal(sample.sparse, sp.keypoints(as_stored_rgb(record.rgb, "jpg"), stored, n))
