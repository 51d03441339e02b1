"""The run-time loop: a Relax VM over the compiled library, TVM's paged KV cache, greedy decoding.

Protocol of one step, as MLC-LLM's engine drives the cache (``vm.builtin.kv_state_*``):
``begin_forward(kv, seq_ids, lengths)`` -> ``prefill``/``decode`` -> ``end_forward(kv)``.
Sequences are added before their prefill and removed when finished, so the cache holds only live
sequences' pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from backends.base import GenerationOutput, GenerationRequest
from backends.decoding import greedy_decode


@dataclass(frozen=True)
class KVOptions:
    """Paged KV cache settings (tokens throughout).

    Attributes:
        context_window: the most tokens one sequence may hold (prompt + generated); 0 = model max.
        prefill_chunk: the most tokens one prefill call processes (longer inputs are chunked).
        page_size: tokens per KV page (fixed at 16: other sizes fail a layout check in TVM 0.27).
        sliding_window: keep only the last this-many tokens' KV per sequence (0 = off).
        attention_sink: with a sliding window, also keep the first this-many tokens (StreamingLLM).
        max_batch: the most sequences the cache is created for.
    """

    context_window: int = 2048
    prefill_chunk: int = 1024
    page_size: int = 16
    sliding_window: int = 0
    attention_sink: int = 0
    max_batch: int = 8


def _func(name: str):
    import tvm

    return tvm.get_global_func(name)


class Session:
    """A loaded compiled model on one device.

    Args:
        library: the loaded ``tvm.runtime.Module`` (VM executable library).
        params: parameters in the order of the export (numpy arrays; any iterable: each is copied
            to the device as it comes, so an iterator that reads one at a time keeps host memory
            to one parameter beyond what the device holds).
        device: ``"cpu"`` or ``"cuda"``.
        kv_bytes_per_token: KV bytes per token over all layers (K and V), for cache accounting.
    """

    def __init__(self, library, params: Iterable[np.ndarray], device: str, kv: KVOptions,
                 kv_bytes_per_token: int):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # = relax.VirtualMachine; also in runtime-only TVM

        self.dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        self.vm = VirtualMachine(library, self.dev)
        self.params = [tvm.runtime.tensor(p, self.dev) for p in params]
        self.param_bytes = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in self.params)
        self.kv_options = kv
        self.kv_bytes_per_token = kv_bytes_per_token
        self._cache = None
        self._cache_capacity = (0, 0)
        self._lengths: dict[int, int] = {}
        self._f = {name: self.vm[name] for name in ("prefill", "decode", "create_tir_paged_kv_cache")}
        self._add = _func("vm.builtin.kv_state_add_sequence")
        self._remove = _func("vm.builtin.kv_state_remove_sequence")
        self._begin = _func("vm.builtin.kv_state_begin_forward")
        self._end = _func("vm.builtin.kv_state_end_forward")
        self._sliding = _func("vm.builtin.attention_kv_cache_enable_sliding_window_for_seq")
        self._available_pages = _func("vm.builtin.attention_kv_cache_get_num_available_pages")
        self._total_pages = 0

    # --- cache ----------------------------------------------------------------------------
    def cache(self, batch: int, total_tokens: int):
        """A paged KV cache for ``batch`` sequences and ``total_tokens`` tokens, reused while it is
        large enough. ``generate`` calls it inside the timed region (after the request's
        ``start_s``): a request that needs a larger cache pays for creating it in its TTFT, as
        every backend pays for its per-request state; latency warm-up runs absorb it."""
        from tvm.runtime import ShapeTuple

        o = self.kv_options
        if batch > self._cache_capacity[0] or total_tokens > self._cache_capacity[1]:
            capacity = (max(batch, o.max_batch), max(total_tokens, self._cache_capacity[1]))
            self._cache = None
            self._cache = self._f["create_tir_paged_kv_cache"](
                ShapeTuple([capacity[0]]), ShapeTuple([capacity[1]]), ShapeTuple([o.prefill_chunk]),
                ShapeTuple([o.page_size]), ShapeTuple([1 if o.sliding_window else 0]))
            self._cache_capacity = capacity
            self._lengths = {}
            self._total_pages = int(self._available_pages(self._cache))  # all free right after creation
        return self._cache

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: ``page_size`` positions of K and V in every layer."""
        return self.kv_options.page_size * self.kv_bytes_per_token

    @property
    def reserved_kv_bytes(self) -> int:
        """Bytes the current cache preallocated: every page TVM created, K and V of all layers."""
        return self._total_pages * self.page_bytes

    def used_kv_bytes(self) -> int:
        """Bytes of the pages TVM has allocated to sequences (``total pages - available pages``,
        ``vm.builtin.attention_kv_cache_get_num_available_pages``) x ``page_bytes``."""
        if self._cache is None:
            return 0
        return (self._total_pages - int(self._available_pages(self._cache))) * self.page_bytes

    def analytic_kv_pages(self) -> int:
        """Pages the live sequences should hold by our own count (``ceil(held / page_size)`` each,
        ``held`` capped by the sliding window + sink): a cross-check of ``used_kv_bytes``, equal to
        TVM's count without a sliding window and a lower bound with one (TVM keeps the sink in a
        page of its own and the window can straddle two pages)."""
        o = self.kv_options
        pages = 0
        for length in self._lengths.values():
            held = min(length, o.sliding_window + o.attention_sink) if o.sliding_window else length
            pages += -(-held // o.page_size)
        return pages

    def cached_tokens(self) -> int:
        """Positions the live sequences hold, summed over them (capped by the sliding window + sink)."""
        o = self.kv_options
        return sum(min(n, o.sliding_window + o.attention_sink) if o.sliding_window else n
                   for n in self._lengths.values())

    def add_sequence(self, kv, seq_id: int) -> None:
        """Register a new, empty sequence (with the sliding window / sink when configured).

        TVM's ``sliding_window_size`` counts the sink (the cache holds that many positions in
        all); this project's convention (docs/metrics.md, shared with ``hf``) does not, so TVM is
        given ``sliding_window + attention_sink``: sink + the last ``sliding_window`` positions."""
        self._add(kv, seq_id)
        self._lengths[seq_id] = 0
        o = self.kv_options
        if o.sliding_window:
            self._sliding(kv, seq_id, o.sliding_window + o.attention_sink, o.attention_sink)

    def remove_sequence(self, kv, seq_id: int) -> None:
        self._remove(kv, seq_id)
        self._lengths.pop(seq_id, None)

    def _forward(self, name: str, kv, seq_ids: list[int], lengths: list[int], *args):
        import tvm
        from tvm.runtime import ShapeTuple

        self._begin(kv, ShapeTuple(seq_ids), ShapeTuple(lengths))
        out = self._f[name](*args, kv, self.params)
        self._end(kv)
        for sid, n in zip(seq_ids, lengths):
            self._lengths[sid] += n
        return out[0] if not isinstance(out, tvm.runtime.Tensor) else out

    def _ids(self, ids, shape):
        import tvm

        return tvm.runtime.tensor(np.asarray(ids, dtype=np.int32).reshape(shape), self.dev)

    # --- model calls ----------------------------------------------------------------------
    def prefill(self, kv, prompts: dict[int, Sequence[int]]) -> dict[int, np.ndarray]:
        """Prefill every sequence of ``prompts`` (seq id -> tokens), in chunks of at most
        ``prefill_chunk`` tokens, several sequences per call. Returns seq id -> float32 logits ``[V]``
        at its last prompt token."""
        chunk = self.kv_options.prefill_chunk
        remaining = {sid: list(tokens) for sid, tokens in prompts.items()}
        logits: dict[int, np.ndarray] = {}
        while any(remaining.values()):
            seq_ids, lengths, ids, finished, positions = [], [], [], [], []
            budget = chunk
            for sid, rest in remaining.items():
                if not rest or budget == 0:
                    continue
                take = min(budget, len(rest))
                seq_ids.append(sid)
                lengths.append(take)
                ids.extend(rest[:take])
                remaining[sid] = rest[take:]
                budget -= take
                positions.append(len(ids) - 1)
                finished.append(not remaining[sid])
            out = self._forward("prefill", kv, seq_ids, lengths, self._ids(ids, (1, -1)),
                                self._ids(positions, (-1,))).numpy()[0]
            for row, (sid, done) in enumerate(zip(seq_ids, finished)):
                if done:
                    logits[sid] = out[row]
        return logits

    def decode(self, kv, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        """One decoding step for each sequence (seq id -> its last token); float32 logits ``[V]`` each."""
        seq_ids = list(tokens)
        out = self._forward("decode", kv, seq_ids, [1] * len(seq_ids),
                            self._ids([tokens[s] for s in seq_ids], (-1, 1))).numpy()
        return {sid: out[row, 0] for row, sid in enumerate(seq_ids)}

    def score_plan(self, n: int) -> tuple[int, int]:
        """How ``score_logits`` splits the ``n - 1`` predicting positions of an ``n``-token window:
        ``(prefix, chunk)``, the first ``prefix`` positions in prefill calls of ``chunk`` tokens,
        the rest one token per call (``decode``, as generation does).

        Without a sliding window everything is prefilled: ``(n - 1, prefill_chunk)``. With one,
        TVM's paged KV cache (``BeginForward``; ``paged_kv_cache.cc`` of apache/tvm) builds the
        page table a call attends to before it appends and slides (``ReserveAppendLengthInSeq``
        -> ``SlideWindowForSequence``), and the call's new tokens attend to each other causally
        in full (ragged self-attention): the window is only applied between calls. So a query in
        a multi-token call sees more history than the window keeps, and only one token per call
        attends to exactly what generation would: the first ``attention_sink`` positions + the
        last ``sliding_window`` positions before it + itself. The first ``sliding_window +
        attention_sink`` positions are exact in larger calls too (nothing is evicted before them).
        """
        o = self.kv_options
        if not o.sliding_window:
            return n - 1, o.prefill_chunk
        return min(n - 1, o.sliding_window + o.attention_sink), o.prefill_chunk

    def score_logits(self, token_ids: Sequence[int], first_scored: int) -> np.ndarray:
        """The logits that predict ``token_ids[i]`` for ``i >= first_scored``, float32
        ``[n - first_scored, vocab]``, computed through the KV cache in the calls ``score_plan``
        gives, the LM head only at the scored positions (``prefill``'s ``logit_pos``; a
        context-only call asks for its last row): with a sliding window, every scored token
        attends to what the window + sink keep, as in generation."""
        n = len(token_ids)
        kv = self.cache(1, -(-n // self.kv_options.page_size) * self.kv_options.page_size)
        sid = 1 << 20
        self.add_sequence(kv, sid)
        picked = []
        prefix, chunk = self.score_plan(n)
        try:
            for start in range(0, prefix, chunk):
                stop = min(start + chunk, prefix)  # positions start..stop-1 predict start+1..stop
                rows = list(range(max(0, first_scored - 1 - start), stop - start)) or [stop - start - 1]
                logits = self._forward("prefill", kv, [sid], [stop - start], self._ids(token_ids[start:stop], (1, -1)),
                                       self._ids(rows, (-1,))).numpy()[0]
                if stop > first_scored - 1:  # row j predicts token start + j + 1
                    picked.append(np.asarray(logits, dtype=np.float32))
            for pos in range(prefix, n - 1):  # sliding window: one token per call
                row = self.decode(kv, {sid: int(token_ids[pos])})[sid]
                if pos >= first_scored - 1:
                    picked.append(np.asarray(row, dtype=np.float32)[None])
        finally:
            self.remove_sequence(kv, sid)
        return np.concatenate(picked)

    def generate(self, request: GenerationRequest, stop_ids: list[int]) -> GenerationOutput:
        """Batched greedy decoding (``backends.decoding.greedy_decode``) over this cache: one
        sequence per prompt, added before prefill and removed at the end; finished sequences
        leave the decode batch. ``extra`` carries the KV bytes (pages TVM allocated to the
        sequences) and cached positions after prefill and at the end, our own page count
        (``kv_cache_pages_analytic``) and the whole preallocated pool (``kv_cache_reserved_bytes``).
        ``start_s`` is ``request.start_s`` (stamped by ``Backend.generate``), so the cache and
        sequence set-up below count in TTFT, as per-request state does for every backend.

        Raises:
            ValueError: prompt + ``max_new_tokens`` exceeds ``context_window`` without a sliding window.
        """
        o = self.kv_options
        prompts = request.prompt_token_ids
        longest = request.longest_prompt + request.max_new_tokens
        if o.context_window and longest > o.context_window and not o.sliding_window:
            raise ValueError(f"prompt + max_new_tokens = {longest} exceeds context_window {o.context_window}")
        page = o.page_size
        kv = self.cache(len(prompts), sum(-(-(len(p) + request.max_new_tokens) // page) * page for p in prompts))
        ids = list(range(len(prompts)))
        for sid in ids:
            self.add_sequence(kv, sid)
        extra: dict[str, int] = {}

        def prefill() -> np.ndarray:
            logits = self.prefill(kv, {sid: prompts[sid] for sid in ids})
            return np.stack([logits[sid] for sid in ids])

        def step(chosen: np.ndarray, live: np.ndarray) -> np.ndarray:
            rows = self.decode(kv, {sid: int(chosen[sid]) for sid in ids if live[sid]})
            logits = np.zeros((len(ids), len(next(iter(rows.values())))), dtype=np.float32)
            for sid, row in rows.items():
                logits[sid] = row
            return logits

        def measure_prefill() -> None:
            extra["kv_cache_bytes_prefill"] = self.used_kv_bytes()
            extra["kv_cache_tokens_prefill"] = self.cached_tokens()

        try:
            out = greedy_decode(request, stop_ids, prefill, step, measure_prefill)
            extra["kv_cache_bytes"] = self.used_kv_bytes()
            extra["kv_cache_tokens"] = self.cached_tokens()
            extra["kv_cache_pages_analytic"] = self.analytic_kv_pages()
            extra["kv_cache_reserved_bytes"] = self.reserved_kv_bytes
        finally:
            for sid in ids:
                self.remove_sequence(kv, sid)
        out.extra = extra
        return out
