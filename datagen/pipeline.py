"""The datagen job: source -> teacher -> depth -> K -> simulated LiDAR -> shards, on Ray, resumable.

The only module that imports ray. The design is one Ray task per shard:

- The sorted input list is cut into shards of `shard_size` inputs: shard i holds inputs
  [i * S, (i + 1) * S). The assignment depends on nothing but the list, so a rerun knows exactly which
  inputs each shard holds and which shards are already finished.
- A shard task (one CPU) loads its inputs a chunk at a time, sends each chunk to a teacher replica (a Ray
  actor holding the model, batched, one per GPU; the oracle runs in the task itself), turns disparity
  into depth, draws K, simulates the LiDAR and streams the samples into a ShardWriter. Only two chunks
  are alive per task, so memory does not grow with the shard size, and the teacher works on chunk k + 1
  while the task does geometry on chunk k.
- Before the tar gets its final name the task writes a sidecar `<shard>.rows.json` (atomically) with the
  manifest rows and failure rows of its inputs. A shard is finished iff its sidecar exists and, when it
  holds samples, its tar exists: a kill at any moment leaves finished shards and files that a rerun
  removes (`*.tmp-*`) or rewrites.
- The driver keeps at most `workers` shard tasks in flight (backpressure: peak memory is set by the
  workers, not by the number of inputs) and, at the end, rebuilds manifest.parquet and failures.parquet
  from the sidecars, so they describe exactly the shards on disk.

Each sample draws its randomness from a seed made of (--seed, key), so the bytes of a shard depend neither
on scheduling, nor on the number of workers, nor on resumption.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from datagen.job_lock import LockBusy, job_lock
from shared import storage
from shared.shard import Sample, encode_sample

log = logging.getLogger("datagen")

MANIFEST = "manifest.parquet"
FAILURES = "failures.parquet"
JOB_FILE = "job.json"
ROWS_SUFFIX = ".rows.json"
# settings that change the bytes of a shard: a rerun into the same folder must use the same ones
FINGERPRINT_FIELDS = ("source", "teacher", "seed", "shard_size", "lidar", "mesh", "occlusion", "mount",
                      "lidar_noise_m", "lidar_dropout", "intrinsics", "max_size", "rgb_format", "source_options",
                      "hidden_geometry", "sensor", "teacher_output", "metric_scale_jitter")
# what a job.json written before a field existed meant by its absence (only disparity teachers existed then)
FINGERPRINT_DEFAULTS = {"teacher_output": "disparity", "metric_scale_jitter": 0.0}
MANIFEST_COLUMNS = ("key", "shard", "source_path", "width", "height", "K", "teacher", "lidar", "points", "bytes")
FAILURE_COLUMNS = ("key", "shard", "source_path", "stage", "error")


class PipelineError(RuntimeError):
    """The job cannot start or cannot go on; the message says why (the CLI prints it without a traceback)."""


class ConfigError(PipelineError):
    """The arguments do not describe a job (unknown source or option, oracle on real images, ...)."""


@dataclass
class RunConfig:
    source: str = "synthetic"
    out: str = "shards"
    root: str | None = None
    workers: int | None = None  # None: every local core (or every CPU of the cluster)
    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray
    teacher: str | None = None  # None: oracle for synthetic, DEFAULT_TEACHER otherwise
    teacher_replicas: int | None = None  # None: one per GPU, or 1
    teacher_batch: int = 8
    teacher_output: str | None = None  # None: from the model's config or datagen's table (disparity|depth|metric)
    metric_scale_jitter: float = 0.0  # metric teachers: a global scale per image in [1/(1+j), 1+j]; 0 = off
    limit: int | None = None
    seed: int = 0
    shard_size: int = 128
    lidar: str = "hdl64"
    mesh: str = "grid"
    occlusion: str = "none"
    mount: str | None = "random"  # random: a rig drawn per sample (parallax as on real cars); none; kitti
    lidar_noise_m: float = 0.0  # Gaussian range noise (> 0: replaces the sensor's own)
    lidar_dropout: float = 0.0  # fraction of returns dropped (> 0: replaces the sensor's own)
    hidden_geometry: bool | None = None  # background behind occluding edges; None: on for offset mounts
    sensor: str = "ideal"  # sensor effects: ideal, realistic, PRESET:key=value,... or a .json (datagen.sensor)
    intrinsics: str = "random"
    max_size: int | None = 1280  # longest image side; larger unlabelled inputs are downscaled (K follows)
    rgb_format: str = "jpg"
    source_options: dict = field(default_factory=dict)  # family, width, height, labelled, gt, splits, ...
    progress: str = "auto"  # auto (a bar on a terminal, log lines otherwise) | bar | log | none
    log_every_s: float = 10.0
    ray_log_to_driver: bool = False  # worker stdout/stderr stay in the Ray session logs unless asked for
    runtime_env: str = "auto"  # code shipped to a cluster: auto|full|code|off (datagen/runtime_env.py)


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

    @property
    def images_per_s(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        stages = ", ".join(f"{k} {v}" for k, v in sorted(self.failed_by_stage.items()))
        return (f"done {self.done}, skipped {self.skipped}, failed {self.failed}"
                + (f" ({stages})" if stages else "")
                + f"; {self.images_per_s:.2f} images/s over {self.seconds:.1f} s ({self.wall_s:.1f} s in all), "
                f"{self.workers} workers, teacher {self.teacher}\n"
                f"{self.out_dir}: {self.shards} shards, {MANIFEST} {self.samples_total} rows, "
                f"{FAILURES} {self.failures_total} rows")


# ---------------------------------------------------------------------------------------------------------
# One sample: functions of (record, disparity, settings, seed) only; they run inside the shard tasks.


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (--seed, key): the same whatever the order, worker or run."""
    digest = hashlib.sha256(f"dmd3c/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_rngs(seed: int) -> dict[str, np.random.Generator]:
    # one stream per stage, so that e.g. another LiDAR preset does not change the sampled K
    children = np.random.SeedSequence(seed).spawn(4)
    return dict(zip(("teacher", "depth", "intrinsics", "lidar"), map(np.random.default_rng, children), strict=True))


def is_labelled(record) -> bool:
    return record.sparse is not None or record.gt is not None


def downscale(record, max_size: int | None):
    """Shrink an unlabelled record whose longest side exceeds max_size; K and the true depth follow.

    Labelled records keep their size: resampling a real scan or GT would invent or drop points.
    """
    h, w = record.rgb.shape[:2]
    if max_size is None or max(h, w) <= max_size or is_labelled(record):
        return record
    from PIL import Image

    from datagen.camera import resize_image_and_K, scale_K

    s = max_size / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    # antialiased; the reducing gap lets a 9000 x 6000 input take a cheap box pre-shrink first
    img = Image.fromarray(record.rgb).resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    record.rgb = np.ascontiguousarray(np.asarray(img))
    if record.K is not None:
        record.K = scale_K(record.K, nw / w, nh / h)
    if record.true_depth is not None:
        record.true_depth, _ = resize_image_and_K(record.true_depth, np.eye(3), nw, nh, nearest=True)
    if record.true_object_id is not None:
        record.true_object_id, _ = resize_image_and_K(record.true_object_id, np.eye(3), nw, nh, nearest=True)
    record.meta = {**record.meta, "resized_from": [w, h]}
    return record


SCENE_OF_FAMILY = {"street": "outdoor", "room": "indoor", "nature": "outdoor", "tabletop": "indoor"}  # synthetic


def scene_hint(record) -> str:
    """The depth range family for disparity_to_depth: what the source says (outdoor/indoor), else any."""
    from datagen.disparity import DEPTH_RANGES

    scene = record.meta.get("scene") or SCENE_OF_FAMILY.get(record.meta.get("family"))
    return scene if scene in DEPTH_RANGES else "any"


class StageError(Exception):
    """An input failed at one stage; becomes a row of failures.parquet."""

    def __init__(self, stage: str, error: BaseException | str):
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        super().__init__(text)
        self.stage, self.error = stage, text


def _stage(name: str, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 (one bad input must never stop the job; the row keeps the reason)
        raise StageError(name, exc) from exc


def build_sample(record, disparity: np.ndarray, cfg: dict, seed: int, rngs: dict, teacher_info: dict) -> Sample:
    """Everything after the teacher: depth, K and simulated LiDAR (unlabelled), or the labelled sample."""
    meta = {"source": record.source, "source_path": record.source_path, **record.meta,
            "teacher": {**{k: teacher_info.get(k) for k in ("model", "revision", "dtype")},
                        "output": teacher_info.get("output", "disparity"), **teacher_info.get("per_image", {})}}
    h, w = record.rgb.shape[:2]
    if disparity is None or disparity.shape != (h, w):
        raise StageError("teacher", f"teacher map has shape {getattr(disparity, 'shape', None)}, image is {(h, w)}")
    if is_labelled(record):
        if record.K is None:
            raise StageError("intrinsics", "labelled record without intrinsics")
        meta["intrinsics"] = "native"
        return Sample(record.key, record.rgb, record.K, teacher=disparity, sparse=record.sparse, gt=record.gt,
                      meta=meta)
    from datagen.camera import sample_intrinsics
    from datagen.lidar import simulate_sparse_depth
    from datagen.pseudo_depth import teacher_to_depth

    depth_m, depth_info = _stage("depth", teacher_to_depth, disparity, teacher_info.get("output", "disparity"),
                                 rngs["depth"], scene=scene_hint(record), ceiling_m=teacher_info.get("ceiling_m"),
                                 scale_jitter=cfg.get("metric_scale_jitter", 0.0))
    if cfg["native_K"] and record.K is not None:
        K, meta["intrinsics"] = record.K, "native"
    else:
        K, meta["intrinsics"] = _stage("intrinsics", sample_intrinsics, w, h, rngs["intrinsics"]), "random"
    lidar_kw = dict(pattern=cfg["lidar"], mesh=cfg["mesh"], occlusion=cfg["occlusion"],
                    noise_std_m=cfg["lidar_noise_m"] or None, dropout=cfg["lidar_dropout"] or None,
                    hidden=cfg.get("hidden_geometry"), sensor=cfg.get("sensor"), rgb=record.rgb)
    if cfg["mount"] not in (None, "none"):
        lidar_kw["mount"] = cfg["mount"]
    sparse, lidar_info = _stage("lidar", simulate_sparse_depth, depth_m, K, rngs["lidar"], **lidar_kw)
    meta["depth_range"] = depth_info
    meta["lidar"] = {**lidar_info, "preset": lidar_info.get("preset", cfg["lidar"]), "seed": seed}
    return Sample(record.key, record.rgb, K, teacher=disparity, depth=depth_m, sparse=sparse, meta=meta)


# ---------------------------------------------------------------------------------------------------------
# Files: shard names, sidecars, atomic writes, the finished-shard test.


def shard_name(source: str, index: int) -> str:
    return f"{source}-{index:06d}"


# Every file goes through shared.storage: out_dir is a local folder or an object-store URL (s3://...).


def read_sidecar(out_dir: str | Path, name: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(out_dir, f"{name}{ROWS_SUFFIX}")))
    except (OSError, ValueError):
        return None


def shard_finished(out_dir: str | Path, name: str, keys: list[str]) -> dict | None:
    """The sidecar of a finished shard holding exactly these input keys, or None (then it is redone)."""
    rows = read_sidecar(out_dir, name)
    if not rows or rows.get("keys") != keys:
        return None
    if rows.get("samples", 0) > 0 and not storage.is_file(storage.join(out_dir, f"{name}.tar")):
        return None  # killed between sidecar and rename
    return rows


def remove_partial_files(out_dir: str | Path) -> int:
    """Delete what killed shard tasks and drivers left (temporary files, unfinished uploads)."""
    return storage.remove_partial(out_dir)


def _arrow_schema(columns: tuple[str, ...]):
    import pyarrow as pa

    types = {"width": pa.int32(), "height": pa.int32(), "points": pa.int64(), "bytes": pa.int64(),
             "K": pa.list_(pa.float64())}
    return pa.schema([(c, types.get(c, pa.string())) for c in columns])


def write_tables(out_dir: str | Path, finished: list[bool], source: str, extra_failures: list[dict]) -> tuple[int, int]:
    """Rebuild manifest.parquet and failures.parquet from the sidecars of the finished shards, in shard order,
    plus `extra_failures` (the inputs of shards whose worker died).

    Streams: one sidecar at a time, written in row groups, so a job of millions of inputs does not hold
    its manifest in memory. Both files appear atomically. Returns the row counts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    targets = {"manifest": (MANIFEST, MANIFEST_COLUMNS), "failures": (FAILURES, FAILURE_COLUMNS)}
    writers, files, buffers, counts = {}, {}, {}, {}
    for kind, (fname, columns) in targets.items():
        files[kind] = storage.AtomicFile(storage.join(out_dir, fname))
        writers[kind] = pq.ParquetWriter(files[kind].file, _arrow_schema(columns))
        buffers[kind], counts[kind] = [], 0

    def flush(kind: str, force: bool = False) -> None:
        if buffers[kind] and (force or len(buffers[kind]) >= 65536):
            columns = targets[kind][1]
            rows = [{c: r.get(c) for c in columns} for r in buffers[kind]]
            writers[kind].write_table(pa.Table.from_pylist(rows, schema=_arrow_schema(columns)))
            buffers[kind].clear()

    try:
        for i, done in enumerate(finished):
            if not done:
                continue
            rows = read_sidecar(out_dir, shard_name(source, i))
            if rows is None:
                raise PipelineError(f"the rows of finished shard {shard_name(source, i)} cannot be read any more")
            for kind in targets:
                buffers[kind] += rows[kind]
                counts[kind] += len(rows[kind])
                flush(kind)
        buffers["failures"] += extra_failures
        counts["failures"] += len(extra_failures)
        for kind in targets:
            flush(kind, force=True)
            writers[kind].close()
            files[kind].commit()
            files[kind] = None
    finally:
        for f in files.values():
            if f is not None:
                f.abort()
    return counts["manifest"], counts["failures"]


# ---------------------------------------------------------------------------------------------------------
# The shard task (a Ray task; plain Python, so it also runs without Ray in a debugger).

_SOURCES: dict = {}  # per worker process: a source is built once, not once per shard


def _source(cfg: dict):
    from datagen.sources import get_source

    key = json.dumps([cfg["source"], cfg["root"], cfg["intrinsics"], cfg["source_options"]], sort_keys=True)
    if key not in _SOURCES:
        _SOURCES[key] = get_source(cfg["source"], cfg["root"], intrinsics=cfg["intrinsics"], **cfg["source_options"])
    return _SOURCES[key]


def teacher_maps(teacher, feed, packed, ref) -> list:
    """(map, per-image facts) for each image of one chunk from a teacher replica; an image that could not be
    prepared or that the model rejects becomes a StageError in its slot (a failed batch is retried one image
    at a time), the others still get their map. `feed` (a TeacherFeed) finishes what a CPU replica leaves."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        results = feed.unpack(packed, ray.get(ref))
    except RayTaskError:
        results = []
        for i in range(len(packed.sizes)):
            alone = packed.only(i)
            try:
                results += feed.unpack(alone, ray.get(teacher.run.remote(alone)))[i:i + 1]
            except RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) else exc
                results.append(StageError("teacher", f"{type(cause).__name__}: {str(cause).splitlines()[-1]}"))
    return [StageError("teacher", str(r)) if isinstance(r, Exception) and not isinstance(r, StageError) else r
            for r in results]


def warm_up(cfg: dict) -> int:
    """Import and initialise what a shard task needs (the reader, Open3D's ray casting, the synthetic world)
    once per worker process while the teacher loads, so the first shards do not pay for it (about 1 s) and
    images/s means the steady rate. Best effort: a real error shows up in the shard that meets it."""
    from datagen.camera import make_K
    from datagen.lidar import simulate_sparse_depth

    _source(cfg)
    try:  # a 32 x 32 wall 5 m away, through the job's own LiDAR and mesh settings
        if cfg["source"] == "synthetic":
            from datagen.synthetic import render_scene

            render_scene(0, family="street", width=32, height=32)
            from datagen.teacher import OracleTeacher

            OracleTeacher().predict_from_depth(np.full((32, 32), 5.0, np.float32), np.random.default_rng(0))
        simulate_sparse_depth(np.full((32, 32), 5.0, np.float32), make_K(30.0, 30.0, 15.5, 15.5),
                              np.random.default_rng(0), pattern=cfg["lidar"], mesh=cfg["mesh"],
                              mount=None if cfg["mount"] in (None, "none") else "kitti",  # compiles the casters
                              sensor=cfg.get("sensor"), rgb=np.zeros((32, 32, 3), np.uint8))
    except Exception:  # noqa: BLE001
        pass
    return os.getpid()


def process_shard(cfg: dict, index: int, items: list, teacher, teacher_info: dict, out_dir: str) -> dict:
    """Turn one shard's inputs into `<source>-NNNNNN.tar` + its sidecar; return the sidecar.

    `teacher` is an actor handle (batched Depth Anything) or None for the oracle. A failure of one input
    becomes a failure row; an error of the shard itself (the disk, the teacher actor gone) propagates.
    """
    from datagen.sources.base import InputError
    from shared.shard import ShardWriter

    name = shard_name(cfg["source"], index)
    source = _source(cfg)
    cfg = {**cfg, "native_K": source.intrinsics == "native"}
    writer: ShardWriter | None = None
    manifest, failures = [], []

    def fail(item, stage: str, error: str) -> None:
        failures.append({"key": item.key, "shard": name, "source_path": item.path, "stage": stage, "error": error})

    def load_chunk(chunk: list) -> list:
        loaded = []
        for item in chunk:
            try:
                record = source.load(item)
                loaded.append((item, downscale(record, cfg["max_size"])))
            except InputError as exc:
                fail(item, "load", str(exc))
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 (a reader bug on one odd file must not stop the job)
                fail(item, "load", f"{type(exc).__name__}: {exc}")
        return loaded

    def submit(loaded: list):  # the teacher starts on this chunk while the task finishes the previous one
        if teacher is None or not loaded:
            return None
        packed = feed.pack([r.rgb for _, r in loaded])  # resized (and normalised for a CPU model) here
        return packed, teacher.run.remote(packed)

    def finish(loaded: list, sent) -> None:
        nonlocal writer
        maps = [(None, {})] * len(loaded) if sent is None else teacher_maps(teacher, feed, *sent)
        for (item, record), result in zip(loaded, maps, strict=True):
            seed = sample_seed(cfg["seed"], item.key)
            rngs = sample_rngs(seed)
            try:
                if isinstance(result, StageError):
                    raise result
                disp, facts = result
                if disp is None:  # the oracle: a teacher-like map made from the synthetic world's true depth
                    if record.true_depth is None:
                        raise StageError("teacher", "the oracle teacher needs true depth (synthetic source only)")
                    disp = _stage("teacher", oracle.predict_from_depth, record.true_depth, rngs["teacher"],
                                  rgb=record.rgb, object_id=record.true_object_id, family=record.meta.get("family"))
                info = {**teacher_info, "per_image": facts} if facts else teacher_info
                sample = build_sample(record, disp, cfg, seed, rngs, info)
                members = _stage("encode", encode_sample, sample, cfg["rgb_format"])
            except StageError as exc:
                fail(item, exc.stage, exc.error)
                continue
            if writer is None:
                writer = ShardWriter(storage.join(out_dir, f"{name}.tar"), rgb_format=cfg["rgb_format"])
            writer.write(members)
            manifest.append({
                "key": item.key, "shard": f"{name}.tar", "source_path": item.path,
                "width": sample.width, "height": sample.height, "K": np.asarray(sample.K, float).ravel().tolist(),
                "teacher": teacher_info.get("model"), "lidar": None if is_labelled(record) else cfg["lidar"],
                "points": int(np.count_nonzero(sample.sparse)) if sample.sparse is not None else 0,
                "bytes": sum(len(v) for k, v in members.items() if not k.startswith("__")),
            })

    oracle = feed = None
    if teacher is None:
        from datagen.teacher import make_teacher

        oracle = make_teacher("oracle")
    else:
        from datagen.teacher import TeacherFeed

        feed = TeacherFeed(teacher_info, cfg["teacher_batch"])
    batch = max(1, int(cfg["teacher_batch"]))
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    try:
        pending = None
        for chunk in chunks:
            loaded = load_chunk(chunk)
            ref = submit(loaded)
            if pending is not None:
                finish(*pending)
            pending = (loaded, ref)
        if pending is not None:
            finish(*pending)
        order = {it.key: n for n, it in enumerate(items)}
        failures.sort(key=lambda r: order[r["key"]])  # input order, however the chunks fell
        rows = {"shard": name, "keys": [it.key for it in items], "samples": len(manifest),
                "manifest": manifest, "failures": failures}
        # the sidecar goes first: a tar under its final name always has its rows on disk
        storage.write_bytes(storage.join(out_dir, f"{name}{ROWS_SUFFIX}"), json.dumps(rows).encode())
        if writer is not None:
            writer.close()
            writer = None
        return rows
    finally:
        if writer is not None:
            writer.abort()


# ---------------------------------------------------------------------------------------------------------
# The driver.


def _teacher_actor_class():
    import ray

    class TeacherReplica:
        """One copy of the model. Shard tasks send it chunks already resized (and, for a CPU model, normalised)
        by their TeacherFeed; it transfers each batch once, runs the network and, on an accelerator,
        normalises and upsamples there too (DepthTeacher.run)."""

        def __init__(self, spec: str, batch_size: int, cpu_threads: int, output: str | None = None):
            import torch

            from datagen.teacher import make_teacher

            self.teacher = make_teacher(spec, batch_size=batch_size, output=output)
            if self.teacher.device == "cpu":
                # Ray gives a zero-CPU actor one thread; on a CPU-only machine the model may use the cores the
                # workers leave free, and no more (a spinning thread pool on busy cores costs 100x)
                torch.set_num_threads(cpu_threads)

        def info(self) -> dict:
            return self.teacher.info()

        def run(self, packed):
            return self.teacher.run(packed)

    return ray.remote(TeacherReplica)


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).is_file()


def _local_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def connect_ray(address: str | None, workers: int | None, log_to_driver: bool,
                ship: str = "auto") -> tuple[bool, int]:
    """Start a local Ray (loopback only) or join a cluster, shipping the code as `ship` says
    (datagen/runtime_env.py). Returns (we started it, workers to use)."""
    from datagen.runtime_env import describe, runtime_env

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
    import ray

    if ray.is_initialized():  # a caller (a test, a notebook) already connected: use that
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return False, max(1, min(workers or cpus, cpus) if address is None else (workers or cpus))
    cores = _local_cores()
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


def _fingerprint(cfg: RunConfig, teacher: str, teacher_output: str) -> dict:
    d = asdict(cfg)
    d["teacher"], d["teacher_output"] = teacher, teacher_output  # the kind in use, however it was decided
    # how many inputs is not a setting of the bytes (synthetic's count works like --limit)
    d["source_options"] = {k: v for k, v in sorted(d["source_options"].items()) if k != "count"}
    return json.loads(json.dumps({k: d[k] for k in FINGERPRINT_FIELDS}))


def _check_job_file(out_dir: str | Path, fingerprint: dict, about: dict | None = None) -> None:
    """Refuse an output folder made with other settings; write job.json: the fingerprint plus `about`
    (facts that do not change the bytes, such as the teacher's licence: not compared)."""
    path = storage.join(out_dir, JOB_FILE)
    if storage.is_file(path):
        try:
            old = json.loads(storage.read_bytes(path))
        except ValueError:
            old = None
        if old is not None:
            old = {k: old.get(k, FINGERPRINT_DEFAULTS.get(k)) for k in FINGERPRINT_FIELDS}
        if old is not None and old != fingerprint:
            diff = ", ".join(f"{k}: {old.get(k)!r} before, {fingerprint.get(k)!r} now"
                             for k in FINGERPRINT_FIELDS if old.get(k) != fingerprint.get(k))
            raise PipelineError(f"{out_dir} holds shards made with other settings ({diff}); "
                                "use another --out or remove that folder")
    storage.write_bytes(path, json.dumps({**fingerprint, **(about or {})}, indent=1, sort_keys=True).encode())


class _Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (or nothing)."""

    def __init__(self, mode: str, total: int, every_s: float):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.every_s = mode, total, every_s
        self.n, self.t0, self.last = 0, time.monotonic(), time.monotonic()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1)

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
        if self.bar is not None:
            self.bar.close()


def prepare(cfg: RunConfig):
    """Everything that must fail fast, before Ray starts: source layout, items, teacher (its weights, the kind
    of map it gives, its licence). Returns (items, teacher spec, resolved spec, teacher profile)."""
    from datagen.sources import get_source
    from datagen.teacher import DEFAULT_TEACHER, ORACLE, resolve_teacher, teacher_profile
    from datagen.teacher_zoo import TeacherOutputUnknown

    if cfg.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {cfg.shard_size}")
    _check_locations(cfg)
    _check_lidar_settings(cfg)
    cfg.source_options = {k: v for k, v in cfg.source_options.items() if v is not None}
    if cfg.source == "synthetic":
        cfg.source_options.setdefault("seed", cfg.seed)  # --seed S also gives a new synthetic world
    options = dict(cfg.source_options)
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
    items = source.items()
    if cfg.limit is not None:
        items = items[:cfg.limit]
    dup = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if dup:
        raise ConfigError(f"source {cfg.source} gave duplicate keys, e.g. {dup[0]}")
    return items, teacher, resolved, profile


def _check_locations(cfg: RunConfig) -> None:
    """--out is a local folder or an object-store URL (never a URL taken as a local path), --runtime-env
    a known mode; --root is checked by the source (only some read object storage)."""
    from datagen.runtime_env import MODES

    try:
        cfg.out = storage.check(cfg.out, "--out")
    except storage.StorageError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.runtime_env not in MODES:
        raise ConfigError(f"--runtime-env must be one of {', '.join(MODES)}, got {cfg.runtime_env!r}")


def _check_lidar_settings(cfg: RunConfig) -> None:
    """The sensor spec parses, and hidden geometry is asked for only where it applies (the grid mesh)."""
    from datagen.lidar import get_sensor

    try:
        get_sensor(cfg.sensor)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"--sensor {cfg.sensor!r}: {exc}") from exc
    if cfg.hidden_geometry and cfg.mesh != "grid":
        raise ConfigError(f"--hidden-geometry applies to --mesh grid, not {cfg.mesh!r}")


def run(cfg: RunConfig) -> RunSummary:
    """Run (or resume) the job described by cfg; see the module docstring."""
    t_start = time.monotonic()
    from datagen.teacher_zoo import license_line

    items, teacher_spec, teacher_resolved, profile = prepare(cfg)
    lic = profile["license"]
    (log.warning if lic["non_commercial"] else log.info)("%s", license_line(teacher_spec, lic))
    out_dir = storage.join(cfg.out, cfg.source)  # cfg.out was checked by prepare: a local path or a store URL
    try:
        storage.makedirs(out_dir)
    except OSError as exc:
        raise PipelineError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from exc
    except storage.StorageError as exc:
        raise PipelineError(str(exc)) from exc
    try:
        with job_lock(out_dir):  # see datagen/job_lock.py: fcntl locally, a lease on an object store
            return _run_locked(cfg, items, teacher_spec, teacher_resolved, out_dir, t_start, profile)
    except LockBusy as exc:
        raise PipelineError(str(exc)) from exc
    except OSError as exc:  # the driver's own files (job.json, the tables): disk full, permissions
        raise PipelineError(f"cannot write to {out_dir}: {exc}") from exc


def _run_locked(cfg, items, teacher_spec, teacher_resolved, out_dir: str, t_start: float,
                profile: dict) -> RunSummary:
    about = {"teacher_about": {k: profile[k] for k in ("model_type", "output", "output_source", "license")}}
    _check_job_file(out_dir, _fingerprint(cfg, teacher_spec, profile["output"]), about)
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
    summary = RunSummary(out_dir=str(out_dir), inputs=len(items), shards=len(shards), teacher=teacher_spec)
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
        crashed = _run_shards(cfg, shards, todo, finished, teacher_spec, teacher_resolved, out_dir, summary)
        remove_partial_files(out_dir)  # left by workers that died mid-shard (their task was retried)
    else:
        crashed = []
    summary.samples_total, summary.failures_total = write_tables(out_dir, finished, cfg.source, crashed)
    summary.wall_s = time.monotonic() - t_start
    return summary


def _run_shards(cfg, shards, todo, finished, teacher_spec, teacher_resolved, out_dir, summary) -> list[dict]:
    """Run the unfinished shards on Ray; fills `finished` and `summary`, returns rows of crashed shards."""
    started, workers = connect_ray(cfg.address, cfg.workers, cfg.ray_log_to_driver, cfg.runtime_env)
    import ray
    from ray.exceptions import RayTaskError

    summary.workers = workers
    actors = []
    task_cfg = {k: getattr(cfg, k) for k in ("source", "root", "intrinsics", "source_options", "seed", "lidar",
                                              "mesh", "occlusion", "mount", "lidar_noise_m", "lidar_dropout",
                                              "hidden_geometry", "sensor",
                                              "max_size", "rgb_format", "teacher_batch", "metric_scale_jitter")}
    try:
        warm = [ray.remote(warm_up).options(num_cpus=1).remote(task_cfg) for _ in range(min(workers, len(todo)))]
        if teacher_spec == "oracle":
            from datagen.teacher import OracleTeacher

            info = OracleTeacher().info()
        else:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            replicas = cfg.teacher_replicas or max(gpus, 1)
            per_gpu = min(1.0, gpus / replicas) if gpus else 0
            Replica = _teacher_actor_class()
            # num_cpus=0: the model mostly waits on the GPU (or is the one CPU job among the workers'), and a
            # reserved CPU would leave a local 2-core job with one worker
            spare = max(1, (_local_cores() - workers) // replicas) if started else 1
            actors = [Replica.options(num_cpus=0, num_gpus=per_gpu, max_restarts=2, max_task_retries=2)
                      .remote(teacher_resolved, cfg.teacher_batch, spare, cfg.teacher_output)
                      for _ in range(replicas)]
            try:  # load errors surface here, before any shard
                infos = ray.get([a.info.remote() for a in actors])
            except ray.exceptions.RayError as exc:
                raise PipelineError(f"the teacher {teacher_resolved} could not be loaded: {exc}") from exc
            info = infos[0]
            log.info("teacher %s: %d replica(s) on %s, %s", info.get("model"), replicas, info.get("device"),
                     info.get("dtype"))
        try:
            ray.get(warm)
        except RayTaskError as exc:
            raise PipelineError(f"the Ray workers cannot set up the job ({exc.cause!r}); on a cluster every node "
                                "needs this project: shipped by --runtime-env full|code, or installed in the "
                                "nodes' image (then --runtime-env off)") from exc
        remote = ray.remote(process_shard).options(num_cpus=1, max_retries=3)
        progress = _Progress(cfg.progress, sum(len(shards[i]) for i in todo), cfg.log_every_s)
        t0 = time.monotonic()
        queue, in_flight, crashed = list(todo), {}, []
        try:
            while queue or in_flight:
                while queue and len(in_flight) < workers:
                    i = queue.pop(0)
                    actor = actors[i % len(actors)] if actors else None
                    in_flight[remote.remote(task_cfg, i, shards[i], actor, info, out_dir)] = i
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=min(cfg.log_every_s, 1.0))
                progress.tick()
                for ref in ready:
                    i = in_flight.pop(ref)
                    try:
                        rows = ray.get(ref)
                    except RayTaskError as exc:  # the shard itself failed (disk full, a bug): stop, say why
                        for r in in_flight:
                            ray.cancel(r, force=True)
                        cause = exc.cause if getattr(exc, "cause", None) else exc
                        raise PipelineError(f"shard {shard_name(cfg.source, i)} failed: "
                                            f"{type(cause).__name__}: {cause}") from exc
                    except ray.exceptions.RayError as exc:  # the worker died even after retries
                        log.warning("shard %s lost (%s); its inputs go to %s, a rerun retries them",
                                    shard_name(cfg.source, i), type(exc).__name__, FAILURES)
                        crashed += [{"key": it.key, "shard": shard_name(cfg.source, i), "source_path": it.path,
                                     "stage": "worker", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                                    for it in shards[i]]
                        summary.failed += len(shards[i])
                        summary.failed_by_stage["worker"] = summary.failed_by_stage.get("worker", 0) + len(shards[i])
                        progress.update(len(shards[i]))
                        continue
                    if rows["samples"] and not storage.is_file(storage.join(out_dir, f"{rows['shard']}.tar")):
                        raise PipelineError(f"shard {rows['shard']} was written by a worker but is not in {out_dir} "
                                            "on this machine: on a cluster --out must be a folder every node shares")
                    finished[i] = True
                    summary.done += rows["samples"]
                    summary.failed += len(rows["failures"])
                    for f in rows["failures"]:
                        summary.failed_by_stage[f["stage"]] = summary.failed_by_stage.get(f["stage"], 0) + 1
                    progress.update(len(shards[i]))
        finally:
            progress.tick(force=True)
            progress.close()
        summary.seconds = time.monotonic() - t0
        return crashed
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
