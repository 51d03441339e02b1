"""Design-space sweeps from a file: validated on load (pydantic), expanded into jobs and cells.

A sweep file (YAML) names a model, backends, workloads, fixed workload parameters (a section per
workload), fixed backend options, and ``axes``: the grid. An axis is a workload parameter
(``n_in``, or its flag name ``input_lens``) or a backend option (``mlc.sliding_window``).
``link`` zips axes that move together (equal lengths) instead of crossing them. An axis a backend
or workload does not have is not crossed with it: hf rows are not repeated per mlc option, and
perplexity cells are not repeated per prompt length. ``exclude`` drops combinations from the grid
as GitHub Actions' ``matrix.exclude`` does: an entry (``{workload: squad-long,
mlc.sliding_window: 512}``) removes every cell that matches all of its keys (``backend``,
``workload`` or an axis). Backend option values are checked against
each backend's typed options when the file loads, so a bad value fails before anything runs, with
the file's line.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from backends.base import REGISTRY, BackendError, backend_class
from backends.models import EMBEDDED_MODEL
from backends.options import OptionError, parse_options
from harness.plan import Cell, Job, UsageError, check_variant, parse_backends, parse_workloads, runnable_pairs
from workloads.base import WorkloadError
from workloads.registry import DEFAULT_WORKLOADS, WORKLOADS, workload_class


class SweepError(UsageError):
    """A malformed sweep file: one line naming the file, the line and the key (exit code 2)."""


class SweepSpec(BaseModel):
    """The sweep file's schema. Workload parameter sections are the extra keys named after a
    workload (``latency: {output_len: 64}``)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(EMBEDDED_MODEL, description="registered model, Hub id or local directory")
    random_weights: bool = False
    backends: list[str] = Field(min_length=1, description="NAME or NAME:VARIANT, as --backends")
    workloads: list[str] = Field(default_factory=lambda: list(DEFAULT_WORKLOADS))
    backend_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    link: list[list[str]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(
        default_factory=list, description="combinations to drop: each entry's keys (backend, workload, axes) all match")
    baseline: str | None = Field(None, description="the NAME:VARIANT label the others are compared with, as "
                                 "run --baseline ('none': no comparison; default hf:fp32 on CPU, hf:fp16 on CUDA)")
    slurm: dict[str, Any] = Field(default_factory=dict, description="--executor slurm settings: partition, account, "
                                  "gpus_per_job, cpus_per_job, time_min, mem_gb (the --slurm-* flags override them)")
    scales: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="named scales (e.g. full: a GPU-size study): keys that replace the top-level ones")
    _where: Any = PrivateAttr(default=None)  # the file and its YAML nodes, for errors with lines

    def workload_sections(self) -> dict[str, dict[str, Any]]:
        return dict(self.model_extra or {})

    def located_error(self, keys: tuple, message: str) -> "SweepError":
        """``SweepError("FILE:LINE: KEY: message")`` for a problem found after loading."""
        return (self._where or _Located(Path("sweep"), None)).error(keys, message)


def _line_of(root, path: tuple) -> int | None:
    """The 1-based line of ``path`` (keys / list indices) in a composed YAML node tree."""
    import yaml

    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


class _Located:
    """Turns problems into ``SweepError("FILE:LINE: KEY: message")``."""

    def __init__(self, path: Path, root, scale: str | None = None, scaled: frozenset = frozenset()):
        self.path, self.root = path, root
        self.scale, self.scaled = scale, scaled  # keys the chosen scale replaced: their lines are there

    def error(self, keys: tuple, message: str) -> SweepError:
        located = ("scales", self.scale, *keys) if keys and keys[0] in self.scaled else keys
        line = _line_of(self.root, located)
        where = f"{self.path}:{line}" if line else str(self.path)
        return SweepError(f"{where}: {'.'.join(map(str, keys)) or 'file'}: {message}")


def load_sweep(path: Path, scale: str | None = None) -> SweepSpec:
    """Read and validate a sweep file, at one of its ``scales`` when ``scale`` names one (the keys
    of ``scales.SCALE`` replace the top-level ones; without a scale, the top level is the sweep).

    Raises:
        SweepError: unreadable, not YAML, a key of the wrong type / unknown (file, line, key), or
            an unknown scale.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except OSError as exc:
        raise SweepError(f"{path}: cannot read the sweep file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SweepError(f"{path}:{mark.line + 1 if mark else '?'}: not YAML ({getattr(exc, 'problem', exc)})") from None
    where = _Located(path, root)
    if not isinstance(data, dict):
        raise where.error((), "a sweep file is a mapping of keys (model, backends, workloads, axes, ...)")
    if scale is not None:
        scales = data.get("scales") or {}
        if not isinstance(scales, dict):
            raise where.error(("scales",), "scales must be a mapping: scale name -> the keys it replaces")
        if not isinstance(scales.get(scale), dict):
            raise where.error(("scales",), f"no scale {scale!r} in this file; scales: {', '.join(scales) or 'none'}")
        data = {**data, **scales[scale]}
        where = _Located(path, root, scale, frozenset(scales[scale]))
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise where.error(tuple(error["loc"]), error["msg"]) from None
    for index, name in enumerate(spec.workloads):
        if name not in WORKLOADS:
            raise where.error(("workloads", index), f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    for key in spec.workload_sections():
        if key not in WORKLOADS:
            raise where.error((key,), f"unknown key; valid: {', '.join([*SweepSpec.model_fields, *WORKLOADS])}")
    spec._where = where
    return spec


def _axis_kind(name: str, backends: set[str], workloads: list[str], where: _Located) -> tuple[str, str]:
    """``("backend", NAME)`` for ``NAME.option`` axes, ``("params", field)`` for workload ones."""
    prefix, dot, option = name.partition(".")
    if dot:
        if prefix not in backends:
            raise where.error(("axes", name), f"backend {prefix!r} is not in this sweep's backends")
        if option not in backend_class(prefix).Options.model_fields:
            raise where.error(("axes", name), f"unknown option {option!r} of {prefix}; valid: "
                              f"{', '.join(backend_class(prefix).Options.keys())}")
        return "backend", prefix
    if not any(name in workload_class(w).param_names() for w in workloads):
        raise where.error(("axes", name), "not a parameter of " + ", ".join(workloads)
                          + " nor a BACKEND.option")
    return "params", ""


def _groups(spec: SweepSpec, where: _Located) -> list[list[str]]:
    """The axes in groups that vary together: each ``link`` list, then every other axis alone."""
    linked = [name for group in spec.link for name in group]
    for index, group in enumerate(spec.link):
        missing = [name for name in group if name not in spec.axes]
        if missing:
            raise where.error(("link", index), f"{missing[0]!r} is not an axis")
        if len({len(spec.axes[name]) for name in group}) > 1:
            raise where.error(("link", index), "linked axes need equally many values")
    if len(linked) != len(set(linked)):
        raise where.error(("link",), "an axis is in two link groups")
    return [list(group) for group in spec.link] + [[name] for name in spec.axes if name not in linked]


def _combinations(groups: list[list[str]], axes: dict[str, list[Any]], keep) -> list[dict[str, Any]]:
    """The grid over the groups whose axes ``keep`` accepts: a dict per point (axis -> value)."""
    chosen = [g for g in groups if all(keep(name) for name in g)]
    points = [[dict(zip(g, values)) for values in zip(*(axes[name] for name in g))] for g in chosen]
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*points)] or [{}]


def plan_sweep(spec: SweepSpec, path: Path, workloads: list[str]) -> tuple[list[Job], list[str]]:
    """Jobs (a backend variant x a point of its option axes) holding their cells (a workload x a
    point of its parameter axes), and the variants left out as unavailable (``name:variant (why)``).

    Raises:
        SweepError: an unknown backend, workload, axis or parameter, a value a backend's options
            or a workload's parameters reject, or an unusable link.
    """
    where: _Located = spec._where or _Located(Path(path), None)
    try:
        pairs = parse_backends(",".join(spec.backends))
        parse_workloads(",".join(workloads), ())
    except UsageError as exc:
        raise where.error(("backends",), str(exc)) from None
    names = {name for name, _, _ in pairs}
    for name in spec.backend_options:
        if name not in REGISTRY or name not in names:
            raise where.error(("backend_options", name), f"not a backend of this sweep ({', '.join(sorted(names))})")
    kinds = {axis: _axis_kind(axis, names, workloads, where) for axis in spec.axes}
    groups = _groups(spec, where)
    for group in groups:
        if len({kinds[a] for a in group}) > 1:
            raise where.error(("link",), f"linked axes {group} must all be options of one backend or all "
                              "workload parameters")
    cells = _cells(spec, workloads, groups, kinds, where)
    _check_exclude(spec, workloads, where)
    runnable, left_out = runnable_pairs(pairs)
    jobs = []
    for name, variant, availability in runnable:
        cls = backend_class(name)
        for point in _combinations(groups, spec.axes, lambda a: kinds[a] == ("backend", name)):
            values = {**spec.backend_options.get(name, {}), **{a.partition(".")[2]: v for a, v in point.items()}}
            try:
                options = parse_options(cls.Options, name, values).model_dump()
                check_variant(name, variant, options, availability)
            except (OptionError, BackendError) as exc:
                keys = ("axes", next(iter(point))) if point else ("backend_options", name)
                at = f" (at {', '.join(f'{a}={v}' for a, v in point.items())})" if point else ""
                raise where.error(keys, f"{exc}{at}") from None
            tag = ",".join(f"{a.partition('.')[2]}={v}" for a, v in point.items())
            kept = [cell for cell in cells if not any(_excludes(entry, name, variant, point, cell)
                                                      for entry in spec.exclude)]
            if kept:
                jobs.append(Job(name, variant, options, kept, None if availability.ok else availability.reason, tag))
    return jobs, left_out


def _check_exclude(spec: SweepSpec, workloads: list[str], where: _Located) -> None:
    """Every ``exclude`` entry is a non-empty mapping of ``backend``, ``workload`` and axis names.

    Raises:
        SweepError: an empty entry, or a key that is none of those (file, line, key).
    """
    for index, entry in enumerate(spec.exclude):
        if not entry:
            raise where.error(("exclude", index), "an empty entry would drop every cell")
        for key, value in entry.items():
            if key not in ("backend", "workload") and key not in spec.axes:
                raise where.error(("exclude", index, key), "not 'backend', 'workload' nor an axis of this sweep")
            if key == "workload" and value not in workloads:
                raise where.error(("exclude", index, key), f"not a workload of this sweep ({', '.join(workloads)})")


def _excludes(entry: dict[str, Any], backend: str, variant: str, point: dict[str, Any], cell: Cell) -> bool:
    """True when ``cell`` of the job ``backend:variant`` at option ``point`` matches every key of
    ``entry``: ``backend`` (NAME or NAME:VARIANT), ``workload``, a backend option axis (by the job's
    point) or a workload parameter axis (by the cell's parameters; a workload without it never
    matches)."""
    for key, value in entry.items():
        if key == "backend":
            if str(value) not in (backend, f"{backend}:{variant}"):
                return False
        elif key == "workload":
            if value != cell.workload:
                return False
        elif "." in key:
            if key not in point or point[key] != value:
                return False
        else:
            field = workload_class(cell.workload).param_names().get(key)
            if field is None or cell.params.get(field) != value:
                return False
    return True


def _cells(spec: SweepSpec, workloads: list[str], groups, kinds, where: _Located) -> list[Cell]:
    """Every workload's cells: its fixed section, crossed with the parameter axes it has."""
    sections = spec.workload_sections()
    cells: list[Cell] = []
    for workload in workloads:
        cls = workload_class(workload)
        aliases = cls.param_names()
        base: dict[str, Any] = {}
        for key, value in (sections.get(workload) or {}).items():
            if key not in aliases:
                raise where.error((workload, key), f"unknown parameter; valid: {', '.join(sorted(aliases))}")
            try:
                base[aliases[key]] = cls.coerce(aliases[key], value)
            except WorkloadError as exc:
                raise where.error((workload, key), str(exc)) from None
        seen: dict[str, int] = {}
        for point in _combinations(groups, spec.axes, lambda a: kinds[a] == ("params", "") and a in aliases):
            values = dict(base)
            for axis, value in point.items():
                try:
                    values[aliases[axis]] = cls.coerce(aliases[axis], value)
                except WorkloadError as exc:
                    raise where.error(("axes", axis), str(exc)) from None
            params = cls.Params(**values)
            try:
                cls.check(params)
            except WorkloadError as exc:
                raise where.error((workload,), str(exc)) from None
            cell_id = cls.cell_id(params)
            seen[cell_id] = seen.get(cell_id, 0) + 1
            if seen[cell_id] > 1:  # an axis the id does not show (e.g. warmup): keep ids unique
                cell_id += "-" + "-".join(f"{k}{v}" for k, v in sorted(point.items()))
            cells.append(Cell(cell_id, workload, params.to_dict(), WORKLOADS[workload]))
    return cells
