"""Runs jobs, each backend variant in its own worker process, and writes one record per cell.

Records are appended to ``results.jsonl`` as each cell finishes; ``results.csv`` and
``results.sqlite`` (the same rows, ``reports.records``) are rewritten after each backend variant.

Where jobs run is the executor's business (``harness.executors``): locally one after another
(never concurrently: they would contend for the same cores and memory bandwidth and each would
measure the other), or as Ray tasks / Slurm jobs that each hold their own GPU or CPUs. The runner
turns each worker's event stream (``harness.worker_process.worker_events``) into records and is
safe to call from one thread per concurrent job. A worker that crashes, is killed for memory, is
lost with its node or exceeds the per-cell timeout costs only its current cell: that cell is
recorded as failed with the reason and a fresh worker continues with the variant's remaining cells.

With a baseline (``RunConfig.baseline``, run first), every worker learns who the baseline is
(``workloads.agreement.Comparison``: the baseline's wikitext2 cells write their distributions under
``OUT/baseline/``, the others' read them), and every other record whose samples hold generated
``token_ids`` gets ``metrics.generation_agreement`` against the baseline's record of the same cell.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from backends.models import ModelSpec
from harness.env import fingerprint
from harness.plan import Cell, Job, cell_key
from harness.worker_process import MALFORMED, WORKER_EXIT, worker_events

LOAD_ATTEMPTS = 2  # workers lost (crash, hang) before the backend loaded, per variant, before giving up
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
    tables: bool = True  # rewrite results.csv / .sqlite after each job (not on a Slurm node: the driver does)
    out_dir: Path | None = None  # the run's folder (baseline distributions); default: the results file's
    memory_check: bool = True  # skip a variant whose estimate does not fit (harness.worker.preflight)

    @property
    def run_dir(self) -> Path:
        """The run's output folder, absolute (workers may run elsewhere, from another directory)."""
        return Path(self.out_dir or self.results_path.parent).resolve()


Launch = Callable[[dict[str, Any], Path, float], Iterator[dict[str, Any]]]
"""Starts a worker on a payload and yields its events, ending with ``worker_exit``
(``worker_events`` locally; ``harness.executors.ray_cluster`` runs it in a Ray task)."""


def local_launch(payload: dict[str, Any], log_path: Path, cell_timeout_s: float) -> Iterator[dict[str, Any]]:
    """A worker process on this machine (``worker_events``)."""
    return worker_events(payload, log_path, cell_timeout_s)


class Runner:
    """Turns jobs into records: starts their workers through a ``Launch``, consumes the events,
    appends one record per cell to the results file and rewrites the tables after each job."""

    def __init__(self, config: RunConfig, observer: Observer | None = None, env: dict[str, Any] | None = None,
                 on_job_finished: Callable[[list[dict[str, Any]]], None] | None = None):
        """``on_job_finished(records)``: called after each job with every record so far (the
        CLI re-renders the report, so an interrupted run has one of what finished)."""
        self.config = config
        self.on_job_finished = on_job_finished
        self.observer = observer or NullObserver()
        self.writer = ResultsWriter(config.results_path)
        self.env = env if env is not None else fingerprint()
        config.log_dir.mkdir(parents=True, exist_ok=True)
        self._baseline_records: dict[tuple[str, str], dict[str, Any]] = {}  # (workload, params) -> record
        self._lock = threading.RLock()  # records, tables and the observer, when jobs run concurrently
        self._previous: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []

    def run(self, jobs: list[Job], previous: list[dict[str, Any]] = (), executor=None) -> list[dict[str, Any]]:
        """Run ``jobs`` through ``executor`` (``harness.executors``; default: locally, in order);
        returns their records. ``previous``: records already in the results file (a resumed
        sweep), kept in the CSV/SQLite tables beside the new ones."""
        from harness.executors.local import LocalExecutor

        self._previous = list(previous)
        for record in previous:
            self._remember_baseline(record)
        (executor or LocalExecutor()).run(self, jobs)
        return list(self.records)

    def baseline_records(self) -> list[dict[str, Any]]:
        """The baseline's ok records so far (what a remote job needs for generation agreement)."""
        with self._lock:
            return list(self._baseline_records.values())

    def fail_cells(self, job: Job, cells: list[Cell], reason: str) -> list[dict[str, Any]]:
        """Record ``cells`` of ``job`` as failed with ``reason`` (an executor that lost them)."""
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return [self._record(job, cell, "failed", now, error=reason) for cell in cells]

    def job_finished(self) -> None:
        """Rewrite the CSV and SQLite tables from every record so far (after each job), then
        ``on_job_finished``."""
        if not self.config.tables:
            return
        with self._lock:
            everything = [*self._previous, *self.records]
            write_tables(everything, self.config.results_path.parent)
            if self.on_job_finished is not None:
                self.on_job_finished(everything)

    def add_record(self, record: dict[str, Any], job: Job | None = None, cell: Cell | None = None) -> None:
        """Append a finished record (made here, or by a Slurm job and gathered) to the results
        file, the baseline index and the observer."""
        with self._lock:
            self._remember_baseline(record)
            self.writer.append(record)
            self.records.append(record)
            if job is not None and cell is not None:
                self.observer.cell_finished(job, cell, record)

    def _record(self, job: Job, cell: Cell, status: str, started_at: str, env: dict[str, Any] | None = None,
                **data: Any) -> dict[str, Any]:
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
            "env": env or self.env,
            "started_at": started_at,
            "duration_s": data.pop("duration_s", None),
        }
        with self._lock:
            self._add_generation_agreement(record)
            record = normalize(record)
            self.add_record(record, job, cell)
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

    def run_job(self, job: Job, launch: Launch = local_launch) -> list[dict[str, Any]]:
        """Run one job's cells, a fresh worker (through ``launch``) after each one lost; returns
        its records and rewrites the tables. A worker that crashes or hangs before it has loaded
        the backend is tried ``LOAD_ATTEMPTS`` times; then every remaining cell is recorded as
        failed with the reason, instead of one crash (or one timeout) per cell."""
        if job.skip_reason:
            records = self.fail_cells(job, job.cells, f"unavailable: {job.skip_reason}")
        else:
            records = []
            pending = list(job.cells)
            load_losses = 0
            while pending:
                done, loaded = self._run_worker(job, pending, launch)
                records.extend(done)
                finished = {record["cell_id"] for record in done}
                pending = [cell for cell in pending if cell.cell_id not in finished]
                if not loaded and pending:
                    load_losses += 1
                    if load_losses >= LOAD_ATTEMPTS:
                        reason = f"not run: the worker was lost while loading {load_losses} times " \
                                 f"(last: {done[-1]['error']})"
                        records.extend(self.fail_cells(job, pending, reason))
                        pending = []
        self.job_finished()
        return records

    def payload(self, job: Job, cells: list[Cell]) -> dict[str, Any]:
        """What a worker needs to run ``cells`` of ``job`` (JSON-serialisable)."""
        return {"backend": job.backend, "variant": job.variant, "options": job.options,
                "model": self.config.model.to_dict(), "cells": [c.__dict__ for c in cells],
                "memory_check": self.config.memory_check,
                "comparison": Comparison(self.config.baseline, job.label == self.config.baseline,
                                         str(self.config.run_dir), self.config.baseline_note).to_dict()}

    def _run_worker(self, job: Job, cells: list[Cell], launch: Launch) -> tuple[list[dict[str, Any]], bool]:
        """Run ``cells`` in one worker: records for a prefix of them (at least one), and whether
        the worker loaded the backend (a load failure that raised counts as loaded: it is
        recorded for every cell at once and never retried)."""
        log_path = self.config.log_dir / f"{job.backend}-{job.variant}.log"
        events = launch(self.payload(job, cells), log_path, self.config.cell_timeout_s)
        try:
            return self._consume(job, cells, events, log_path)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # kills a worker still running (interrupted, or given up on)

    def _consume(self, job: Job, cells: list[Cell], events: Iterator[dict[str, Any]], log_path: Path
                 ) -> tuple[list[dict[str, Any]], bool]:
        by_id = {c.cell_id: c for c in cells}
        records: list[dict[str, Any]] = []
        recorded: set[str] = set()
        load: dict[str, Any] | None = None
        info: dict[str, Any] = {}
        env: dict[str, Any] | None = None  # the node's own fingerprint, when the worker ran elsewhere
        current: Cell | None = None
        loaded = False
        started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

        def lose(reason: str) -> tuple[list[dict[str, Any]], bool]:
            """This worker is done for: its current (or next) cell fails with ``reason``."""
            if len(records) < len(cells):
                cell = current or next(c for c in cells if c.cell_id not in recorded)
                records.append(self._record(job, cell, "failed", started_at, env, load=load,
                                            error=f"{reason}; log: {log_path}"))
            return records, loaded

        for event in events:
            kind = event.get("event")
            if kind == WORKER_EXIT:
                return lose(event["reason"])
            problem = _malformed(event, by_id, recorded)
            if problem:
                if len(records) == len(cells):
                    return records, loaded  # every cell is recorded: what the worker says now changes nothing
                return lose(problem)
            if kind == "env":
                env = event["env"]
            elif kind == "load_failed":
                return [self._record(job, c, "failed", started_at, env, error=f"load failed: {event['error']}")
                        for c in cells], True
            elif kind == "loaded":
                load, info, loaded = event["load"], event["info"], True
            elif kind == "cell_start":
                current = by_id[event["cell_id"]]
                started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                with self._lock:
                    self.observer.cell_started(job, current)
            elif kind == "progress":
                with self._lock:
                    self.observer.cell_progress(job, by_id[event["cell_id"]], event["done"], event["total"])
            elif kind == "cell_done":
                cell = by_id[event["cell_id"]]
                recorded.add(cell.cell_id)
                records.append(self._record(
                    job, cell, event["status"], started_at, env, load=load, error=event.get("error"),
                    metrics=event.get("metrics", {}), samples=event.get("samples", {}),
                    info=event.get("info", info), duration_s=event.get("duration_s")))
                current = None
        return lose("the worker's event stream ended without its exit")


_EVENT_FIELDS = {"env": ("env",), "load_failed": ("error",), "loaded": ("load", "info"), "cell_start": ("cell_id",),
                 "progress": ("cell_id", "done", "total"), "cell_done": ("cell_id", "status")}


def _malformed(event: dict[str, Any], cells: dict[str, Cell], recorded: set[str]) -> str | None:
    """Why ``event`` breaks the worker protocol (``harness.worker``), or None: not a known event,
    a field missing, a cell this worker was not given, or a cell already recorded."""
    kind = event.get("event")
    shown = json.dumps(event, default=str)[:300]
    if kind == MALFORMED:
        return f"the worker wrote a line that is not a JSON event: {event.get('line', '')!r}"
    if kind not in _EVENT_FIELDS:
        return f"the worker sent an unknown event: {shown}"
    missing = [name for name in _EVENT_FIELDS[kind] if name not in event]
    if missing:
        return f"the worker sent a {kind} event without {missing[0]}: {shown}"
    if "cell_id" in event and event["cell_id"] not in cells:
        return f"the worker sent an event for a cell it was not given: {shown}"
    if kind == "cell_done" and (event["cell_id"] in recorded or event["status"] not in ("ok", "failed")):
        return f"the worker sent a cell_done that cannot be recorded: {shown}"
    return None
