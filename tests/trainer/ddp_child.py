"""torchrun's entry point in the DDP restart tests (tests/trainer/test_ddp.py, bench/chaos.py): the trainer's
command line, with two test hooks set by environment variables (the trainer itself has none).

    DMD3C_TEST_MARKS=DIR        each worker writes DIR/rank<R>-restart<N>.pid (its process id), so that a
                                killer knows whom to kill; N is torchrun's restart count
    DMD3C_TEST_STALL=P:R:N      the worker of rank R in restart N writes half of the first file whose name
                                starts with P (a checkpoint's temporary file), fsyncs it, writes
                                DIR/in-write.pid and sleeps: a kill then lands inside that write
"""

import os
import sys
import time
from pathlib import Path


def stall_in_write(prefix: str, marks: Path) -> None:
    from shared import fsutil

    real = fsutil._write_all

    def half_then_wait(f, data, chunk=1 << 22):
        if os.path.basename(f.name).startswith(prefix):
            real(f, data[: len(data) // 2], chunk)
            f.flush()
            os.fsync(f.fileno())
            (marks / "in-write.pid").write_text(f"{os.getpid()} {f.name}")
            time.sleep(600)
        real(f, data, chunk)

    fsutil._write_all = half_then_wait


def main() -> None:
    rank, restart = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    marks = Path(os.environ["DMD3C_TEST_MARKS"]) if os.environ.get("DMD3C_TEST_MARKS") else None
    if marks is not None:
        (marks / f"rank{rank}-restart{restart}.pid").write_text(str(os.getpid()))
    if os.environ.get("DMD3C_TEST_STALL") and marks is not None:
        prefix, r, n = os.environ["DMD3C_TEST_STALL"].rsplit(":", 2)
        if (int(r), int(n)) == (rank, restart):
            stall_in_write(prefix, marks)
    from trainer.cli import app

    sys.argv[0] = "trainer"
    app()


if __name__ == "__main__":
    main()
