"""One datagen run per output folder at a time.

Local folder (or NFS): an fcntl lock on OUT/<source>/.lock, held for the whole run and dropped by the
operating system when the process dies, kill -9 included.

Object store: there is no lock primitive, so `.lock` is an object holding a lease: the owner's host, pid
and a random token, rewritten every LEASE_S / 4 seconds by a background thread and deleted at the end.
It is created with a conditional PUT (If-None-Match: *), so of two runs that start together one gets it.
A run that finds a lock stops at once, unless the lease is stale: not renewed for LEASE_S seconds (its
owner is gone), or held by a process of this very host that no longer exists (so a rerun right after a
kill -9 need not wait). A run that loses its lease (it could not renew it for LEASE_S seconds and another
run took over) ends with an error. Clocks of the machines involved are assumed to agree within seconds.
Even two runs writing one prefix cannot corrupt it: shards, sidecars and tables only ever appear whole,
and the same settings give the same bytes (job.json refuses other settings).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from shared import storage

log = logging.getLogger("datagen")

LOCK_NAME = ".lock"
LEASE_S = 120.0


class LockBusy(RuntimeError):
    """Another run holds the output folder (or this run could not take or keep the lock); says which."""


@contextmanager
def job_lock(out_dir: str):
    """Hold the lock of an output folder (local path or object-store URL) for the duration of the block."""
    if storage.is_url(out_dir):
        lease = Lease(out_dir)
        lease.acquire()
        try:
            yield lease
        finally:
            lease.release()
        if lease.lost:
            raise LockBusy(f"the lease on {lease.url} was lost during the run (not renewed for {LEASE_S:.0f} s, "
                           "and another run took it over); run the job again to check its output")
        return
    try:
        lock = open(os.path.join(out_dir, LOCK_NAME), "w")  # noqa: SIM115 (held for the whole run)
    except OSError as exc:
        raise LockBusy(f"cannot write to the output folder {out_dir}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        raise LockBusy(f"another datagen run is writing to {out_dir}") from exc
    try:
        yield lock
    finally:
        lock.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def stale_reason(held: dict, now: float | None = None) -> str | None:
    """Why a lease someone else wrote may be taken over, or None while it is in force."""
    now = time.time() if now is None else now
    age = now - float(held.get("renewed", 0))
    if age > float(held.get("lease_s", LEASE_S)):
        return f"not renewed for {age:.0f} s"
    if held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", -1))):
        return f"its process {held.get('pid')} on this host is gone"
    return None


class Lease:
    """The lease lock of one object-store prefix (see the module docstring)."""

    def __init__(self, out_dir: str):
        self.out_dir, self.url = out_dir, storage.join(out_dir, LOCK_NAME)
        self.token, self.lost = uuid.uuid4().hex, False
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": self.started, "renewed": time.time(), "lease_s": LEASE_S}).encode()

    def read(self) -> dict | None:
        try:
            held = json.loads(storage.read_bytes(self.url))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # not ours to read: treated as expired (renewed at 0)
        return held if isinstance(held, dict) else {}

    def acquire(self) -> None:
        for _ in range(3):
            try:
                storage.create_exclusive(self.url, self.record())
                break
            except FileExistsError:
                held = self.read()
                if held is None:
                    continue  # released in between
                if held.get("token") == self.token:
                    break  # ours: a retried create whose first try reached the store (its reply was lost)
                why = stale_reason(held)
                if why is None:
                    age = time.time() - float(held.get("renewed", 0))
                    raise LockBusy(f"another datagen run is writing to {self.out_dir} (host {held.get('host')}, "
                                   f"pid {held.get('pid')}, lease renewed {age:.0f} s ago; it expires "
                                   f"{float(held.get('lease_s', LEASE_S)):.0f} s after its last renewal). If that "
                                   f"run is dead, wait for the lease to expire or delete {self.url}") from None
                log.warning("taking over %s from a run that is gone (%s)", self.url, why)
                storage.remove(self.url)
        else:
            raise LockBusy(f"could not take {self.url}: other runs keep creating it")
        self._thread = threading.Thread(target=self._renew, name="datagen-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_S / 4):
            try:
                held = self.read()
                if held is None or held.get("token") != self.token:
                    self.lost = True
                    log.error("the lease on %s was taken over by another run (host %s, pid %s)", self.url,
                              (held or {}).get("host"), (held or {}).get("pid"))
                    return
                storage.write_bytes(self.url, self.record())
            except Exception as exc:  # noqa: BLE001 (a network blip: keep trying until the lease runs out)
                log.warning("cannot renew the lease on %s: %s", self.url, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = self.read()
            if held is not None and held.get("token") == self.token:
                storage.remove(self.url)
        except OSError as exc:  # the run is done; a leftover lease expires by itself
            log.warning("cannot release %s: %s", self.url, exc)
