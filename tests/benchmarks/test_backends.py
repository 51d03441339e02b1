"""One benchmark per available backend variant and stage, on ``--model`` (tiny-llama by default).

Stages: ``prefill`` (a 128-token prompt, 1 new token: TTFT), ``decode`` (an 8-token prompt, 32 new
tokens: prefill is a small share, and extra_info carries TPOT and decode tokens/s from the
per-token timestamps), ``generate`` (128 in, 32 out) and ``ppl_window`` (log-likelihood of a
256-token WikiText-2 window; extra_info carries its perplexity). Select with ``-k``, e.g.
``pytest --benchmark-only -k bnb`` or ``-k "decode and hf:fp32"``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from backends.base import ScoringWindow
from workloads.metrics import generation_timings, perplexity
from harness.pytest_plugin import all_variants, measure
from workloads.data import wikitext2_token_ids
from workloads.latency import build_prompts

VARIANTS = all_variants()
IDS = [f"{n}:{v}" for n, v in VARIANTS]
# module scope groups the tests by variant, so each backend variant loads once
pytestmark = pytest.mark.parametrize("pair", VARIANTS, ids=IDS, scope="module")


@pytest.fixture(scope="module")
def corpus(bench_tokenizer, data_dir, request):
    import os

    os.environ.setdefault("HARNESS_DATA_DIR", str(data_dir))
    return wikitext2_token_ids(bench_tokenizer)


def _attach(benchmark, backend, holder, peak, **metrics):
    benchmark.extra_info.update({
        "backend": backend.label, "model": holder.spec.name, "info": backend.info(),
        "load": holder.load_info, **peak, **metrics})


def _generation_case(benchmark, loaded_backends, corpus, pair, n_in, n_out, rounds):
    backend = loaded_backends.get(*pair)
    prompt = build_prompts(corpus, n_in, 1)
    out, peak = measure(benchmark, lambda: backend.generate(prompt, n_out, min_new_tokens=n_out), rounds)
    timings = generation_timings(out.start_s, out.step_times_s, n_in)
    _attach(benchmark, backend, loaded_backends, peak, n_in=n_in,
            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in timings.items()})
    return out


def test_prefill(benchmark, loaded_backends, corpus, pair, bench_rounds):
    out = _generation_case(benchmark, loaded_backends, corpus, pair, 128, 1, bench_rounds)
    assert out.n_steps == 1


def test_decode(benchmark, loaded_backends, corpus, pair, bench_rounds):
    out = _generation_case(benchmark, loaded_backends, corpus, pair, 8, 32, bench_rounds)
    assert out.n_steps == 32


def test_generate(benchmark, loaded_backends, corpus, pair, bench_rounds):
    out = _generation_case(benchmark, loaded_backends, corpus, pair, 128, 32, bench_rounds)
    assert out.n_steps == 32


def test_ppl_window(benchmark, loaded_backends, corpus, pair, bench_rounds):
    backend = loaded_backends.get(*pair)
    window = ScoringWindow(tuple(corpus[:256]), 0)
    (scores,), peak = measure(benchmark, lambda: backend.loglikelihood([window]), bench_rounds)
    ppl = perplexity(scores)["ppl"]
    _attach(benchmark, backend, loaded_backends, peak, window_tokens=256, ppl=ppl,
            scored_tokens=int(scores.size), tokens_per_s=None)
    assert np.isfinite(ppl)
