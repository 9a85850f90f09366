"""The files of a datagen output folder: shard names, the sidecar of each shard, manifest and failures tables.

    <source>-000000.tar          the samples of shard 0 (written by shared.shard.ShardWriter)
    <source>-000000.rows.json    its sidecar: the input keys, manifest rows and failure rows of the shard
    manifest.parquet             one row per sample, rebuilt from the sidecars at the end of every run
    failures.parquet             one row per input that could not be turned into a sample

A shard is finished iff its sidecar exists, lists exactly the shard's inputs, and (when it holds samples)
its tar exists: the sidecar is written atomically before the tar gets its final name. Anything else under
a temporary name (`*.tmp-*`) was left by a killed run and is removed. See docs/pipeline.md, "Resume".

The folder is a local path or an object-store URL (s3://...): every file goes through shared.storage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from datagen.job.settings import PipelineError
from shared import storage
from shared.shard import ShardWriter

MANIFEST = "manifest.parquet"
FAILURES = "failures.parquet"
ROWS_SUFFIX = ".rows.json"
MANIFEST_COLUMNS = ("key", "shard", "source_path", "width", "height", "K", "teacher", "lidar", "points", "bytes")
FAILURE_COLUMNS = ("key", "shard", "source_path", "stage", "error")


def shard_name(source: str, index: int) -> str:
    return f"{source}-{index:06d}"


def failure_row(item, shard: str, stage: str, error: str) -> dict:
    return {"key": item.key, "shard": shard, "source_path": item.path, "stage": stage, "error": error}


def manifest_row(item, shard: str, sample, members: dict, teacher: str | None, lidar: str | None) -> dict:
    return {
        "key": item.key, "shard": f"{shard}.tar", "source_path": item.path,
        "width": sample.width, "height": sample.height, "K": np.asarray(sample.K, float).ravel().tolist(),
        "teacher": teacher, "lidar": lidar,
        "points": int(np.count_nonzero(sample.sparse)) if sample.sparse is not None else 0,
        "bytes": sum(len(v) for k, v in members.items() if not k.startswith("__")),
    }


class ShardOutput:
    """What one shard task writes: the tar (opened at the first sample) and the rows of its sidecar.

    Used as a context manager: leaving it without `finish` (an error of the shard itself) drops the
    partial tar, so only a finished shard ever appears under its final name.
    """

    def __init__(self, out_dir: str | Path, name: str, rgb_format: str):
        self.out_dir, self.name, self.rgb_format = out_dir, name, rgb_format
        self.writer: ShardWriter | None = None
        self.manifest: list[dict] = []
        self.failures: list[dict] = []

    def __enter__(self) -> ShardOutput:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.abort()

    def fail(self, item, stage: str, error: str) -> None:
        self.failures.append(failure_row(item, self.name, stage, error))

    def write(self, members: dict, row: dict) -> None:
        """Add one encoded sample and its manifest row."""
        if self.writer is None:
            self.writer = ShardWriter(storage.join(self.out_dir, f"{self.name}.tar"), rgb_format=self.rgb_format)
        self.writer.write(members)
        self.manifest.append(row)

    def finish(self, items: list) -> dict:
        """Write the sidecar, then give the tar its final name; returns the sidecar's rows."""
        order = {it.key: n for n, it in enumerate(items)}
        self.failures.sort(key=lambda r: order[r["key"]])  # input order, however the chunks fell
        rows = {"shard": self.name, "keys": [it.key for it in items], "samples": len(self.manifest),
                "manifest": self.manifest, "failures": self.failures}
        # the sidecar goes first: a tar under its final name always has its rows on disk
        storage.write_bytes(storage.join(self.out_dir, f"{self.name}{ROWS_SUFFIX}"), json.dumps(rows).encode())
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return rows


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


def tables_available() -> bool:
    """Whether manifest.parquet and failures.parquet can be written here (pyarrow is installed)."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


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

    Without pyarrow (a machine that has only what the GPU check carries, see bench/gpu_bundle.py) the rows
    are counted and checked the same way but neither table is written, and tables of an earlier run are
    removed: they would miss this run's shards. The sidecars hold every row, and the next run where pyarrow
    is installed writes both tables from them.
    """
    targets = {"manifest": (MANIFEST, MANIFEST_COLUMNS), "failures": (FAILURES, FAILURE_COLUMNS)}
    writers, files, buffers, counts = {}, {}, {}, {}
    arrow = tables_available()
    if arrow:
        import pyarrow as pa
        import pyarrow.parquet as pq
    for kind, (fname, columns) in targets.items():
        if arrow:
            files[kind] = storage.AtomicFile(storage.join(out_dir, fname))
            writers[kind] = pq.ParquetWriter(files[kind].file, _arrow_schema(columns))
        else:
            storage.remove(storage.join(out_dir, fname))
        buffers[kind], counts[kind] = [], 0

    def flush(kind: str, force: bool = False) -> None:
        if not arrow:
            buffers[kind].clear()
        elif buffers[kind] and (force or len(buffers[kind]) >= 65536):
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
            if arrow:
                writers[kind].close()
                files[kind].commit()
                files[kind] = None
    finally:
        for f in files.values():
            if f is not None:
                f.abort()
    return counts["manifest"], counts["failures"]
