"""Parallel, vectorised CPU attention kernels for TVM's paged KV cache.

``TIRPagedKVCache`` builds its llvm attention kernels as scalar, single-threaded TIR (one serial
loop nest per batch, every head and query row inside it). ``schedules.cpu_schedule_pass`` swaps
these PrimFuncs (found by their symbols, ``RAGGED_PREFILL`` etc. below) for the kernels here,
which keep the exact signatures and semantics (causal mask, GQA, sliding window + attention sink
through the same length-info helpers, inline RoPE when ``rotary_mode == 1``, the log2-sum-exp
``lse`` output the cache merges states with):

* prefill, ragged (the new tokens) and paged (a sequence's pages: chunked-prefill history,
  sliding window): keys gathered transposed into a workspace, then per (head, 4 query rows)
  each block of ``KB`` keys is a register GEMM, a masked online-softmax update and ``P V``
  (``_prefill_tile_macros``);
* decode: per (sequence, KV head, key range) the whole GQA group at once, each K/V row read once
  per group; key ranges merged in a second pass (split-K, as flash-decoding);
* ``exp2`` is ``fastmath.exp2`` (vectorisable; LLVM calls scalar libm for TIR's ``exp2``).

Left stock (scalar): tree attention (speculative decoding, unused here) and the merge/copy kernels.
"""

from __future__ import annotations

from backends.mlc.fastmath import LOG2E, exp2

KB = 16  # keys per online-softmax block
VL = 16  # vector lanes of the decode q.k partial sums
TQ = 4  # query rows per register tile (prefill)
NSPLIT = 2  # query tiles of one head are dealt round-robin to this many parallel work items
MIN_DECODE_ITEMS = 4  # decode: parallel work items per sequence at least (key ranges x KV heads)


def _prefill_tile_macros(h_q: int, h_kv: int, d: int, dtype: str, rope_scaling: dict):
    """The tiled online-softmax core shared by the ragged and paged prefill kernels.

    Both kernels first gather their sequences' keys transposed into ``Kt[h_kv, d, rows]`` and the
    values into ``Vc[h_kv, rows, d]`` (sequence ``b`` at column/row offset ``off``; ``KB`` zeroed
    spare rows at the end so a block may read past a sequence without a bounds check); then, per
    (query head, tile of ``TQ`` query rows), every block of ``KB`` keys is one small register
    GEMM ``S[TQ, KB] = Q Kt`` vectorised over keys, a masked online-softmax update with a
    vectorised ``exp2``, and ``O[TQ, d] += P V`` vectorised over ``d``.

    Returns the macros ``(zero_spare_rows, head_tiles)`` the two kernels call.
    """
    from tvm import tirx
    from tvm.relax.frontend.nn.llm._kernel_common import _rope
    from tvm.script import tirx as T

    group_size = h_q // h_kv

    @T.macro
    def tile(q: T.Buffer, q_rope_position: T.Buffer, Kt: T.Buffer, Vc: T.Buffer, output: T.Buffer,
             lse: T.Buffer, h: T.int32, q0: T.int32, qt: T.int32, qlen: T.int32, off: T.int32,
             kv_len: T.int32, causal: T.int32, window: T.int32, rotary_mode: T.int32,
             rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        with T.sblock("attn_tile"):
            T.reads()
            T.writes()
            Qt = T.sblock_alloc_buffer((TQ, d), "float32")
            S = T.sblock_alloc_buffer((TQ, KB), "float32")
            O = T.sblock_alloc_buffer((TQ, d), "float32")
            st = T.sblock_alloc_buffer((TQ, 4), "float32")  # m, l, block max, alpha
            lim = T.sblock_alloc_buffer((TQ, 2), "int32")  # visible keys [lo, hi) of each row
            hk: T.let[T.int32] = h // group_size
            for r in T.unroll(TQ):
                row: T.let[T.int32] = T.min(qt * TQ + r, qlen - 1)
                for dd in T.serial(d):
                    Qt[r, dd] = T.if_then_else(
                        rotary_mode == 1,
                        _rope(q, q_rope_position[q0 + row], d, rope_theta, rope_scale, (q0 + row, h, dd), dtype, rope_scaling),
                        q[q0 + row, h, dd],
                    ).astype("float32") * (sm_scale * LOG2E)
                for dd in T.vectorized(d):
                    O[r, dd] = T.float32(0)
                st[r, 0] = T.float32(-5e4)
                st[r, 1] = T.float32(0)
                # visible keys [lo, hi) of this row: TVM's _causal_mask / _causal_or_sliding_cross_mask
                lim[r, 0] = T.if_then_else(
                    tirx.And(causal > 0, window > 0), T.max(kv_len - T.max(window - row - 1, 0), 0), 0)
                lim[r, 1] = T.if_then_else(
                    tirx.And(causal > 0, window <= 0), T.min(T.max(kv_len - qlen + row + 1, 0), kv_len), kv_len)
            lo0: T.let[T.int32] = lim[0, 0]
            hi1: T.let[T.int32] = lim[TQ - 1, 1]
            for kb in T.serial(T.max(hi1 - lo0 + KB - 1, 0) // KB):
                c0: T.let[T.int32] = lo0 + kb * KB
                for r in T.unroll(TQ):
                    for j in T.vectorized(KB):
                        S[r, j] = T.float32(0)
                for dd in T.serial(d):
                    for r in T.unroll(TQ):
                        for j in T.vectorized(KB):
                            S[r, j] = S[r, j] + Qt[r, dd] * Kt[hk, dd, off + c0 + j]
                for r in T.unroll(TQ):
                    for j in T.vectorized(KB):
                        S[r, j] = T.if_then_else(
                            tirx.And(c0 + j >= lim[r, 0], c0 + j < lim[r, 1]),
                            S[r, j], T.float32(-5e4))
                    st[r, 2] = st[r, 0]
                    for j in T.serial(KB):
                        st[r, 2] = T.max(st[r, 2], S[r, j])
                    st[r, 3] = exp2(st[r, 0] - st[r, 2])
                    st[r, 0] = st[r, 2]
                    for j in T.vectorized(KB):
                        S[r, j] = T.if_then_else(S[r, j] > T.float32(-4e4), exp2(S[r, j] - st[r, 0]), T.float32(0))
                    st[r, 1] = st[r, 1] * st[r, 3]
                    for j in T.serial(KB):
                        st[r, 1] = st[r, 1] + S[r, j]
                    for dd in T.vectorized(d):
                        O[r, dd] = O[r, dd] * st[r, 3]
                for j in T.serial(KB):
                    for r in T.unroll(TQ):
                        for dd in T.vectorized(d):
                            O[r, dd] = O[r, dd] + S[r, j] * Vc[hk, off + c0 + j, dd]
            for r in T.unroll(TQ):
                if qt * TQ + r < qlen:
                    if st[r, 1] > T.float32(0):
                        for dd in T.vectorized(d):
                            output[q0 + qt * TQ + r, h, dd] = (O[r, dd] / st[r, 1]).astype(dtype)
                        lse[q0 + qt * TQ + r, h] = st[r, 0] + T.log2(st[r, 1])
                    else:
                        for dd in T.vectorized(d):
                            output[q0 + qt * TQ + r, h, dd] = T.Cast(dtype, T.float32(0))
                        lse[q0 + qt * TQ + r, h] = T.float32(-5e4)

    @T.macro
    def zero_spare_rows(Kt: T.Buffer, Vc: T.Buffer, hk: T.int32, start: T.int32):
        """Zero ``KB`` workspace rows after a sequence (the next sequence overwrites them)."""
        for pos in T.serial(KB):
            for dd in T.serial(d):
                Kt[hk, dd, start + pos] = T.float32(0)
            for dd in T.vectorized(d):
                Vc[hk, start + pos, dd] = T.float32(0)

    @T.macro
    def head_tiles(q: T.Buffer, q_rope_position: T.Buffer, Kt: T.Buffer, Vc: T.Buffer,
                   output: T.Buffer, lse: T.Buffer, item: T.int32, q0: T.int32, qlen: T.int32,
                   off: T.int32, kv_len: T.int32, causal: T.int32, window: T.int32,
                   rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
                   sm_scale: T.float32):
        """Work item ``item`` (head ``item // NSPLIT``) takes every ``NSPLIT``-th query tile of one
        sequence (causal tiles grow with the row index: dealing them round-robin balances)."""
        for t in T.serial((T.ceildiv(qlen, TQ) + NSPLIT - 1 - item % NSPLIT) // NSPLIT):
            tile(q, q_rope_position, Kt, Vc, output, lse, item // NSPLIT, q0, t * NSPLIT + item % NSPLIT,
                 qlen, off, kv_len, causal, window, rotary_mode, rope_scale, rope_theta, sm_scale)

    return zero_spare_rows, head_tiles


def ragged_prefill_cpu(h_kv: int, h_q: int, d: int, dtype: str, rope_scaling: dict):
    """Replacement for ``batch_prefill_ragged_kv`` (self-attention of the new tokens)."""
    from tvm.relax.frontend.nn.llm._kernel_common import _rope
    from tvm.script import tirx as T

    zero_spare_rows, head_tiles = _prefill_tile_macros(h_q, h_kv, d, dtype, rope_scaling)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
        var_kv_indptr: T.handle, var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle,
        var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        Kt = T.alloc_buffer((h_kv, d, kv_len + KB), "float32")
        Vc = T.alloc_buffer((h_kv, kv_len + KB, d), "float32")

        for hk in T.parallel(h_kv):
            for b in T.serial(batch_size):
                with T.sblock("gather"):
                    T.reads()
                    T.writes()
                    k0: T.let[T.int32] = kv_indptr[b]
                    klen: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                    for pos in T.serial(klen):
                        for dd in T.serial(d):
                            Kt[hk, dd, k0 + pos] = T.if_then_else(
                                rotary_mode == 1,
                                _rope(k, k_rope_pos_offset[b] + pos, d, rope_theta, rope_scale, (k0 + pos, hk, dd), dtype, rope_scaling),
                                k[k0 + pos, hk, dd],
                            ).astype("float32")
                        for dd in T.vectorized(d):
                            Vc[hk, k0 + pos, dd] = v[k0 + pos, hk, dd].astype("float32")
                    zero_spare_rows(Kt, Vc, hk, k0 + klen)
        for item in T.parallel(h_q * NSPLIT):
            for b in T.serial(batch_size):
                head_tiles(q, q_rope_position, Kt, Vc, output, lse, item, q_indptr[b],
                           q_indptr[b + 1] - q_indptr[b], kv_indptr[b], kv_indptr[b + 1] - kv_indptr[b],
                           causal, 0, rotary_mode, rope_scale, rope_theta, sm_scale)

    return batch_prefill_ragged_kv


def paged_prefill_cpu(h_kv: int, h_q: int, d: int, dtype: str, sliding_window: bool,
                      rope_scaling: dict, page_size: int, sliding_window_size: int):
    """Replacement for ``batch_prefill_paged_kv_cpu[_sliding_window]`` (attention of the new tokens
    to a sequence's KV pages: the history of a chunked prefill, or everything with a sliding
    window). Masks as TVM's kernel (``_causal_or_sliding_cross_mask`` with the cache's
    ``layer_sliding_window_size`` when ``sliding_window``)."""
    from tvm.relax.frontend.nn.llm._kernel_common import (
        _declare_length_info, _get_kv_chunk_len, _get_seq_offset, _rope)
    from tvm.script import tirx as T

    zero_spare_rows, head_tiles = _prefill_tile_macros(h_q, h_kv, d, dtype, rope_scaling)
    window = sliding_window_size if sliding_window else 0

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        length_info = _declare_length_info(var_length_info, batch_size, sliding_window, length_info_elem_offset)
        Kt = T.alloc_buffer((h_kv, d, nnz_pages * page_size + KB), "float32")
        Vc = T.alloc_buffer((h_kv, nnz_pages * page_size + KB, d), "float32")

        for hk in T.parallel(h_kv):
            for b in T.serial(batch_size):
                with T.sblock("gather"):
                    T.reads()
                    T.writes()
                    pbeg: T.let[T.int32] = page_indptr[b]
                    pend: T.let[T.int32] = page_indptr[b + 1]
                    off: T.let[T.int32] = (pbeg - page_indptr[0]) * page_size
                    klen: T.let[T.int32] = T.if_then_else(
                        pbeg != pend, _get_kv_chunk_len(pend - pbeg, page_size, b, length_info, sliding_window), 0)
                    for pos in T.serial(klen):
                        so: T.let[T.int32] = _get_seq_offset(pos, b, length_info, sliding_window)
                        pno: T.let[T.int32] = page_values[pbeg + so // page_size]
                        for dd in T.serial(d):
                            Kt[hk, dd, off + pos] = T.if_then_else(
                                rotary_mode == 1,
                                _rope(pages, k_rope_pos_offset[b] + pos, d, rope_theta, rope_scale, (pno, 0, hk, so % page_size, dd), dtype, rope_scaling),
                                pages[pno, 0, hk, so % page_size, dd],
                            ).astype("float32")
                        for dd in T.vectorized(d):
                            Vc[hk, off + pos, dd] = pages[pno, 1, hk, so % page_size, dd].astype("float32")
                    zero_spare_rows(Kt, Vc, hk, off + klen)
        for item in T.parallel(h_q * NSPLIT):
            for b in T.serial(batch_size):
                head_tiles(q, q_rope_position, Kt, Vc, output, lse, item, q_indptr[b],
                           q_indptr[b + 1] - q_indptr[b], (page_indptr[b] - page_indptr[0]) * page_size,
                           T.if_then_else(page_indptr[b] != page_indptr[b + 1],
                                          _get_kv_chunk_len(page_indptr[b + 1] - page_indptr[b], page_size, b, length_info, sliding_window), 0),
                           causal, window, rotary_mode, rope_scale, rope_theta, sm_scale)

    return batch_prefill_paged_kv_cpu


def decode_splits(h_kv: int) -> int:
    """Key ranges each (sequence, KV head) of a decode step is split into, so one sequence has at
    least ``MIN_DECODE_ITEMS`` parallel work items (split-K, as flash-decoding)."""
    return -(-MIN_DECODE_ITEMS // h_kv)


def paged_decode_cpu(h_kv: int, h_q: int, d: int, dtype: str, sliding_window: bool,
                     rope_scaling: dict, page_size: int):
    """Replacement for ``batch_decode_paged_kv_cpu[_sliding_window]`` (one new token per sequence).

    One work item per (sequence, KV head, key range): the ``G = h_q / h_kv`` query heads sharing
    the KV head are processed together, so each key and value row is read once per group instead
    of once per query head; each item keeps an unnormalised online-softmax state (max, sum,
    ``O[G, d]``) per head, and a second parallel pass merges the key ranges' states.
    """
    from tvm.relax.frontend.nn.llm._kernel_common import (
        _declare_length_info, _get_kv_chunk_len, _get_seq_offset, _rope)
    from tvm.script import tirx as T

    group = h_q // h_kv
    n_vo = d // VL
    ns = decode_splits(h_kv)

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle, var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
        output_handle: T.handle, lse_handle: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, h_q, d), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(output_handle, (B, h_q, d), dtype)
        lse = T.match_buffer(lse_handle, (B, h_q), "float32")
        length_info = _declare_length_info(var_length_info, B, sliding_window, length_info_elem_offset)
        O_part = T.alloc_buffer((B, h_q, ns, d), "float32")
        m_part = T.alloc_buffer((B, h_q, ns), "float32")
        l_part = T.alloc_buffer((B, h_q, ns), "float32")

        for item in T.parallel(B * h_kv * ns):
            with T.sblock("attn"):
                T.reads()
                T.writes()
                Q_loc = T.sblock_alloc_buffer((group, d), "float32")
                K_loc = T.sblock_alloc_buffer((d,), "float32")
                O_loc = T.sblock_alloc_buffer((group, d), "float32")
                part = T.sblock_alloc_buffer((group, VL), "float32")
                S = T.sblock_alloc_buffer((group, KB), "float32")
                st = T.sblock_alloc_buffer((group, 3), "float32")  # m, l, alpha
                b: T.let[T.int32] = item // (h_kv * ns)
                hk: T.let[T.int32] = item // ns % h_kv
                pbeg: T.let[T.int32] = page_table_indptr[b]
                pend: T.let[T.int32] = page_table_indptr[b + 1]
                kend: T.let[T.int32] = T.if_then_else(
                    pbeg != pend, _get_kv_chunk_len(pend - pbeg, page_size, b, length_info, sliding_window), 0)
                per: T.let[T.int32] = T.ceildiv(T.ceildiv(kend, ns), KB) * KB
                k0: T.let[T.int32] = T.min(item % ns * per, kend)
                k1: T.let[T.int32] = T.min(k0 + per, kend)
                for g in T.serial(group):
                    for dd in T.serial(d):
                        Q_loc[g, dd] = T.if_then_else(
                            rotary_mode == 1,
                            _rope(Q, q_rope_position[b], d, rope_theta, rope_scale, (b, hk * group + g, dd), dtype, rope_scaling),
                            Q[b, hk * group + g, dd],
                        ).astype("float32") * (sm_scale * LOG2E)
                    for dd in T.vectorized(d):
                        O_loc[g, dd] = T.float32(0)
                    st[g, 0] = T.float32(-5e4)
                    st[g, 1] = T.float32(0)
                for kb in T.serial(T.ceildiv(k1 - k0, KB)):
                    for j in T.serial(KB):
                        row: T.let[T.int32] = T.min(k0 + kb * KB + j, k1 - 1)
                        off: T.let[T.int32] = _get_seq_offset(row, b, length_info, sliding_window)
                        pno: T.let[T.int32] = page_table_values[pbeg + off // page_size]
                        poff: T.let[T.int32] = off % page_size
                        for g in T.serial(group):
                            for l in T.vectorized(VL):
                                part[g, l] = T.float32(0)
                        if rotary_mode == 1:
                            for dd in T.serial(d):
                                K_loc[dd] = _rope(pages, k_rope_pos_offset[b] + row, d, rope_theta, rope_scale, (pno, 0, hk, poff, dd), dtype, rope_scaling).astype("float32")
                        else:
                            for dd in T.vectorized(d):
                                K_loc[dd] = pages[pno, 0, hk, poff, dd].astype("float32")
                        for vo in T.serial(n_vo):
                            for g in T.serial(group):
                                for l in T.vectorized(VL):
                                    part[g, l] = part[g, l] + Q_loc[g, vo * VL + l] * K_loc[vo * VL + l]
                        for g in T.serial(group):
                            S[g, j] = T.float32(0)
                            for l in T.serial(VL):
                                S[g, j] = S[g, j] + part[g, l]
                            S[g, j] = T.if_then_else(k0 + kb * KB + j < k1, S[g, j], T.float32(-5e4))
                    for g in T.serial(group):
                        st[g, 2] = st[g, 0]
                        for j in T.serial(KB):
                            st[g, 2] = T.max(st[g, 2], S[g, j])
                        for j in T.vectorized(KB):
                            S[g, j] = T.if_then_else(k0 + kb * KB + j < k1, exp2(S[g, j] - st[g, 2]), T.float32(0))
                        st[g, 1] = st[g, 1] * exp2(st[g, 0] - st[g, 2])
                        for dd in T.vectorized(d):
                            O_loc[g, dd] = O_loc[g, dd] * exp2(st[g, 0] - st[g, 2])
                        st[g, 0] = st[g, 2]
                        for j in T.serial(KB):
                            st[g, 1] = st[g, 1] + S[g, j]
                    for j in T.serial(KB):
                        row2: T.let[T.int32] = T.min(k0 + kb * KB + j, k1 - 1)
                        off2: T.let[T.int32] = _get_seq_offset(row2, b, length_info, sliding_window)
                        pno2: T.let[T.int32] = page_table_values[pbeg + off2 // page_size]
                        for g in T.serial(group):
                            for dd in T.vectorized(d):
                                O_loc[g, dd] = O_loc[g, dd] + S[g, j] * pages[pno2, 1, hk, off2 % page_size, dd].astype("float32")
                for g in T.serial(group):
                    for dd in T.vectorized(d):
                        O_part[b, hk * group + g, item % ns, dd] = O_loc[g, dd]
                    m_part[b, hk * group + g, item % ns] = st[g, 0]
                    l_part[b, hk * group + g, item % ns] = st[g, 1]
        for bh in T.parallel(B * h_q):
            with T.sblock("merge"):
                T.reads()
                T.writes()
                O_acc = T.sblock_alloc_buffer((d,), "float32")
                ml = T.sblock_alloc_buffer((3,), "float32")  # max, sum, scale
                b: T.let[T.int32] = bh // h_q
                h: T.let[T.int32] = bh % h_q
                ml[0] = T.float32(-5e4)
                for sp in T.serial(ns):
                    ml[0] = T.max(ml[0], m_part[b, h, sp])
                ml[1] = T.float32(0)
                for dd in T.vectorized(d):
                    O_acc[dd] = T.float32(0)
                for sp in T.serial(ns):
                    ml[2] = exp2(m_part[b, h, sp] - ml[0])
                    ml[1] = ml[1] + l_part[b, h, sp] * ml[2]
                    for dd in T.vectorized(d):
                        O_acc[dd] = O_acc[dd] + O_part[b, h, sp, dd] * ml[2]
                if ml[1] > T.float32(0):
                    for dd in T.vectorized(d):
                        output[b, h, dd] = (O_acc[dd] / ml[1]).astype(dtype)
                    lse[b, h] = ml[0] + T.log2(ml[1])
                else:
                    for dd in T.vectorized(d):
                        output[b, h, dd] = T.Cast(dtype, T.float32(0))
                    lse[b, h] = T.float32(-5e4)

    return batch_decode_paged_kv


# The KV cache registers its kernels under these names; by the time the schedule pass runs, the
# module's global vars carry the PrimFuncs' own symbols instead. Both are matched.
RAGGED_PREFILL = ("tir_attention_prefill_ragged_cpu", "batch_prefill_ragged_kv")
# The model applies RoPE before the cache (RopeMode.NORMAL), so the kernels' inline-RoPE branch
# (rotary_mode == 1) never runs here; it is built without rope scaling.
INLINE_ROPE_SCALING: dict = {}
PAGED_DECODE = ("tir_attention_decode_cpu", "batch_decode_paged_kv_cpu")
PAGED_DECODE_SLIDING = ("tir_attention_decode_cpu_sliding_window", "batch_decode_paged_kv_cpu_sliding_window")
PAGED_PREFILL = ("tir_attention_prefill_cpu", "batch_prefill_paged_kv_cpu")
PAGED_PREFILL_SLIDING = ("tir_attention_prefill_cpu_sliding_window", "batch_prefill_paged_kv_cpu_sliding_window")


def _layer_sliding_window_size() -> int:
    """The per-layer window TVM's sliding-window prefill kernel masks with: the cache's
    ``layer_sliding_window_size``, which ``model.py`` leaves at TVM's default."""
    import inspect

    from tvm.relax.frontend.nn.llm.kv_cache import TIRPagedKVCache

    return int(inspect.signature(TIRPagedKVCache.__init__).parameters["layer_sliding_window_size"].default)


def replacement(name: str, func):
    """The fast kernel standing in for the KV cache's PrimFunc ``name``, or None to keep it."""
    try:
        params = list(func.params)  # TVM 0.27: buffer params carry .shape / .dtype
        if name in RAGGED_PREFILL:
            qb, kb = params[0], params[2]
            h_q, d = int(qb.shape[1]), int(qb.shape[2])
            h_kv = int(kb.shape[1])
            if h_q % h_kv or int(params[3].shape[2]) != d:
                return None
            new = ragged_prefill_cpu(h_kv, h_q, d, qb.dtype, INLINE_ROPE_SCALING)
        elif name in PAGED_DECODE + PAGED_DECODE_SLIDING:
            qb, pb = params[0], params[1]
            h_q, d = int(qb.shape[1]), int(qb.shape[2])
            h_kv, page_size = int(pb.shape[2]), int(pb.shape[3])
            if d % VL or h_q % h_kv:
                return None
            new = paged_decode_cpu(h_kv, h_q, d, qb.dtype, name in PAGED_DECODE_SLIDING,
                                   INLINE_ROPE_SCALING, page_size)
        elif name in PAGED_PREFILL + PAGED_PREFILL_SLIDING:
            qb, pb = params[0], params[2]
            h_q, d = int(qb.shape[1]), int(qb.shape[2])
            h_kv, page_size = int(pb.shape[2]), int(pb.shape[3])
            if h_q % h_kv:
                return None
            new = paged_prefill_cpu(h_kv, h_q, d, qb.dtype, name in PAGED_PREFILL_SLIDING,
                                    INLINE_ROPE_SCALING, page_size, _layer_sliding_window_size())
        else:
            return None
    except Exception:  # noqa: BLE001 - unexpected shape: keep the stock kernel
        return None
    if func.attrs is not None and "global_symbol" in func.attrs:
        new = new.with_attr("global_symbol", func.attrs["global_symbol"])
    return new
