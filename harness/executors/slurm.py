"""The Slurm executor (``--executor slurm``, the ``[slurm]`` extra, through submitit): one Slurm job
per backend variant, submitted as one job array, each running the variant's cells exactly as a
local run does (``Runner.run_job``: a worker process per variant, the per-cell timeout, a fresh
worker after a crash) on the node Slurm gives it.

- Each job writes its records to its own file, ``OUT/slurm/parts/NNN.jsonl`` (never two writers on
  one file over a network filesystem); the driver gathers their complete lines into
  ``OUT/results.jsonl`` as they appear, so progress and ``--resume`` work as for a local run.
  ``OUT`` must be on a filesystem the nodes share.
- The baseline job runs (and is gathered) first: the others read the distributions it writes
  under ``OUT/baseline/`` and compare their generated tokens with its records.
- Each record carries the fingerprint of the node that measured it.
- A job that Slurm ends before it wrote every cell (TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY,
  an error in the job) gets its missing cells recorded as failed with that state; the others go on.
- ``OUT/slurm/jobs.json`` lists the submitted jobs (Slurm id, label, cells), which
  ``python -m harness status OUT`` reads.
- Settings (flags override the sweep file's ``slurm:`` section): partition, GPUs per job, CPUs per
  job, time limit (minutes), account, and ``local`` (submitit's local executor: the same jobs as
  local processes, to try a set-up without a cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.plan import Cell, Job, UsageError

INSTALL_HINT = "pip install -e '.[slurm]'"
JOB_FOLDER = "jobs/%j"  # submitit's folder per job (pickles, stdout/stderr), under OUT/slurm
POLL_S = 2.0


class SlurmSettings(BaseModel):
    """One job's request. ``time_min``: Slurm's time limit in minutes; ``gpus_per_job`` 0: CPU
    jobs; ``local``: run through submitit's local executor instead of ``sbatch``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    partition: str | None = None
    account: str | None = None
    gpus_per_job: int = Field(0, ge=0)
    cpus_per_job: int = Field(1, ge=1)
    time_min: int = Field(240, ge=1)
    mem_gb: int | None = Field(None, ge=1)
    local: bool = False


class SlurmSettingError(UsageError):
    """A bad ``slurm:`` setting: ``key`` and ``reason`` (the sweep file's error names its line)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"slurm.{key}: {reason}")
        self.key, self.reason = key, reason


def _count(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return int(text)
    parse.__name__ = f"integer >= {low}"
    return parse


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--slurm-*`` flags (each overrides the sweep file's ``slurm:`` key of the same name)."""
    parser.add_argument("--slurm-partition", help="Slurm partition of every job")
    parser.add_argument("--slurm-account", help="Slurm account to charge")
    parser.add_argument("--slurm-gpus", type=_count(0), metavar="N", help="GPUs per job (default 0)")
    parser.add_argument("--slurm-cpus", type=_count(1), metavar="N", help="CPUs (and worker threads) per job (default 1)")
    parser.add_argument("--slurm-time", type=_count(1), metavar="MIN", help="time limit per job in minutes (default 240)")
    parser.add_argument("--slurm-mem", type=_count(1), metavar="GB", help="memory per job in GB (default: the partition's)")
    parser.add_argument("--slurm-local", action="store_true",
                        help="run the jobs as local processes through submitit's local executor (no cluster)")


_FLAGS = {"partition": "slurm_partition", "account": "slurm_account", "gpus_per_job": "slurm_gpus",
          "cpus_per_job": "slurm_cpus", "time_min": "slurm_time", "mem_gb": "slurm_mem", "local": "slurm_local"}


def slurm_settings(args: argparse.Namespace, from_file: dict[str, Any]) -> SlurmSettings:
    """Settings from the sweep file's ``slurm:`` section, overridden by the ``--slurm-*`` flags.

    Raises:
        SlurmSettingError: an unknown key or a value of the wrong type or range.
    """
    values = dict(from_file)
    for key, flag in _FLAGS.items():
        value = getattr(args, flag, None)
        if value not in (None, False):
            values[key] = value
    try:
        return SlurmSettings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(map(str, error["loc"])) or "slurm"
        if error["type"] == "extra_forbidden":
            raise SlurmSettingError(key, f"unknown key; valid: {', '.join(SlurmSettings.model_fields)}") from None
        raise SlurmSettingError(key, error["msg"]) from None


def check_flags_unused(args: argparse.Namespace) -> None:
    """Raise UsageError when a ``--slurm-*`` flag is given without ``--executor slurm``."""
    used = [f"--{flag.replace('_', '-')}" for flag in _FLAGS.values() if getattr(args, flag, None) not in (None, False)]
    if used:
        raise UsageError(f"{used[0]} needs --executor slurm")


def import_submitit():
    """The ``submitit`` module. Raises UsageError naming the extra when it is not installed."""
    try:
        import submitit
    except ImportError:
        raise UsageError(f"--executor slurm needs submitit, which is not installed: {INSTALL_HINT}") from None
    return submitit


def run_on_node(config, job: Job, part_path: str, baseline_records: list[dict[str, Any]]) -> int:
    """The body of one Slurm job: run ``job``'s cells here (a local worker per variant, as
    ``Runner.run_job``), records to ``part_path``; returns the number of records written."""
    from dataclasses import replace

    from harness.runner import Runner

    node_config = replace(config, results_path=Path(part_path), tables=False, out_dir=config.run_dir)
    runner = Runner(node_config)
    for record in baseline_records:
        runner._remember_baseline(record)
    return len(runner.run_job(job))


class _Gatherer:
    """Moves complete lines of one job's part file into the run's results as they appear."""

    def __init__(self, path: Path, job: Job):
        self.path, self.job, self.offset, self.seen = path, job, 0, set()

    def gather(self, runner) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        cells = {c.cell_id: c for c in self.job.cells}
        for line in complete.decode("utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            self.seen.add(record["cell_id"])
            runner.add_record(record, self.job, cells.get(record["cell_id"]))

    def missing(self) -> list[Cell]:
        return [c for c in self.job.cells if c.cell_id not in self.seen]


class SlurmExecutor:
    """Runs each job as a Slurm job (submitit), gathering records as the jobs write them.

    Raises:
        UsageError: submitit not installed, or a submission that Slurm refuses (one line).
    """

    name = "slurm"

    def __init__(self, out_dir: Path, settings: SlurmSettings):
        self.submitit = import_submitit()
        self.out_dir, self.settings = Path(out_dir), settings
        self.folder = self.out_dir / "slurm"
        try:
            self._executor = self._make_executor()
        except RuntimeError as exc:  # submitit: no srun / sbatch on this machine
            raise UsageError(f"--executor slurm: no Slurm on this machine ({exc}); --slurm-local runs the jobs "
                             "as local processes") from None

    def describe(self) -> str:
        s = self.settings
        where = "submitit local processes" if s.local else f"partition {s.partition or '(default)'}"
        return f"slurm: {where}, {s.gpus_per_job} GPU / {s.cpus_per_job} CPU / {s.time_min} min per backend variant"

    def _make_executor(self):
        s = self.settings
        cluster = "local" if s.local else "slurm"
        executor = self.submitit.AutoExecutor(folder=str(self.folder / JOB_FOLDER), cluster=cluster)
        params: dict[str, Any] = {"timeout_min": s.time_min, "cpus_per_task": s.cpus_per_job,
                                  "name": "quantarena", "tasks_per_node": 1, "nodes": 1}
        if s.gpus_per_job:
            params["gpus_per_node"] = s.gpus_per_job
        if s.mem_gb:
            params["mem_gb"] = s.mem_gb
        if not s.local:
            if s.partition:
                params["slurm_partition"] = s.partition
            if s.account:
                params["slurm_account"] = s.account
        executor.update_parameters(**params)
        return executor

    def _submit(self, runner, jobs: list[Job], first_index: int) -> list[tuple[Any, _Gatherer]]:
        executor = self._executor
        parts = self.folder / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        config = runner.config
        baseline = runner.baseline_records()
        gatherers = [_Gatherer(parts / self._part_name(config.run_id, first_index + i), job) for i, job in enumerate(jobs)]
        stderr = io.StringIO()  # submitit prints sbatch's refusal before raising it: one line is enough
        with contextlib.redirect_stderr(stderr):
            try:
                with executor.batch():
                    handles = [executor.submit(run_on_node, config, job, str(g.path), baseline)
                               for job, g in zip(jobs, gatherers)]
                failure = None
            except Exception as exc:  # sbatch refused (bad partition, account, limits): nothing ran
                failure = exc
        if failure is not None:
            text = [*str(failure).strip().splitlines(), *stderr.getvalue().splitlines()] or [type(failure).__name__]
            reason = next((line for line in text if "error" in line.lower()), text[-1])
            raise UsageError(f"--executor slurm: the submission failed: {reason.strip()[:300]}")
        self.run_id = config.run_id
        self._write_index(jobs, handles, first_index)
        return list(zip(handles, gatherers))

    @staticmethod
    def _part_name(run_id: str, index: int) -> str:
        return f"{run_id}-{index:03d}.jsonl"  # unique per run: a resumed sweep never re-reads an old part

    def _write_index(self, jobs: list[Job], handles, first_index: int) -> None:
        index_path = self.folder / "jobs.json"
        entries = json.loads(index_path.read_text()) if index_path.exists() else []
        for i, (job, handle) in enumerate(zip(jobs, handles)):
            entries.append({"job_id": str(handle.job_id), "label": job.label,
                            "part": self._part_name(self.run_id, first_index + i),
                            "cells": [c.cell_id for c in job.cells], "local": self.settings.local})
        index_path.write_text(json.dumps(entries, indent=1))

    def _wait(self, runner, pairs) -> None:
        pending = list(pairs)
        while pending:
            for handle, gatherer in list(pending):
                done = handle.done()
                gatherer.gather(runner)
                if done:
                    pending.remove((handle, gatherer))
                    self._fail_missing(runner, handle, gatherer)
            if pending:
                time.sleep(POLL_S)

    @staticmethod
    def _fail_missing(runner, handle, gatherer: _Gatherer) -> None:
        """Cells a finished job never wrote: failed, with how Slurm says the job ended."""
        missing = gatherer.missing()
        if not missing:
            return
        try:
            handle.result()
            why = "the job ended without recording them"
        except Exception as exc:  # the job's error, or Slurm's state (TIMEOUT, NODE_FAIL, ...)
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        state = getattr(handle, "state", "UNKNOWN")
        runner.fail_cells(gatherer.job, missing, f"slurm job {handle.job_id} ended {state}: {why}")

    def run(self, runner, jobs: list[Job]) -> None:
        """The baseline job first (submitted, waited for, gathered), then the others as one array."""
        first = jobs[:1] if jobs and jobs[0].label == runner.config.baseline else []
        rest = jobs[len(first):]
        for group, index in ((first, 0), (rest, len(first))):
            if group:
                self._wait(runner, self._submit(runner, group, index))
                runner.job_finished()
