"""Parallel, vectorised CPU attention kernels for TVM's paged KV cache.

``TIRPagedKVCache`` builds its llvm attention kernels as scalar, single-threaded TIR (one serial
loop nest per batch, every head and query row inside it). ``schedules.cpu_schedule_pass`` swaps
these PrimFuncs (found by their global names in the IRModule) for the kernels below, which keep
the exact signatures and semantics (causal mask, GQA, sliding window + attention sink through the
same length-info helpers, inline RoPE when ``rotary_mode == 1``, the log2-sum-exp ``lse`` output
the cache merges states with):

* parallel over query heads (ragged prefill) / over (sequence, head) pairs (decode);
* online softmax over blocks of ``KB`` keys (one rescale of the accumulator per block);
* q.k dot products as ``VL``-lane vector FMAs over ``head_dim`` and one horizontal sum;
  p.V accumulation vectorised over ``head_dim``;
* causal rows stop at their last visible key (the stock kernel walks the masked keys too).

Left stock (scalar): the paged prefill kernel (history of a chunked prefill / sliding window
prefill), tree attention, and the merge/copy kernels.
"""

from __future__ import annotations

import math

KB = 16  # keys per online-softmax block
VL = 16  # vector lanes of the q.k partial sums
LOG2E = math.log2(math.exp(1))


def ragged_prefill_cpu(h_kv: int, h_q: int, d: int, dtype: str, rope_scaling: dict):
    from tvm.relax.frontend.nn.llm._kernel_common import _rope
    from tvm.script import tirx as T

    group_size = h_q // h_kv
    n_vo = d // VL

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

        for h in T.parallel(h_q):
            for b in T.serial(batch_size):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    Q_loc = T.sblock_alloc_buffer((d,), "float32")
                    K_loc = T.sblock_alloc_buffer((d,), "float32")
                    O_loc = T.sblock_alloc_buffer((d,), "float32")
                    part = T.sblock_alloc_buffer((VL,), "float32")
                    S = T.sblock_alloc_buffer((KB,), "float32")
                    st = T.sblock_alloc_buffer((4,), "float32")  # m, dsum, block max, alpha
                    hk: T.let[T.int32] = h // group_size
                    q0: T.let[T.int32] = q_indptr[b]
                    qlen: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    k0: T.let[T.int32] = kv_indptr[b]
                    klen: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                    for qi in T.serial(qlen):
                        for dd in T.serial(d):
                            Q_loc[dd] = T.if_then_else(
                                rotary_mode == 1,
                                _rope(q, q_rope_position[q0 + qi], d, rope_theta, rope_scale, (q0 + qi, h, dd), dtype, rope_scaling),
                                q[q0 + qi, h, dd],
                            ).astype("float32") * (sm_scale * LOG2E)
                        for dd in T.vectorized(d):
                            O_loc[dd] = T.float32(0)
                        st[0] = T.float32(-5e4)
                        st[1] = T.float32(0)
                        kend: T.let[T.int32] = T.if_then_else(
                            causal > 0, T.max(T.min(klen - qlen + qi + 1, klen), 0), klen)
                        for kb in T.serial((kend + KB - 1) // KB):
                            for j in T.serial(KB):
                                kk: T.let[T.int32] = T.min(kb * KB + j, kend - 1)
                                for l in T.vectorized(VL):
                                    part[l] = T.float32(0)
                                if rotary_mode == 1:
                                    for dd in T.serial(d):
                                        K_loc[dd] = _rope(k, k_rope_pos_offset[b] + kk, d, rope_theta, rope_scale, (k0 + kk, hk, dd), dtype, rope_scaling).astype("float32")
                                    for vo in T.serial(n_vo):
                                        for l in T.vectorized(VL):
                                            part[l] = part[l] + Q_loc[vo * VL + l] * K_loc[vo * VL + l]
                                else:
                                    for vo in T.serial(n_vo):
                                        for l in T.vectorized(VL):
                                            part[l] = part[l] + Q_loc[vo * VL + l] * k[k0 + kk, hk, vo * VL + l].astype("float32")
                                S[j] = T.float32(0)
                                for l in T.serial(VL):
                                    S[j] = S[j] + part[l]
                                S[j] = T.if_then_else(kb * KB + j < kend, S[j], T.float32(-5e4))
                            st[2] = st[0]
                            for j in T.serial(KB):
                                st[2] = T.max(st[2], S[j])
                            st[3] = T.exp2(st[0] - st[2])
                            st[1] = st[1] * st[3]
                            for dd in T.vectorized(d):
                                O_loc[dd] = O_loc[dd] * st[3]
                            st[0] = st[2]
                            for j in T.serial(KB):
                                S[j] = T.if_then_else(kb * KB + j < kend, T.exp2(S[j] - st[0]), T.float32(0))
                                st[1] = st[1] + S[j]
                                for dd in T.vectorized(d):
                                    O_loc[dd] = O_loc[dd] + S[j] * v[k0 + T.min(kb * KB + j, kend - 1), hk, dd].astype("float32")
                        if st[1] > T.float32(0):
                            for dd in T.vectorized(d):
                                output[q0 + qi, h, dd] = (O_loc[dd] / st[1]).astype(dtype)
                            lse[q0 + qi, h] = st[0] + T.log2(st[1])
                        else:
                            for dd in T.vectorized(d):
                                output[q0 + qi, h, dd] = T.Cast(dtype, T.float32(0))
                            lse[q0 + qi, h] = T.float32(-5e4)

    return batch_prefill_ragged_kv


def paged_decode_cpu(h_kv: int, h_q: int, d: int, dtype: str, sliding_window: bool,
                     rope_scaling: dict, page_size: int):
    from tvm.relax.frontend.nn.llm._kernel_common import (
        _declare_length_info, _get_kv_chunk_len, _get_seq_offset, _rope)
    from tvm.script import tirx as T

    group_size = h_q // h_kv
    n_vo = d // VL

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

        for bh in T.parallel(B * h_q):
            with T.sblock("attn"):
                T.reads()
                T.writes()
                Q_loc = T.sblock_alloc_buffer((d,), "float32")
                K_loc = T.sblock_alloc_buffer((d,), "float32")
                O_loc = T.sblock_alloc_buffer((d,), "float32")
                part = T.sblock_alloc_buffer((VL,), "float32")
                S = T.sblock_alloc_buffer((KB,), "float32")
                st = T.sblock_alloc_buffer((4,), "float32")
                b: T.let[T.int32] = bh // h_q
                h: T.let[T.int32] = bh % h_q
                hk: T.let[T.int32] = h // group_size
                pbeg: T.let[T.int32] = page_table_indptr[b]
                pend: T.let[T.int32] = page_table_indptr[b + 1]
                kend: T.let[T.int32] = T.if_then_else(
                    pbeg != pend, _get_kv_chunk_len(pend - pbeg, page_size, b, length_info, sliding_window), 0)
                for dd in T.serial(d):
                    Q_loc[dd] = T.if_then_else(
                        rotary_mode == 1,
                        _rope(Q, q_rope_position[b], d, rope_theta, rope_scale, (b, h, dd), dtype, rope_scaling),
                        Q[b, h, dd],
                    ).astype("float32") * (sm_scale * LOG2E)
                for dd in T.vectorized(d):
                    O_loc[dd] = T.float32(0)
                st[0] = T.float32(-5e4)
                st[1] = T.float32(0)
                for kb in T.serial((kend + KB - 1) // KB):
                    for j in T.serial(KB):
                        row: T.let[T.int32] = T.min(kb * KB + j, kend - 1)
                        off: T.let[T.int32] = _get_seq_offset(row, b, length_info, sliding_window)
                        pno: T.let[T.int32] = page_table_values[pbeg + off // page_size]
                        poff: T.let[T.int32] = off % page_size
                        for l in T.vectorized(VL):
                            part[l] = T.float32(0)
                        if rotary_mode == 1:
                            for dd in T.serial(d):
                                K_loc[dd] = _rope(pages, k_rope_pos_offset[b] + row, d, rope_theta, rope_scale, (pno, 0, hk, poff, dd), dtype, rope_scaling).astype("float32")
                            for vo in T.serial(n_vo):
                                for l in T.vectorized(VL):
                                    part[l] = part[l] + Q_loc[vo * VL + l] * K_loc[vo * VL + l]
                        else:
                            for vo in T.serial(n_vo):
                                for l in T.vectorized(VL):
                                    part[l] = part[l] + Q_loc[vo * VL + l] * pages[pno, 0, hk, poff, vo * VL + l].astype("float32")
                        S[j] = T.float32(0)
                        for l in T.serial(VL):
                            S[j] = S[j] + part[l]
                        S[j] = T.if_then_else(kb * KB + j < kend, S[j], T.float32(-5e4))
                    st[2] = st[0]
                    for j in T.serial(KB):
                        st[2] = T.max(st[2], S[j])
                    st[3] = T.exp2(st[0] - st[2])
                    st[1] = st[1] * st[3]
                    for dd in T.vectorized(d):
                        O_loc[dd] = O_loc[dd] * st[3]
                    st[0] = st[2]
                    for j in T.serial(KB):
                        row2: T.let[T.int32] = T.min(kb * KB + j, kend - 1)
                        off2: T.let[T.int32] = _get_seq_offset(row2, b, length_info, sliding_window)
                        pno2: T.let[T.int32] = page_table_values[pbeg + off2 // page_size]
                        S[j] = T.if_then_else(kb * KB + j < kend, T.exp2(S[j] - st[0]), T.float32(0))
                        st[1] = st[1] + S[j]
                        for dd in T.vectorized(d):
                            O_loc[dd] = O_loc[dd] + S[j] * pages[pno2, 1, hk, off2 % page_size, dd].astype("float32")
                if st[1] > T.float32(0):
                    for dd in T.vectorized(d):
                        output[b, h, dd] = (O_loc[dd] / st[1]).astype(dtype)
                    lse[b, h] = st[0] + T.log2(st[1])
                else:
                    for dd in T.vectorized(d):
                        output[b, h, dd] = T.Cast(dtype, T.float32(0))
                    lse[b, h] = T.float32(-5e4)

    return batch_decode_paged_kv


# The KV cache registers its kernels under these names; by the time the schedule pass runs, the
# module's global vars carry the PrimFuncs' own symbols instead. Both are matched.
RAGGED_PREFILL = ("tir_attention_prefill_ragged_cpu", "batch_prefill_ragged_kv")
PAGED_DECODE = ("tir_attention_decode_cpu", "batch_decode_paged_kv_cpu")
PAGED_DECODE_SLIDING = ("tir_attention_decode_cpu_sliding_window", "batch_decode_paged_kv_cpu_sliding_window")


def replacement(name: str, func):
    """The fast kernel standing in for the KV cache's PrimFunc ``name``, or None to keep it."""
    try:
        params = list(func.params)  # TVM 0.27: buffer params carry .shape / .dtype
        if name in RAGGED_PREFILL:
            qb, kb = params[0], params[2]
            h_q, d = int(qb.shape[1]), int(qb.shape[2])
            h_kv = int(kb.shape[1])
            if d % VL or h_q % h_kv or int(params[3].shape[2]) != d:
                return None
            new = ragged_prefill_cpu(h_kv, h_q, d, qb.dtype, _ROPE_SCALING.get("value", {}))
        elif name in PAGED_DECODE + PAGED_DECODE_SLIDING:
            qb, pb = params[0], params[1]
            h_q, d = int(qb.shape[1]), int(qb.shape[2])
            h_kv, page_size = int(pb.shape[2]), int(pb.shape[3])
            if d % VL or h_q % h_kv:
                return None
            new = paged_decode_cpu(h_kv, h_q, d, qb.dtype, name in PAGED_DECODE_SLIDING,
                                   _ROPE_SCALING.get("value", {}), page_size)
        else:
            return None
    except Exception:  # noqa: BLE001 - unexpected shape: keep the stock kernel
        return None
    if func.attrs is not None and "global_symbol" in func.attrs:
        new = new.with_attr("global_symbol", func.attrs["global_symbol"])
    return new


# rope_scaling of the model being compiled (only used when the cache applies RoPE inline,
# rotary_mode == 1; the model's cache uses RopeMode.NORMAL, where RoPE is applied before).
_ROPE_SCALING: dict = {}
