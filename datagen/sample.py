"""One input -> one sample: teacher map -> metric pseudo depth -> intrinsics K -> simulated LiDAR.

`make_sample` is the whole path of one image, top to bottom. Labelled records (KITTI, NYU, the synthetic
world's labelled mode) keep their own scan, ground truth and K and only gain the teacher's map.

Every random draw of a sample comes from a seed made of (--seed, key), one stream per step (shared.seeds),
so the bytes of a sample depend neither on scheduling, nor on the number of workers, nor on resumption, and
another LiDAR preset does not change the sampled K. The scan is cast from what the shard stores (the depth
at its PNG precision, the image as a reader decodes it) with the spec recorded in meta.json, so it can be
cast again from the shard alone: the trainer's `--lidar` does, with a new seed every epoch. A step that fails raises StageError naming the step: the
shard task turns it into a row of failures.parquet and goes on with the next input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image

from datagen.camera import resize_image_and_K, sample_intrinsics
from datagen.disparity import DEPTH_RANGES
from datagen.job.settings import RunConfig
from datagen.pseudo_depth import teacher_to_depth
from datagen.teachers.runner import OracleTeacher
from shared.camera import scale_K
from shared.depth import as_stored_depth, as_stored_rgb
from shared.scan.lidar import simulate_sparse_depth
from shared.scan.sensor import get_sensor
from shared.seeds import sample_rngs, sample_seed
from shared.shard import Sample

SCENE_OF_FAMILY = {"street": "outdoor", "room": "indoor", "nature": "outdoor", "tabletop": "indoor"}  # synthetic


class StageError(Exception):
    """An input failed at one step (stage); becomes a row of failures.parquet."""

    def __init__(self, stage: str, error: BaseException | str):
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        super().__init__(text)
        self.stage, self.error = stage, text


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the step of the code inside: any error there becomes StageError(name, error)."""
    try:
        yield
    except (MemoryError, KeyboardInterrupt, StageError):
        raise
    except Exception as exc:  # noqa: BLE001 (one bad input must never stop the job; the row keeps the reason)
        raise StageError(name, exc) from exc


def reads_image(spec) -> bool:
    """Whether the scan looks at the camera image (keypoints; a sensor's dark-surface dropout; a pattern
    file's own sensor, which may), so that it must see the image as the shard stores it."""
    return (spec.lidar.strip().lower().startswith("keypoints:") or spec.sensor is None
            or get_sensor(spec.sensor).needs_brightness)


def is_labelled(record) -> bool:
    return record.sparse is not None or record.gt is not None


def downscale(record, max_size: int | None):
    """Shrink an unlabelled record whose longest side exceeds max_size; K and the true depth follow.

    Labelled records keep their size: resampling a real scan or GT would invent or drop points.
    """
    h, w = record.rgb.shape[:2]
    if max_size is None or max(h, w) <= max_size or is_labelled(record):
        return record
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


def scene_hint(record) -> str:
    """The depth range family for disparity_to_depth: what the source says (outdoor/indoor), else any."""
    scene = record.meta.get("scene") or SCENE_OF_FAMILY.get(record.meta.get("family"))
    return scene if scene in DEPTH_RANGES else "any"


def make_sample(record, teacher: tuple[np.ndarray, dict] | StageError | None, cfg: RunConfig, native_K: bool,
                teacher_info: dict) -> Sample:
    """One input to one sample.

    `teacher` is the teacher's answer for record.rgb: (map, per-image facts such as Depth Pro's focal
    length), a StageError when the teacher rejected the image, or None for the oracle (its map is made
    here from the synthetic world's true depth). `teacher_info` says which model it is and what kind of
    map it gives (DepthTeacher.info). `native_K`: use the source's own intrinsics where it has them.
    """
    seed = sample_seed(cfg.seed, record.key)
    rngs = sample_rngs(seed)
    if isinstance(teacher, StageError):
        raise teacher
    teacher_map, facts = teacher if teacher is not None else (None, {})
    if teacher is None:  # the oracle: a teacher-like map made from the true depth
        if record.true_depth is None:
            raise StageError("teacher", "the oracle teacher needs true depth (synthetic source only)")
        with stage("teacher"):
            teacher_map = OracleTeacher().predict_from_depth(record.true_depth, rngs["teacher"], rgb=record.rgb,
                                                             object_id=record.true_object_id,
                                                             family=record.meta.get("family"))
    kind = teacher_info.get("output", "disparity")
    meta = {"source": record.source, "source_path": record.source_path, **record.meta,
            "teacher": {**{k: teacher_info.get(k) for k in ("model", "revision", "dtype")}, "output": kind, **facts}}
    h, w = record.rgb.shape[:2]
    if getattr(teacher_map, "shape", None) != (h, w):
        raise StageError("teacher", f"teacher map has shape {getattr(teacher_map, 'shape', None)}, image is {(h, w)}")

    if is_labelled(record):  # a real scan and GT: only the teacher's map is added
        if record.K is None:
            raise StageError("intrinsics", "labelled record without intrinsics")
        meta["intrinsics"] = "native"
        return Sample(record.key, record.rgb, record.K, teacher=teacher_map, sparse=record.sparse, gt=record.gt,
                      meta=meta)

    with stage("depth"):
        depth_m, depth_info = teacher_to_depth(teacher_map, kind, rngs["depth"], scene=scene_hint(record),
                                               ceiling_m=teacher_info.get("ceiling_m"),
                                               scale_jitter=cfg.metric_scale_jitter)
    if native_K and record.K is not None:
        K, meta["intrinsics"] = record.K, "native"
    else:
        with stage("intrinsics"):
            K, meta["intrinsics"] = sample_intrinsics(w, h, rngs["intrinsics"]), "random"
    with stage("lidar"):
        rgb = as_stored_rgb(record.rgb, cfg.rgb_format) if reads_image(cfg.scan) else record.rgb
        sparse, lidar_info = simulate_sparse_depth(as_stored_depth(depth_m), K, rngs["lidar"], cfg.scan, rgb=rgb)
    meta["depth_range"] = depth_info
    meta["lidar"] = {**lidar_info, "preset": lidar_info.get("preset", cfg.scan.lidar), "seed": seed,
                     "spec": cfg.scan.to_dict()}
    return Sample(record.key, record.rgb, K, teacher=teacher_map, depth=depth_m, sparse=sparse, meta=meta)
