"""Reading a run's results file in tests that watch a run from outside (executors, Slurm, faults)."""

from __future__ import annotations

import json
from pathlib import Path


def records(out: Path) -> list[dict]:
    """The records in ``out/results.jsonl`` so far (none when it does not exist yet)."""
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def ok_keys(out: Path) -> set[str]:
    """The cell keys whose latest record in ``out`` is ok."""
    latest = {r["cell_key"]: r["status"] for r in records(out)}
    return {key for key, status in latest.items() if status == "ok"}
