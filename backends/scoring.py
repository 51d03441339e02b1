"""From the logits of scored positions to everything perplexity and agreement need: the one place
every backend's scoring ends.

Every backend returns float32 logits ``[n_scored, vocab]`` for a window's scored positions
(``Backend._score_logits``); ``Backend.score_window`` then calls the functions here:

- ``target_logprobs``: the log-probability of each target token (perplexity);
- ``compact_topk``: a compact copy of a baseline's distributions (top-k log-probs in fp16,
  relative to the most likely token's, their token ids, and the log of the probability mass
  outside the top k), so a baseline's distributions over a whole evaluation fit in megabytes
  instead of gigabytes;
- ``topk_agreement``: per-token KL divergence KLD(base || q) over the baseline's top-k tokens plus
  one "rest" bucket, and whether q's argmax equals the baseline's (top-1 agreement), the
  statistics of llama.cpp's ``llama-perplexity --kl-divergence``
  (``tools/perplexity/perplexity.cpp``);
- ``full_kld``: the exact full-vocabulary KLD, the reference the compact form is checked against.

All arithmetic is float64, ``chunk`` rows at a time, so a ``[n, vocab]`` float64 copy never
exists at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _log_softmax(block: np.ndarray) -> np.ndarray:
    """float64 ``log softmax`` of each row of ``block`` (max subtracted first: numerically stable)."""
    block = np.asarray(block, dtype=np.float64)
    peak = block.max(axis=-1, keepdims=True)
    shifted = block - peak
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def target_logprobs(logits: np.ndarray, targets: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``log softmax(logits)[i, targets[i]]`` for every row, computed in float64.

    The log-sum-exp is taken after subtracting each row's maximum (numerically stable); rows are
    processed ``chunk`` at a time so a ``[n, vocab]`` float64 copy never exists at once.

    Args:
        logits: ``[n, vocab]`` float (float32 from every backend).
        targets: ``[n]`` int token ids.

    Returns:
        float64 ``[n]`` natural-log probabilities (all <= 0).
    """
    targets = np.asarray(targets, dtype=np.int64)
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), chunk):
        block = np.asarray(logits[start : start + chunk], dtype=np.float64)
        peak = block.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(block - peak).sum(axis=-1)) + peak[:, 0]
        out[start : start + chunk] = block[np.arange(len(block)), targets[start : start + chunk]] - lse
    return out


@dataclass
class CompactLogprobs:
    """A baseline's next-token distributions at ``n`` scored positions, kept compactly.

    Attributes:
        top: float32 ``[n]`` natural-log probability of the most likely token.
        logprobs: float16 ``[n, k]`` natural-log probabilities of the ``k`` most likely tokens minus
            ``top`` (all <= 0; relative, so the fp16 step is finest where the mass is), most likely
            first (ties: lower token id first, so ``ids[:, 0]`` is the ``argmax``).
        ids: int32 ``[n, k]`` their token ids.
        log_rest: float32 ``[n]`` log of the probability mass outside the top k (``-inf`` if none).

    Size: ``n * (6k + 8)`` bytes (k = 256: 1544 bytes a token, 12.6 MB for 8192 tokens, 470 MB for
    WikiText-2's ~305k SmolLM2 tokens).
    """

    top: np.ndarray
    logprobs: np.ndarray
    ids: np.ndarray
    log_rest: np.ndarray

    def __len__(self) -> int:
        return len(self.log_rest)

    def rows(self, start: int, stop: int) -> "CompactLogprobs":
        return CompactLogprobs(self.top[start:stop], self.logprobs[start:stop], self.ids[start:stop],
                               self.log_rest[start:stop])

    @classmethod
    def concatenate(cls, parts: list["CompactLogprobs"]) -> "CompactLogprobs":
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("top", "logprobs", "ids", "log_rest")))


def _merged(logp: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``logp`` (float64 log-softmax rows ``[c, vocab]``) reduced to the outcomes ``ids`` ``[c, k]``
    plus one rest bucket, as stored: (float32 ``[c]`` log-prob at ``ids[:, 0]``, float16 ``[c, k]``
    log-probs relative to it, float32 ``[c]`` log rest). The rest mass is summed over the tokens
    outside ``ids`` (no ``1 - sum`` cancellation)."""
    chosen = np.take_along_axis(logp, ids, axis=1)
    probs = np.exp(logp)
    np.put_along_axis(probs, ids, 0.0, axis=1)
    with np.errstate(divide="ignore"):
        rest = np.log(probs.sum(axis=1))
    return chosen[:, 0].astype(np.float32), (chosen - chosen[:, :1]).astype(np.float16), rest.astype(np.float32)


def _normalised(top32: np.ndarray, relative16: np.ndarray, rest32: np.ndarray) -> np.ndarray:
    """float64 ``[c, k+1]`` log-probabilities of the stored outcomes (top k, then rest),
    renormalised so that they sum to exactly 1 after the rounding."""
    top = top32.astype(np.float64)[:, None] + relative16.astype(np.float64)
    logp = np.concatenate([top, rest32.astype(np.float64)[:, None]], axis=1)
    peak = logp.max(axis=1, keepdims=True)
    return logp - (peak + np.log(np.exp(logp - peak).sum(axis=1, keepdims=True)))


def compact_topk(logits: np.ndarray, k: int, chunk: int = 128) -> CompactLogprobs:
    """The top-``k`` compact form (``CompactLogprobs``) of each row's softmax distribution.

    Args:
        logits: ``[n, vocab]`` float (float32 from every backend).
        k: tokens kept per row (>= 1; at most ``vocab``).

    Raises:
        ValueError: ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, vocab = logits.shape
    k = min(k, vocab)
    top = np.empty(n, dtype=np.float32)
    relative = np.empty((n, k), dtype=np.float16)
    ids = np.empty((n, k), dtype=np.int32)
    rest = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk):
        raw = np.asarray(logits[start : start + chunk], dtype=np.float32)
        part = np.argpartition(-raw, k - 1, axis=1)[:, :k] if k < vocab else np.tile(np.arange(vocab), (len(raw), 1))
        part.sort(axis=1)  # ascending ids, so the stable sort below puts the lower id first on ties
        order = np.argsort(-np.take_along_axis(raw, part, axis=1), axis=1, kind="stable")
        chosen = np.take_along_axis(part, order, axis=1)
        rows = slice(start, start + chunk)
        top[rows], relative[rows], rest[rows] = _merged(_log_softmax(raw), chosen)
        ids[rows] = chosen
    return CompactLogprobs(top, relative, ids, rest)


def topk_agreement(logits: np.ndarray, base: CompactLogprobs, chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Per-token KL divergence ``KLD(base || q)`` and top-1 agreement of ``q = softmax(logits)``
    with a baseline stored as ``CompactLogprobs``.

    KLD is taken over k + 1 outcomes: the baseline's top-k tokens and one bucket for all other
    tokens. q goes through exactly the same reduction (its log-probs at the baseline's ids, relative
    to the one at the baseline's top token, rounded to fp16; its mass outside them in one bucket;
    both distributions renormalised), so identical logits give exactly 0. Merging outcomes never increases a KL divergence (data-processing
    inequality, Cover & Thomas, Elements of Information Theory, 2.8), so before the fp16 rounding
    this is a lower bound of the exact full-vocabulary KLD; ``docs/metrics.md`` gives the gap
    measured against ``full_kld``.

    Args:
        logits: ``[n, vocab]`` float32 logits of the compared backend at the same positions.
        base: the baseline's ``CompactLogprobs`` for those ``n`` positions.

    Returns:
        (float64 ``[n]`` KLD in nats, bool ``[n]`` ``argmax(q) == argmax(base)``).

    Raises:
        ValueError: ``logits`` and ``base`` have different row counts.
    """
    n = logits.shape[0]
    if n != len(base):
        raise ValueError(f"{n} rows of logits but {len(base)} baseline rows")
    kld = np.empty(n, dtype=np.float64)
    same = np.empty(n, dtype=bool)
    for start in range(0, n, chunk):
        raw = np.asarray(logits[start : start + chunk], dtype=np.float32)
        part = base.rows(start, start + chunk)
        ids = part.ids.astype(np.int64)
        p = _normalised(part.top, part.logprobs, part.log_rest)
        q = _normalised(*_merged(_log_softmax(raw), ids))
        with np.errstate(invalid="ignore"):  # 0 * (-inf - x): an empty bucket contributes 0
            terms = np.where(np.isneginf(p), 0.0, np.exp(p) * (p - q))
        kld[start : start + chunk] = terms.sum(axis=1)
        same[start : start + chunk] = np.argmax(raw, axis=1) == ids[:, 0]
    return kld, same


def full_kld(base_logits: np.ndarray, logits: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Exact ``KLD(softmax(base_logits) || softmax(logits))`` per row over the full vocabulary.

    Args:
        base_logits, logits: ``[n, vocab]`` float.

    Returns:
        float64 ``[n]`` KLD in nats.
    """
    out = np.empty(len(base_logits), dtype=np.float64)
    for start in range(0, len(base_logits), chunk):
        p = _log_softmax(base_logits[start : start + chunk])
        q = _log_softmax(logits[start : start + chunk])
        out[start : start + chunk] = (np.exp(p) * (p - q)).sum(axis=1)
    return out
