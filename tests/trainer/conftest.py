"""Tiny shards for the trainer tests, written with the project's own ShardWriter.

Every sample is an analytic scene: a tilted plane n . P = d seen by a pinhole camera, so its depth is
known in closed form; every member derives from that one depth (gt on half the pixels, LiDAR on a few,
teacher = affine of 1/depth, rgb coding depth and position), which lets tests check that a transform
treated all members alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.camera import make_K
from shared.shard import Sample, ShardWriter

H, W = 64, 96


def plane_depth(K: np.ndarray, h: int, w: int, normal, dist: float) -> np.ndarray:
    """z of the plane normal . P = dist along the ray of each integer pixel: z = dist / (normal . K^-1 (u, v, 1))."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    return dist / (rays @ np.asarray(normal, np.float64))


def make_sample(i: int, h: int = H, w: int = W, seed: int = 0, labelled: bool = True, teacher: bool = True,
                prefix: str = "test") -> Sample:
    rng = np.random.default_rng(seed * 1000 + i)
    K = make_K(rng.uniform(50, 70), rng.uniform(50, 70), rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h)
    normal = (rng.uniform(-0.3, 0.3), rng.uniform(-0.6, -0.2), 1.0)
    depth = plane_depth(K, h, w, normal, rng.uniform(4, 8)).clip(0.5, 60).astype(np.float32)
    depth = (np.rint(depth * 256) / 256).astype(np.float32)  # exactly representable in a depth PNG
    v, u = np.mgrid[0:h, 0:w]
    rgb = np.stack([np.clip(depth * 12, 0, 255), (u * 255 // max(w - 1, 1)), (v * 255 // max(h - 1, 1))], -1)
    sparse = np.where(rng.random((h, w)) < 0.08, depth, 0).astype(np.float32)
    gt = np.where(rng.random((h, w)) < 0.5, depth, 0).astype(np.float32) if labelled else None
    return Sample(key=f"{prefix}-{seed:02d}-{i:04d}", rgb=rgb.astype(np.uint8), K=K,
                  teacher=(0.7 / depth + 0.05).astype(np.float32) if teacher else None,
                  depth=depth, sparse=sparse, gt=gt, meta={"source": "test", "source_path": f"/test/{i}"})


def write_shards(root: Path, n_shards: int, per_shard: int, seed: int = 0, h: int = H, w: int = W,
                 rgb_format: str = "png", **kw) -> list[str]:
    """n_shards tars of per_shard samples under root; returns all keys in write order."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        with ShardWriter(root / f"test-{s:06d}.tar", rgb_format=rgb_format) as wr:
            for j in range(per_shard):
                sample = make_sample(s * per_shard + j, h, w, seed, **kw)
                wr.write(sample)
                keys.append(sample.key)
    return keys


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def shards(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "shards"
    return root, write_shards(root, 2, 4)
