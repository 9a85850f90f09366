"""The datagen job: a source's inputs -> shards of samples, resumable, one task per shard.

    run(cfg)          check the job (prepare), lock the output folder, skip the finished shards, run the
                      others on Ray (ray_runner) or in this process (local_runner; executor.py picks), rebuild
                      the manifest and failures tables (shard_files)
    process_shard     one shard task: load its inputs a chunk at a time, get their teacher maps, turn
                      each into a sample (sample.make_sample) and stream the samples into the shard's tar

Shard i holds inputs [i * S, (i + 1) * S) of the sorted input list, so a rerun knows which inputs each
shard holds and which shards are finished. How and why: docs/pipeline.md ("Resume", "Design").
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from datagen.job.executor import EXECUTORS, ShardLost, open_runner
from datagen.job.local_runner import InProcessTeacher
from datagen.job.lock import LockBusy, job_lock
from datagen.job.runtime_env import MODES as RUNTIME_ENV_MODES
from datagen.job.settings import ConfigError, PipelineError, RunConfig, fingerprint_in
from datagen.job.shard_files import (
    FAILURES,
    MANIFEST,
    ShardOutput,
    failure_row,
    manifest_row,
    remove_partial_files,
    shard_finished,
    shard_name,
    tables_available,
    write_tables,
)
from datagen.sample import StageError, downscale, is_labelled, make_sample, stage
from datagen.sources import get_source
from datagen.sources.base import InputError
from datagen.teachers.runner import (
    DEFAULT_TEACHER,
    ORACLE,
    OracleTeacher,
    TeacherFeed,
    resolve_teacher,
    teacher_profile,
)
from datagen.teachers.zoo import TeacherOutputUnknown, license_line
from datagen.world.scenes import render_scene
from shared import storage
from shared.camera import make_K
from shared.scan.lidar import simulate_sparse_depth
from shared.shard import encode_sample

log = logging.getLogger("datagen")

JOB_FILE = "job.json"


@dataclass
class RunSummary:
    out_dir: str
    inputs: int = 0
    shards: int = 0
    done: int = 0  # samples written by this run
    skipped: int = 0  # inputs of shards finished by an earlier run
    failed: int = 0  # inputs that failed in this run
    samples_total: int = 0  # rows of manifest.parquet
    failures_total: int = 0  # rows of failures.parquet
    failed_by_stage: dict = field(default_factory=dict)
    seconds: float = 0.0  # processing time (Ray and teacher start-up excluded)
    wall_s: float = 0.0  # the whole command
    workers: int = 0
    teacher: str = ""
    executor: str = "ray"
    tables_written: bool = True  # False: pyarrow is missing, the rows are only in the sidecars

    @property
    def images_per_s(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def count_failures(self, stages) -> None:
        for s in stages:
            self.failed += 1
            self.failed_by_stage[s] = self.failed_by_stage.get(s, 0) + 1

    def format(self) -> str:
        stages = ", ".join(f"{k} {v}" for k, v in sorted(self.failed_by_stage.items()))
        return (f"done {self.done}, skipped {self.skipped}, failed {self.failed}"
                + (f" ({stages})" if stages else "")
                + f"; {self.images_per_s:.2f} images/s over {self.seconds:.1f} s ({self.wall_s:.1f} s in all), "
                + (f"{self.workers} workers" if self.executor == "ray" else "in this process (--executor local)")
                + f", teacher {self.teacher}\n"
                f"{self.out_dir}: {self.shards} shards, {MANIFEST} {self.samples_total} rows, "
                f"{FAILURES} {self.failures_total} rows"
                + ("" if self.tables_written else " (not written: pyarrow is not installed; the rows are in the "
                   "*.rows.json sidecars)"))


# ---------------------------------------------------------------------------------------------------------
# The shard task (a Ray task, or a call in this process with --executor local)

_SOURCES: dict = {}  # per worker process: a source is built once, not once per shard


def cached_source(cfg: RunConfig):
    key = json.dumps([cfg.source, cfg.root, cfg.intrinsics, cfg.source_options], sort_keys=True)
    if key not in _SOURCES:
        _SOURCES[key] = get_source(cfg.source, cfg.root, intrinsics=cfg.intrinsics, **cfg.source_options)
    return _SOURCES[key]


def load_records(source, items: list, max_size: int | None, shard: ShardOutput) -> list[tuple]:
    """(item, record) of the inputs that load; the others become failure rows of the shard."""
    loaded = []
    for item in items:
        try:
            loaded.append((item, downscale(source.load(item), max_size)))
        except InputError as exc:
            shard.fail(item, "load", str(exc))
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 (a reader bug on one odd file must not stop the job)
            shard.fail(item, "load", f"{type(exc).__name__}: {exc}")
    return loaded


def teacher_request(teacher, feed: TeacherFeed, images: list):
    """Ask `teacher` for the maps of a chunk of images now; the answer's maps() collects them later.
    teacher: a replica (a Ray actor, ray_runner) or the teacher in this process (local_runner)."""
    if isinstance(teacher, InProcessTeacher):
        return teacher.request(feed, images)
    from datagen.job.ray_runner import TeacherRequest

    return TeacherRequest(teacher, feed, images)


def write_samples(shard: ShardOutput, loaded: list[tuple], request, cfg: RunConfig,
                  native_K: bool, teacher_info: dict) -> None:
    """Turn each loaded input and its teacher map into a sample in the shard, or a failure row."""
    # without a replica (the oracle) make_sample makes each map from the synthetic world's true depth
    maps = request.maps() if request is not None else [None] * len(loaded)
    for (item, record), teacher in zip(loaded, maps, strict=True):
        try:
            sample = make_sample(record, teacher, cfg, native_K, teacher_info)
            with stage("encode"):
                members = encode_sample(sample, cfg.rgb_format)
        except StageError as exc:
            shard.fail(item, exc.stage, exc.error)
            continue
        lidar = None if is_labelled(record) else cfg.scan.lidar
        shard.write(members, manifest_row(item, shard.name, sample, members, teacher_info.get("model"), lidar))


def process_shard(cfg: RunConfig, index: int, items: list, teacher, teacher_info: dict, out_dir: str) -> dict:
    """Turn one shard's inputs into `<source>-NNNNNN.tar` + its sidecar; return the sidecar's rows.

    `teacher` is a teacher replica (a Ray actor), the teacher in this process (--executor local) or None for
    the oracle. The inputs go in chunks of
    --teacher-batch: the replica works on chunk k + 1 while this task does the geometry of chunk k, and no
    more than two chunks are in memory. A failure of one input becomes a failure row; an error of the shard
    itself (the disk, the teacher gone) propagates.
    """
    source = cached_source(cfg)
    native_K = source.intrinsics == "native"
    feed = TeacherFeed(teacher_info, cfg.teacher_batch) if teacher is not None else None
    batch = max(1, int(cfg.teacher_batch))
    with ShardOutput(out_dir, shard_name(cfg.source, index), cfg.rgb_format) as shard:
        pending = None  # the previous chunk: (its loaded inputs, its teacher request or None for the oracle)
        for start in range(0, len(items), batch):
            loaded = load_records(source, items[start:start + batch], cfg.max_size, shard)
            # the replica starts on this chunk while the task finishes the previous one
            request = teacher_request(teacher, feed, [r.rgb for _, r in loaded]) if feed is not None and loaded else None
            if pending is not None:
                write_samples(shard, *pending, cfg, native_K, teacher_info)
            pending = (loaded, request)
        if pending is not None:
            write_samples(shard, *pending, cfg, native_K, teacher_info)
        return shard.finish(items)


def warm_up(cfg: RunConfig) -> int:
    """Import and initialise what a shard task needs (the reader, the casters, the synthetic world) once per
    worker process while the teacher loads, so the first shards do not pay for it and images/s means the
    steady rate. Best effort: a real error shows up in the shard that meets it."""
    cached_source(cfg)
    try:  # a 32 x 32 wall 5 m away, through the job's own LiDAR and mesh settings
        if cfg.source == "synthetic":
            render_scene(0, family="street", width=32, height=32)
            OracleTeacher().predict_from_depth(np.full((32, 32), 5.0, np.float32), np.random.default_rng(0))
        mount = "none" if cfg.scan.mount == "none" else "kitti"  # an offset mount compiles the hidden layer too
        simulate_sparse_depth(np.full((32, 32), 5.0, np.float32), make_K(30.0, 30.0, 15.5, 15.5),
                              np.random.default_rng(0), replace(cfg.scan, mount=mount),
                              rgb=np.zeros((32, 32, 3), np.uint8))
    except Exception:  # noqa: BLE001
        pass
    return os.getpid()


# ---------------------------------------------------------------------------------------------------------
# The job


def prepare(cfg: RunConfig) -> tuple[RunConfig, list, str, dict]:
    """Everything that must fail fast, before Ray starts: source layout, items, teacher (its weights, the kind
    of map it gives, its licence), the executor. The scan's settings were checked when cfg.scan was made
    (ScanSpec).

    Returns the settings with the executor, the teacher, its output kind and the source options filled in,
    the input items, the teacher to load (a folder path or hub id, see resolve_teacher) and its profile
    (teacher_profile)."""
    if cfg.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {cfg.shard_size}")
    cfg = replace(cfg, executor=_checked_executor(cfg))
    out = _checked_out(cfg)
    source_options = {k: v for k, v in cfg.source_options.items() if v is not None}
    if cfg.source == "synthetic":
        source_options.setdefault("seed", cfg.seed)  # --seed S also gives a new synthetic world
    options = dict(source_options)
    if cfg.source == "synthetic" and cfg.limit is not None and "count" not in options:
        options["count"] = cfg.limit  # --limit N for synthetic means N scenes: do not list more
    try:
        source = get_source(cfg.source, cfg.root, intrinsics=cfg.intrinsics, **options)
    except (ValueError, KeyError) as exc:
        raise ConfigError(str(exc.args[0] if exc.args else exc)) from exc
    source.check_layout()  # LayoutError: the CLI prints it and exits 2
    teacher = cfg.teacher or (ORACLE if cfg.source == "synthetic" else DEFAULT_TEACHER)
    if teacher == ORACLE and cfg.source != "synthetic":
        raise ConfigError("--teacher oracle needs true depth: it only works with --source synthetic")
    resolved = resolve_teacher(teacher)  # TeacherUnavailable, before any work
    if cfg.metric_scale_jitter < 0:
        raise ConfigError(f"--metric-scale-jitter must be >= 0, got {cfg.metric_scale_jitter}")
    if teacher == ORACLE and cfg.teacher_output not in (None, "disparity"):
        raise ConfigError(f"--teacher-output {cfg.teacher_output}: the oracle teacher gives disparity")
    try:
        profile = teacher_profile(resolved, None if teacher == ORACLE else cfg.teacher_output)
    except TeacherOutputUnknown as exc:
        raise ConfigError(f"teacher {teacher}: {exc}") from exc
    # the kind in use, however it was decided (the model's config, datagen's table or --teacher-output)
    cfg = replace(cfg, source_options=source_options, teacher=teacher, teacher_output=profile["output"], out=out)
    items = source.items()
    if cfg.limit is not None:
        items = items[:cfg.limit]
    dup = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if dup:
        raise ConfigError(f"source {cfg.source} gave duplicate keys, e.g. {dup[0]}")
    return cfg, items, resolved, profile


def _checked_executor(cfg: RunConfig) -> str:
    """ray or local. --workers 0 means no Ray workers: the shards run in this process (--executor local)."""
    if cfg.workers is not None and cfg.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.executor is not None and cfg.executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {cfg.executor!r}")
    executor = cfg.executor or ("local" if cfg.workers == 0 else "ray")
    if executor == "ray" and cfg.workers == 0:
        raise ConfigError("--workers 0 runs the shards in this process, without Ray (--executor local); "
                          "with --executor ray give --workers N >= 1, or leave it out (every core)")
    if executor == "local" and cfg.address:
        raise ConfigError(f"--address {cfg.address} joins a Ray cluster, --executor local runs in this process "
                          "without Ray: use one or the other")
    return executor


def _checked_out(cfg: RunConfig) -> str:
    """--out as a local folder or a checked object-store URL (a URL never becomes a local path); --runtime-env
    a known mode. --root is checked by the source (only some read object storage)."""
    if cfg.runtime_env not in RUNTIME_ENV_MODES:
        raise ConfigError(f"--runtime-env must be one of {', '.join(RUNTIME_ENV_MODES)}, got {cfg.runtime_env!r}")
    try:
        return storage.check(cfg.out, "--out")
    except storage.StorageError as exc:
        raise ConfigError(str(exc)) from exc


def check_job_file(out_dir: str | Path, cfg: RunConfig, about: dict | None = None) -> None:
    """Refuse an output folder whose shards were made with other settings of the bytes; write job.json: our
    fingerprint plus `about` (facts that do not change the bytes, such as the teacher's licence: not compared)."""
    path, fingerprint = storage.join(out_dir, JOB_FILE), cfg.fingerprint()
    if storage.is_file(path):
        try:
            old = fingerprint_in(json.loads(storage.read_bytes(path)))
        except ValueError:
            old = None
        if old is not None and old != fingerprint:
            diff = ", ".join(f"{k}: {old.get(k)!r} before, {v!r} now" for k, v in fingerprint.items()
                             if old.get(k) != v)
            raise PipelineError(f"{out_dir} holds shards made with other settings ({diff}); "
                                "use another --out or remove that folder")
    storage.write_bytes(path, json.dumps({**fingerprint, **(about or {})}, indent=1, sort_keys=True).encode())


def run(cfg: RunConfig) -> RunSummary:
    """Run (or resume) the job described by cfg."""
    t_start = time.monotonic()
    cfg, items, teacher_resolved, profile = prepare(cfg)
    lic = profile["license"]
    (log.warning if lic["non_commercial"] else log.info)("%s", license_line(cfg.teacher, lic))
    out_dir = storage.join(cfg.out, cfg.source)  # a local folder or an object-store URL (prepare checked it)
    try:
        storage.makedirs(out_dir)
    except OSError as exc:
        raise PipelineError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from exc
    except storage.StorageError as exc:
        raise PipelineError(str(exc)) from exc
    about = {"teacher_about": {k: profile[k] for k in ("model_type", "output", "output_source", "license")}}
    try:
        with job_lock(out_dir):  # datagen/job/lock.py: fcntl on a local folder, a lease on an object store
            return _run_locked(cfg, items, teacher_resolved, out_dir, t_start, about)
    except LockBusy as exc:
        raise PipelineError(str(exc)) from exc
    except OSError as exc:  # the driver's own files (job.json, the tables): disk full, permissions
        raise PipelineError(f"cannot write to {out_dir}: {exc}") from exc


def _run_locked(cfg: RunConfig, items: list, teacher_resolved: str, out_dir: str, t_start: float,
                about: dict) -> RunSummary:
    check_job_file(out_dir, cfg, about)
    removed = remove_partial_files(out_dir)
    if removed:
        log.info("removed %d partial file(s) left by an interrupted run", removed)
    S = cfg.shard_size
    shards = [items[i:i + S] for i in range(0, len(items), S)]
    names = [shard_name(cfg.source, i) for i in range(len(shards))]
    # only whether each shard is finished is kept: rows stay on disk (a big job's manifest is big)
    finished = [shard_finished(out_dir, names[i], [it.key for it in shards[i]]) is not None
                for i in range(len(shards))]
    todo = [i for i, done in enumerate(finished) if not done]
    summary = RunSummary(out_dir=str(out_dir), inputs=len(items), shards=len(shards), teacher=cfg.teacher,
                         executor=cfg.executor)
    summary.skipped = sum(len(shards[i]) for i, done in enumerate(finished) if done)
    ours = {f"{n}.tar" for n in names}
    stale = [n for n in storage.listdir(out_dir) if n.startswith(f"{cfg.source}-") and n.endswith(".tar")
             and n not in ours]
    if stale:
        log.warning("%d shard(s) in %s are not part of this job (an earlier run with a larger --limit?), e.g. %s; "
                    "they are left alone and not in the manifest", len(stale), out_dir, stale[0])
    if todo:
        log.info("%d inputs in %d shards: %d to do, %d already finished", len(items), len(shards), len(todo),
                 len(shards) - len(todo))
        crashed = _run_shards(cfg, shards, todo, finished, teacher_resolved, out_dir, summary)
        remove_partial_files(out_dir)  # left by workers that died mid-shard (their task was retried)
    else:
        crashed = []
    summary.samples_total, summary.failures_total = write_tables(out_dir, finished, cfg.source, crashed)
    summary.tables_written = tables_available()
    if not summary.tables_written:
        log.warning("pyarrow is not installed: %s and %s are not written (the rows are in the *.rows.json "
                    "sidecars; the same command run where pyarrow is installed writes both)", MANIFEST, FAILURES)
    summary.wall_s = time.monotonic() - t_start
    return summary


def _run_shards(cfg: RunConfig, shards: list[list], todo: list[int], finished: list[bool], teacher_resolved: str,
                out_dir: str, summary: RunSummary) -> list[dict]:
    """Run the unfinished shards on Ray or in this process (cfg.executor); fills `finished` and `summary`,
    returns the failure rows of the inputs of shards whose worker died (a rerun retries them: they have no
    sidecar)."""
    crashed = []
    with open_runner(cfg) as runner:
        summary.workers = runner.workers
        runner.start(teacher_resolved, warm_up, n_tasks=len(todo))
        t0 = time.monotonic()
        for i, rows in runner.run_shards(process_shard, shards, todo, out_dir):
            name = shard_name(cfg.source, i)
            if isinstance(rows, ShardLost):
                log.warning("shard %s lost (%s); its inputs go to %s, a rerun retries them", name, rows.kind, FAILURES)
                crashed += [failure_row(it, name, "worker", rows.error) for it in shards[i]]
                summary.count_failures(["worker"] * len(shards[i]))
                continue
            if rows["samples"] and not storage.is_file(storage.join(out_dir, f"{name}.tar")):
                raise PipelineError(f"shard {name} was written by a worker but is not in {out_dir} "
                                    "on this machine: on a cluster --out must be a folder every node shares")
            finished[i] = True
            summary.done += rows["samples"]
            summary.count_failures(f["stage"] for f in rows["failures"])
        summary.seconds = time.monotonic() - t0
    return crashed
