"""Claiming an output folder for one run: created and checked writable before any cell runs, and
held with an exclusive lock (``fcntl.flock`` on ``OUT/.quantarena.lock``) so that a second run into
the same folder stops with the holder's pid instead of interleaving records with it. The lock is
the kernel's: it goes with the process, so a killed run never leaves a stale one."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator

from harness.plan import UsageError

LOCK_NAME = ".quantarena.lock"


def check_writable(out: Path) -> None:
    """Create ``out`` (and parents) and write a probe file in it.

    Raises:
        UsageError: it cannot be created or written (read-only filesystem, permissions, a path
            through a regular file).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__})") from None


@contextlib.contextmanager
def claimed(out: Path) -> Iterator[Path]:
    """Hold ``out`` for this run (after ``check_writable``); released when the block ends or the
    process dies.

    Raises:
        UsageError: another live run holds it (the message names its pid), or it is not writable.
    """
    out = Path(out)
    check_writable(out)
    handle = (out / LOCK_NAME).open("a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UsageError(f"--out {out} is in use by another run (pid {holder}); wait for it to finish "
                             "or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield out
    finally:
        handle.close()  # closing the file releases the lock
