"""The worker process: loads one backend variant and runs its cells, streaming JSON events.

Started by ``harness.runner`` as ``python -m harness.worker`` with the job as JSON on stdin.
Events go to the original stdout, one JSON object per line; anything libraries print goes to
stderr (the runner keeps it in a log), so a chatty library cannot corrupt the protocol.
Events: ``loaded`` (load report, info), ``cell_start``, ``progress`` (done, total),
``cell_done`` (status, metrics, samples, error), ``load_failed`` (error).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


EVENTS = None  # the event stream of this worker (set by main; fault-injection tests write to it)


def _event_stream():
    """Keep the real stdout for events; point fd 1 at stderr for everything else."""
    global EVENTS
    EVENTS = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return EVENTS


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def preflight(backend, spec, cells: list[dict[str, Any]]) -> tuple[str | None, dict[str, Any]]:
    """The pre-flight memory check (``backends.footprint``) of ``backend`` over ``cells``:
    ``(reason it does not fit or None, the estimate as a dict)``. Sized for the largest sequence
    and the largest batch any cell asks for. A model whose config the estimate cannot read is not
    checked (the dict then says why)."""
    from backends.footprint import ModelShape, available_memory, does_not_fit
    from backends.models import checkpoint_dir
    from workloads.registry import load_workload

    tokens, batch = 1, 1
    for cell in cells:
        workload_cls = load_workload(cell["workload_path"])
        cell_tokens, cell_batch = workload_cls(workload_cls.Params.from_dict(cell["params"])).sequence_footprint()
        tokens, batch = max(tokens, cell_tokens), max(batch, cell_batch)
    try:  # a random-weight model's config is read where it is: nothing is built for a skipped variant
        config = Path(spec.location) if spec.random_weights else checkpoint_dir(spec) / "config.json"
        shape = ModelShape.from_config(config)
    except (KeyError, OSError, ValueError) as exc:
        return None, {"skipped": f"config not readable for an estimate: {one_line(exc)}"}
    estimate = backend.estimate_memory(shape, tokens, batch)
    host, device = available_memory(estimate.device)
    facts = {**estimate.to_dict(), "tokens": tokens, "batch": batch, "host_available_bytes": host}
    if device is not None:
        facts["device_available_bytes"] = device
    return does_not_fit(estimate, host, device), facts


def main() -> int:
    events = _event_stream()

    def emit(kind: str, **data: Any) -> None:
        from reports.records import json_safe

        events.write(json.dumps(json_safe({"event": kind, **data})) + "\n")

    job = json.load(sys.stdin)
    from backends.base import backend_class
    from backends.models import ModelSpec, load_tokenizer
    from workloads.agreement import Comparison
    from workloads.registry import load_workload

    spec = ModelSpec.from_dict(job["model"])
    try:
        backend = backend_class(job["backend"])(job["variant"], job["options"])
        reason, estimate = preflight(backend, spec, job["cells"]) if job.get("memory_check", True) else (None, {})
        if reason is not None:
            emit("load_failed", error=f"skipped before loading: {reason} (--no-memory-check runs it anyway)")
            return 0
        load = backend.load(spec)
        if estimate:
            load.details["memory_estimate"] = estimate
        tokenizer = load_tokenizer(spec)
        info = backend.info()
    except Exception as exc:  # one backend failing to load must not lose the others' results
        traceback.print_exc()
        emit("load_failed", error=one_line(exc))
        return 0
    emit("loaded", load=load.to_dict(), info=info)
    for cell in job["cells"]:
        emit("cell_start", cell_id=cell["cell_id"])
        workload_cls = load_workload(cell["workload_path"])
        workload = workload_cls(workload_cls.Params.from_dict(cell["params"]))
        if job.get("comparison"):
            workload.comparison = Comparison.from_dict(job["comparison"])
        started = time.perf_counter()
        try:
            result = workload.run(
                backend, tokenizer,
                lambda done, total, cid=cell["cell_id"]: emit("progress", cell_id=cid, done=done, total=total),
            )
        except Exception as exc:  # a failing cell is recorded; the next one still runs
            traceback.print_exc()
            emit("cell_done", cell_id=cell["cell_id"], status="failed", error=one_line(exc),
                 duration_s=time.perf_counter() - started)
            continue
        emit("cell_done", cell_id=cell["cell_id"], status="ok", metrics=result.metrics,
             samples=result.samples, info=backend.info(), duration_s=time.perf_counter() - started)
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
