"""``python -m harness status OUT``: what a run or sweep into ``OUT`` has done, per backend variant.

Reads ``OUT/plan.json`` (the jobs and cells of the latest invocation, written before any cell
runs), ``OUT/results.jsonl`` (the records so far) and, for ``--executor slurm``,
``OUT/slurm/jobs.json`` with each job's state as Slurm reports it (``sacct``, through submitit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from harness.plan import UsageError


@dataclass
class JobStatus:
    """One backend variant: ``ok`` / ``failed`` cells recorded, ``waiting`` cells of the plan not
    yet recorded (pending or running), and the scheduler's job id and state where there is one."""

    label: str
    ok: int
    failed: int
    waiting: int
    job_id: str = ""
    state: str = ""


def _slurm_states(out: Path) -> dict[str, tuple[str, str]]:
    """label -> (job id, state) of the latest Slurm submission of each label."""
    index = out / "slurm" / "jobs.json"
    if not index.exists():
        return {}
    states: dict[str, tuple[str, str]] = {}
    for entry in json.loads(index.read_text()):
        state = "local process" if entry.get("local") else _sacct_state(out, entry["job_id"])
        states[entry["label"]] = (entry["job_id"], state)
    return states


def _sacct_state(out: Path, job_id: str) -> str:
    try:
        import submitit

        from harness.executors.slurm import JOB_FOLDER

        return str(submitit.SlurmJob(str(out / "slurm" / JOB_FOLDER), job_id).state)
    except Exception as exc:  # no submitit, or sacct unavailable here: say so in the table
        return f"unknown ({type(exc).__name__})"


def _complete_records(path: Path) -> list[dict]:
    """The records on complete lines (a running job may be writing the last one); read only."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records = []
    for line in data[:data.rfind(b"\n") + 1].splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "label" in record and "cell_id" in record:
            records.append(record)
    return records


def run_status(out: Path) -> list[JobStatus]:
    """The status of every backend variant of the run in ``out``.

    Raises:
        UsageError: ``out`` has no ``plan.json`` (not a run folder, or it never started).
    """
    plan_path = Path(out) / "plan.json"
    if not plan_path.exists():
        raise UsageError(f"{out}: no plan.json here; give the --out folder of a run or sweep")
    plan = json.loads(plan_path.read_text())
    results = Path(out) / "results.jsonl"
    latest = {(r["label"], r["cell_id"]): r["status"] for r in _complete_records(results)}
    slurm = _slurm_states(Path(out))
    labels = [job["label"] for job in plan["jobs"]]
    labels += sorted({label for label, _ in latest} - set(labels))  # variants finished by earlier invocations
    planned = {job["label"]: job["cells"] for job in plan["jobs"]}
    rows = []
    for label in labels:
        statuses = [status for (lab, _), status in latest.items() if lab == label]
        waiting = sum((label, cell) not in latest for cell in planned.get(label, []))
        job_id, state = slurm.get(label, ("", ""))
        rows.append(JobStatus(label, statuses.count("ok"), statuses.count("failed"), waiting, job_id, state))
    return rows
