"""Benchmark result records (schema 2): one nested dict per cell, read and written as JSONL, CSV
and SQLite, so that all three give equal records.

Flat rows: ``flatten`` turns a record into ``{"metrics.ttft_ms.median": 12.5, ...}``. A flat cell is
None, bool, int, float or str; a str cell is JSON exactly when it starts with ``[``, ``{`` or ``"``:
``flatten`` JSON-encodes lists, dicts it cannot flatten (empty, or a key containing ".") and strings
that themselves start with one of those characters, and ``unflatten`` decodes such cells.
Table formats add their own escapes on top of that convention (a string the format would read back
as something else, e.g. ``""``/``"2"`` in CSV or ``"true"`` in SQLite, is written JSON-encoded);
booleans are stored as the text ``true``/``false`` in both CSV and SQLite.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import sqlite3
import warnings
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

SCHEMA_VERSION = 2
FIELDS = ("schema", "run_id", "cell_id", "cell_key", "label", "backend", "variant", "options", "workload",
          "params", "model", "status", "error", "metrics", "samples", "load", "info", "env",
          "started_at", "duration_s")
KNOWN_SCHEMAS = (1, 2)
RESULTS_SUFFIXES = (".jsonl", ".csv", ".sqlite", ".db")  # what read_records reads

SQUAD_RENAMES = {"exact": "exact_pct", "f1": "f1_pct", "exact_ci95": "exact_pct_ci95",
                 "f1_ci95": "f1_pct_ci95", "HasAns_exact": "HasAns_exact_pct",
                 "HasAns_f1": "HasAns_f1_pct", "HasAns_f1_ci95": "HasAns_f1_pct_ci95",
                 "NoAns_accuracy": "NoAns_accuracy_pct",
                 "NoAns_accuracy_ci95": "NoAns_accuracy_pct_ci95"}
# v1 load key -> v2 ``load.prepare`` key; v1 keys not named here (and not top-level) go to ``details``
V1_PREPARE = {"checkpoint_prepare_s": "checkpoint_s", **{k: k for k in (
    "export_s", "quantize_s", "convert_s", "compile_s", "artifact_bytes", "artifact_dir",
    "cache_hit")}, "artifact_cache_hit": "cache_hit"}  # cache_hit wins over artifact_cache_hit
V2_LOAD_TOP = ("load_s", "weight_bytes", "load_call_s", "first_forward_s")

# CSV columns that stay text even when a cell looks like a number or a boolean
TEXT_COLUMNS = frozenset({"run_id", "cell_id", "cell_key", "label", "backend", "variant", "workload", "status",
                          "error", "started_at", "env.git_commit", "env.cpu", "env.os",
                          "env.python", "env.cuda_driver"})
TEXT_PREFIXES = ("model.", "env.packages.", "info.library.")

_INT = re.compile(r"[-+]?\d+\Z", re.ASCII)
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z", re.ASCII)
_JSON_START = ("[", "{", '"')


class ResultsError(ValueError):
    """A results file is missing, unreadable or not in a known schema (the message is one line)."""


def json_safe(value: Any) -> Any:
    """``value`` (any JSON-like object) with NaN/inf floats replaced by None, tuples by lists,
    numpy scalars by Python ones and dict keys by ``str(key)``, recursively."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _flat_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict) and value and not any("." in str(k) for k in value):
        for k, v in value.items():
            _flat_into(out, f"{key}.{k}", v)
    elif isinstance(value, (dict, list, tuple)) or (isinstance(value, str) and value.startswith(_JSON_START)):
        out[key] = json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False)
    else:
        out[key] = json_safe(value)


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One flat row (``dict[str, None|bool|int|float|str]``) of ``record``: every FIELD first (None
    when absent), then any other top-level key; nested keys joined with "."; see the module
    docstring for which str cells are JSON."""
    out: dict[str, Any] = {}
    for key in FIELDS + tuple(k for k in record if k not in FIELDS):
        _flat_into(out, str(key), record.get(key))
    return out


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_JSON_START):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def unflatten(row: dict[str, Any]) -> dict[str, Any]:
    """The nested record of a flat ``row`` (inverse of ``flatten``): every FIELD present (None when
    absent), None leaves and None extra top-level keys dropped, dicts left empty by that dropped,
    JSON cells decoded."""
    record: dict[str, Any] = {}
    for column, value in row.items():
        value = _decode(value)
        if value is None:
            continue
        *parents, leaf = column.split(".")
        node = record
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {**{key: record.pop(key, None) for key in FIELDS}, **record}


def normalize(record: dict[str, Any]) -> dict[str, Any]:
    """``unflatten(flatten(json_safe(record)))``: the form every reader returns."""
    return unflatten(flatten(json_safe(record)))


def upgrade_v1(record: dict[str, Any]) -> dict[str, Any]:
    """A schema-2 copy of a schema-1 ``record`` (squad metrics renamed to ``*_pct``,
    ``metrics.memory`` to flat ``*_bytes`` metrics, ``load`` to ``{load_s, weight_bytes, prepare,
    details}``). Raises ResultsError if ``record["schema"]`` is not 1."""
    if record.get("schema") != 1:
        raise ResultsError(f"not a schema-1 record: schema {record.get('schema')!r}")
    out = copy.deepcopy(record)
    out["schema"] = 2
    metrics = out.get("metrics")
    if isinstance(metrics, dict):
        memory = metrics.pop("memory", None) or {}
        metrics = {SQUAD_RENAMES.get(k, k): v for k, v in metrics.items()}
        metrics.update({f"{k}_bytes": v for k, v in memory.items()})
        out["metrics"] = metrics
    old = out.get("load")
    if isinstance(old, dict):
        load: dict[str, Any] = {k: old.pop(k) for k in V2_LOAD_TOP if k in old}
        prepare: dict[str, Any] = {}
        for v1_key, v2_key in V1_PREPARE.items():
            if v1_key in old and v2_key not in prepare:
                prepare[v2_key] = old.pop(v1_key)
        if "artifact_bytes" not in prepare and {"library_bytes", "weights_bytes_on_disk"} <= set(old):
            # v1 mlc reported its entry's two files; v2's artifact_bytes is their sum (as mlc now reports)
            prepare["artifact_bytes"] = old["library_bytes"] + old["weights_bytes_on_disk"]
        load.update(prepare=prepare, details=old)
        out["load"] = load
    return out


class ResultsWriteError(OSError):
    """Appending a record failed (disk full, file too large); the file holds every earlier record."""


class TruncatedResultsWarning(UserWarning):
    """A results file ends in a line cut mid-write (a run killed while appending); it was skipped."""


class ResultsWriter:
    """Appends records to a JSONL file ``path`` (parents created), one line each, fsynced."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` (NaN/inf as null) as one JSON line and force it to disk (fsync).

        Raises:
            ResultsWriteError: the write failed (disk full, file size limit, I/O error); the file
                is cut back to where it was, so every record before this one stays intact.
        """
        line = (json.dumps(json_safe(record), allow_nan=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)  # no half-written line left behind
            raise ResultsWriteError(f"cannot write {self.path} ({exc.strerror or exc}); every record "
                                    "before this one is intact") from None
        finally:
            os.close(fd)


def is_text_column(column: str) -> bool:
    """Whether CSV cells of ``column`` stay str even when they look like numbers or booleans
    (``TEXT_COLUMNS`` and everything under ``TEXT_PREFIXES``)."""
    return column in TEXT_COLUMNS or column.startswith(TEXT_PREFIXES)


def _from_csv(column: str, text: str) -> Any:
    if text == "":
        return None
    if is_text_column(column):
        return text
    if text in ("true", "false"):
        return text == "true"
    if _INT.match(text):
        return int(text)
    return float(text) if _FLOAT.match(text) else text


def _to_csv(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    decoded = _from_csv(column, value)
    return value if isinstance(decoded, str) else json.dumps(value, ensure_ascii=False)


def _from_sqlite(value: Any) -> Any:
    return value == "true" if value in ("true", "false") else value


def _to_sqlite(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if value in ("true", "false") else value


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    rank = {field: i for i, field in enumerate(FIELDS)}
    return sorted(seen, key=lambda c: rank.get(c.split(".", 1)[0], len(FIELDS)))


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_sqlite(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    quoted = ", ".join('"' + c.replace('"', '""') + '"' for c in columns)  # no types: BLOB affinity
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"CREATE TABLE results ({quoted})")
        db.executemany(f"INSERT INTO results VALUES ({', '.join('?' * len(columns))})",
                       [[_to_sqlite(row.get(c)) for c in columns] for row in rows])
        db.commit()


def write_tables(records: Iterable[dict[str, Any]], out_dir: Path | str) -> tuple[Path, Path]:
    """(Re)write ``out_dir/results.csv`` and ``out_dir/results.sqlite`` (table ``results``, untyped
    columns) with one flat row per record; each file is replaced atomically. Returns both paths."""
    import pandas as pd  # imported here: the worker process imports this module, pandas costs ~90 MB RSS

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [flatten(json_safe(r)) for r in records]
    columns = _columns(rows) if rows else list(FIELDS)
    frame = pd.DataFrame([[_to_csv(c, row.get(c)) for c in columns] for row in rows],
                         columns=columns, dtype=object)
    csv_path, db_path = out_dir / "results.csv", out_dir / "results.sqlite"
    _replace_atomically(csv_path, lambda tmp: frame.to_csv(tmp, index=False))
    _replace_atomically(db_path, lambda tmp: _write_sqlite(tmp, columns, rows))
    return csv_path, db_path


def _checked(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict) or record.get("schema") is None or record.get("label") is None:
        raise ResultsError(f"{where}: not a quantarena record (no schema/label)")
    if record["schema"] not in KNOWN_SCHEMAS:
        raise ResultsError(f"{where}: unknown schema {record['schema']!r} (expected 1 or 2)")
    return normalize(upgrade_v1(record) if record["schema"] == 1 else record)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a last line cut mid-write (no newline, not JSON) is skipped with a
    ``TruncatedResultsWarning`` (``sweep --resume`` runs that cell again).

    Raises:
        ResultsError: a line before the last that is not a JSON record.
    """
    records = []
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, 1):
        last = number == len(lines)  # a last line has no newline: a write may have been cut there
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not (last and exc.reason == "unexpected end of data"):  # not a character cut in two
                raise
            line = None
        if line is not None and not line.strip():
            continue
        try:
            record = json.loads(line) if line is not None else None
        except ValueError:
            record = None
        if record is None:
            if last:
                warnings.warn(f"{path}:{number}: skipped a last line cut mid-write ({len(raw)} bytes); "
                              "sweep --resume runs that cell again", TruncatedResultsWarning, stacklevel=2)
                continue
            raise ResultsError(f"{path}:{number}: not a JSON line")
        records.append(_checked(record, f"{path}:{number}"))
    return records


def recover_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete records of a JSONL results file that a crash may have cut mid-line (a run
    killed while appending, a power loss): a trailing line without its newline that is not valid
    JSON is removed from the file (truncated away), so appending can continue cleanly. A missing
    file gives no records.

    Raises:
        ResultsError: a non-JSON or non-record line before the end.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    if tail.strip():
        try:
            json.loads(tail)
            end = len(data)  # a complete last record that only lacks its newline
        except ValueError:
            pass
        with path.open("r+b") as handle:
            if end == len(data):
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:
                handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    return _read_jsonl(path) if path.read_bytes().strip() else []


def _read_table(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".csv":
        import pandas as pd

        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
        columns = list(frame.columns)
        rows = [{c: _from_csv(c, v) for c, v in row.items()} for row in frame.to_dict("records")]
    else:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            cursor = db.execute("SELECT * FROM results ORDER BY rowid")
            columns = [d[0] for d in cursor.description]
            rows = [{c: _from_sqlite(v) for c, v in zip(columns, values)} for values in cursor]
    if not {"schema", "label"} <= set(columns):
        raise ResultsError(f"{path}: not a quantarena table (no schema/label columns)")
    return [_checked(unflatten(row), f"{path}: row {i}") for i, row in enumerate(rows, 1)]


def read_records(path: Path | str) -> list[dict[str, Any]]:
    """All records of a ``.jsonl``, ``.csv`` or ``.sqlite``/``.db`` results file, as normalized
    schema-2 records (schema-1 records upgraded).

    Raises:
        ResultsError: the file is missing or unreadable, has an unknown suffix, a line that is not
            JSON, a record without schema/label or of an unknown schema, a table without the
            schema/label columns, or no records.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"results file not found: {path}")
    if path.suffix.lower() not in RESULTS_SUFFIXES:
        raise ResultsError(f"{path}: unknown results suffix {path.suffix!r} "
                           "(expected .jsonl, .csv, .sqlite or .db)")
    from pandas.errors import EmptyDataError, ParserError

    try:
        records = (_read_jsonl if path.suffix.lower() == ".jsonl" else _read_table)(path)
    except (OSError, UnicodeError, sqlite3.Error, ParserError, EmptyDataError) as exc:
        raise ResultsError(f"{path}: not readable ({(str(exc).splitlines() or [''])[0]})") from None
    if not records:
        raise ResultsError(f"{path}: no records")
    return records
