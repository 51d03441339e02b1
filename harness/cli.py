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
from harness.results import ResultsError, read_records
from workloads.base import WorkloadError
from workloads.registry import WORKLOADS

DEFAULT_WORKLOADS = ("latency", "wikitext2")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    values = _int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected >= 0, got {value}")
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
    lat = run.add_argument_group("latency")
    lat.add_argument("--input-lens", type=_int_list, default=[128, 512], help="prompt tokens (default 128,512)")
    lat.add_argument("--output-len", type=_positive, default=64, help="new tokens (default 64)")
    lat.add_argument("--batch-sizes", type=_int_list, default=[1], help="sequences per call (default 1)")
    lat.add_argument("--context-lengths", type=_int_list,
                     help="context-length sweep: latency cells with these prompt lengths (replaces --input-lens)")
    lat.add_argument("--warmup", type=_non_negative, default=2, help="untimed runs per cell (default 2)")
    lat.add_argument("--repetitions", type=_positive, default=5, help="timed runs per cell (default 5)")
    ppl = run.add_argument_group("wikitext2")
    ppl.add_argument("--ppl-context", type=_positive, default=1024, help="window tokens (default 1024)")
    ppl.add_argument("--ppl-stride", type=_positive, default=512, help="stride tokens (default 512)")
    ppl.add_argument("--max-eval-tokens", type=_non_negative, default=8192,
                     help="score this many leading tokens; 0 = the whole split (default 8192)")
    qa = run.add_argument_group("squad")
    qa.add_argument("--squad-n", type=_positive, default=200, help="questions, stratified HasAns/NoAns (default 200)")
    qa.add_argument("--squad-shots", type=_non_negative, default=0, help="worked examples per prompt (default 0)")
    qa.add_argument("--squad-batch", type=_positive, default=8, help="questions per generate call (default 8)")
    qa.add_argument("--squad-seed", type=_non_negative, default=0, help="sampling seed (default 0)")
    run.add_argument("--backend-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="passed to every backend (e.g. threads=2, attn=eager)")
    run.add_argument("--timeout", type=_positive, default=3600, help="seconds per cell (default 3600)")

    sub.add_parser("list", help="backends (with availability), models, workloads")
    report = sub.add_parser("report", help="re-render the markdown report from results.jsonl or "
                            "pytest-benchmark JSON")
    report.add_argument("results", type=Path)
    report.add_argument("--out", type=Path, help="output folder (default: beside the results)")
    compare = sub.add_parser("compare", help="compare pytest-benchmark JSON runs (first = reference)")
    compare.add_argument("runs", type=Path, nargs="+")
    compare.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    return parser


def plan_cells(args: argparse.Namespace, workloads: list[str]) -> list[Cell]:
    cells: list[Cell] = []
    for name in workloads:
        if name == "latency":
            # a context-length sweep replaces the default prompt lengths
            lengths = list(dict.fromkeys(args.context_lengths or args.input_lens))
            for n_in in lengths:
                for batch in args.batch_sizes:
                    params = {"n_in": n_in, "n_out": args.output_len, "batch": batch,
                              "warmup": args.warmup, "repetitions": args.repetitions}
                    cells.append(Cell(f"latency-in{n_in}-out{args.output_len}-b{batch}", name, params))
        elif name == "wikitext2":
            if args.ppl_stride > args.ppl_context:
                raise UsageError(f"--ppl-stride {args.ppl_stride} must be <= --ppl-context {args.ppl_context}")
            params = {"context": args.ppl_context, "stride": args.ppl_stride,
                      "max_eval_tokens": args.max_eval_tokens}
            cells.append(Cell("wikitext2", name, params))
        elif name == "squad":
            params = {"n": args.squad_n, "shots": args.squad_shots, "batch_size": args.squad_batch,
                      "seed": args.squad_seed}
            cells.append(Cell(f"squad-n{args.squad_n}-k{args.squad_shots}", name, params))
    return cells


def check_data(workloads: list[str]) -> None:
    """Fail fast when ``$HARNESS_DATA_DIR`` is set but lacks a file a chosen workload reads."""
    from workloads.data import SQUAD_GLOB, WIKITEXT2_FILE, data_dir

    local = data_dir()
    if local is None:
        return
    if {"latency", "wikitext2"} & set(workloads):
        path = local / WIKITEXT2_FILE
        if not path.is_file():
            raise WorkloadError(f"missing data: {path} (HARNESS_DATA_DIR={os.environ['HARNESS_DATA_DIR']})")
    if "squad" in workloads and not list(local.glob(SQUAD_GLOB)):
        raise WorkloadError(f"missing data: {local / SQUAD_GLOB} (HARNESS_DATA_DIR={os.environ['HARNESS_DATA_DIR']})")


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
        refused = [w for w in workloads if WORKLOADS[w].needs_quality]
        if refused and args.workloads:
            raise UsageError(f"quality workloads ({', '.join(refused)}) are refused on random weights; "
                             f"choose from {', '.join(w for w in WORKLOADS if not WORKLOADS[w].needs_quality)}")
        workloads = [w for w in workloads if not WORKLOADS[w].needs_quality]
    check_data(workloads)
    pairs = parse_backends(args.backends)
    jobs, left_out = build_jobs(pairs, plan_cells(args, workloads), dict(args.backend_option))
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
    report = render_report(records, out, title=f"quantarena: {spec.name}")
    console.print(f"results: {results_path}\nreport: {report}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


def command_list(_: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from harness.console import console

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
    workloads.add_column("workload")
    workloads.add_column("measures")
    for name, cls in WORKLOADS.items():
        workloads.add_row(name + (" (quality)" if cls.needs_quality else ""), cls.description)
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
    report = render_report(records, out, title=f"quantarena: {records[0]['model'].get('name', '')}")
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
