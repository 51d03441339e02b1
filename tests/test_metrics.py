"""Metric formulas on synthetic timestamps, against hand-computed values."""

import math

import numpy as np
import pytest

from workloads.metrics import generation_timings, inter_token_latencies_ms, perplexity, summarize


def test_generation_timings_hand_worked():
    # start at 10.0 s; first token at 10.2 s (TTFT 200 ms); 4 more tokens 50 ms apart
    steps = [10.2, 10.25, 10.30, 10.35, 10.40]
    t = generation_timings(10.0, steps, n_in=100, batch=1)
    assert t["ttft_ms"] == pytest.approx(200.0)
    assert t["e2e_ms"] == pytest.approx(400.0)
    assert t["tpot_ms"] == pytest.approx(50.0)  # (400 - 200) / (5 - 1)
    assert t["prefill_tok_s"] == pytest.approx(500.0)  # 100 / 0.2
    assert t["decode_tok_s"] == pytest.approx(20.0)  # 4 / 0.2
    assert t["n_out"] == 5


def test_batch_scales_rates_not_latencies():
    one = generation_timings(0.0, [0.1, 0.2, 0.3], n_in=10, batch=1)
    four = generation_timings(0.0, [0.1, 0.2, 0.3], n_in=10, batch=4)
    assert four["ttft_ms"] == one["ttft_ms"]
    assert four["decode_tok_s"] == pytest.approx(4 * one["decode_tok_s"])
    assert four["prefill_tok_s"] == pytest.approx(4 * one["prefill_tok_s"])


def test_single_token_has_no_decode_phase():
    t = generation_timings(0.0, [0.3], n_in=8)
    assert math.isnan(t["tpot_ms"]) and math.isnan(t["decode_tok_s"])
    assert t["ttft_ms"] == pytest.approx(300.0)


@pytest.mark.parametrize("steps", [[], [0.2, 0.1], [-1.0]])
def test_bad_timestamps_rejected(steps):
    with pytest.raises(ValueError):
        generation_timings(0.0, steps, n_in=1)


def test_itl_are_gaps():
    assert inter_token_latencies_ms([1.0, 1.01, 1.03]) == pytest.approx([10.0, 20.0])


def test_summarize_percentiles_and_std():
    s = summarize([1, 2, 3, 4, 100])
    assert s["median"] == 3
    assert s["p90"] == pytest.approx(np.percentile([1, 2, 3, 4, 100], 90))
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1))
    assert s["n"] == 5
    assert summarize([float("nan"), 2.0])["n"] == 1
    assert summarize([])["n"] == 0


def test_perplexity_of_uniform_model_is_vocab_size():
    logprobs = np.full(50, -math.log(1000))
    p = perplexity(logprobs)
    assert p["ppl"] == pytest.approx(1000)
    assert p["n_tokens"] == 50
    assert p["ppl_se"] == pytest.approx(0.0)


def test_perplexity_standard_error_delta_method():
    rng = np.random.default_rng(0)
    logprobs = -rng.uniform(1, 3, size=400)
    p = perplexity(logprobs)
    nll = -logprobs
    assert p["ppl"] == pytest.approx(math.exp(nll.mean()))
    assert p["ppl_se"] == pytest.approx(p["ppl"] * nll.std(ddof=1) / math.sqrt(400))
    assert p["ppl_ci95"][0] < p["ppl"] < p["ppl_ci95"][1]
    with pytest.raises(ValueError):
        perplexity([])
