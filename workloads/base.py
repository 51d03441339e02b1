"""What a workload is: a named measurement that drives any ``Backend`` through its public contract,
and declares everything the harness and the report need to know about it.

A workload knows nothing about a backend's internals (lm-evaluation-harness's task/model split):
it gets a loaded backend and the model's tokenizer and returns metrics and raw samples. Its
parameter dataclass declares the command-line flags (``param``), the class declares its cell ids,
the data files it reads, its metrics (``Metric``: name, unit, which direction is better) and its
section of the markdown report, so that adding a workload is one module and one registry line.
"""

from __future__ import annotations

import abc
import argparse
import itertools
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from backends.base import Backend

Progress = Callable[[int, int], None]  # (done, total)


class WorkloadError(RuntimeError):
    """The workload cannot run (missing data, bad parameters, a refused combination); one line."""


BEYOND_CONTEXT = "beyond the model's context"  # marks a refused length in a failed record


def refuse_beyond_context(what: str, tokens: int, context: int | None) -> None:
    """Refuse, never clip, ``tokens`` that do not fit the model's ``context``
    (``max_position_embeddings``, ``backends.models.max_context_tokens``; None: unknown, nothing
    to check against).

    Raises:
        WorkloadError: ``tokens > context``; the message starts with ``what`` and contains
            ``BEYOND_CONTEXT``.
    """
    if context is not None and tokens > context:
        raise WorkloadError(f"{what} is {BEYOND_CONTEXT} ({context} tokens, max_position_embeddings); "
                            "refused, not clipped")


@dataclass
class WorkloadResult:
    """``metrics``: summary numbers for tables, named ``{metric}_{unit}``; ``samples``: the raw
    measurements behind them."""

    metrics: dict[str, Any]
    samples: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """A metric a workload reports: ``name`` is its key in a record's ``metrics`` (``{metric}_{unit}``,
    e.g. ``ttft_ms``), ``unit`` as printed, ``better`` which direction is an improvement."""

    name: str
    unit: str
    better: Literal["higher", "lower"]
    description: str


def _int_list(text: str, minimum: int, wanted: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
    return values


def positive_ints(text: str) -> list[int]:
    """argparse type: ``"128,512"`` -> ``[128, 512]``, every value >= 1."""
    return _int_list(text, 1, "positive integers")


def non_negative_ints(text: str) -> list[int]:
    """argparse type: ``"0,50,100"`` -> ``[0, 50, 100]``, every value >= 0."""
    return _int_list(text, 0, "integers >= 0")


def positive_int(text: str) -> int:
    """argparse type: one integer >= 1."""
    values = positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def non_negative_int(text: str) -> int:
    """argparse type: one integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected >= 0, got {value}")
    return value


def param(default: int | str, help: str, *flags: str, sweep: bool = False, minimum: int = 1,
          cli_default: list[int] | None = None, choices: tuple[str, ...] = ()) -> Any:
    """A workload parameter field: its command-line ``flags`` (first is the name), ``help``, and
    whether the flag takes a comma list (``sweep``: one cell per value, ``cli_default`` the list
    used when the flag is not given); integers ``>= minimum``, or one of ``choices`` (strings)."""
    return field(default=default, metadata={"flags": flags, "help": help, "sweep": sweep, "minimum": minimum,
                                            "cli_default": cli_default or [default], "choices": choices})


@dataclass
class WorkloadParams:
    """Base of each workload's parameters (a dataclass of ``param`` fields; records carry them verbatim)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Workload(abc.ABC):
    """A measurement.

    Class attributes:
        name, description: registry key and one line for ``harness list``.
        needs_quality: meaningless on random weights (refused there).
        Params: the parameter dataclass (fields made with ``param``).
        data_files: files it reads, relative to ``$HARNESS_DATA_DIR`` (glob patterns allowed).
        metrics: what it reports (``Metric``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs_quality: ClassVar[bool] = False
    Params: ClassVar[type[WorkloadParams]]
    data_files: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[tuple[Metric, ...]] = ()

    def __init__(self, params: WorkloadParams):
        self.params = params
        # Set by the harness worker: the run's baseline (``workloads.agreement.Comparison``), for
        # workloads that compare with it (wikitext2); None outside the harness.
        self.comparison = None

    # --- declaration: command line, cells, checks --------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this workload's flags (one argument group) to ``parser``."""
        group = parser.add_argument_group(cls.name)
        for f in fields(cls.Params):
            meta = f.metadata
            if meta.get("choices"):
                group.add_argument(*meta["flags"], dest=f"{cls.name}__{f.name}", choices=meta["choices"],
                                   default=f.default, help=f"{meta['help']} (default {f.default})")
                continue
            if meta.get("sweep"):
                kind = positive_ints if meta["minimum"] >= 1 else non_negative_ints
                default = list(meta["cli_default"])
            else:
                kind, default = (positive_int if meta["minimum"] >= 1 else non_negative_int), f.default
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            group.add_argument(*meta["flags"], dest=f"{cls.name}__{f.name}", type=kind, default=default,
                               help=f"{meta['help']} (default {shown})")

    @classmethod
    def params_from_args(cls, args: argparse.Namespace) -> list[WorkloadParams]:
        """One ``Params`` per cell: the cross product of the sweep flags' values, in order.

        Raises:
            WorkloadError: parameters ``check`` rejects.
        """
        axes = []
        for f in fields(cls.Params):
            value = getattr(args, f"{cls.name}__{f.name}", f.default)
            axes.append([(f.name, v) for v in dict.fromkeys(value)] if f.metadata.get("sweep") else [(f.name, value)])
        cells = [cls.Params(**dict(combo)) for combo in itertools.product(*axes)]
        for params in cells:
            cls.check(params)
        return cells

    @classmethod
    def param_names(cls) -> dict[str, str]:
        """Every name a parameter answers to in a sweep file -> its field: the field name and each
        flag without dashes (``n_out``, ``output_len``)."""
        names: dict[str, str] = {}
        for f in fields(cls.Params):
            names[f.name] = f.name
            for flag in f.metadata.get("flags", ()):
                names[flag.lstrip("-").replace("-", "_")] = f.name
        return names

    @classmethod
    def coerce(cls, name: str, value: Any) -> Any:
        """``value`` checked as parameter ``name`` (a field name): an int >= its minimum, or one
        of its choices.

        Raises:
            WorkloadError: naming the parameter and what it accepts.
        """
        meta = next(f.metadata for f in fields(cls.Params) if f.name == name)
        if meta.get("choices"):
            if value not in meta["choices"]:
                raise WorkloadError(f"{cls.name}.{name} must be one of {', '.join(meta['choices'])}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < meta["minimum"]:
            raise WorkloadError(f"{cls.name}.{name} must be an integer >= {meta['minimum']}, got {value!r}")
        return value

    @classmethod
    def check(cls, params: WorkloadParams) -> None:
        """Reject parameter combinations before anything runs (raise ``WorkloadError``)."""

    @classmethod
    def cell_id(cls, params: WorkloadParams) -> str:
        """A stable id of one cell, unique within a run (default: the workload name)."""
        return cls.name

    @classmethod
    def missing_data(cls, data_dir: Path) -> str | None:
        """The first of ``data_files`` absent under ``data_dir``, as a path, or None."""
        for pattern in cls.data_files:
            if not list(data_dir.glob(pattern)):
                return str(data_dir / pattern)
        return None

    # --- running -------------------------------------------------------------------------------
    # --- running -------------------------------------------------------------------------------
    def sequence_footprint(self) -> tuple[int, int]:
        """``(tokens per sequence, sequences at once)`` at this cell's largest forward pass: what
        the pre-flight memory check (``backends.footprint``) sizes the KV cache and activations
        for. The default, 2048 x 1, suits workloads that do not say."""
        return 2048, 1

    @abc.abstractmethod
    def run(self, backend: Backend, tokenizer, progress: Progress) -> WorkloadResult:
        """Measure ``backend`` (already loaded). Raises ``WorkloadError`` with a one-line reason."""

    # --- reporting -----------------------------------------------------------------------------
    @classmethod
    def report_section(cls, records: list[dict[str, Any]], out_dir: Path) -> list[str]:
        """Markdown lines of this workload's report section, from its ok records alone (never
        re-running anything). The default: a table of the declared ``metrics`` per backend
        (medians where a metric has statistics)."""
        from reports.markdown import md_table

        mine = [r for r in records if r["workload"] == cls.name and r["status"] == "ok"]
        if not mine or not cls.metrics:
            return []

        def show(value: Any) -> str:
            if isinstance(value, dict):
                value = value.get("median")
            return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

        header = ["backend", "cell"] + [f"{m.name} ({m.better} is better)" for m in cls.metrics]
        rows = [[r["label"], r["cell_id"]] + [show(r["metrics"].get(m.name)) for m in cls.metrics] for r in mine]
        return [f"## {cls.name}: {cls.description}", "", md_table(header, rows)]
