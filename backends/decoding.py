"""The greedy decoding loop for backends that drive their own forward passes (ONNX Runtime, TVM).

The backend supplies two functions, ``prefill`` and ``step``; this loop picks tokens, enforces
``min_new_tokens`` and stop tokens, and stamps each step with ``perf_counter`` the moment its
tokens exist on the host, so TTFT and ITL mean the same thing for every backend that uses it
(transformers backends get the same stamps from ``model.generate`` through a streamer). The start
is not stamped here: it is the request's ``start_s``, stamped by ``Backend.generate`` before the
backend's per-request set-up (its KV cache / sequences, padded inputs), the same point for all.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from backends.base import GenerationOutput, GenerationRequest

Prefill = Callable[[], np.ndarray]
Step = Callable[[np.ndarray, np.ndarray], np.ndarray]


def greedy_decode(request: GenerationRequest, stop_ids: list[int], prefill: Prefill, step: Step,
                  on_first_step: Callable[[], None] | None = None) -> GenerationOutput:
    """Greedy generation of ``request`` through a backend's own forward passes.

    Args:
        request: the prompts and limits.
        stop_ids: ids that end a sequence (emitted, then it stops); suppressed while fewer than
            ``request.min_new_tokens`` tokens exist, as transformers' ``MinNewTokensLengthLogitsProcessor``.
        prefill: runs the prompts, returns float logits ``[batch, vocab]`` at each prompt's last token.
        step: ``step(tokens, live)`` feeds ``tokens`` (int64 ``[batch]``, the tokens just chosen)
            for the rows where ``live`` (bool ``[batch]``) is true and returns logits ``[batch, vocab]``
            for the next position (rows of finished sequences are ignored).
        on_first_step: called once right after the first step's stamp (the cache then holds exactly
            the prompts), e.g. to measure the KV cache; its cost falls into the second interval.

    Returns:
        ``GenerationOutput`` with each sequence's tokens (its stop token included), the stamps, and
        ``start_s = request.start_s`` (the TTFT origin stamped by ``Backend.generate``).
    """
    stops = np.asarray(stop_ids, dtype=np.int64)
    tokens: list[list[int]] = [[] for _ in range(request.batch)]
    live = np.ones(request.batch, dtype=bool)
    stamps: list[float] = []
    logits = prefill()
    for index in range(request.max_new_tokens):
        if index < request.min_new_tokens and stops.size:
            logits[:, stops] = -np.inf
        chosen = logits.argmax(axis=-1).astype(np.int64)
        stamps.append(time.perf_counter())
        for row in np.flatnonzero(live):
            tokens[row].append(int(chosen[row]))
        if index == 0 and on_first_step is not None:
            on_first_step()
        live &= ~np.isin(chosen, stops)
        if not live.any() or index == request.max_new_tokens - 1:
            break
        logits = step(chosen, live)
    return GenerationOutput(tokens, request.start_s, stamps)
