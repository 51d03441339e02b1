"""Shared fixtures: the tiny random-weight Llama (fast contract tests) and the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backends.models import resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-layer, 64-wide Llama with seeded random weights and the SmolLM2 tokenizer."""
    return resolve_model("tiny-llama")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$HARNESS_DATA_DIR`` (CI sets ``../shared/data``); tests needing real data skip without it."""
    value = os.environ.get("HARNESS_DATA_DIR") or str(REPO_ROOT.parent / "shared" / "data")
    path = Path(value)
    if not (path / "wikitext-2-raw-v1" / "test.txt").is_file():
        pytest.skip(f"shared data not found at {path}: set HARNESS_DATA_DIR")
    return path


pytest_plugins = ["harness.pytest_plugin"]


@pytest.fixture(scope="module")
def tiny_backends(tiny_model):
    """``get(name, variant, **options)``: a backend loaded on the tiny model, one per
    (name, variant, options), reused within the test module and closed after it."""
    from backends.base import backend_class

    loaded = {}

    def get(name: str, variant: str, **options):
        key = (name, variant, tuple(sorted(options.items())))
        if key not in loaded:
            backend = backend_class(name)(variant, options)
            backend.load(tiny_model)
            loaded[key] = backend
        return loaded[key]

    yield get
    for backend in loaded.values():
        backend.close()
