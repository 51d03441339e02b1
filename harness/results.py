"""Results as JSON lines: one self-describing record per cell, appended and flushed as it finishes.

Record schema (``SCHEMA_VERSION``): ``schema``, ``run_id``, ``cell_id``, ``label``
(``backend:variant``), ``backend``, ``variant``, ``workload``, ``params``, ``model`` (ModelSpec
dict), ``status`` (``ok`` | ``failed``), ``error`` (one line or null), ``metrics``, ``samples``,
``load`` (LoadReport dict), ``info`` (backend self-description), ``env`` (fingerprint),
``started_at`` (ISO 8601 UTC), ``duration_s``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


class ResultsError(ValueError):
    """A results file is missing or not in this schema."""


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf (not JSON) replaced by null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class ResultsWriter:
    """Appends records to ``path`` (created with its parents), flushing each one to disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            handle.flush()


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of a results file.

    Raises:
        ResultsError: the file is missing, a line is not JSON, or a record lacks the schema fields.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"results file not found: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ResultsError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict) or "schema" not in record or "label" not in record:
            raise ResultsError(f"{path}:{number}: not a quantarena record (no schema/label)")
        records.append(record)
    if not records:
        raise ResultsError(f"{path}: no records")
    return records
