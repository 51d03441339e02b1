"""Compilation: target detection, the Relax pipeline with this backend's schedules, export.

The pipeline is TVM's per-target default (``relax.backend.{cpu_generic,cuda}``: legalize, fuse,
lower, plan memory) with one scheduling step after ``FuseTIR``: on CUDA the stock dlight GPU rules
(as MLC-LLM does); on CPU ``schedules.cpu_schedule_pass`` (vectorised, parallel kernels; TVM's
stock CPU pipeline schedules nothing and runs every kernel as a serial scalar loop).
"""

from __future__ import annotations

import os


def make_target(device: str, threads: int | None = None):
    """A ``tvm.target.Target`` for ``"cpu"`` (LLVM, host CPU features) or ``"cuda"`` (this GPU's arch).

    String targets with ``-mcpu`` are rejected by TVM 0.27, so the target is built from a dict.
    """
    import tvm
    from tvm.target import Target

    host = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "num-cores": int(threads or os.cpu_count() or 1)}
    if device == "cuda":
        # QUANTARENA_CUDA_ARCH (e.g. sm_90) cross-compiles on a machine without the GPU
        arch = os.environ.get("QUANTARENA_CUDA_ARCH") or "sm_" + tvm.cuda(0).compute_version.replace(".", "")
        return Target({"kind": "cuda", "arch": arch}, host=host)
    return Target(host)


def target_key(target) -> str:
    """A short stable description of a target for cache keys and ``info()``."""
    kind = target.kind.name
    if kind == "cuda":
        return f"cuda-{target.attrs.get('arch', '')}"
    return f"llvm-{target.attrs.get('mcpu', '')}"


def relax_pipeline(target, fast_attention: bool = True):
    """TVM's default Relax pipeline for ``target`` with this backend's scheduling after FuseTIR.

    ``fast_attention=False`` keeps the KV cache's own CPU attention kernels (A/B comparisons).
    On CUDA: dlight's GPU rules, as MLC-LLM; the linear layers carry ``dlight.do_not_tensorize``
    (``model.py``).
    """
    import tvm

    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as base
        from tvm.s_tir import dlight as dl

        schedule = [dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
        finalize = base.finalize_passes(target)
    else:
        from tvm.relax.backend.cpu_generic import pipeline as base

        from backends.mlc.schedules import cpu_schedule_pass

        schedule = [cpu_schedule_pass(fast_attention)]
        finalize = cpu_finalize_passes(base, target)

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                base.library_dispatch_passes(target) + fusion_passes() + schedule
                + base.dataflow_lower_passes(target) + finalize
            )
            return seq(mod)

    return _pipeline


def fusion_passes() -> list:
    """Legalize the Relax ops to TIR and fuse them (TVM's default order): what the schedules see."""
    from tvm import relax

    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def cpu_finalize_passes(base, target) -> list:
    """``base``'s finalization passes (``relax.backend.cpu_generic.pipeline``) without
    ``KillAfterLastUse`` (on CPU; CUDA keeps TVM's passes: nothing was measured there).

    That pass ends every intermediate's life with a ``vm.builtin.null_value`` call, 977 of them
    per SmolLM2 decode step. Storage is planned statically (``StaticPlanBlockMemory``) and
    returned to the pool when the function returns, so the early kills did not lower peak memory
    (prefill and scoring peaks measured within 3%), while they cost 0.65 ms of the 1.77 ms a
    decode step of the shrunk twin takes (``scripts/profile_mlc_decode.py --host-overhead``) and
    ~5% of the real step.
    """
    return [p for p in base.finalize_passes(target) if p.info.name != "KillAfterLastUse"]


def compile_module(mod, target, fast_attention: bool = True):
    """``tvm.compile`` the exported IRModule for ``target``; returns the VM executable."""
    import tvm

    return tvm.compile(mod, target, relax_pipeline=relax_pipeline(target, fast_attention))
