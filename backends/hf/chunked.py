"""Feeding a scoring window through a transformers KV cache, chunk by chunk: the loop shared by
the quantized-KV scorer (``backends.kvq.scoring.cached_logits``) and the sink + sliding-window
scorer (``backends.hf.sink_cache.sink_window_logits``), which differ only in where the chunks
start and in the attention mask they pass."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def check_scoring_args(n: int, first_scored: int, chunk: int) -> None:
    """Raises ValueError: ``first_scored`` outside ``1..n`` or ``chunk < 1``."""
    if not 1 <= first_scored <= n:
        raise ValueError(f"first_scored must be in 1..{n}, got {first_scored}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


def chunked_logits(model, cache, token_ids: Sequence[int], first_scored: int, bounds: Sequence[tuple[int, int]],
                   device: str, mask: Callable[[int, int], object] | None = None) -> np.ndarray:
    """The logits predicting ``token_ids[first_scored:]``, the tokens fed through ``cache`` one
    chunk ``token_ids[start:stop]`` per forward, for each ``(start, stop)`` of ``bounds`` in order.

    Args:
        model: a transformers ``*ForCausalLM`` in eval mode.
        cache: a transformers ``Cache`` holding ``token_ids[:bounds[0][0]]``; filled (and left
            filled) by this call.
        token_ids: the window, ``[n]`` token ids.
        first_scored: index of the first scored token (``1 <= first_scored <= n``).
        bounds: consecutive chunks; row ``j`` of chunk ``(start, stop)`` predicts token
            ``start + j + 1``, so they should reach ``n - 1``.
        device: where the model runs (``"cpu"`` / ``"cuda"``).
        mask: ``mask(start, stop)`` gives the chunk's attention mask (called before its forward,
            so it sees the cache as it is then); None: the model's own causal mask.

    Returns:
        float32 ``[n - first_scored, vocab]`` (row ``j`` predicts ``token_ids[first_scored + j]``);
        ``[0, vocab]`` when no chunk reaches a scored token.
    """
    import torch

    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=device)
    pieces = []
    with torch.inference_mode():
        for start, stop in bounds:
            extra = {} if mask is None else {"attention_mask": mask(start, stop)}
            # rows start..stop-1 predict start+1..stop: the LM head runs only on the scored ones
            # (a context-only chunk still needs one row for the call)
            scored = stop - max(start, first_scored - 1) if stop >= first_scored else 0
            out = model(input_ids=ids[:, start:stop], past_key_values=cache, use_cache=True,
                        cache_position=torch.arange(start, stop, device=device), logits_to_keep=max(scored, 1),
                        **extra)
            if scored:
                pieces.append(out.logits[0, -scored:].float().cpu().numpy())
    if not pieces:
        return np.zeros((0, model.config.get_text_config(decoder=True).vocab_size), dtype=np.float32)
    return np.concatenate(pieces)
