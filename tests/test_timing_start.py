"""The TTFT origin is one point for every backend: ``GenerationRequest.start_s``, stamped by
``Backend.generate`` after validation and before any per-request state (padding, KV cache, engine
set-up). Per-engine probes (mlc, llama.cpp) are in their own test modules, beside their fixtures."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from backends.base import BackendError, GenerationRequest
from backends.decoding import greedy_decode
from backends.hf.backend import TransformersBackend

PROMPT = [785, 3575, 282, 4649, 314, 198, 28, 1675]


def test_greedy_decode_reports_the_request_start_and_stamps_none_of_its_own():
    request = GenerationRequest(((1, 2, 3),), max_new_tokens=2)
    prefill_called = []

    def prefill():
        prefill_called.append(time.perf_counter())
        return np.eye(1, 8, 3, dtype=np.float32)

    out = greedy_decode(request, [], prefill, lambda chosen, live: np.eye(1, 8, 4, dtype=np.float32))
    assert out.start_s == request.start_s  # the request's origin, not a stamp taken inside the loop
    assert out.start_s < prefill_called[0] <= out.step_times_s[0]
    assert out.token_ids == [[3, 4]]


@pytest.fixture(scope="module")
def hf(tiny_backends):
    return tiny_backends("hf", "fp32", threads=2)


def test_hf_start_precedes_kv_cache_creation(hf, monkeypatch):
    """transformers' TTFT includes building the cache and ``generate``'s own set-up."""
    created = []
    original = hf.new_cache

    def probe():
        created.append(time.perf_counter())
        return original()

    monkeypatch.setattr(hf, "new_cache", probe)
    out = hf.generate([PROMPT], 3, min_new_tokens=3)
    assert len(created) == 1
    assert out.start_s < created[0] < out.step_times_s[0]


def test_a_backend_reporting_its_own_start_is_rejected(tiny_model):
    class Restamping(TransformersBackend):
        def _generate(self, request):
            return dataclasses.replace(super()._generate(request), start_s=time.perf_counter())

    with pytest.raises(BackendError, match="must report request.start_s"):
        Restamping("fp32", {"threads": 2}).load(tiny_model)  # load's first generation already checks
