"""Metric formulas, computed from raw timestamps and log-probabilities only.

Definitions follow vLLM's ``benchmarks/benchmark_serving.py`` (``vllm bench serve``) and
optimum-benchmark's latency tracker; ``docs/metrics.md`` gives each with its source. Times are
seconds in, milliseconds out; rates are tokens per second.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def generation_timings(start_s: float, step_times_s: Sequence[float], n_in: int, batch: int = 1) -> dict[str, float]:
    """Per-request latency metrics of one generation.

    Args:
        start_s: ``perf_counter`` when the prompt was handed to the backend.
        step_times_s: ``perf_counter`` when each decoding step's tokens were available, ``[n_out]``.
        n_in: prompt tokens per sequence.
        batch: sequences generated together.

    Returns:
        ``ttft_ms`` (first token - start), ``e2e_ms`` (last token - start),
        ``tpot_ms`` = (e2e - TTFT) / (n_out - 1), ``prefill_tok_s`` = batch * n_in / TTFT,
        ``decode_tok_s`` = batch * (n_out - 1) / (e2e - TTFT), ``n_out``. With a single output
        token TPOT and the decode rate are NaN (no decode phase was observed).

    Raises:
        ValueError: no steps, or timestamps that go backwards.
    """
    times = np.asarray(step_times_s, dtype=np.float64)
    if times.size == 0:
        raise ValueError("no generated tokens to time")
    if times[0] < start_s or np.any(np.diff(times) < 0):
        raise ValueError("token timestamps must not go backwards")
    n_out = int(times.size)
    ttft = times[0] - start_s
    e2e = times[-1] - start_s
    decode = e2e - ttft
    return {
        "ttft_ms": ttft * 1e3,
        "e2e_ms": e2e * 1e3,
        "tpot_ms": decode / (n_out - 1) * 1e3 if n_out > 1 else math.nan,
        "prefill_tok_s": batch * n_in / ttft if ttft > 0 else math.nan,
        "decode_tok_s": batch * (n_out - 1) / decode if n_out > 1 and decode > 0 else math.nan,
        "n_out": float(n_out),
    }


def inter_token_latencies_ms(step_times_s: Sequence[float]) -> list[float]:
    """ITL: the gaps between consecutive tokens of one request, ``[n_out - 1]`` milliseconds."""
    return (np.diff(np.asarray(step_times_s, dtype=np.float64)) * 1e3).tolist()


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, p90, p99, mean, standard deviation (ddof=1; 0 for one value), min, max and count.

    Percentiles use linear interpolation (numpy's default, as vLLM's benchmark does). NaNs are
    dropped; an empty input gives NaNs and ``n = 0``.
    """
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if data.size == 0:
        return {k: math.nan for k in ("median", "p90", "p99", "mean", "std", "min", "max")} | {"n": 0}
    return {
        "median": float(np.median(data)),
        "p90": float(np.percentile(data, 90)),
        "p99": float(np.percentile(data, 99)),
        "mean": float(np.mean(data)),
        "std": float(np.std(data, ddof=1)) if data.size > 1 else 0.0,
        "min": float(np.min(data)),
        "max": float(np.max(data)),
        "n": int(data.size),
    }


def perplexity(token_logprobs: Sequence[float]) -> dict[str, float]:
    """Token-level perplexity and its standard error.

    PPL = exp(mean NLL) over every scored token (the transformers "perplexity of fixed-length
    models" guide). The standard error of the mean NLL is std(NLL)/sqrt(n); the PPL's is by the
    delta method, PPL * SE(mean NLL), and ``ppl_ci95`` is exp(mean NLL +- 1.96 SE).
    Tokens are treated as independent, so the SE is a lower bound for correlated text.

    Raises:
        ValueError: no tokens were scored.
    """
    nll = -np.asarray(token_logprobs, dtype=np.float64)
    if nll.size == 0:
        raise ValueError("no scored tokens")
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(nll.size)) if nll.size > 1 else math.nan
    ppl = math.exp(mean)
    return {
        "ppl": ppl,
        "ppl_se": ppl * se,
        "mean_nll": mean,
        "mean_nll_se": se,
        "ppl_ci95": [math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)],
        "n_tokens": int(nll.size),
    }
