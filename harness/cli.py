"""``python -m harness``: run, list, report.

Bad input (unknown backend / variant / model / workload, malformed options, missing data) prints
one line on stderr naming the bad value and the valid choices and exits with code 2. ``run`` exits
0 when every cell succeeded and 1 when any failed (its results are still written).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from backends.base import REGISTRY, backend_class, variant_availability
from backends.models import EMBEDDED_MODEL, MODELS, ModelError, checkpoint_dir, resolve_model
from harness.plan import Cell, UsageError, build_jobs, parse_backends, parse_workloads
from reports.records import ResultsError, read_records
from workloads.base import WorkloadError, positive_int
from workloads.registry import DEFAULT_WORKLOADS, WORKLOADS, workload_class

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = sub.add_parser("run", help="benchmark backends on a model")
    run.add_argument("--backends", help="comma list of NAME or NAME:VARIANT (default: every available)")
    run.add_argument("--model", default=EMBEDDED_MODEL,
                     help=f"{', '.join(MODELS)}, a Hub id or a local directory (default {EMBEDDED_MODEL})")
    run.add_argument("--random-weights", action="store_true",
                     help="build the architecture with random weights (speed/memory only)")
    run.add_argument("--workloads", help=f"comma list of {', '.join(WORKLOADS)} (default {','.join(DEFAULT_WORKLOADS)})")
    run.add_argument("--out", type=Path, help="output folder (default reports/out/RUN_ID)")
    for name in WORKLOADS:  # each workload declares its own flags
        workload_class(name).add_arguments(run)
    run.add_argument("--backend-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="NAME.KEY=VALUE for one backend (mlc.sliding_window=1024), KEY=VALUE for every "
                          "chosen backend that has KEY (threads=2); see list --options NAME")
    run.add_argument("--timeout", type=positive_int, default=3600, help="seconds per cell (default 3600)")

    listing = sub.add_parser("list", help="backends (with availability), models, workloads")
    listing.add_argument("--options", metavar="BACKEND", choices=list(REGISTRY),
                         help="print one backend's options (name, type, default, description)")
    report = sub.add_parser("report", help="re-render the markdown report from results.jsonl / .csv / "
                            ".sqlite or pytest-benchmark JSON")
    report.add_argument("results", type=Path)
    report.add_argument("--out", type=Path, help="output folder (default: beside the results)")
    compare = sub.add_parser("compare", help="compare pytest-benchmark JSON runs (first = reference)")
    compare.add_argument("runs", type=Path, nargs="+")
    compare.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    return parser


def plan_cells(args: argparse.Namespace, workloads: list[str]) -> list[Cell]:
    """The cells of a run: each workload expands its own flags (sweeps) into cells."""
    cells: list[Cell] = []
    for name in workloads:
        cls = workload_class(name)
        for params in cls.params_from_args(args):
            cells.append(Cell(cls.cell_id(params), name, params.to_dict(), WORKLOADS[name]))
    return cells


def check_data(workloads: list[str]) -> None:
    """Fail fast when ``$HARNESS_DATA_DIR`` is set but lacks a file a chosen workload declares."""
    from workloads.data import data_dir

    local = data_dir()
    if local is None:
        return
    for name in workloads:
        missing = workload_class(name).missing_data(local)
        if missing:
            raise WorkloadError(f"missing data: {missing} (HARNESS_DATA_DIR={os.environ['HARNESS_DATA_DIR']})")


def report_sections(records: list[dict[str, Any]]):
    """The report sections of the registered workloads, in registry order."""
    return [workload_class(name).report_section for name in WORKLOADS]


def command_run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from harness.console import ProgressObserver, console, make_progress, summary_table
    from harness.runner import RunConfig, Runner
    from reports.markdown import render_report

    spec = resolve_model(args.model, random_weights=args.random_weights)
    if spec.source == "hub":
        checkpoint_dir(spec)  # download once, here, so an unreachable model is a one-line error
    workloads = parse_workloads(args.workloads, DEFAULT_WORKLOADS)
    if spec.random_weights:
        quality = {w for w in WORKLOADS if workload_class(w).needs_quality}
        refused = [w for w in workloads if w in quality]
        if refused and args.workloads:
            raise UsageError(f"quality workloads ({', '.join(refused)}) are refused on random weights; "
                             f"choose from {', '.join(w for w in WORKLOADS if w not in quality)}")
        workloads = [w for w in workloads if w not in quality]
    check_data(workloads)
    pairs = parse_backends(args.backends)
    jobs, left_out = build_jobs(pairs, plan_cells(args, workloads), list(args.backend_option))
    for item in left_out:
        console.print(f"[yellow]skipped[/] {escape(item)}")
    if not jobs:
        raise UsageError("no backend is available on this machine; see python -m harness list")
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or PROJECT_ROOT / "reports" / "out" / run_id
    results_path = out / "results.jsonl"
    console.print(f"run {run_id}: {spec.name} ({spec.source}); {len(jobs)} backend variants x "
                  f"{len(jobs[0].cells)} cells -> {results_path}")
    with make_progress() as progress:
        runner = Runner(RunConfig(run_id, spec, results_path, out / "logs", args.timeout), ProgressObserver(progress))
        records = runner.run(jobs)
    console.print(summary_table(records))
    report = render_report(records, out, title=f"quantarena: {spec.name}", sections=report_sections(records))
    console.print(f"results: {results_path} (and results.csv, results.sqlite)\nreport: {report}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


def command_list(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from harness.console import console

    if args.options:
        options = Table(title=f"{args.options} options (--backend-option {args.options}.KEY=VALUE)")
        for column in ("option", "type", "default", "description"):
            options.add_column(column)
        for row in backend_class(args.options).Options.describe():
            options.add_row(*(escape(cell) for cell in row))
        console.print(options)
        return 0

    table = Table(title="backends")
    for column in ("backend", "description", "available"):
        table.add_column(column)
    for name in REGISTRY:
        try:
            variants = backend_class(name).variants
        except ImportError as exc:
            table.add_row(name, "-", f"no: cannot import {exc.name}")
            continue
        for variant, description in variants.items():
            availability = variant_availability(name, variant)
            table.add_row(f"{name}:{variant}", escape(description),
                          "yes" if availability.ok else escape(f"no: {availability.reason}"))
    console.print(table)
    models = Table(title="models")
    models.add_column("model")
    models.add_column("description")
    for key, model in MODELS.items():
        models.add_row(key + (" (default)" if key == EMBEDDED_MODEL else ""), model.description)
    console.print(models)
    workloads = Table(title="workloads")
    for column in ("workload", "measures", "metrics (unit, better)"):
        workloads.add_column(column)
    for name in WORKLOADS:
        cls = workload_class(name)
        metrics = ", ".join(f"{m.name} ({m.unit or '-'}, {m.better})" for m in cls.metrics)
        workloads.add_row(name + (" (quality)" if cls.needs_quality else ""), cls.description, metrics)
    console.print(workloads)
    return 0


def command_report(args: argparse.Namespace) -> int:
    from harness.console import console, summary_table
    from reports.benchmarks import is_benchmark_json
    from reports.markdown import render_report

    if is_benchmark_json(args.results):
        args.runs = [args.results]
        args.out = (args.out or args.results.parent) / f"{args.results.stem}.md"
        return command_compare(args)
    records = read_records(args.results)
    out = args.out or args.results.parent
    report = render_report(records, out, title=f"quantarena: {(records[0]['model'] or {}).get('name', '')}",
                           sections=report_sections(records))
    console.print(summary_table(records))
    console.print(f"report: {report}")
    return 0


def command_compare(args: argparse.Namespace) -> int:
    from reports.benchmarks import render_benchmarks

    markdown = render_benchmarks(args.runs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown, encoding="utf-8")
        print(f"report: {args.out}")
    else:
        print(markdown)
    return 0


COMMANDS = {"run": command_run, "list": command_list, "report": command_report, "compare": command_compare}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, ModelError, ResultsError, WorkloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
