import numpy as np
import pytest

from shared.camera import make_K
from shared.shard import Sample


def make_sample(i: int, h: int = 48, w: int = 64, gt: bool = True, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed + i)
    depth = rng.uniform(1.0, 80.0, (h, w)).astype(np.float32)
    sparse = np.where(rng.random((h, w)) < 0.05, depth, 0).astype(np.float32)
    return Sample(
        key=f"test-{i:04d}",
        rgb=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        K=make_K(60.0, 61.0, w / 2, h / 2),
        teacher=(1.0 / depth).astype(np.float32),
        depth=depth,
        sparse=sparse,
        gt=depth if gt else None,
        meta={"source": "test", "source_path": f"/data/{i}.png"},
    )


@pytest.fixture
def samples():
    return [make_sample(i) for i in range(5)]
