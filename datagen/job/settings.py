"""The settings of a datagen job (`datagen run`) and the errors that stop one.

`RunConfig` is frozen: `pipeline.prepare` fills in what the user left open (the teacher, the kind of map it
gives, the source's options) once, and the same object goes to every shard task. Its fields are of two kinds:

- the settings of the bytes (metadata `fingerprint`): the source, teacher, seed, shard size, LiDAR,
  intrinsics, ... Together they are the job's fingerprint, written to `<out>/<source>/job.json`; a rerun
  into the same folder with any of them changed is refused instead of mixing two jobs in one folder;
- the settings of the run: where the data and the output are, how many workers, which cluster, how much
  progress to print. They may differ between a run and its resume.

A setting of the bytes added after job.json files were written carries `absent`: what a job.json without
it meant (before teacher kinds existed every teacher gave disparity, and no scale was jittered), so that
such a folder still resumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from shared.scan.spec import ScanSpec

BYTES = {"fingerprint": True}  # field metadata: this setting changes the bytes of a shard


def _bytes_since(absent) -> dict:
    """Field metadata of a setting of the bytes that older job.json files lack; `absent` is what they meant."""
    return {"fingerprint": True, "absent": absent}


class PipelineError(RuntimeError):
    """The job cannot start or cannot go on; the message says why (the CLI prints it without a traceback)."""


class ConfigError(PipelineError):
    """The arguments do not describe a job (unknown source or option, oracle on real images, ...)."""


@dataclass(frozen=True)
class RunConfig:
    # -- the settings of the bytes: the job's fingerprint ---------------------------------------------
    source: str = field(default="synthetic", metadata=BYTES)
    teacher: str | None = field(default=None, metadata=BYTES)  # None: oracle for synthetic, else DEFAULT_TEACHER
    seed: int = field(default=0, metadata=BYTES)
    shard_size: int = field(default=128, metadata=BYTES)
    # which scan: pattern, mount, surface, occlusion, sensor (shared.scan.spec; job.json holds its option names)
    scan: ScanSpec = field(default_factory=ScanSpec, metadata=BYTES)
    intrinsics: str = field(default="random", metadata=BYTES)
    # longest image side; larger unlabelled inputs are downscaled (K follows)
    max_size: int | None = field(default=1280, metadata=BYTES)
    rgb_format: str = field(default="jpg", metadata=BYTES)
    # family, width, height, labelled, gt, splits, ... (a synthetic `count` is left out of the fingerprint)
    source_options: dict = field(default_factory=dict, metadata=BYTES)
    # disparity | depth | metric; None: from the model's config or datagen's table (prepare fills it in)
    teacher_output: str | None = field(default=None, metadata=_bytes_since("disparity"))
    # metric teachers: a global scale per image in [1/(1+j), 1+j]; 0 = off
    metric_scale_jitter: float = field(default=0.0, metadata=_bytes_since(0.0))
    # -- the settings of the run ----------------------------------------------------------------------
    out: str = "shards"
    root: str | None = None
    limit: int | None = None  # only the first N inputs (shards already made stay valid: a shard is its inputs)
    workers: int | None = None  # None: every local core (or every CPU of the cluster); 0: --executor local
    # ray (shard tasks on Ray, local or a cluster) | local (in this process, no Ray: datagen/job/local_runner.py);
    # None: ray, or local with workers == 0. Not a setting of the bytes: both executors write the same ones
    executor: str | None = None
    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray
    teacher_replicas: int | None = None  # None: one per GPU, or 1
    teacher_batch: int = 8
    progress: str = "auto"  # auto (a bar on a terminal, log lines otherwise) | bar | log | none
    log_every_s: float = 10.0
    ray_log_to_driver: bool = False  # worker stdout/stderr stay in the Ray session logs unless asked for
    runtime_env: str = "auto"  # code shipped to a cluster: auto|full|code|off (datagen/job/runtime_env.py)

    def fingerprint(self) -> dict:
        """The settings of the bytes as plain JSON values: what job.json holds (the scan as its options)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("fingerprint") and f.name != "scan"}
        d.update(self.scan.cli_fields())
        # how many inputs is not a setting of the bytes (synthetic's count works like --limit)
        d["source_options"] = {k: v for k, v in sorted(self.source_options.items()) if k != "count"}
        return json.loads(json.dumps(d))


def fingerprint_in(job: dict) -> dict:
    """The fingerprint a job.json holds, in today's terms: a setting it lacks takes the value it had before
    the setting existed (None where there is none); its other keys (teacher_about, ...) are left out."""
    d = {f.name: job.get(f.name, f.metadata.get("absent")) for f in fields(RunConfig)
         if f.metadata.get("fingerprint") and f.name != "scan"}
    return d | {k: job.get(k) for k in ScanSpec().cli_fields()}
