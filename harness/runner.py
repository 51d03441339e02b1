"""Runs jobs, each backend variant in its own worker process, and writes one record per cell.

Records are appended to ``results.jsonl`` as each cell finishes; ``results.csv`` and
``results.sqlite`` (the same rows, ``reports.records``) are rewritten after each backend variant.

Jobs run one after another (never concurrently: they would contend for the same cores and
memory bandwidth and each would measure the other). A worker that crashes, is killed for memory
or exceeds the per-cell timeout costs only its current cell: that cell is recorded as failed with
the reason and a fresh worker continues with the variant's remaining cells.

With a baseline (``RunConfig.baseline``, run first), every worker learns who the baseline is
(``workloads.agreement.Comparison``: the baseline's wikitext2 cells write their distributions under
``OUT/baseline/``, the others' read them), and every other record whose samples hold generated
``token_ids`` gets ``metrics.generation_agreement`` against the baseline's record of the same cell.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from backends.models import ModelSpec
from harness.env import fingerprint
from harness.plan import Cell, Job, cell_key
from reports.records import SCHEMA_VERSION, ResultsWriter, normalize, write_tables
from workloads.agreement import Comparison, generation_agreement


class Observer(Protocol):
    """Progress callbacks (the CLI draws rich progress bars from them)."""

    def cell_started(self, job: Job, cell: Cell) -> None: ...
    def cell_progress(self, job: Job, cell: Cell, done: int, total: int) -> None: ...
    def cell_finished(self, job: Job, cell: Cell, record: dict[str, Any]) -> None: ...


class NullObserver:
    def cell_started(self, job, cell): pass
    def cell_progress(self, job, cell, done, total): pass
    def cell_finished(self, job, cell, record): pass


@dataclass
class RunConfig:
    run_id: str
    model: ModelSpec
    results_path: Path
    log_dir: Path
    cell_timeout_s: float = 3600.0
    baseline: str | None = None  # the baseline's job label (``harness.plan.baseline_first``)
    baseline_note: str | None = None  # why there is none


def _pump(stream, events: queue.Queue) -> None:
    """Move the worker's event lines into a queue (so the runner can wait with a timeout);
    None marks the end of the stream."""
    for line in stream:
        events.put(line)
    events.put(None)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "worker still running"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (likely killed for memory)" if name == "SIGKILL" else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with code {code}"


class Runner:
    def __init__(self, config: RunConfig, observer: Observer | None = None):
        self.config = config
        self.observer = observer or NullObserver()
        self.writer = ResultsWriter(config.results_path)
        self.env = fingerprint()
        config.log_dir.mkdir(parents=True, exist_ok=True)
        self._baseline_records: dict[tuple[str, str], dict[str, Any]] = {}  # (workload, params) -> record

    def run(self, jobs: list[Job], previous: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """Run ``jobs`` in order; returns their records. ``previous``: records already in the
        results file (a resumed sweep), kept in the CSV/SQLite tables beside the new ones."""
        records: list[dict[str, Any]] = []
        for record in previous:
            self._remember_baseline(record)
        for job in jobs:
            records.extend(self.run_job(job))
            write_tables([*previous, *records], self.config.results_path.parent)
        return records

    def _record(self, job: Job, cell: Cell, status: str, started_at: str, **data: Any) -> dict[str, Any]:
        record = {
            "schema": SCHEMA_VERSION,
            "run_id": self.config.run_id,
            "cell_id": cell.cell_id,
            "cell_key": cell_key(self.config.model.to_dict(), job, cell, self.env.get("packages", {})),
            "label": job.label,
            "backend": job.backend,
            "variant": job.variant,
            "options": job.options,
            "workload": cell.workload,
            "params": cell.params,
            "model": self.config.model.to_dict(),
            "status": status,
            "error": data.pop("error", None),
            "metrics": data.pop("metrics", {}),
            "samples": data.pop("samples", {}),
            "load": data.pop("load", None),
            "info": data.pop("info", {}),
            "env": self.env,
            "started_at": started_at,
            "duration_s": data.pop("duration_s", None),
        }
        self._add_generation_agreement(record)
        record = normalize(record)
        self._remember_baseline(record)
        self.writer.append(record)
        self.observer.cell_finished(job, cell, record)
        return record

    @staticmethod
    def _cell_of(record: dict[str, Any]) -> tuple[str, str]:
        return record["workload"], json.dumps(record.get("params") or {}, sort_keys=True)

    def _remember_baseline(self, record: dict[str, Any]) -> None:
        if record.get("label") == self.config.baseline and record.get("status") == "ok":
            self._baseline_records[self._cell_of(record)] = record

    def _add_generation_agreement(self, record: dict[str, Any]) -> None:
        """``metrics.generation_agreement`` of a record holding generated ``samples.token_ids``
        (latency), against the baseline's record of the same workload and parameters: the
        identical-token share and the first divergent token (``generation_agreement``), or a note."""
        tokens = record["samples"].get("token_ids")
        if record["status"] != "ok" or not tokens or record["label"] == self.config.baseline:
            return
        if self.config.baseline is None:
            record["metrics"]["generation_agreement"] = {"note": self.config.baseline_note or "no baseline in this run"}
            return
        base = self._baseline_records.get(self._cell_of(record))
        agreement: dict[str, Any] = {"baseline": self.config.baseline}
        if base is None or not base["samples"].get("token_ids"):
            agreement["note"] = "the baseline has no ok record of this cell"
        else:
            agreement.update(generation_agreement(tokens, base["samples"]["token_ids"]))
        record["metrics"]["generation_agreement"] = agreement

    def run_job(self, job: Job) -> list[dict[str, Any]]:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if job.skip_reason:
            return [self._record(job, c, "failed", now, error=f"unavailable: {job.skip_reason}")
                    for c in job.cells]
        records: list[dict[str, Any]] = []
        pending = list(job.cells)
        while pending:
            done = self._run_worker(job, pending)
            records.extend(done)
            pending = pending[len(done):]
        return records

    def _run_worker(self, job: Job, cells: list[Cell]) -> list[dict[str, Any]]:
        """Run ``cells`` in one worker; returns records for a prefix of them (at least one)."""
        log_path = self.config.log_dir / f"{job.backend}-{job.variant}.log"
        payload = {"backend": job.backend, "variant": job.variant, "options": job.options,
                   "model": self.config.model.to_dict(), "cells": [c.__dict__ for c in cells],
                   "comparison": Comparison(self.config.baseline, job.label == self.config.baseline,
                                            str(self.config.results_path.parent), self.config.baseline_note).to_dict()}
        with log_path.open("a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "harness.worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, text=True)
            proc.stdin.write(json.dumps(payload))
            proc.stdin.close()
            events: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, events), daemon=True).start()
            return self._consume(job, cells, proc, events, log_path)

    def _consume(self, job, cells, proc, events, log_path) -> list[dict[str, Any]]:
        by_id = {c.cell_id: c for c in cells}
        records: list[dict[str, Any]] = []
        load: dict[str, Any] | None = None
        info: dict[str, Any] = {}
        current: Cell | None = None
        started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        deadline = time.monotonic() + self.config.cell_timeout_s
        while True:
            try:
                line = events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = "timeout"
            if line == "timeout" or (line is None and len(records) < len(cells)):
                cell = current or cells[len(records)]
                if line == "timeout":
                    proc.kill()
                    reason = f"timed out after {self.config.cell_timeout_s:.0f} s"
                else:
                    proc.wait()
                    reason = _describe_exit(proc.returncode)
                records.append(self._record(job, cell, "failed", started_at, load=load,
                                            error=f"{reason}; log: {log_path}"))
                proc.wait()
                return records
            if line is None:
                proc.wait()
                return records
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = event["event"]
            if kind == "load_failed":
                proc.wait()
                return [self._record(job, c, "failed", started_at, error=f"load failed: {event['error']}")
                        for c in cells]
            if kind == "loaded":
                load, info = event["load"], event["info"]
            elif kind == "cell_start":
                current = by_id[event["cell_id"]]
                started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                deadline = time.monotonic() + self.config.cell_timeout_s
                self.observer.cell_started(job, current)
            elif kind == "progress":
                self.observer.cell_progress(job, by_id[event["cell_id"]], event["done"], event["total"])
            elif kind == "cell_done":
                cell = by_id[event["cell_id"]]
                records.append(self._record(
                    job, cell, event["status"], started_at, load=load, error=event.get("error"),
                    metrics=event.get("metrics", {}), samples=event.get("samples", {}),
                    info=event.get("info", info), duration_s=event.get("duration_s")))
                current = None
                if len(records) == len(cells):
                    proc.wait()
                    return records
