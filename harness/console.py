"""Rich console output: live progress per cell while running, the summary table at the end."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from reports.table import SummaryRow, summary_rows

# Wide enough for the summary table when output goes to a file or CI log rather than a terminal.
console = Console(width=None if sys.stdout.isatty() else 200)


class ProgressObserver:
    """Draws one progress bar per cell; prints a line as each cell finishes."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def _key(self, job, cell) -> str:
        return f"{job.label} {cell.cell_id}"

    def cell_started(self, job, cell) -> None:
        self.tasks[self._key(job, cell)] = self.progress.add_task(self._key(job, cell), total=None)

    def cell_progress(self, job, cell, done, total) -> None:
        task = self.tasks.get(self._key(job, cell))
        if task is not None:
            self.progress.update(task, completed=done, total=total)

    def cell_finished(self, job, cell, record) -> None:
        task = self.tasks.pop(self._key(job, cell), None)
        if task is not None:
            self.progress.remove_task(task)
        status = "[green]ok[/]" if record["status"] == "ok" else f"[red]failed[/]: {escape(str(record['error']))}"
        self.progress.console.print(f"{self._key(job, cell)}: {status}")


def make_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def relative_table(records: list[dict[str, Any]], baseline: str | None = None) -> Table | None:
    """Every row against the baseline (``reports.baseline``), flagged rows marked; None without a
    baseline row."""
    from reports.baseline import RELATIVE_COLUMNS, baseline_label, relative_cells, relative_rows
    from reports.sanity import FLAG, sanity_flags

    baseline = baseline_label(records, baseline)
    if baseline is None:
        return None
    flags = sanity_flags(records, baseline)
    table = Table(title=f"relative to {baseline} (report.md has the sanity flags' reasons)")
    for column in RELATIVE_COLUMNS:
        table.add_column(column, justify="left" if column == "backend" else "right")
    for row in relative_rows(records, baseline):
        cells = relative_cells(row)
        cells[0] += f" {FLAG}" if row.label in flags else ""
        table.add_row(*(escape(cell) for cell in cells))
    return table


def summary_table(records: list[dict[str, Any]]) -> Table:
    table = Table(title="quantarena summary (median ± std)")
    for column in SummaryRow.COLUMNS:
        table.add_column(column, justify="left" if column in ("backend", "format") else "right")
    for row in summary_rows(records):
        table.add_row(*(escape(cell) for cell in row.cells()))
    return table
