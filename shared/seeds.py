"""The random streams of one sample: every random choice datagen makes for a sample comes from a seed made of
(--seed, key), one stream per step, so a sample's bytes depend neither on scheduling, nor on the number of
workers, nor on resumption, and another LiDAR preset does not change the sampled K. The trainer uses the same
streams to cast a shard's scan again exactly (its seed is in meta.json as lidar.seed)."""

from __future__ import annotations

import hashlib

import numpy as np

STREAMS = ("teacher", "depth", "intrinsics", "lidar")


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (--seed, key): the same whatever the order, worker or run."""
    digest = hashlib.sha256(f"dmd3c/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_rngs(seed: int) -> dict[str, np.random.Generator]:
    """One generator per step of the sample (STREAMS), from its sample_seed."""
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return dict(zip(STREAMS, map(np.random.default_rng, children), strict=True))
