"""Expand a run request into jobs: one per backend variant, each a list of cells (workload x shape).

``--backends bnb`` expands to the backend's default variants; ``bnb:nf4`` picks one. Unknown
names raise ``UsageError`` naming the bad value and the valid choices. Backend options are routed
to their backends and validated here, before anything loads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from backends.base import REGISTRY, Availability, BackendError, backend_class, variant_availability
from backends.options import OptionError, parse_options, split_addressed
from workloads.registry import WORKLOADS


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


@dataclass
class Cell:
    """One measurement of one backend variant: ``workload`` (registry name) run with ``params``;
    ``workload_path`` (``module:Class``) lets the worker import it."""

    cell_id: str
    workload: str
    params: dict[str, Any]
    workload_path: str = ""


@dataclass
class Job:
    """One backend variant, run in its own worker process over its cells."""

    backend: str
    variant: str
    options: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    skip_reason: str | None = None  # unavailable here: recorded, not run
    tag: str = ""  # the options a sweep varies, e.g. "sliding_window=1024": part of the row label

    @property
    def label(self) -> str:
        """``backend:variant``, plus ``[tag]`` when a sweep varies this backend's options."""
        return f"{self.backend}:{self.variant}" + (f" [{self.tag}]" if self.tag else "")


# Versions that change what a cell measures; part of every cell's key (the project's own commit is
# not: a resumed sweep keeps the cells that finished before an unrelated commit).
KEY_PACKAGES = ("torch", "transformers", "bitsandbytes", "onnxruntime", "optimum-onnx", "optimum-quanto",
                "apache-tvm", "llama-cpp-python")


def cell_key(model: dict[str, Any], job: Job, cell: Cell, packages: dict[str, str]) -> str:
    """A stable key of one cell: sha256 (16 hex digits) over the model, backend, variant, options
    as parsed, workload, parameters and the measuring libraries' versions. Equal keys mean the
    same measurement, so ``--resume`` skips a key that already has an ok record."""
    payload = {"model": model, "backend": job.backend, "variant": job.variant, "options": job.options,
               "workload": cell.workload, "params": cell.params,
               "versions": {name: packages.get(name) for name in KEY_PACKAGES}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_backends(text: str | None) -> list[tuple[str, str, bool]]:
    """``"hf,bnb:int8"`` -> ``[("hf", v, False) for v in hf's defaults] + [("bnb", "int8", True)]``;
    None means every registered backend's default variants. The flag says the variant was named
    explicitly. Duplicates are dropped, order kept."""
    items = [t.strip() for t in text.split(",")] if text else list(REGISTRY)
    pairs: list[tuple[str, str, bool]] = []
    for item in items:
        if not item:
            raise UsageError(f"empty backend name in --backends {text!r}")
        name, _, variant = item.partition(":")
        if name not in REGISTRY:
            raise UsageError(f"unknown backend {name!r}; choose from {', '.join(REGISTRY)}")
        cls = backend_class(name)
        if variant and variant not in cls.variants:
            raise UsageError(
                f"unknown variant {name}:{variant}; choose from "
                + ", ".join(f"{name}:{v}" for v in cls.variants)
            )
        for v in [variant] if variant else cls.default_variants:
            if all((name, v) != (n, w) for n, w, _ in pairs):
                pairs.append((name, v, bool(variant)))
    return pairs


def parse_workloads(text: str | None, default: tuple[str, ...]) -> list[str]:
    names = [t.strip() for t in text.split(",")] if text else list(default)
    for name in names:
        if name not in WORKLOADS:
            raise UsageError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return list(dict.fromkeys(names))


def backend_options(pairs: list[tuple[str, str, bool]], option_pairs: list[tuple[str, str]]
                    ) -> dict[str, dict[str, Any]]:
    """Route ``--backend-option`` pairs to the chosen backends and validate them against each
    backend's typed options; returns backend name -> options as parsed (typed, defaults filled).

    Raises:
        UsageError: an unknown key, a wrong type or an out-of-range value (one line).
    """
    classes = {name: backend_class(name).Options for name, _, _ in pairs}
    try:
        routed = split_addressed(option_pairs, classes)
        return {name: parse_options(classes[name], name, routed[name]).model_dump() for name in classes}
    except OptionError as exc:
        raise UsageError(str(exc)) from None


def build_jobs(
    pairs: list[tuple[str, str, bool]],
    cells: list[Cell],
    option_pairs: list[tuple[str, str]],
) -> tuple[list[Job], list[str]]:
    """A job per backend variant, and the ``name:variant (reason)`` of those left out.

    An unavailable variant named explicitly (``bnb:nf4``) becomes a job with ``skip_reason``, so
    the results say why it has no numbers; one that only came from expanding a backend name (or
    the default 'everything') is left out and reported in the second list. Each available
    variant is constructed once with its options, so checks that depend on the variant fail here.

    Raises:
        UsageError: a bad option (see ``backend_options``).
    """
    options = backend_options(pairs, option_pairs)
    runnable, left_out = runnable_pairs(pairs)
    jobs = []
    for name, variant, availability in runnable:
        try:
            check_variant(name, variant, options[name], availability)
        except BackendError as exc:
            raise UsageError(str(exc)) from None
        jobs.append(Job(name, variant, dict(options[name]), list(cells),
                        None if availability.ok else availability.reason))
    return jobs, left_out


def runnable_pairs(pairs: list[tuple[str, str, bool]]) -> tuple[list[tuple[str, str, Availability]], list[str]]:
    """The variants to make jobs of, with their availability, and ``name:variant (reason)`` of the
    ones left out: an unavailable variant named explicitly is kept (recorded as failed with its
    reason), one that only came from expanding a backend name is left out."""
    runnable, left_out = [], []
    for name, variant, explicit in pairs:
        availability = variant_availability(name, variant)
        if availability.ok or explicit:
            runnable.append((name, variant, availability))
        else:
            left_out.append(f"{name}:{variant} ({availability.reason})")
    return runnable, left_out


def check_variant(name: str, variant: str, options: dict[str, Any], availability: Availability) -> None:
    """Construct an available variant with its options once, so checks that depend on the variant
    fail before anything loads.

    Raises:
        BackendError: the backend rejects the options for this variant.
    """
    if availability.ok:
        backend_class(name)(variant, options)


def default_baseline(jobs: list[Job]) -> str:
    """The default baseline label: ``hf:fp16`` where the hf backend runs on CUDA, else ``hf:fp32``
    (its ``device`` option, ``auto`` meaning CUDA when torch sees a device)."""
    from backends.device import default_device

    hf = next((job for job in jobs if job.backend == "hf"), None)
    device = (hf.options.get("device") if hf else None) or "auto"
    return "hf:fp16" if (default_device() if device == "auto" else device) == "cuda" else "hf:fp32"


def baseline_first(jobs: list[Job], requested: str | None) -> tuple[list[Job], str | None, str | None]:
    """Choose the run's baseline and put its job first (its wikitext2 cells store the
    distributions the others are compared with, so it must run before them).

    Args:
        jobs: the planned jobs. requested: ``--baseline`` / the sweep's ``baseline:`` (a job label,
            ``none``, or None for the default, ``default_baseline``).

    Returns:
        (the jobs, baseline first; the baseline label or None; when None, a note saying why).

    Raises:
        UsageError: ``requested`` names no job of the run.
    """
    labels = [job.label for job in jobs]
    if requested == "none":
        return jobs, None, "no baseline (--baseline none): no agreement metrics"
    if requested and requested not in labels:
        raise UsageError(f"--baseline {requested} is not a backend variant of this run; choose from "
                         + ", ".join([*labels, "none"]))
    label = requested or default_baseline(jobs)
    if label not in labels:
        return jobs, None, f"no baseline in this run (the default, {label}, is not in it): no agreement metrics"
    return [job for job in jobs if job.label == label] + [job for job in jobs if job.label != label], label, None
