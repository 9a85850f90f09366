"""Stopping the processes a test or bench/chaos.py started, by process id (never by name)."""

from __future__ import annotations

import psutil


def kill_tree(pid: int, timeout: float = 15.0) -> None:
    """SIGKILL a process and every descendant (Ray's workers and torchrun's ranks may leave the process
    group), and wait until they are gone: a worker of a killed run must not finish a shard or write a
    checkpoint behind the caller's back."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
