"""One worker process (``python -m harness.worker``) as a stream of its events, with the per-cell
timeout enforced here, next to the process, so that every executor (local, a Ray task on another
node, a Slurm job) gets the same isolation and the same limits.

The stream yields the worker's JSON events as dicts (``loaded``, ``cell_start``, ``progress``,
``cell_done``, ``load_failed``; see ``harness.worker``) and always ends with one
``{"event": "worker_exit", "reason": ...}``: how the process ended (its exit code or signal, or the
timeout that killed it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

WORKER_EXIT = "worker_exit"
MALFORMED = "malformed"  # a line on the event stream that is not a JSON object: {"event": MALFORMED, "line": ...}
EXIT_GRACE_S = 30.0  # after the last cell: time for the worker to close its backend and exit
THREADS_ENV = "HARNESS_THREADS"  # caps backends.device.physical_cores() in the worker (a cell's CPU share)


def describe_exit(code: int | None) -> str:
    """A one-line reason for a worker's exit status (``Popen.returncode``)."""
    if code is None:
        return "worker still running"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (likely killed for memory)" if name == "SIGKILL" else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with code {code}"


def _die_with_parent() -> None:
    """In the child before exec: a new session (its own process group, so a kill reaches the
    libraries' helper processes too) and SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``),
    so a runner or Ray worker that is killed leaves no orphan measuring on its cores."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not glibc Linux: the timeout and the group kill still apply
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _pump(stream, lines: queue.Queue) -> None:
    """Move the worker's stdout lines into a queue (so the reader can wait with a timeout); None
    marks the end of the stream."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def worker_events(payload: dict[str, Any], log_path: Path, cell_timeout_s: float,
                  threads: int | None = None) -> Iterator[dict[str, Any]]:
    """Start a worker on ``payload`` (the job: backend, variant, options, model, cells) and yield
    its events; the worker's stderr is appended to ``log_path``.

    A cell (from its ``cell_start``, or from the start for loading) that runs longer than
    ``cell_timeout_s`` seconds gets the worker's whole process group killed, and the stream ends
    with ``worker_exit`` saying so. ``threads``: the CPU threads the worker's backend may use
    (``HARNESS_THREADS``; None: the machine's cores). A line that is not a JSON object is yielded
    as ``{"event": "malformed", "line": LINE}`` (the reader decides what it costs). After the last
    cell's ``cell_done`` the worker has ``EXIT_GRACE_S`` to exit. Closing the generator early
    (an interrupted run, a reader that gave up on this worker) kills the worker's process group.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env[THREADS_ENV] = env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with log_path.open("a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "harness.worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                preexec_fn=_die_with_parent)
        try:
            try:
                proc.stdin.write(json.dumps(payload))
                proc.stdin.close()
            except BrokenPipeError:  # it died before reading its job: its exit status says how
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            deadline = time.monotonic() + cell_timeout_s
            remaining = len(payload.get("cells", ()))
            while True:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    _kill_group(proc)
                    yield {"event": WORKER_EXIT, "reason": f"timed out after {cell_timeout_s:.0f} s"}
                    return
                if line is None:
                    proc.wait()
                    yield {"event": WORKER_EXIT, "reason": describe_exit(proc.returncode), "code": proc.returncode}
                    return
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    event = None
                if not isinstance(event, dict):
                    yield {"event": MALFORMED, "line": line.rstrip("\n")[:300]}
                    continue
                if event.get("event") == "cell_start":
                    deadline = time.monotonic() + cell_timeout_s
                elif event.get("event") == "cell_done":
                    remaining -= 1
                    if remaining <= 0:
                        deadline = time.monotonic() + EXIT_GRACE_S
                yield event
        finally:
            _kill_group(proc)  # still running (the reader gave up), or exited leaving helpers in its group
