"""manifest.parquet and failures.parquet, rebuilt from the sidecars: with pyarrow, and without it (a machine with
only what the GPU check carries), where the rows are counted and checked but no table is written, and the
tables of an earlier run, which would miss this run's shards, are removed."""

import json
import sys

import pytest

from datagen.job.settings import PipelineError
from datagen.job.shard_files import FAILURES, MANIFEST, tables_available, write_tables

pq = pytest.importorskip("pyarrow.parquet")


def sidecar(out, i: int, keys: list[str], failed: list[str]) -> None:
    name = f"folder-{i:06d}"
    manifest = [{"key": k, "shard": f"{name}.tar", "source_path": f"/d/{k}.jpg", "width": 4, "height": 3,
                 "K": [1.0, 0, 2, 0, 1, 1.5, 0, 0, 1], "teacher": "t", "lidar": "hdl64", "points": 2, "bytes": 10}
                for k in keys if k not in failed]
    failures = [{"key": k, "shard": name, "source_path": f"/d/{k}.jpg", "stage": "load", "error": "empty"}
                for k in failed]
    (out / f"{name}.rows.json").write_text(json.dumps({"shard": name, "keys": keys, "samples": len(manifest),
                                                       "manifest": manifest, "failures": failures}))


def test_without_pyarrow_the_rows_are_counted_and_stale_tables_removed(tmp_path, monkeypatch):
    sidecar(tmp_path, 0, ["a", "b"], failed=["b"])
    assert write_tables(tmp_path, [True], "folder", []) == (1, 1)
    assert pq.read_table(tmp_path / MANIFEST).column("key").to_pylist() == ["a"]

    sidecar(tmp_path, 1, ["c", "d"], failed=[])
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    assert not tables_available()
    lost = [{"key": "e", "shard": "folder-000002", "source_path": "/d/e.jpg", "stage": "worker", "error": "x"}]
    assert write_tables(tmp_path, [True, True, False], "folder", lost) == (3, 2)
    assert not (tmp_path / MANIFEST).exists() and not (tmp_path / FAILURES).exists()  # they lacked shard 1
    with pytest.raises(PipelineError, match="cannot be read"):  # a finished shard's rows are still checked
        write_tables(tmp_path, [True, True, True], "folder", [])

    monkeypatch.undo()  # pyarrow back: the same call writes both tables from the sidecars
    assert tables_available()
    assert write_tables(tmp_path, [True, True, False], "folder", lost) == (3, 2)
    assert pq.read_table(tmp_path / MANIFEST).column("key").to_pylist() == ["a", "c", "d"]
    assert pq.read_table(tmp_path / FAILURES).column("key").to_pylist() == ["b", "e"]
