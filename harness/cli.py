"""``python -m harness``: run, list, report.

Bad input (unknown backend / variant / model / workload, malformed options, missing data) prints
one line on stderr naming the bad value and the valid choices and exits with code 2. ``run`` exits
0 when every cell succeeded and 1 when any failed (its results are still written).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence

from backends.base import REGISTRY, backend_class, variant_availability
from backends.models import EMBEDDED_MODEL, MODELS, ModelError, checkpoint_dir, resolve_model
from harness import executors
from harness.run_folder import check_writable, claimed
from harness.plan import Cell, UsageError, baseline_first, build_jobs, parse_backends, parse_workloads
from reports.records import RESULTS_SUFFIXES, ResultsError, ResultsWriteError, read_records
from workloads.base import WorkloadError, positive_int
from workloads.registry import DEFAULT_WORKLOADS, WORKLOADS, workload_class

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def _positive_days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of days > 0, got {text!r}")
    return value


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
    run.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                     help="load every variant even when its memory estimate exceeds what is available "
                          "(by default such a variant is skipped, with the estimate, before it loads)")
    executors.add_arguments(run)
    run.add_argument("--baseline", metavar="LABEL",
                     help="the NAME:VARIANT the others are compared with (KL divergence, top-1 and greedy-token "
                          "agreement); it runs first; 'none': no comparison (default hf:fp32 on CPU, hf:fp16 on "
                          "CUDA, when in the run)")

    sweep = sub.add_parser("sweep", help="run a design-space sweep file (YAML): the grid of its axes")
    sweep.add_argument("file", type=Path)
    sweep.add_argument("--out", type=Path, help="output folder (default reports/out/FILE-RUN_ID)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the sweep in --out: run only cells without an ok record")
    sweep.add_argument("--scale", help="a scale the file defines under scales: (e.g. full, the GPU-size study); "
                       "default: the file's top level (the CPU scale)")
    sweep.add_argument("--dry-run", action="store_true", help="print the cells and their count, run nothing")
    sweep.add_argument("--timeout", type=positive_int, default=3600, help="seconds per cell (default 3600)")
    sweep.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                       help="load every variant even when its memory estimate exceeds what is available "
                            "(by default such a variant is skipped, with the estimate, before it loads)")
    executors.add_arguments(sweep)
    listing = sub.add_parser("list", help="backends (with availability), models, workloads")
    listing.add_argument("--options", metavar="BACKEND", choices=list(REGISTRY),
                         help="print one backend's options (name, type, default, description)")
    report = sub.add_parser("report", help="re-render the markdown report from results.jsonl / .csv / "
                            ".sqlite or pytest-benchmark JSON")
    report.add_argument("results", type=Path)
    report.add_argument("--out", type=Path, help="output folder (default: beside the results)")
    report.add_argument("--baseline", metavar="LABEL",
                        help="the row others are compared with (default: the run's baseline, else hf:fp32 / hf:fp16)")
    status = sub.add_parser("status", help="what a run or sweep into a folder has done: per backend variant, "
                            "cells ok / failed / waiting, and Slurm job states")
    status.add_argument("out", type=Path, help="the run's --out folder")
    cache = sub.add_parser("cache", help="the artifact caches on disk: list entries with their size, last use and "
                           "state; prune unusable ones, old ones (--older-than) or all")
    cache.add_argument("action", choices=("list", "prune"))
    cache.add_argument("--kind", choices=("checkpoints", "onnx", "mlc", "llamacpp", "other"),
                       help="only this cache")
    cache.add_argument("--older-than", type=_positive_days, metavar="DAYS",
                       help="prune: also entries not used for DAYS days")
    cache.add_argument("--all", action="store_true", help="prune: every entry")
    cache.add_argument("--dry-run", action="store_true", help="prune: list what would be removed, remove nothing")
    compare = sub.add_parser("compare", help="compare two results files (.jsonl/.csv/.sqlite: per-cell "
                             "ratios, changes beyond the noise flagged) or pytest-benchmark JSON runs "
                             "(first = reference)")
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


def quality_filtered(spec, workloads: list[str], named: bool) -> list[str]:
    """``workloads`` without the quality ones on random weights.

    Raises:
        UsageError: a quality workload was named explicitly (``named``) for a random-weight model.
    """
    if not spec.random_weights:
        return workloads
    quality = {w for w in WORKLOADS if workload_class(w).needs_quality}
    refused = [w for w in workloads if w in quality]
    if refused and named:
        raise UsageError(f"quality workloads ({', '.join(refused)}) are refused on random weights; "
                         f"choose from {', '.join(w for w in WORKLOADS if w not in quality)}")
    return [w for w in workloads if w not in quality]


class RunStopped(BaseException):
    """SIGTERM during a run (BaseException, like KeyboardInterrupt: nothing on the way catches it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM raises ``RunStopped`` in the main thread for the block (SIGINT already raises
    KeyboardInterrupt), so a stopped run unwinds: the current cell's worker is killed, finished
    records stay, the report is written."""
    def stop(signum, frame):
        raise RunStopped(signum)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def execute(spec, jobs, out: Path, run_id: str, timeout: int, previous: list[dict[str, Any]] = (),
            baseline: str | None = None, baseline_note: str | None = None, executor=None,
            memory_check: bool = True) -> int:
    """Run ``jobs`` into ``out`` (claimed by the caller: ``harness.run_folder.claimed``) through
    ``executor`` (``harness.executors``; default local) with progress bars, then print the summary
    and write the report over ``previous`` records and the new ones. ``baseline``: the label the
    others are compared with (its job first), or None with ``baseline_note`` saying why. The report
    is re-rendered after each backend variant. SIGINT / SIGTERM stop the current cell, keep every
    finished record, write the report and return 130 / 143. ``memory_check``: skip a variant whose
    memory estimate does not fit (``harness.worker.preflight``). Returns the exit code (1 if a new
    cell failed)."""
    from rich.markup import escape

    from harness.console import ProgressObserver, console, make_progress, relative_table, summary_table
    from harness.runner import RunConfig, Runner
    from reports.markdown import render_report

    results_path = out / "results.jsonl"
    cells = sum(len(job.cells) for job in jobs)
    console.print(f"run {run_id}: {spec.name} ({spec.source}); {len(jobs)} backend variants, {cells} cells "
                  f"-> {results_path}")
    if executor is not None and executor.name != "local":
        console.print(escape(executor.describe()))
    write_plan(out, run_id, jobs, executor.name if executor is not None else "local")

    def report(records: list[dict[str, Any]]) -> Path:
        everything = latest_per_cell(records)
        return render_report(everything, out, title=f"quantarena: {spec.name}", sections=report_sections(everything),
                             baseline=baseline)

    stopped: str | None = None
    with make_progress() as progress:
        runner = Runner(RunConfig(run_id, spec, results_path, out / "logs", timeout, baseline, baseline_note,
                                  memory_check=memory_check),
                        ProgressObserver(progress), on_job_finished=report)
        try:
            with stop_on_sigterm():
                runner.run(jobs, previous, executor)
        except KeyboardInterrupt:
            stopped = "SIGINT"
        except RunStopped as exc:
            stopped = str(exc)
    records = list(runner.records)
    everything = latest_per_cell([*previous, *records])
    if stopped:
        path = report([*previous, *records])
        console.print(f"[yellow]stopped by {stopped}[/]: {len(records)} finished records kept in {results_path}; "
                      f"report of what finished: {path}")
        return 130 if stopped == "SIGINT" else 143
    relative = relative_table(everything, baseline) if baseline else None
    if relative is not None:
        console.print(relative)
    console.print(summary_table(everything))
    path = report([*previous, *records])
    console.print(f"results: {results_path} (and results.csv, results.sqlite)\nreport: {path}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


def write_plan(out: Path, run_id: str, jobs, executor: str) -> None:
    """``OUT/plan.json``: the jobs and cells this invocation runs (``harness status`` reads it)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    plan = {"run_id": run_id, "executor": executor,
            "jobs": [{"label": job.label, "cells": [c.cell_id for c in job.cells]} for job in jobs]}
    (out / "plan.json").write_text(json.dumps(plan, indent=1))


def latest_per_cell(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per cell key, the latest (a resumed sweep retries failed cells), in first-seen
    order; records without a key (schema-1 files) are all kept."""
    latest: dict[Any, dict[str, Any]] = {}
    for index, record in enumerate(records):
        latest[record.get("cell_key") or index] = record
    return list(latest.values())


def command_run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from harness.console import console

    spec = resolve_model(args.model, random_weights=args.random_weights)
    if spec.source == "hub":
        checkpoint_dir(spec)  # download once, here, so an unreachable model is a one-line error
    workloads = quality_filtered(spec, parse_workloads(args.workloads, DEFAULT_WORKLOADS), bool(args.workloads))
    check_data(workloads)
    pairs = parse_backends(args.backends)
    jobs, left_out = build_jobs(pairs, plan_cells(args, workloads), list(args.backend_option))
    for item in left_out:
        console.print(f"[yellow]skipped[/] {escape(item)}")
    if not jobs:
        raise UsageError("no backend is available on this machine; see python -m harness list")
    jobs, baseline, note = baseline_first(jobs, args.baseline)
    console.print(f"baseline: {escape(baseline)}" if baseline else f"[yellow]{escape(note)}[/]")
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or PROJECT_ROOT / "reports" / "out" / run_id
    executor = executors.make_executor(args, out)
    with claimed(out):
        return execute(spec, jobs, out, run_id, args.timeout, baseline=baseline, baseline_note=note,
                       executor=executor, memory_check=args.memory_check)


def command_sweep(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from harness.console import console
    from harness.sweep import load_sweep, plan_sweep
    from reports.records import recover_jsonl

    sweep = load_sweep(args.file, args.scale)
    spec = resolve_model(sweep.model, random_weights=sweep.random_weights)
    if spec.source == "hub":
        checkpoint_dir(spec)
    workloads = quality_filtered(spec, sweep.workloads, True)
    check_data(workloads)
    jobs, left_out = plan_sweep(sweep, args.file, workloads)
    for item in left_out:
        console.print(f"[yellow]skipped[/] {escape(item)}")
    try:
        jobs, baseline, note = baseline_first(jobs, sweep.baseline)
    except UsageError as exc:
        raise sweep.located_error(("baseline",), str(exc).replace("--baseline ", "")) from None
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = args.file.stem + (f"-{args.scale}" if args.scale else "")
    out = args.out or PROJECT_ROOT / "reports" / "out" / f"{name}-{run_id}"
    results_path = out / "results.jsonl"
    if results_path.exists() and not args.resume and not args.dry_run:
        raise UsageError(f"{results_path} already holds results: add --resume to continue that sweep, "
                         "or choose another --out")
    from harness.executors.slurm import SlurmSettingError

    try:
        executor = executors.make_executor(args, out, sweep.slurm)
    except SlurmSettingError as exc:  # the file's slurm: section (argparse checks the flags)
        raise sweep.located_error(("slurm", exc.key), exc.reason) from None
    if args.dry_run:  # read only: a sweep running into this folder may be appending right now
        previous = read_records(results_path) if results_path.exists() else []
        jobs, total, todo = _not_done(jobs, previous, spec)
        for job in jobs:
            console.print(f"{escape(job.label)}: {', '.join(c.cell_id for c in job.cells)}")
        console.print(f"{total} cells, {total - todo} already done, {todo} to run")
        return 0
    with claimed(out):
        previous = recover_jsonl(results_path)  # cuts a line a killed run left half-written
        jobs, total, todo = _not_done(jobs, previous, spec)
        if not jobs:
            console.print(f"all {total} cells of {args.file} already have ok records in {results_path}")
            return 0
        return execute(spec, jobs, out, run_id, args.timeout, previous, baseline, note, executor,
                       memory_check=args.memory_check)


def _not_done(jobs, previous: list[dict[str, Any]], spec):
    """``(jobs with only their cells that have no ok record in previous, all cells, cells to run)``."""
    from harness.env import package_versions
    from harness.plan import cell_key

    done = {r.get("cell_key") for r in previous if r["status"] == "ok"}
    packages = package_versions()  # the cell key needs only these, not the whole fingerprint (a bandwidth run)
    total = sum(len(job.cells) for job in jobs)
    for job in jobs:
        job.cells = [c for c in job.cells if cell_key(spec.to_dict(), job, c, packages) not in done]
    jobs = [job for job in jobs if job.cells]
    return jobs, total, sum(len(job.cells) for job in jobs)


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
    from harness.console import console, relative_table, summary_table
    from reports.benchmarks import is_benchmark_json
    from reports.markdown import render_report

    if is_benchmark_json(args.results):
        args.runs = [args.results]
        args.out = (args.out or args.results.parent) / f"{args.results.stem}.md"
        return command_compare(args)
    records = latest_per_cell(read_records(args.results))
    if args.baseline and args.baseline not in {r["label"] for r in records if r["status"] == "ok"}:
        raise UsageError(f"--baseline {args.baseline}: no ok record with that label in {args.results}")
    out = args.out or args.results.parent
    check_writable(out)
    report = render_report(records, out, title=f"quantarena: {(records[0]['model'] or {}).get('name', '')}",
                           sections=report_sections(records), baseline=args.baseline)
    relative = relative_table(records, args.baseline)
    if relative is not None:
        console.print(relative)
    console.print(summary_table(records))
    console.print(f"report: {report}")
    return 0


def command_compare(args: argparse.Namespace) -> int:
    from reports.benchmarks import render_benchmarks
    from reports.compare import render_comparison

    if any(path.suffix.lower() in RESULTS_SUFFIXES for path in args.runs):
        if len(args.runs) != 2:
            raise UsageError("compare takes two results files: the reference, then the new one")
        better = {m.name: m.better for name in WORKLOADS for m in workload_class(name).metrics}
        a, b = (latest_per_cell(read_records(path)) for path in args.runs)
        markdown = render_comparison(a, b, better, names=tuple(f"{p.parent.name}/{p.name}" for p in args.runs))
    else:
        markdown = render_benchmarks(args.runs)
    if args.out:
        check_writable(args.out.parent)
        args.out.write_text(markdown, encoding="utf-8")
        print(f"report: {args.out}")
    else:
        print(markdown)
    return 0


def command_status(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from harness.console import console
    from harness.status import run_status

    rows = run_status(args.out)
    table = Table(title=f"status of {escape(str(args.out))}")
    for column in ("backend variant", "ok", "failed", "waiting", "job", "state"):
        table.add_column(column, justify="right" if column in ("ok", "failed", "waiting") else "left")
    for row in rows:
        table.add_row(escape(row.label), str(row.ok), str(row.failed), str(row.waiting), row.job_id, escape(row.state))
    console.print(table)
    waiting = sum(row.waiting for row in rows)
    console.print(f"{sum(r.ok for r in rows)} ok, {sum(r.failed for r in rows)} failed, {waiting} waiting")
    return 0


def command_cache(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from backends.models import cache_root
    from harness.cache import cache_items, human_bytes, to_prune
    from harness.console import console

    root = cache_root()
    if args.action == "list" and (args.older_than is not None or args.all or args.dry_run):
        raise UsageError("--older-than, --all and --dry-run are for cache prune")
    items = [i for i in cache_items(root) if args.kind is None or i.kind == args.kind]
    if args.action == "prune":
        items = to_prune(items, args.older_than, args.all)
    verb = {"list": "", "prune": "would remove " if args.dry_run else "removed "}[args.action]
    table = Table(title=f"{verb}{escape(str(root))}")
    for column in ("cache", "entry", "size", "last used", "state"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for item in items:
        used = dt.datetime.fromtimestamp(item.last_used).strftime("%Y-%m-%d %H:%M") if item.last_used else "-"
        table.add_row(item.kind, escape(str(item.path.relative_to(root))), human_bytes(item.bytes), used,
                      escape(item.state))
        if args.action == "prune" and not args.dry_run:
            item.remove()
    console.print(table)
    total = sum(item.bytes for item in items)
    by_kind = {}
    for item in items:
        by_kind[item.kind] = by_kind.get(item.kind, 0) + item.bytes
    parts = ", ".join(f"{kind} {human_bytes(size)}" for kind, size in by_kind.items())
    console.print(f"{verb}{len(items)} entries, {human_bytes(total)}" + (f" ({parts})" if parts else ""))
    return 0


COMMANDS = {"cache": command_cache, "status": command_status, "run": command_run, "sweep": command_sweep, "list": command_list, "report": command_report,
            "compare": command_compare}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. Exit codes: 0 ok, 1 a cell failed or results could not be written, 2 bad input,
    130 / 143 stopped by SIGINT / SIGTERM."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit: an error to report, not a kill
    warnings.showwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, ModelError, ResultsError, WorkloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ResultsWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
