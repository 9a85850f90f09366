"""Durable file operations shared by the shard writer, the pipeline and the trainer's checkpoints."""

from __future__ import annotations

import os


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
