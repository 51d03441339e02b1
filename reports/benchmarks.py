"""Markdown from pytest-benchmark JSON (``--benchmark-json`` / ``--benchmark-autosave`` files).

One table per file set: a row per benchmark (backend variant x stage), the median time of each
run, the change against the first run, and the harness metrics the plugin put in ``extra_info``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reports.records import ResultsError

EXTRA_COLUMNS = (("ttft_ms", "TTFT ms", 1), ("tpot_ms", "TPOT ms", 2), ("decode_tok_s", "decode tok/s", 1),
                 ("prefill_tok_s", "prefill tok/s", 1), ("ppl", "PPL", 3))


def is_benchmark_json(path: Path) -> bool:
    """True for a pytest-benchmark JSON file (a JSON object with ``benchmarks`` and ``machine_info``)."""
    if path.suffix != ".json":
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "benchmarks" in data and "machine_info" in data


def read_benchmark_json(path: Path) -> dict[str, Any]:
    """The parsed file. Raises ``ResultsError`` if it is not pytest-benchmark JSON."""
    if not is_benchmark_json(path):
        raise ResultsError(f"not a pytest-benchmark JSON file: {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def _fmt(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def render_benchmarks(paths: list[Path]) -> str:
    """Markdown comparing one or more pytest-benchmark runs (the first is the reference)."""
    runs = [(p, read_benchmark_json(p)) for p in paths]
    names: list[str] = []
    by_run: list[dict[str, dict[str, Any]]] = []
    for _, data in runs:
        table = {b["name"]: b for b in data["benchmarks"]}
        by_run.append(table)
        names += [n for n in table if n not in names]
    header = ["benchmark"] + [f"median ms ({p.stem})" for p, _ in runs]
    if len(runs) > 1:
        header += [f"change vs {runs[0][0].stem}" for _ in runs[1:]]
    last = by_run[-1]
    header += [title for _, title, _ in EXTRA_COLUMNS]
    rows = []
    for name in names:
        medians = [table[name]["stats"]["median"] * 1e3 if name in table else None for table in by_run]
        row = [name] + [_fmt(m, 2) for m in medians]
        for m in medians[1:]:
            row.append(f"{(m / medians[0] - 1) * 100:+.1f}%" if m and medians[0] else "-")
        extra = (last.get(name) or {}).get("extra_info", {})
        row += [_fmt(extra.get(key), digits) for key, _, digits in EXTRA_COLUMNS]
        rows.append(row)
    first = runs[0][1]
    machine = first["machine_info"]
    commit = first.get("commit_info", {})
    lines = ["# quantarena benchmarks (pytest-benchmark)", "",
             f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
             f"Python {machine.get('python_version')}; commit {commit.get('id', '?')[:12]}"
             f"{' (dirty)' if commit.get('dirty') else ''}; {first.get('datetime')}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
