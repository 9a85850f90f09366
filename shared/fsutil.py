"""Durable file writes shared by the shard writer, the datagen job files and the trainer's checkpoints.

One rule everywhere: a file is written under a temporary name (`<name>.tmp-<pid>`), flushed to disk,
renamed over its final name (os.replace is atomic) and the directory entry is flushed too. A crash at
any point leaves the old file or the new one under the final name, never half of one; what it can leave
is a `*.tmp-*` file, which readers ignore and the datagen job removes on resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TMP_MARK = ".tmp-"  # in every temporary name: readers skip such files, a resumed job deletes them


def temporary_path(path: str | os.PathLike) -> Path:
    """Where `path` is written before it is renamed into place (unique per process)."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (after a rename into it) so the rename survives a power cut.

    Best effort: some file systems refuse to open or fsync a directory, which is not an error here.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically and durably: temporary file, fsync, rename, fsync of the directory.

    On an error the temporary file is removed and the error propagates; `path` keeps its old content.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """`obj` as indented JSON at `path` (its folder created), atomically: a report or summary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def _write_all(f, data: bytes, chunk: int = 1 << 22) -> None:
    # in chunks, so that a fault test can stop a write half-way (and a big file needs no single huge syscall)
    view = memoryview(data)
    for i in range(0, len(view), chunk):
        f.write(view[i:i + chunk])
