"""The shard tasks in this process, without Ray: `datagen run --executor local` (or `--workers 0`).

The same shard task (pipeline.process_shard) for each unfinished shard, in order, and the same teacher code
(DepthTeacher, on the GPU when there is one, or the oracle inside the task) loaded once in this process, so
the bytes are the same as on Ray; resume, the lock, the tables and the failure rows are pipeline.run's, as
for Ray. For a notebook or a debugger, a single-GPU workstation, a SLURM array task, and a machine without
Ray (the GPU check on a lent machine). Never imports ray.

As a Ray replica does, the teacher works on the next chunk of images (on a thread of its own) while the shard
task does the geometry of the previous one; one shard task runs at a time.

A teacher on the CPU runs on one torch thread while the job runs (the process's setting is restored after):
on a CPU the model's output depends in its last bits on the number of threads, and one is what a Ray replica
gets beside a full set of workers (the default), so both executors write the same bytes, on any machine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from datagen.job.executor import Progress
from datagen.job.settings import PipelineError, RunConfig
from datagen.job.shard_files import shard_name
from datagen.sample import StageError
from datagen.teachers.runner import ORACLE, OracleTeacher, TeacherFeed, accelerated, make_teacher

log = logging.getLogger("datagen")


class InProcessTeacher:
    """The teacher in this process, asked the way a Ray replica is (ray_runner.TeacherReplica): a chunk at a
    time, through the shard task's TeacherFeed. The model runs on one thread of its own, so requests are
    served one after the other, in the order they were made, as an actor serves them."""

    def __init__(self, spec: str, batch_size: int, output: str | None):
        self.teacher = make_teacher(spec, batch_size=batch_size, output=output)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datagen-teacher")

    def info(self) -> dict:
        return self.teacher.info()

    def request(self, feed: TeacherFeed, images: list) -> LocalRequest:
        return LocalRequest(self, feed, images)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class LocalRequest:
    """The maps of one chunk of images, asked now and collected later: ray_runner.TeacherRequest in this
    process, with the same answers (a failed batch is retried one image at a time, an image the model rejects
    gets a StageError in its slot and the others still get their map)."""

    def __init__(self, teacher: InProcessTeacher, feed: TeacherFeed, images: list):
        self.teacher, self.feed = teacher, feed
        self.packed = feed.pack(images)
        self.future = teacher.pool.submit(teacher.teacher.run, self.packed)

    def maps(self) -> list:
        try:
            answer = self.future.result()
        except Exception:  # noqa: BLE001 (as a failed replica call: find the image the model rejects)
            results = []
            for i in range(len(self.packed.sizes)):
                alone = self.packed.only(i)
                try:
                    one = self.teacher.pool.submit(self.teacher.teacher.run, alone).result()
                except Exception as exc:  # noqa: BLE001
                    lines = str(exc).splitlines() or [""]
                    results.append(StageError("teacher", f"{type(exc).__name__}: {lines[-1]}"))
                    continue
                results += self.feed.unpack(alone, one)[i:i + 1]
        else:
            results = self.feed.unpack(self.packed, answer)
        return [StageError("teacher", str(r)) if isinstance(r, Exception) and not isinstance(r, StageError) else r
                for r in results]


class LocalRunner:
    """One job's shard tasks in this process, one at a time. A context manager: on leaving, the teacher's
    thread is stopped and the model dropped."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.workers = 1
        if cfg.workers is not None and cfg.workers > 1:
            log.warning("--workers %d: the local executor runs one shard task at a time, in this process",
                        cfg.workers)
        if cfg.teacher_replicas is not None and cfg.teacher_replicas > 1:
            log.warning("--teacher-replicas %d: the local executor loads one teacher, in this process",
                        cfg.teacher_replicas)
        self.teacher: InProcessTeacher | None = None
        self.teacher_info: dict = {}
        self.progress: Progress | None = None
        self.torch_threads: int | None = None  # the process's setting, restored on leaving

    def __enter__(self) -> LocalRunner:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.teacher is not None:
            self.teacher.close()
            self.teacher = None
        if self.torch_threads is not None:
            import torch

            torch.set_num_threads(self.torch_threads)
            self.torch_threads = None

    def start(self, teacher_resolved: str, warm_up: Callable[[RunConfig], int], n_tasks: int) -> dict:
        """Warm this process up (imports, the casters' compilation) and load the teacher once; returns its
        info. Load errors surface here, before any shard."""
        warm_up(self.cfg)
        if self.cfg.teacher == ORACLE:  # the oracle runs in the shard task itself, as on Ray
            self.teacher_info = OracleTeacher().info()
            return self.teacher_info
        try:
            self.teacher = InProcessTeacher(teacher_resolved, self.cfg.teacher_batch, self.cfg.teacher_output)
        except Exception as exc:  # noqa: BLE001 (as a replica that cannot load: say why and stop)
            raise PipelineError(f"the teacher {teacher_resolved} could not be loaded: "
                                f"{type(exc).__name__}: {exc}") from exc
        self.teacher_info = self.teacher.info()
        if not accelerated(self.teacher_info["device"]):
            import torch

            self.torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)  # a replica's thread count, and bytes that do not depend on the machine
        log.info("teacher %s: in this process on %s, %s", self.teacher_info.get("model"),
                 self.teacher_info.get("device"), self.teacher_info.get("dtype"))
        return self.teacher_info

    def run_shards(self, process_shard: Callable, shards: list[list], todo: list[int],
                   out_dir: str) -> Iterator[tuple[int, dict]]:
        """Run process_shard(cfg, i, shards[i], teacher, teacher_info, out_dir) for each i in todo, in order;
        yield (i, the sidecar rows it returns). A shard task that raises stops the job, as on Ray."""
        self.progress = Progress(self.cfg.progress, sum(len(shards[i]) for i in todo), self.cfg.log_every_s)
        for i in todo:
            try:
                rows = process_shard(self.cfg, i, shards[i], self.teacher, self.teacher_info, out_dir)
            except Exception as exc:  # noqa: BLE001 (the shard itself failed: disk full, a bug; stop, say why)
                raise PipelineError(f"shard {shard_name(self.cfg.source, i)} failed: "
                                    f"{type(exc).__name__}: {exc}") from exc
            yield i, rows
            self.progress.update(len(shards[i]))
