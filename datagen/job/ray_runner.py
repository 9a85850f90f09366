"""Everything that knows about Ray: joining a cluster or starting a local Ray, the teacher replicas, running
the shard tasks with at most `workers` in flight (`--executor ray`; local_runner.py is the same without Ray).

The only module of the project that imports ray, and only inside functions: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
must be set before ray is imported, and importing datagen must not cost Ray's start-up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from datagen.job.executor import Progress, ShardLost
from datagen.job.runtime_env import describe, runtime_env
from datagen.job.settings import PipelineError, RunConfig
from datagen.job.shard_files import shard_name
from datagen.sample import StageError
from datagen.teachers.runner import ORACLE, OracleTeacher, Packed, TeacherFeed, make_teacher

log = logging.getLogger("datagen")


# ---------------------------------------------------------------------------------------------------------
# Connecting


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).is_file()


def local_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def connect_ray(address: str | None, workers: int | None, log_to_driver: bool,
                ship: str = "auto") -> tuple[bool, int]:
    """Start a local Ray (loopback only) or join a cluster, shipping the code as `ship` says
    (datagen/job/runtime_env.py). Returns (we started it, workers to use)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in ("local", ""):
        address = None
    try:
        env = runtime_env(ship, joining_cluster=address is not None)
    except RuntimeError as exc:
        raise PipelineError(str(exc)) from exc
    if address is None:
        # bind to 127.0.0.1: a laptop job must not open ports on the network (read when ray is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    elif "RAY_AUTH_MODE" not in os.environ and _token_available():
        # `ray start --head` turns token auth on when a token exists, but a driver given an explicit address
        # does not (ray 2.5x+): send the local token, as `ray job submit` would
        os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as exc:
        raise PipelineError("Ray is not installed here (pip install 'ray[default]'); without Ray, run the shards in "
                            "this process: --executor local") from exc

    if ray.is_initialized():  # a caller (a test, a notebook) already connected: use that
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return False, max(1, min(workers or cpus, cpus) if address is None else (workers or cpus))
    cores = local_cores()
    if address is None:
        want = workers or cores
        if want > cores:
            log.warning("--workers %d but this machine has %d CPU cores: running %d workers "
                        "(use --address to run on a Ray cluster)", want, cores, cores)
        use = min(want, cores)
        try:
            ray.init(address="local", num_cpus=use, include_dashboard=False, log_to_driver=log_to_driver,
                     logging_level=logging.WARNING, runtime_env=env)
        except Exception as exc:  # noqa: BLE001 (ports, /dev/shm, a stale session: say what Ray said)
            raise PipelineError(f"cannot start a local Ray: {type(exc).__name__}: {exc}") from exc
        return True, use
    log.info("joining the Ray cluster at %s: %s", address, describe(env))
    try:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING, runtime_env=env)
    except Exception as exc:  # noqa: BLE001 (connection refused, auth, version mismatch: all fatal, say which)
        raise PipelineError(
            f"cannot join the Ray cluster at {address}: {type(exc).__name__}: {exc}. A head started with "
            "`ray start --head` uses token authentication when a token exists on it: give this driver the "
            "same token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as printed by "
            "`ray get-auth-token` on the head)") from exc
    cpus = int(ray.cluster_resources().get("CPU", 0))
    use = workers or max(cpus, 1)
    if cpus and use > cpus:
        log.warning("--workers %d but the cluster has %d CPUs: shard tasks will queue", use, cpus)
    return False, use


# ---------------------------------------------------------------------------------------------------------
# The teacher replicas


class TeacherReplica:
    """One copy of the model (a Ray actor). Shard tasks send it chunks already resized (and, for a CPU model,
    normalised) by their TeacherFeed; it transfers each batch once, runs the network and, on an accelerator,
    normalises and upsamples there too (DepthTeacher.run)."""

    def __init__(self, spec: str, batch_size: int, cpu_threads: int, output: str | None = None):
        import torch  # lazy: only a replica needs torch

        self.teacher = make_teacher(spec, batch_size=batch_size, output=output)
        if self.teacher.device == "cpu":
            # Ray gives a zero-CPU actor one thread; on a CPU-only machine the model may use the cores the
            # workers leave free, and no more (a spinning thread pool on busy cores costs 100x)
            torch.set_num_threads(cpu_threads)

    def info(self) -> dict:
        return self.teacher.info()

    def run(self, packed: Packed) -> list:
        return self.teacher.run(packed)


class TeacherRequest:
    """The maps of one chunk of images, asked of a replica now and collected later (the replica works on
    them while the shard task does the geometry of the previous chunk). The shard task's TeacherFeed
    prepares the images here, on the task's own core, and finishes what a CPU replica leaves."""

    def __init__(self, replica, feed: TeacherFeed, images: list):
        self.replica, self.feed = replica, feed
        self.packed = feed.pack(images)
        self.ref = replica.run.remote(self.packed)

    def maps(self) -> list:
        """(map, per-image facts) for each image. An image that could not be prepared or that the model
        rejects gets a StageError in its slot (a failed batch is retried one image at a time), and the
        others still get their map."""
        import ray
        from ray.exceptions import RayTaskError

        try:
            results = self.feed.unpack(self.packed, ray.get(self.ref))
        except RayTaskError:
            results = []
            for i in range(len(self.packed.sizes)):
                alone = self.packed.only(i)
                try:
                    results += self.feed.unpack(alone, ray.get(self.replica.run.remote(alone)))[i:i + 1]
                except RayTaskError as exc:
                    cause = exc.cause if getattr(exc, "cause", None) else exc
                    results.append(StageError("teacher", f"{type(cause).__name__}: {str(cause).splitlines()[-1]}"))
        return [StageError("teacher", str(r)) if isinstance(r, Exception) and not isinstance(r, StageError) else r
                for r in results]


# ---------------------------------------------------------------------------------------------------------
# The job on Ray


class RayRunner:
    """One job's Ray session: the workers, the teacher replicas, the shard tasks. A context manager: on
    leaving, the replicas are killed and a local Ray started here is shut down."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.started, self.workers = connect_ray(cfg.address, cfg.workers, cfg.ray_log_to_driver, cfg.runtime_env)
        self.replicas: list = []
        self.teacher_info: dict = {}
        self.progress: Progress | None = None

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self.progress is not None:
            self.progress.close()
        for a in self.replicas:
            ray.kill(a)
        if self.started:
            ray.shutdown()

    def start(self, teacher_resolved: str, warm_up: Callable[[RunConfig], int], n_tasks: int) -> dict:
        """Load the teacher replicas while `warm_up(cfg)` runs once per worker process (imports, Open3D's
        first ray cast); returns the teacher's info. Load errors surface here, before any shard."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        warm = [ray.remote(warm_up).options(num_cpus=1).remote(self.cfg) for _ in range(min(self.workers, n_tasks))]
        if self.cfg.teacher == ORACLE:  # the oracle runs in the shard tasks themselves
            self.teacher_info = OracleTeacher().info()
        else:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            n = self.cfg.teacher_replicas or max(gpus, 1)
            per_gpu = min(1.0, gpus / n) if gpus else 0
            # num_cpus=0: the model mostly waits on the GPU (or is the one CPU job among the workers'), and a
            # reserved CPU would leave a local 2-core job with one worker
            spare = max(1, (local_cores() - self.workers) // n) if self.started else 1
            actor = ray.remote(TeacherReplica).options(num_cpus=0, num_gpus=per_gpu, max_restarts=2,
                                                       max_task_retries=2)
            self.replicas = [actor.remote(teacher_resolved, self.cfg.teacher_batch, spare, self.cfg.teacher_output)
                             for _ in range(n)]
            try:
                self.teacher_info = ray.get([a.info.remote() for a in self.replicas])[0]
            except RayError as exc:
                raise PipelineError(f"the teacher {teacher_resolved} could not be loaded: {exc}") from exc
            log.info("teacher %s: %d replica(s) on %s, %s", self.teacher_info.get("model"), n,
                     self.teacher_info.get("device"), self.teacher_info.get("dtype"))
        try:
            ray.get(warm)
        except RayTaskError as exc:
            raise PipelineError(f"the Ray workers cannot set up the job ({exc.cause!r}); on a cluster every node "
                                "needs this project: shipped by --runtime-env full|code, or installed in the "
                                "nodes' image (then --runtime-env off)") from exc
        return self.teacher_info

    def run_shards(self, process_shard: Callable, shards: list[list], todo: list[int],
                   out_dir: str) -> Iterator[tuple[int, dict | ShardLost]]:
        """Run process_shard(cfg, i, shards[i], replica, teacher_info, out_dir) for each i in todo, at most
        `workers` at a time (shard i uses replica i mod R); yield (i, the sidecar rows it returns) as each
        finishes, or (i, ShardLost) when its worker died. A shard task that raises stops the job."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        remote = ray.remote(process_shard).options(num_cpus=1, max_retries=3)
        self.progress = Progress(self.cfg.progress, sum(len(shards[i]) for i in todo), self.cfg.log_every_s)
        queue, in_flight = list(todo), {}
        while queue or in_flight:
            while queue and len(in_flight) < self.workers:
                i = queue.pop(0)
                replica = self.replicas[i % len(self.replicas)] if self.replicas else None
                in_flight[remote.remote(self.cfg, i, shards[i], replica, self.teacher_info, out_dir)] = i
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=min(self.cfg.log_every_s, 1.0))
            self.progress.tick()
            for ref in ready:
                i = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as exc:  # the shard itself failed (disk full, a bug): stop, say why
                    for r in in_flight:
                        ray.cancel(r, force=True)
                    cause = exc.cause if getattr(exc, "cause", None) else exc
                    raise PipelineError(f"shard {shard_name(self.cfg.source, i)} failed: "
                                        f"{type(cause).__name__}: {cause}") from exc
                except RayError as exc:  # the worker died even after retries
                    result = ShardLost(exc)
                yield i, result
                self.progress.update(len(shards[i]))
