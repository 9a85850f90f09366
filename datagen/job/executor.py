"""What runs a job's shard tasks: Ray (`--executor ray`, the default) or this process (`--executor local`).

Both runners have the same small interface, so `pipeline.run` does not know which one it has:

    with open_runner(cfg) as runner:           # connect / nothing to connect to
        runner.workers                         # shard tasks at a time
        runner.start(teacher, warm_up, n)      # load the teacher (replicas, or once in this process); its info
        for i, rows in runner.run_shards(process_shard, shards, todo, out_dir):
            ...                                # rows: the shard's sidecar rows, or ShardLost

Both run the same `pipeline.process_shard` with the same teacher code, so both write the same bytes. Also
here: the progress display both use, and ShardLost (a shard whose worker process died, Ray only).
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

from datagen.job.settings import RunConfig

log = logging.getLogger("datagen")

EXECUTORS = ("ray", "local")


def open_runner(cfg: RunConfig):
    """The runner of cfg.executor (prepare resolved it): RayRunner, or LocalRunner, which never imports ray."""
    if cfg.executor == "local":
        from datagen.job.local_runner import LocalRunner

        return LocalRunner(cfg)
    from datagen.job.ray_runner import RayRunner

    return RayRunner(cfg)


class ShardLost:
    """A shard whose worker process died, even after Ray's retries: its inputs become failure rows."""

    def __init__(self, exc: BaseException):
        self.kind = type(exc).__name__
        self.error = f"{type(exc).__name__}: {exc}".splitlines()[0]


class Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (or nothing)."""

    def __init__(self, mode: str, total: int, every_s: float):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.every_s = mode, total, every_s
        self.n, self.t0, self.last = 0, time.monotonic(), time.monotonic()
        self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1) if mode == "bar" else None

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            self.tick()

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.mode != "log" or (now - self.last < self.every_s and not force):
            return
        self.last = now
        rate = self.n / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        log.info("%d/%d images, %.2f images/s, ETA %s", self.n, self.total, rate,
                 "?" if eta == float("inf") else f"{eta:.0f} s")

    def close(self) -> None:
        self.tick(force=True)
        if self.bar is not None:
            self.bar.close()
