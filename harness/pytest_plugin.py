"""pytest plugin: the suite's backends as pytest-benchmark benchmarks, for regression tracking.

Enable it with ``pytest_plugins = ["harness.pytest_plugin"]`` in a ``conftest.py`` (this project's
``tests/conftest.py`` does). It adds ``--model`` (default ``tiny-llama``; e.g. ``smollm2-135m``)
and fixtures that load one backend variant at a time and attach the harness metrics to each
benchmark's ``extra_info``, so ``--benchmark-json`` output carries what the harness report has.
"""

from __future__ import annotations

from typing import Any

import pytest

from backends.base import REGISTRY, backend_class, variant_availability
from backends.memory import PeakMemorySampler

DEFAULT_BENCH_MODEL = "tiny-llama"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("quantarena")
    group.addoption("--model", default=DEFAULT_BENCH_MODEL,
                    help=f"model the backend benchmarks load (default {DEFAULT_BENCH_MODEL})")
    group.addoption("--bench-rounds", type=int, default=3,
                    help="timed rounds per backend benchmark, after one warm-up round (default 3)")


def all_variants() -> list[tuple[str, str]]:
    """Every registered ``(backend, variant)``, for parametrising benchmarks."""
    return [(name, variant) for name in REGISTRY for variant in backend_class(name).variants]


class LoadedBackends:
    """Holds at most one loaded backend: benchmarks are ordered by variant, so each loads once and
    memory never holds two models (which would also distort the peak-memory readings)."""

    def __init__(self, spec):
        self.spec = spec
        self.key: tuple[str, str] | None = None
        self.backend = None
        self.load_info: dict[str, Any] = {}

    def get(self, name: str, variant: str):
        availability = variant_availability(name, variant)
        if not availability.ok:
            pytest.skip(f"{name}:{variant} unavailable: {availability.reason}")
        if self.key != (name, variant):
            if self.backend is not None:
                self.backend.close()
            self.backend = backend_class(name)(variant)
            report = self.backend.load(self.spec)
            self.key = (name, variant)
            self.load_info = report.to_dict()
        return self.backend


@pytest.fixture(scope="session")
def bench_model(request):
    from backends.models import resolve_model

    return resolve_model(request.config.getoption("--model"))


@pytest.fixture(scope="session")
def bench_rounds(request) -> int:
    return request.config.getoption("--bench-rounds")


@pytest.fixture(scope="session")
def bench_tokenizer(bench_model):
    from backends.models import load_tokenizer

    return load_tokenizer(bench_model)


@pytest.fixture(scope="session")
def loaded_backends(bench_model):
    holder = LoadedBackends(bench_model)
    yield holder
    if holder.backend is not None:
        holder.backend.close()


def measure(benchmark, fn, rounds: int, warmup_rounds: int = 1):
    """Time ``fn`` with pytest-benchmark's pedantic mode while sampling peak memory; returns
    (the last call's result, peak memory in bytes named as in the records: ``peak_rss_bytes``, ...)."""
    results = []

    def call():
        results.append(fn())

    with PeakMemorySampler() as sampler:
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return results[-1], {f"{key}_bytes": value for key, value in sampler.result().items()}
