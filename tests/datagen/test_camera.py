import math

import numpy as np
import pytest

from datagen.camera import INTRINSICS_PRESETS, fx_from_hfov, hfov_deg, resize_image_and_K, sample_intrinsics
from shared.camera import backproject, crop_K, make_K, project


def test_backproject_then_project_is_identity():
    rng = np.random.default_rng(0)
    K = sample_intrinsics(96, 64, rng)
    depth = rng.uniform(0.5, 80.0, (64, 96))
    pts = backproject(depth, K).reshape(-1, 3)
    uv, z = project(pts, K)
    v, u = np.mgrid[0:64, 0:96]
    np.testing.assert_allclose(uv[:, 0], u.ravel(), atol=1e-9)
    np.testing.assert_allclose(uv[:, 1], v.ravel(), atol=1e-9)
    np.testing.assert_allclose(z, depth.ravel(), rtol=1e-12)


@pytest.mark.parametrize("name", ["normal", "wide", "any"])
def test_sampled_intrinsics_follow_the_preset(name):
    dist = INTRINSICS_PRESETS[name]
    rng = np.random.default_rng(1)
    for _ in range(200):
        K = sample_intrinsics(640, 480, rng, name)
        assert dist.hfov_deg[0] - 1e-9 <= hfov_deg(K, 640) <= dist.hfov_deg[1] + 1e-9
        assert abs(K[0, 2] - 319.5) <= dist.pp_jitter * 640 + 1e-9
        assert abs(K[1, 2] - 239.5) <= dist.pp_jitter * 480 + 1e-9
        assert abs(K[1, 1] / K[0, 0] - 1) <= dist.aspect_jitter + 1e-12
        assert K.dtype == np.float64 and K.shape == (3, 3)


def test_presets_documented_ranges():
    assert INTRINSICS_PRESETS["normal"].hfov_deg == (45.0, 75.0)
    assert INTRINSICS_PRESETS["wide"].hfov_deg == (75.0, 100.0)
    # KITTI's camera (fx 721.5 over 1242 px) is a 'wide' view.
    assert 75 <= hfov_deg(make_K(721.5, 721.5, 609.6, 172.9), 1242) <= 100


def test_same_seed_same_K():
    a = sample_intrinsics(320, 240, np.random.default_rng(7))
    b = sample_intrinsics(320, 240, np.random.default_rng(7))
    c = sample_intrinsics(320, 240, np.random.default_rng(8))
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_resize_and_crop_keep_points_on_their_pixels():
    """A 3D point projects to the same place in the image content before and after resize / crop."""
    rng = np.random.default_rng(2)
    K = sample_intrinsics(64, 48, rng)
    P = np.array([[0.3, -0.2, 4.0]])
    uv, _ = project(P, K)
    img = rng.random((48, 64)).astype(np.float32)
    small, K2 = resize_image_and_K(img, K, 32, 24)
    uv2, _ = project(P, K2)
    # pixel centre u maps to (u + 0.5) * s - 0.5
    np.testing.assert_allclose(uv2[0], (uv[0] + 0.5) * 0.5 - 0.5, atol=1e-9)
    assert small.shape == (24, 32) and small.dtype == np.float32
    uv3, _ = project(P, crop_K(K, 5, 7))  # the crop img[5:35, 7:47]
    np.testing.assert_allclose(uv3[0], uv[0] - [7, 5], atol=1e-9)
    rgb = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    out, _ = resize_image_and_K(rgb, K, 16, 12, nearest=True)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8


def test_fx_from_hfov():
    assert math.isclose(fx_from_hfov(200, 90.0), 100.0)
