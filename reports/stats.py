"""Paired significance tests between a backend and the baseline on the same items.

Both tests are paired: the two systems were measured on the same text blocks or the same
questions, so per-item differences carry the comparison and the shared difficulty of the items
cancels. No peer tool (llama-perplexity, lm-evaluation-harness) reports these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class PairedResult:
    """A paired comparison: the observed statistic, its 95% bootstrap CI and the two-sided p-value
    of "no difference". ``n`` is the number of paired items (blocks or questions)."""

    estimate: float
    ci95: tuple[float, float]
    p_value: float
    n: int

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "ci95": list(self.ci95), "p_value": self.p_value, "n": self.n}


def _shifted_p_value(deltas: np.ndarray, observed: float) -> float:
    """Two-sided bootstrap p-value of H0 "difference = 0": the share of resampled differences at
    least as far from the observed one as the observed one is from 0 (the bootstrap distribution
    shifted to the null; Efron & Tibshirani 1993, section 16.4), with the +1 correction so it is
    never 0 (Davison & Hinkley 1997, eq. 4.11)."""
    extreme = np.count_nonzero(np.abs(deltas - observed) >= abs(observed))
    return float((extreme + 1) / (len(deltas) + 1))


def paired_bootstrap_ppl(nll_q: np.ndarray, nll_base: np.ndarray, tokens: np.ndarray,
                         samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> PairedResult:
    """Relative perplexity change PPL(q)/PPL(base) - 1 over the same scored tokens, resampling
    fixed-size token blocks with replacement (a block bootstrap: neighbouring tokens are
    correlated, blocks of ~128 tokens are close to independent).

    Args:
        nll_q, nll_base: float ``[n_blocks]``: sum of token NLL (nats) in each block, same blocks.
        tokens: int ``[n_blocks]``: scored tokens in each block.

    Returns:
        ``PairedResult`` with the estimate as a fraction (0.03 = +3 %).

    Raises:
        ValueError: arrays of different lengths, or fewer than 2 blocks.
    """
    nll_q, nll_base, tokens = (np.asarray(a, dtype=np.float64) for a in (nll_q, nll_base, tokens))
    if not (len(nll_q) == len(nll_base) == len(tokens)) or len(tokens) < 2:
        raise ValueError("paired bootstrap needs >= 2 blocks and equally long arrays "
                         f"(got {len(nll_q)}, {len(nll_base)}, {len(tokens)})")

    def change(index) -> np.ndarray:
        n = tokens[index].sum(axis=-1)
        return np.exp((nll_q[index].sum(axis=-1) - nll_base[index].sum(axis=-1)) / n) - 1.0

    observed = float(change(np.arange(len(tokens))))
    draws = np.random.default_rng(seed).integers(0, len(tokens), size=(samples, len(tokens)))
    deltas = change(draws)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return PairedResult(observed, (float(low), float(high)), _shifted_p_value(deltas, observed), len(tokens))


def paired_bootstrap_mean(q: np.ndarray, base: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                          seed: int = BOOTSTRAP_SEED) -> PairedResult:
    """Mean of per-item differences ``q - base`` (e.g. SQuAD F1 per question, in points) with a
    paired bootstrap CI and p-value.

    Raises:
        ValueError: arrays of different lengths, or fewer than 2 items.
    """
    diff = np.asarray(q, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if len(q) != len(base) or len(diff) < 2:
        raise ValueError(f"paired bootstrap needs >= 2 paired items (got {len(q)} and {len(base)})")
    observed = float(diff.mean())
    draws = np.random.default_rng(seed).integers(0, len(diff), size=(samples, len(diff)))
    deltas = diff[draws].mean(axis=1)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return PairedResult(observed, (float(low), float(high)), _shifted_p_value(deltas, observed), len(diff))


def mcnemar_exact(q_correct: np.ndarray, base_correct: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test on paired right/wrong outcomes (e.g. SQuAD EM per question).

    Returns:
        ``(b, c, p)``: questions only q got right, only the baseline got right, and the two-sided
        exact binomial p-value of b vs c under p = 1/2 (McNemar 1947; exact form as in
        statsmodels ``mcnemar(exact=True)``); p = 1 when there are no discordant pairs.

    Raises:
        ValueError: arrays of different lengths.
    """
    q_correct, base_correct = np.asarray(q_correct, dtype=bool), np.asarray(base_correct, dtype=bool)
    if len(q_correct) != len(base_correct):
        raise ValueError(f"McNemar needs paired outcomes (got {len(q_correct)} and {len(base_correct)})")
    b = int(np.count_nonzero(q_correct & ~base_correct))
    c = int(np.count_nonzero(~q_correct & base_correct))
    n = b + c
    if n == 0:
        return b, c, 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(b, c) + 1)) / 2.0**n
    return b, c, float(min(1.0, 2.0 * tail))
