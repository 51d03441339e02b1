"""A workload that misbehaves on purpose, for tests/test_faults.py: ``$FAULT_PLAN`` says what each
cell does, for real, inside the worker process (sleep, hang with a child process, write garbage or an
unknown event onto the worker's event stream, exit). Registered by the tests, never by the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from workloads.base import Metric, Workload, WorkloadParams, WorkloadResult, param


PLAN_ENV = "FAULT_PLAN"  # comma list, one behaviour per cell: ok, long, hang, garbage, unknown, foreign
MARKER_ENV = "FAULT_MARKER_DIR"  # where a hanging cell writes its child's pid


@dataclass
class FaultParams(WorkloadParams):
    cell: int = param(1, "this cell's number (1-based) in $FAULT_PLAN", "--fault-cells", sweep=True, minimum=1,
                      cli_default=[1])


def behaviour(params: FaultParams) -> str:
    """What cell ``params.cell`` does: its entry in ``$FAULT_PLAN`` (ok past its end)."""
    plan = [part.strip() for part in os.environ.get(PLAN_ENV, "ok").split(",")]
    return plan[params.cell - 1] if params.cell <= len(plan) else "ok"


def _events():
    """The worker's event stream (``harness.worker.EVENTS``: the worker runs as ``__main__``)."""
    return sys.modules["__main__"].EVENTS


class FaultWorkload(Workload):
    name = "fault"
    description = "misbehaves as its plan says (tests only)"
    Params = FaultParams
    metrics = (Metric("worker_pid", "pid", "higher", "the worker process that ran the cell"),)

    @classmethod
    def cell_id(cls, params: FaultParams) -> str:
        return f"fault-{params.cell}"

    def run(self, backend, tokenizer, progress) -> WorkloadResult:
        behaviour_ = behaviour(self.params)
        if behaviour_ == "long":
            time.sleep(600)
        elif behaviour_ == "hang":  # a child in the worker's process group, then no progress at all
            child = subprocess.Popen(["sleep", "1000"])
            Path(os.environ[MARKER_ENV], "child.pid").write_text(str(child.pid))
            while True:
                time.sleep(1)
        elif behaviour_ == "garbage":
            _events().write("this is not a JSON event\n")
            time.sleep(600)  # the runner gives up on this worker at once
        elif behaviour_ == "unknown":
            _events().write(json.dumps({"event": "surprise", "cell_id": "?"}) + "\n")
            time.sleep(600)
        elif behaviour_ == "foreign":  # a cell_done for a cell this worker was not given
            _events().write(json.dumps({"event": "cell_done", "cell_id": "fault-nope", "status": "ok"}) + "\n")
            time.sleep(600)
        else:
            time.sleep(0.2)
        progress(1, 1)
        return WorkloadResult({"worker_pid": os.getpid()})
