"""A StreamingLLM attention-sink + sliding-window KV cache for the transformers backends, and
scoring a window through it.

StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453) keeps the keys and values of the first ``sink`` tokens (the attention sinks) and
of the most recent tokens, and evicts the ones in between. The convention here is the one of the
``mlc`` backend's ``sliding_window`` / ``attention_sink`` options (TVM's paged KV cache,
``backends/mlc/runtime.py``): **the window does not count the sink**. After ``n`` tokens the cache
holds positions ``[0, sink)`` and ``[n - window, n)``, i.e. at most ``sink + window`` positions,
and the token at position ``t`` attends to positions ``[0, sink)`` and ``[t - window, t]`` (the
cache plus itself).

Positions: keys keep the RoPE rotation of their original position (transformers caches keys after
RoPE, and the model is fed the tokens' true positions). This is the simpler variant, not the
paper's re-positioning of cached keys by their slot in the cache (StreamingLLM section 3.2, which
lets text run past the pre-training length). A query therefore sees the sink at its true distance
(its position), not at the in-cache distance; no sequence here exceeds the model's context (the
``wikitext2-long`` workload checks it), so no position is out of the trained range.

transformers 4.57 moved its ``SinkCache`` (which re-rotated keys) to a Hub ``custom_generate``
repository; ``SinkWindowLayer`` is built on its cache-layer API (``DynamicLayer``) instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from backends.hf.chunked import check_scoring_args, chunked_logits
from backends.options import check_sink_window


class SinkWindowLayer(DynamicLayer):
    """One layer's cache keeping the first ``sink`` and the last ``window`` positions seen.

    Keys / values are ``[batch, kv_heads, held, head_dim]`` in the model dtype, ``held <= sink +
    window``; ``positions`` is the int64 ``[held]`` tensor of their original token positions
    (ascending; every row of the batch shares them, so batches must not be padded). That index is
    8 bytes per held position and layer, which ``cache_bytes`` counts with the keys and values.

    ``update`` returns the held states followed by the new ones, so the new tokens attend to the
    cache and to themselves; it then evicts what falls out. ``get_mask_sizes`` places the held keys
    just before the new ones (``kv_offset = seen - held``), so transformers' causal mask lets every
    new token see all held keys and the earlier new tokens. That is exact for one new token at a
    time (decoding); a chunk of several new tokens needs the mask of ``sink_window_mask``.
    """

    def __init__(self, window: int, sink: int):
        super().__init__()
        check_sink_window(window, sink)
        if window < 1:
            raise ValueError("a SinkWindowLayer needs window >= 1")
        self.window = window
        self.sink = sink
        self.cumulative_length = 0
        self.positions = torch.zeros(0, dtype=torch.long)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states)
            self.positions = self.positions.to(key_states.device)
        new = key_states.shape[-2]
        full_keys = torch.cat([self.keys, key_states], dim=-2)
        full_values = torch.cat([self.values, value_states], dim=-2)
        full_positions = torch.cat([self.positions, torch.arange(
            self.cumulative_length, self.cumulative_length + new, device=self.positions.device)])
        self.cumulative_length += new
        keep = (full_positions < self.sink) | (full_positions >= self.cumulative_length - self.window)
        index = keep.nonzero().squeeze(-1)
        self.keys = full_keys.index_select(-2, index.to(full_keys.device))
        self.values = full_values.index_select(-2, index.to(full_values.device))
        self.positions = full_positions[index]
        return full_keys, full_values

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        held = int(self.positions.numel())
        return held + cache_position.shape[0], self.cumulative_length - held

    def get_seq_length(self) -> int:
        """Tokens seen so far (the next token's position), not the number held."""
        return self.cumulative_length

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        raise ValueError("a sink + sliding-window cache cannot be cropped (evicted states are lost)")


class SinkWindowCache(Cache):
    """A transformers ``Cache`` with one ``SinkWindowLayer(window, sink)`` per decoder layer.

    Args:
        model_config: the model's transformers config (``num_hidden_layers`` is read).
        window: recent positions kept (>= 1), not counting the sink.
        sink: leading positions kept (0 <= sink < window).

    Raises:
        ValueError: ``sink`` / ``window`` out of range (``check_sink_window``).
    """

    def __init__(self, model_config, window: int, sink: int):
        n_layers = model_config.get_text_config(decoder=True).num_hidden_layers
        self.window = window
        self.sink = sink
        super().__init__(layers=[SinkWindowLayer(window, sink) for _ in range(n_layers)])

    def held_positions(self) -> list[int]:
        """The original positions whose keys / values the cache holds (every layer alike)."""
        return self.layers[0].positions.tolist()


def sink_window_mask(held: torch.Tensor, start: int, stop: int, window: int, sink: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask of new tokens ``[start, stop)`` over the held keys followed by
    the new keys: query ``t`` may see key position ``s`` iff ``s <= t`` and (``s < sink`` or
    ``s >= t - window``). Float ``[1, 1, stop - start, len(held) + stop - start]`` in ``dtype``,
    0 where allowed and the dtype's minimum elsewhere (the form SDPA and eager attention add)."""
    keys = torch.cat([held, torch.arange(start, stop, device=held.device)])
    queries = torch.arange(start, stop, device=held.device)[:, None]
    allowed = (keys[None, :] <= queries) & ((keys[None, :] < sink) | (keys[None, :] >= queries - window))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=held.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def sink_window_logits(model, cache: SinkWindowCache, token_ids: Sequence[int], first_scored: int,
                       chunk: int, device: str) -> np.ndarray:
    """The logits predicting ``token_ids[first_scored:]``, every token fed through ``cache``.

    All ``n`` tokens go through the cache in chunks of at most ``chunk`` (the context too: a
    one-shot prefill would let the context attend beyond the window). Each chunk gets the explicit
    mask of ``sink_window_mask``, so every token sees exactly what token-by-token decoding would
    show it (the sink and the last ``window`` positions before it, and itself), whatever ``chunk``
    is: the held keys cover ``[t - window, start)`` for every ``t`` in the chunk.

    Args:
        model: a transformers ``*ForCausalLM`` in eval mode.
        cache: an empty ``SinkWindowCache``; filled (and left filled) by this call.
        token_ids: the window, ``[n]`` token ids.
        first_scored: index of the first scored token, ``1 <= first_scored <= n``.
        chunk: the most tokens per forward (>= 1).
        device: where the model runs.

    Returns:
        float32 ``[n - first_scored, vocab]`` (row ``j`` predicts ``token_ids[first_scored + j]``).

    Raises:
        ValueError: ``first_scored`` or ``chunk`` out of range.
    """
    n = len(token_ids)
    check_scoring_args(n, first_scored, chunk)
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32

    def mask(start: int, stop: int):
        layer = cache.layers[0]
        held = layer.positions.to(device) if layer.is_initialized else torch.zeros(0, dtype=torch.long, device=device)
        return sink_window_mask(held, start, stop, cache.window, cache.sink, dtype)

    bounds = [(start, min(start + chunk, n - 1)) for start in range(0, n - 1, chunk)]
    return chunked_logits(model, cache, token_ids, first_scored, bounds, device, mask)
