"""CPU schedules for the compiled Llama: vectorised, multi-threaded kernels.

TVM's stock CPU Relax pipeline schedules no TIR (every kernel is a serial scalar loop nest, about
1 token/s on SmolLM2) and dlight's CPU rules have no matmul rule. This pass schedules each PrimFunc
after ``FuseTIR``:

* ``qmm`` blocks (every linear layer, dequantization fused in; ``model.QuantLinear``), loops
  ``(i rows, j output columns, k reduction)`` over a column-tiled weight (``quant.py``):
  ``j`` split into vector tiles as wide as the weight's column tiles (parallel over tiles),
  ``i`` into ``row_tile()`` rows (``model.py`` pads the rows to a multiple), the
  ``rows x tile`` accumulator held in registers (``cache_write`` to ``local``), ``k`` innermost
  but one, so each weight vector is loaded/unpacked once and FMA'd into every row of the tile
  (a register-blocked GEMM).
* ``qmv`` blocks (the same layers traced for ``decode``): the GEMV form of the above, one row
  at a time with a ``1 x tile`` register accumulator.
* every other non-scheduled block (norms, elementwise, embedding gather): its outermost spatial
  loop parallelised.
* the paged KV cache's prefill (ragged and paged) and decode attention kernels (TVM ships them
  scalar and single-threaded) are replaced by the parallel, vectorised ones in ``attention.py``.
It also sets ``tirx.noalias`` on every PrimFunc: one function without it made LLVM codegen of the
whole module slower (notes/tvm-0.27.md).
"""

from __future__ import annotations

from backends.mlc.quant import CPU_COLUMN_TILE, column_tile



def row_tile() -> int:
    """Rows per GEMM register tile: 8 with AVX-512 (8 x 32 floats = 16 of its 32 vector
    registers), else 4 (AVX2 has 16). Divides ``model.ROW_PAD``."""
    from backends.device import cpu_flags

    return 8 if "avx512f" in cpu_flags() else 4


def _column_split(sch, j):
    """Split the output-column loop at the weight's storage tile (``quant.column_tile``), so each
    vector tile reads one contiguous block of the column-tiled weight."""
    return sch.split(j, [None, column_tile(int(sch.get(j).extent), CPU_COLUMN_TILE)])


def _schedule_qmm(sch, block) -> None:
    i, j, k = sch.get_loops(block)
    jo, ji = _column_split(sch, j)
    io, ii = sch.split(i, [None, row_tile()])
    sch.reorder(jo, io, k, ii, ji)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, io)
    sch.parallel(jo)
    sch.vectorize(ji)
    sch.unroll(ii)
    init = sch.decompose_reduction(block, k)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])


def _schedule_qmv(sch, block) -> None:
    """Decode GEMV: one row at a time, one column tile accumulated in registers."""
    i, j, k = sch.get_loops(block)
    jo, ji = _column_split(sch, j)
    sch.reorder(jo, i, k, ji)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, i)
    sch.parallel(jo)
    sch.vectorize(ji)
    init = sch.decompose_reduction(block, k)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])


def _schedule_generic(sch, block) -> None:
    """Parallelise the outermost loop where it is a spatial (data-parallel) loop.

    Inner loops are left to LLVM's own vectoriser: forcing ``vectorize`` on the legalized
    elementwise/norm blocks crashed LLVM in TVM 0.27 ("Cannot implicitly convert a scalable
    size"). These blocks are O(rows x hidden), a small share of the time next to the matmuls.
    """
    loops = sch.get_loops(block)
    if loops:
        try:
            sch.parallel(loops[0])
        except Exception:  # noqa: BLE001 - a reduction or dependent outer loop stays serial
            pass


def _fuse_elementwise(sch, names: list[str]) -> list[str]:
    """Inline the elementwise blocks of a fused function into their consumers and move the
    remaining producers (e.g. a norm's row reduction) under the last block's outer loop.

    ``FuseTIR`` only concatenates the legalized ops: an RMSNorm or SwiGLU arrives as 5-6 blocks,
    each a parallel region of its own, and in decode (one row) the thread-pool launches cost more
    than the work (2.7 ms per token for the 61 RMSNorms of SmolLM2). Returns the blocks left."""
    left = []
    for name in names:
        block = sch.get_sblock(name)
        try:
            sch.compute_inline(block)
            continue
        except Exception:  # noqa: BLE001 - a reduction, or an output block: keep it
            pass
        left.append(name)
    if len(left) > 1:
        outer = sch.get_loops(sch.get_sblock(left[-1]))
        for name in reversed(left[:-1]):
            try:
                sch.compute_at(sch.get_sblock(name), outer[0])
            except Exception:  # noqa: BLE001 - not a per-row producer: stays a region of its own
                pass
    return left


def schedule_primfunc(func):
    """Scheduled copy of one PrimFunc (unchanged when already scheduled)."""
    import re

    from tvm.s_tir import Schedule

    func = func.with_attr("tirx.noalias", True)
    if func.attrs is not None and func.attrs.get("tirx.is_scheduled"):
        return func
    names = [n for n in re.findall(r'T\.sblock\("([^"]+)"', func.script()) if n != "root"]
    if not names:
        return func
    sch = Schedule(func)
    if not any(n in ("qmm", "qmv", "attn") for n in names):
        names = _fuse_elementwise(sch, names)
    for name in names:
        try:
            block = sch.get_sblock(name)
        except Exception:
            continue
        if name == "qmm":
            _schedule_qmm(sch, block)
        elif name == "qmv":
            _schedule_qmv(sch, block)
        elif len(sch.get_loops(block)) > 0 and name not in ("attn",):
            _schedule_generic(sch, block)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def cpu_schedule_pass(fast_attention: bool = True):
    """A module pass applying ``schedule_primfunc`` to every PrimFunc, after swapping the KV
    cache's attention kernels for ``attention.py``'s (unless ``fast_attention`` is False)."""
    import tvm
    from tvm import tirx

    from . import attention

    @tvm.transform.module_pass(opt_level=0, name="QuantArenaCPUSchedule")
    def _pass(mod, _ctx):
        out = tvm.IRModule({}, attrs=mod.attrs)
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc):
                fast = attention.replacement(gv.name_hint, func) if fast_attention else None
                out[gv] = fast if fast is not None else schedule_primfunc(func)
            else:
                out[gv] = func
        return out

    return _pass
