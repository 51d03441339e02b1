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

``score_rows`` does all three in one pass: each block of ``chunk`` rows is widened to float64 and
its log-softmax computed once (``_SoftmaxBlock``), in buffers reused from block to block, and every
statistic is read from it. The full-vocabulary exp is the cost (25 M per 512-token window at a
49,152-token vocabulary), so it is paid once per row, not once per statistic; a ``[n, vocab]``
float64 copy never exists at once.
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


class _SoftmaxBlock:
    """The float64 log-softmax of a block of float32 logit rows, computed once: for row ``r``,
    ``log p[r, j] = shifted[r, j] - log_total[r]`` with ``shifted = logits - max`` (numerically
    stable) and ``exps = exp(shifted)``, ``log_total = log(sum(exps))``. ``shifted`` and ``exps``
    live in caller-owned ``[chunk, vocab]`` buffers that the next block overwrites."""

    def __init__(self, raw: np.ndarray, shifted_buffer: np.ndarray, exps_buffer: np.ndarray):
        rows = len(raw)
        self.raw = raw
        self.shifted = shifted_buffer[:rows]
        np.subtract(raw, raw.max(axis=1, keepdims=True), out=self.shifted, dtype=np.float64)
        self.exps = np.exp(self.shifted, out=exps_buffer[:rows])
        self.log_total = np.log(self.exps.sum(axis=1))

    def logprobs_at(self, ids: np.ndarray) -> np.ndarray:
        """float64 ``[rows, k]`` log-probabilities of the tokens ``ids`` (int ``[rows, k]``)."""
        return np.take_along_axis(self.shifted, ids, axis=1) - self.log_total[:, None]

    def merged(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The distribution reduced to the outcomes ``ids`` (int ``[rows, k]``) plus one rest
        bucket, as stored: (float32 ``[rows]`` log-prob at ``ids[:, 0]``, float16 ``[rows, k]``
        log-probs relative to it, float32 ``[rows]`` log rest, ``-inf`` when nothing is outside).
        The rest mass is summed over the tokens outside ``ids`` (no ``1 - sum`` cancellation)."""
        chosen = self.logprobs_at(ids)
        kept = np.take_along_axis(self.exps, ids, axis=1)
        np.put_along_axis(self.exps, ids, 0.0, axis=1)
        with np.errstate(divide="ignore"):
            rest = np.log(self.exps.sum(axis=1)) - self.log_total
        np.put_along_axis(self.exps, ids, kept, axis=1)  # restored: another reduction may follow
        return chosen[:, 0].astype(np.float32), (chosen - chosen[:, :1]).astype(np.float16), rest.astype(np.float32)

    def top_ids(self, k: int) -> np.ndarray:
        """int ``[rows, k]`` ids of the ``k`` largest logits, most likely first (ties: lower id first)."""
        vocab = self.raw.shape[1]
        if k >= vocab:
            part = np.tile(np.arange(vocab), (len(self.raw), 1))
        else:
            part = np.argpartition(-self.raw, k - 1, axis=1)[:, :k]
            part.sort(axis=1)  # ascending ids, so the stable sort below puts the lower id first on ties
        order = np.argsort(-np.take_along_axis(self.raw, part, axis=1), axis=1, kind="stable")
        return np.take_along_axis(part, order, axis=1)


def _normalised(top32: np.ndarray, relative16: np.ndarray, rest32: np.ndarray) -> np.ndarray:
    """float64 ``[c, k+1]`` log-probabilities of the stored outcomes (top k, then rest),
    renormalised so that they sum to exactly 1 after the rounding."""
    top = top32.astype(np.float64)[:, None] + relative16.astype(np.float64)
    logp = np.concatenate([top, rest32.astype(np.float64)[:, None]], axis=1)
    peak = logp.max(axis=1, keepdims=True)
    return logp - (peak + np.log(np.exp(logp - peak).sum(axis=1, keepdims=True)))


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
    def empty(cls, n: int, k: int) -> "CompactLogprobs":
        """An uninitialised store for ``n`` positions of ``k`` tokens, filled block by block."""
        return cls(np.empty(n, np.float32), np.empty((n, k), np.float16), np.empty((n, k), np.int32),
                   np.empty(n, np.float32))

    @classmethod
    def concatenate(cls, parts: list["CompactLogprobs"]) -> "CompactLogprobs":
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("top", "logprobs", "ids", "log_rest")))


@dataclass
class WindowScore:
    """What ``score_rows`` computed for ``n`` rows, and so what ``Backend.score_window`` returns
    for a window of ``n = window.n_scored`` scored positions (None: not asked for).

    Attributes:
        logprobs: float64 ``[n]`` natural-log probabilities of the target tokens (all <= 0).
        topk: the compact top-k distributions (``CompactLogprobs``), when asked (a baseline's store).
        kld: float64 ``[n]`` KL divergence (nats) KLD(reference || these rows) over the
            reference's top-k tokens plus a rest bucket, when a reference was given.
        same_top: bool ``[n]``: the row's argmax equals the reference's, when one was given.
    """

    logprobs: np.ndarray | None = None
    topk: CompactLogprobs | None = None
    kld: np.ndarray | None = None
    same_top: np.ndarray | None = None


BLOCK_ROWS = 32  # rows per pass: two float64 [32, 49152] buffers (25 MB) reused, instead of a fresh
# [256, vocab] copy per statistic (page faults and cache misses were most of the scoring time)


def score_rows(logits: np.ndarray, targets: np.ndarray | None = None, keep_topk: int = 0,
               reference: CompactLogprobs | None = None, chunk: int = BLOCK_ROWS) -> WindowScore:
    """Target log-probabilities, the compact top-k form and agreement with a reference, from one
    float64 log-softmax per row (``_SoftmaxBlock``), ``chunk`` rows at a time.

    Args:
        logits: ``[n, vocab]`` float (float32 from every backend).
        targets: int ``[n]`` token ids, or None: no ``logprobs``.
        keep_topk: > 0: also ``topk``, with this many tokens per row (at most ``vocab``).
        reference: a baseline's ``CompactLogprobs`` for the same ``n`` rows: also ``kld`` and
            ``same_top`` (``topk_agreement``).

    Raises:
        ValueError: ``keep_topk < 0``, ``chunk < 1``, or ``targets`` / ``reference`` of another length.
    """
    n, vocab = logits.shape
    if keep_topk < 0 or chunk < 1:
        raise ValueError(f"keep_topk must be >= 0 and chunk >= 1, got {keep_topk}, {chunk}")
    if targets is not None and len(targets) != n:
        raise ValueError(f"{n} rows of logits but {len(targets)} targets")
    if reference is not None and len(reference) != n:
        raise ValueError(f"{n} rows of logits but {len(reference)} baseline rows")
    out = WindowScore()
    if targets is not None:
        targets = np.asarray(targets, dtype=np.int64)
        out.logprobs = np.empty(n, dtype=np.float64)
    k = min(keep_topk, vocab)
    if k:
        out.topk = CompactLogprobs.empty(n, k)
    if reference is not None:
        out.kld, out.same_top = np.empty(n, dtype=np.float64), np.empty(n, dtype=bool)
    rows = min(chunk, max(n, 1))
    shifted, exps = np.empty((rows, vocab), np.float64), np.empty((rows, vocab), np.float64)
    for start in range(0, n, chunk):
        block = _SoftmaxBlock(np.asarray(logits[start : start + chunk], dtype=np.float32), shifted, exps)
        span = slice(start, start + len(block.raw))
        if targets is not None:
            out.logprobs[span] = block.logprobs_at(targets[span, None])[:, 0]
        if k:
            ids = block.top_ids(k)
            topk = out.topk
            topk.top[span], topk.logprobs[span], topk.log_rest[span] = block.merged(ids)
            topk.ids[span] = ids
        if reference is not None:
            part = reference.rows(span.start, span.stop)
            ids = part.ids.astype(np.int64)
            p = _normalised(part.top, part.logprobs, part.log_rest)
            q = _normalised(*block.merged(ids))
            with np.errstate(invalid="ignore"):  # 0 * (-inf - x): an empty bucket contributes 0
                terms = np.where(np.isneginf(p), 0.0, np.exp(p) * (p - q))
            out.kld[span] = terms.sum(axis=1)
            out.same_top[span] = np.argmax(block.raw, axis=1) == ids[:, 0]
    return out


def target_logprobs(logits: np.ndarray, targets: np.ndarray, chunk: int = BLOCK_ROWS) -> np.ndarray:
    """``log softmax(logits)[i, targets[i]]`` for every row, computed in float64 (``score_rows``).

    Args:
        logits: ``[n, vocab]`` float (float32 from every backend).
        targets: ``[n]`` int token ids.

    Returns:
        float64 ``[n]`` natural-log probabilities (all <= 0).
    """
    return score_rows(logits, targets, chunk=chunk).logprobs


def compact_topk(logits: np.ndarray, k: int, chunk: int = BLOCK_ROWS) -> CompactLogprobs:
    """The top-``k`` compact form (``CompactLogprobs``) of each row's softmax distribution
    (``score_rows``).

    Args:
        logits: ``[n, vocab]`` float (float32 from every backend).
        k: tokens kept per row (>= 1; at most ``vocab``).

    Raises:
        ValueError: ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return score_rows(logits, keep_topk=k, chunk=chunk).topk


def topk_agreement(logits: np.ndarray, base: CompactLogprobs, chunk: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Per-token KL divergence ``KLD(base || q)`` and top-1 agreement of ``q = softmax(logits)``
    with a baseline stored as ``CompactLogprobs`` (``score_rows``).

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
    scores = score_rows(logits, reference=base, chunk=chunk)
    return scores.kld, scores.same_top


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
