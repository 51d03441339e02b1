"""Expand a run request into jobs: one per backend variant, each a list of cells (workload x shape).

``--backends bnb`` expands to the backend's default variants; ``bnb:nf4`` picks one. Unknown
names raise ``UsageError`` naming the bad value and the valid choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backends.base import REGISTRY, backend_class, variant_availability
from workloads.registry import WORKLOADS


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


@dataclass
class Cell:
    cell_id: str
    workload: str
    params: dict[str, Any]


@dataclass
class Job:
    """One backend variant, run in its own worker process over its cells."""

    backend: str
    variant: str
    options: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    skip_reason: str | None = None  # unavailable here: recorded, not run

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.variant}"


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


def build_jobs(
    pairs: list[tuple[str, str, bool]],
    cells: list[Cell],
    options: dict[str, Any],
) -> tuple[list[Job], list[str]]:
    """A job per backend variant, and the ``name:variant (reason)`` of those left out.

    An unavailable variant named explicitly (``bnb:nf4``) becomes a job with ``skip_reason``, so
    the results say why it has no numbers; one that only came from expanding a backend name (or
    the default 'everything') is left out and reported in the second list."""
    jobs, left_out = [], []
    for name, variant, explicit in pairs:
        availability = variant_availability(name, variant)
        if not availability.ok and not explicit:
            left_out.append(f"{name}:{variant} ({availability.reason})")
            continue
        jobs.append(Job(name, variant, dict(options), list(cells),
                        None if availability.ok else availability.reason))
    return jobs, left_out
