"""Pinhole camera helpers shared by datagen and trainer.

Conventions, the same in datagen, the shards and the trainer: camera frame x right, y down, z forward
(OpenCV); pixel (u, v) has its centre at integer (u, v); K is a 3x3 float64 array; depth means z in
metres, never range along the ray.
Every crop, resize or flip of an image must update K with the functions below.
"""

from __future__ import annotations

import math

import numpy as np


def make_K(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Build a 3x3 float64 intrinsics matrix."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


def as_K(K) -> np.ndarray:
    """Validate and return K as a 3x3 float64 array (accepts nested lists or 9 numbers)."""
    K = np.asarray(K, dtype=np.float64)
    if K.size != 9:
        raise ValueError(f"intrinsics must have 9 numbers (3x3), got shape {K.shape}")
    K = K.reshape(3, 3)
    if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"intrinsics must be finite with fx, fy > 0, got {K.tolist()}")
    return K


def scale_K(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """K after resizing an image by (sx, sy) = (new_w / old_w, new_h / old_h).

    With pixel centres at integers, a pixel u maps to (u + 0.5) * s - 0.5, so the principal point
    moves by the same rule while focal lengths scale plainly.
    """
    K = as_K(K).copy()
    K[0, 0] *= sx
    K[1, 1] *= sy
    K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return K


def crop_K(K: np.ndarray, top: int, left: int) -> np.ndarray:
    """K after cropping an image so that pixel (left, top) becomes (0, 0)."""
    K = as_K(K).copy()
    K[0, 2] -= left
    K[1, 2] -= top
    return K


def flip_K(K: np.ndarray, width: int) -> np.ndarray:
    """K after a horizontal flip of an image of this width: cx' = W - 1 - cx.

    The flip also mirrors the x axis of the camera frame, so back-projecting the flipped image
    with the flipped K gives the original points with x negated.
    """
    K = as_K(K).copy()
    K[0, 2] = width - 1 - K[0, 2]
    return K


def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel coordinates (u, v), each H x W float64."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    return u, v


def backproject(depth_m: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Back-project a depth map (H x W, metres, z) to camera-frame points, H x W x 3 float64.

    (X, Y, Z) = Z * K^-1 (u, v, 1). Pixels with depth 0 give the point (0, 0, 0).
    """
    K = as_K(K)
    z = np.asarray(depth_m, dtype=np.float64)
    u, v = pixel_grid(*z.shape)
    x = (u - K[0, 2]) / K[0, 0] * z
    y = (v - K[1, 2]) / K[1, 1] * z
    return np.stack([x, y, z], axis=-1)


def project(points: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project camera-frame points (N x 3) to pixel coordinates (N x 2, float) and depth z (N,).

    Points with z <= 0 get NaN pixel coordinates; callers drop them.
    """
    K = as_K(K)
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    z = p[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = K[0, 0] * p[:, 0] / z + K[0, 2]
        v = K[1, 1] * p[:, 1] / z + K[1, 2]
    bad = ~(z > 0)
    u[bad] = np.nan
    v[bad] = np.nan
    return np.stack([u, v], axis=-1), z


def rotation_from_rotvec(rotvec) -> np.ndarray:
    """Rodrigues: the 3x3 rotation matrix of an axis-angle vector (radians). Camera and sensor poses: the
    LiDAR mount relative to the camera, the synthetic world's camera."""
    r = np.asarray(rotvec, dtype=np.float64)
    theta = float(np.linalg.norm(r))
    if theta < 1e-15:
        return np.eye(3)
    k = r / theta
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(theta) * Kx + (1 - math.cos(theta)) * Kx @ Kx
