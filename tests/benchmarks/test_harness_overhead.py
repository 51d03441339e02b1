"""The measuring must not slow what it measures: the harness's decode tokens/s for ``hf:fp32`` on
SmolLM2 against a bare ``model.generate`` timed in the same process, runs interleaved so both see
the same machine state. The bare reference has no per-token hook, so its decode rate is derived
from two calls, (n_out - 1) / (t(n_out tokens) - t(1 token)) -- acceptable for a reference, never
for the harness itself."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from backends.hf.backend import TransformersBackend
from backends.models import load_tokenizer, resolve_model
from workloads.metrics import generation_timings
from workloads.data import wikitext2_token_ids
from workloads.latency import build_prompts

N_IN, N_OUT, ROUNDS = 128, 64, 5


def test_harness_decode_rate_within_5_percent_of_bare_generate(benchmark, data_dir, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    spec = resolve_model("smollm2-135m")
    backend = TransformersBackend("fp32")
    backend.load(spec)
    prompt = build_prompts(wikitext2_token_ids(load_tokenizer(spec)), N_IN, 1)
    ids = torch.tensor(prompt)
    mask = torch.ones_like(ids)

    def bare(n: int) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            backend.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=backend.special.pad_id)
            return time.perf_counter() - start

    def harnessed() -> float:
        out = backend.generate(prompt, N_OUT, min_new_tokens=N_OUT)
        return generation_timings(out.start_s, out.step_times_s, N_IN)["decode_tok_s"]

    harnessed(), bare(N_OUT)  # warm-up
    harness_rates, bare_rates = [], []
    for _ in range(ROUNDS):
        harness_rates.append(harnessed())
        bare_rates.append((N_OUT - 1) / (bare(N_OUT) - bare(1)))
    benchmark.pedantic(harnessed, rounds=1, iterations=1)
    ratio = statistics.median(harness_rates) / statistics.median(bare_rates)
    benchmark.extra_info.update(decode_tok_s=statistics.median(harness_rates),
                                bare_decode_tok_s=statistics.median(bare_rates), ratio=ratio)
    assert ratio >= 0.95, f"harness decode {ratio:.3f}x of bare generate"
