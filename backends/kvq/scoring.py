"""Scoring a window through a KV cache, so that perplexity sees the cache's precision.

A single forward pass over a window computes attention from the fresh keys and values and never
reads the cache, so it reports the same perplexity for every KV precision. Here a window is scored
the way generation reads it (the protocol of the quantized-KV studies, e.g. KIVI, arXiv:2402.02750,
and KVQuant, arXiv:2401.18079, which evaluate perplexity with the quantized cache in the loop):

1. prefill ``token_ids[:first_scored]`` through the cache; its last logits score
   ``token_ids[first_scored]``;
2. feed the remaining tokens ``token_ids[first_scored : n-1]`` in chunks of at most ``chunk``
   tokens through the same cache; chunk position ``j`` scores the token after it.

Each chunk attends to all earlier tokens through what the cache returns (for a quantized cache:
the dequantized store plus the full-precision residual) and to its own tokens at full precision,
as a decoding step attends to itself. ``chunk=1`` is exactly token-by-token decoding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from backends.hf.chunked import check_scoring_args, chunked_logits


def cached_logits(model, cache, token_ids: Sequence[int], first_scored: int, chunk: int, device: str) -> np.ndarray:
    """The logits that predict ``token_ids[first_scored:]``, computed through ``cache``.

    Args:
        model: a transformers ``*ForCausalLM`` in eval mode.
        cache: an empty transformers ``Cache``; it is filled (and left filled) by this call.
        token_ids: the window, ``[n]`` token ids.
        first_scored: index of the first scored token, ``1 <= first_scored <= n``.
        chunk: the most tokens per forward after the prefill (>= 1).
        device: where the model runs (``"cpu"`` / ``"cuda"``).

    Returns:
        float32 ``[n - first_scored, vocab]`` logits (row ``j`` predicts ``token_ids[first_scored + j]``).

    Raises:
        ValueError: ``first_scored`` or ``chunk`` out of range.
    """
    n = len(token_ids)
    check_scoring_args(n, first_scored, chunk)
    if first_scored == n:
        return np.zeros((0, model.config.get_text_config(decoder=True).vocab_size), dtype=np.float32)
    bounds = [(0, first_scored)] + [(start, min(start + chunk, n - 1)) for start in range(first_scored, n - 1, chunk)]
    return chunked_logits(model, cache, token_ids, first_scored, bounds, device)
