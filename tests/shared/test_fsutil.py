"""The one atomic write of the project (datagen sidecars and job.json, trainer checkpoints)."""

import pytest

from shared import fsutil


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    assert fsutil.atomic_write_bytes(path, b"old") == path
    fsutil.atomic_write_bytes(path, b"new" * 1000)
    assert path.read_bytes() == b"new" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_write_that_fails_half_way_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    fsutil.atomic_write_bytes(path, b"old")
    real = fsutil._write_all

    def dying(f, data, chunk=1 << 22):
        real(f, data[: len(data) // 2], chunk)
        raise OSError("disk full")

    monkeypatch.setattr(fsutil, "_write_all", dying)
    with pytest.raises(OSError, match="disk full"):
        fsutil.atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # the partial temporary file is gone
    assert fsutil.TMP_MARK in fsutil.temporary_path(path).name
