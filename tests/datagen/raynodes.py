"""Ray nodes started with `ray start` on loopback for the cluster tests, and stopped by process group.

Each node runs `ray start ... --block` in its own session (process group), so that killing that group
stops the node's raylet, agents and workers, never `ray stop`, which kills every Ray process on the machine
by name. Processes a node spawned outside its group are found before the kill and killed by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


class Node:
    """One `ray start --block` process; `stop()` kills its process group and what it spawned."""

    def __init__(self, args: list[str], env: dict, what: str, timeout_s: float = 90):
        try:
            self.proc = subprocess.Popen([ray_bin(), "start", *args, "--block"], env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
        except OSError as exc:
            pytest.skip(f"cannot run `ray start`: {exc}")
        self.lines: list[str] = []
        started = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if "Ray runtime started" in line:
                    started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(timeout_s) or self.proc.poll() is not None:
            self.stop()
            pytest.skip(f"the Ray {what} did not start here: " + "".join(self.lines[-15:]))

    def stop(self) -> None:
        """SIGKILL the node's process group (nothing in it is worth a graceful stop: `ray start --block`
        takes 10 s and more to stop on SIGTERM), then any process it spawned outside the group."""
        try:
            others = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            others = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        for p in others:
            try:
                p.kill()
            except psutil.Error:
                pass


def head_args(port: int, temp_dir: str, num_cpus: int) -> list[str]:
    return ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
