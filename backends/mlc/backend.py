"""MLC-LLM-style compiled backend: group-quantized Llama compiled with Apache TVM Relax.

The approach of MLC-LLM (quantize -> compile with TVM Relax -> run with a paged KV cache) built
from the ``apache-tvm`` PyPI wheel, since MLC-LLM itself is not on PyPI. Variants are MLC-LLM's
quantization mode names (``quant.py``); ``engine`` runs a prebuilt MLC model through
``mlc_llm.MLCEngine`` when that package is importable (experimental, see docs/backends/mlc.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from backends.base import (Availability, Backend, BackendError, GenerationOutput, GenerationRequest, LoadedModel,
                           Preparation, ScoringWindow, largest_peak)
from backends.device import cpu_flags
from backends.kv import kv_bytes_per_token
from backends.models import ModelSpec
from backends.mlc.quant import CPU_COLUMN_TILE, MODES
from backends.options import BackendOptions, check_sink_window
from backends.tokens import stop_token_set


def tvm_default_device() -> str:
    """``"cuda"`` when TVM's own runtime sees a CUDA device (independent of whether torch is a CPU
    build), else ``"cpu"``; ``"cpu"`` too when TVM is not installed."""
    if importlib.util.find_spec("tvm") is None:
        return "cpu"
    import tvm

    return "cuda" if tvm.cuda(0).exist else "cpu"


class MLCOptions(BackendOptions):
    """``mlc`` options; ``threads`` is TVM's thread pool (``TVM_NUM_THREADS``), fixed for the
    worker process at its first load. The KV-cache fields are ``runtime.KVOptions``."""

    context_window: int = Field(2048, ge=0, description="most tokens one sequence may hold (0 = model max)")
    prefill_chunk: int = Field(1024, ge=1, description="most tokens one prefill call processes")
    sliding_window: int = Field(0, ge=0, description="keep only the last N tokens' KV per sequence (0 = off)")
    attention_sink: int = Field(0, ge=0, description="with a sliding window, also keep the first N tokens")
    max_batch: int = Field(8, ge=1, description="most sequences the paged KV cache is created for")
    quantize_embedding: bool = Field(True, description="quantize embedding / lm_head as MLC-LLM does "
                                     "(false: unquantized in the scale dtype)")
    attention: Literal["fast", "stock"] = Field(
        "fast", description="CPU attention kernels: fast = this project's, stock = TVM's own (A/B)")
    cache_dir: str | None = Field(None, description="compiled-artifact cache (default cache_root()/mlc)")

    @model_validator(mode="after")
    def _sink_within_window(self):
        check_sink_window(self.sliding_window, self.attention_sink)
        return self


class MLCBackend(Backend):
    """TVM-compiled Llama with MLC-LLM group quantization and TVM's paged KV cache.

    Options: ``MLCOptions`` (``python -m harness list --options mlc``); ``device`` auto = CUDA when
    TVM sees one.
    """

    name = "mlc"
    variants = {
        "q0f32": "TVM-compiled, fp32 weights (no quantization)",
        "q0f16": "TVM-compiled, fp16 weights (fp32 compute on CPU)",
        "q4f32_1": "TVM-compiled, 4-bit weights, group 32, fp32 scales",
        "q4f16_1": "TVM-compiled, 4-bit weights, group 32, fp16 scales",
        "q4f16_0": "TVM-compiled, 4-bit weights, group 128, fp16 scales",
        "q3f16_1": "TVM-compiled, 3-bit weights (10 per uint32), group 40, fp16 scales",
        "q8f16_1": "TVM-compiled, 8-bit weights, group 32, fp16 scales",
        "engine": "EXPERIMENTAL: a prebuilt MLC-LLM model directory through mlc_llm.MLCEngine",
    }
    default_variants = ("q0f32", "q4f32_1", "q4f16_1", "q3f16_1", "q8f16_1")
    Options = MLCOptions
    runtime_modules = ("tvm",)

    def __init__(self, variant: str, options=None):
        super().__init__(variant, options)
        self.device = tvm_default_device() if self.options.device == "auto" else self.options.device
        self.mode = MODES.get(variant)
        self.session = None
        self._info: dict[str, Any] = {}
        self._entry: Path | None = None
        from backends.mlc.runtime import KVOptions

        o = self.options
        self.kv_options = KVOptions(context_window=o.context_window, prefill_chunk=o.prefill_chunk,
                                    sliding_window=o.sliding_window, attention_sink=o.attention_sink,
                                    max_batch=o.max_batch)

    @classmethod
    def availability(cls, variant: str) -> Availability:
        if variant == "engine":
            if importlib.util.find_spec("mlc_llm") is None:
                return Availability.no("the mlc_llm package is not importable: install MLC-LLM's own "
                                       "wheels (https://llm.mlc.ai/docs/install/mlc_llm) and pass a "
                                       "prebuilt model directory")
            return Availability.no("mlc:engine is experimental and untested here: not enabled")
        if importlib.util.find_spec("tvm") is None:
            return Availability.no("missing package apache-tvm: pip install quantarena[mlc]")
        return Availability.yes()

    @property
    def embed_mode(self):
        """The embedding / lm_head format: the variant's own (MLC-LLM's choice), or unquantized in
        the scale dtype with option ``quantize_embedding=0``."""
        if self.options.quantize_embedding or not self.mode.quantized:
            return self.mode
        return MODES["q0f16" if self.mode.scale_dtype == "float16" else "q0f32"]

    @property
    def compute_dtype(self) -> str:
        """Activations and KV cache dtype: fp16 for f16 modes on CUDA; fp32 on CPU (no fast fp16
        here unless the CPU has AVX512-FP16, which TVM's LLVM path is not tuned for either)."""
        if self.device == "cuda" and self.mode.scale_dtype == "float16":
            return "float16"
        return "float32"

    # --- the pre-flight estimate (backends.footprint) ------------------------------------------
    def weight_bytes_estimate(self, shape) -> int:
        """Each matrix (embedding included, in ``embed_mode``) at the mode's bits plus one scale
        per group; norms in the compute dtype."""

        def per_param(mode) -> float:
            if not mode.quantized:
                return np.dtype(mode.scale_dtype).itemsize
            return 4 / mode.per_word + np.dtype(mode.scale_dtype).itemsize / mode.group_size

        return shape.weight_bytes(linear=per_param(self.mode), embed=per_param(self.embed_mode),
                                  norm=np.dtype(self.compute_dtype).itemsize)

    def kv_element_bytes(self) -> float:
        return float(np.dtype(self.compute_dtype).itemsize)

    # --- preparation and load ---------------------------------------------------------------
    def _config(self, directory: Path):
        from backends.mlc.model import LlamaConfig, UnsupportedModel

        try:
            return LlamaConfig.from_hf(json.loads((directory / "config.json").read_text()))
        except UnsupportedModel as exc:
            raise BackendError(f"{self.label}: {exc}") from None

    def prepare(self, model: ModelSpec, directory: Path) -> Preparation:
        """Convert + quantize the weights and compile the model once (cached per target)."""
        if self.device == "cuda":
            import tvm

            if not tvm.cuda(0).exist:
                raise BackendError(f"{self.label}: device=cuda but TVM sees no CUDA device")
            # TVM 0.27 compiles the CUDA kernels when the library loads, with NVRTC unless told
            # otherwise; on an H100, NVRTC segfaulted on these kernels and nvcc built them
            # (docs/backends/mlc.md, CUDA)
            if shutil.which("nvcc"):
                os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
        # TVM sizes its thread pool once per process, at its first parallel call
        os.environ["TVM_NUM_THREADS"] = str(self.threads)
        from backends.memory import StepPeak
        from backends.mlc import artifacts
        from backends.mlc.compile import compile_module, make_target, target_key
        from backends.mlc.convert import iter_params
        from backends.mlc.model import build_model, export_spec

        self.cfg = cfg = self._config(directory)
        dtype = self.compute_dtype
        embed_mode = self.embed_mode
        target = make_target(self.device, self.threads)
        fast_attention = self.device == "cpu" and self.options.attention == "fast"
        suffix = ("" if embed_mode is self.mode else "-embf") + ("" if self.options.attention == "fast" else "-stockattn")
        entry = artifacts.artifact_dir(directory, self.variant + suffix, dtype, target_key(target),
                                       self.options.cache_dir)
        cached = artifacts.usable(entry)  # a corrupt entry is discarded here, and built below
        self.cached_entry = artifacts.cache_entry(entry) if cached else None
        # CPU kernels read weights in column tiles; dlight's CUDA rules expect plain KN
        tile_width = CPU_COLUMN_TILE if self.device == "cpu" else 0
        if not cached:
            import tvm

            with target:
                module = build_model(cfg, self.mode, dtype, embed_mode, tile_width)
                mod, named = module.export_tvm(export_spec(dtype))
            with artifacts.Staging(entry) as build:
                t0 = time.perf_counter()
                with StepPeak() as compile_peak:
                    executable = compile_module(mod, target, fast_attention)
                    executable.export_library(str(build.path / "lib.so"))
                    del executable
                compile_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                with StepPeak() as convert_peak:  # streamed: one tensor at a time (convert.py)
                    names = artifacts.write_params(build.path / "params.npz", iter_params(
                        directory, cfg, self.mode, dtype, [n for n, _ in named], embed_mode, tile_width))
                build.meta = {"convert_s": time.perf_counter() - t0, "compile_s": compile_s,
                              "convert_peak_bytes": convert_peak.growth_bytes,
                              "compile_peak_bytes": compile_peak.growth_bytes, "names": names,
                              "tvm": tvm.__version__, "target": str(target), "mode": self.variant, "dtype": dtype}
        meta = json.loads((entry / "meta.json").read_text())
        sizes = artifacts.sizes(entry)
        self._entry = entry
        self._info = {"target": str(target), "target_key": target_key(target), "artifact_dir": str(entry)}
        return Preparation(convert_s=meta["convert_s"], compile_s=meta["compile_s"],
                           artifact_bytes=sum(sizes.values()),
                           peak_rss_bytes=largest_peak(meta.get("convert_peak_bytes"), meta.get("compile_peak_bytes")),
                           artifact_dir=str(entry), cache_hit=cached)

    def _load(self, model: ModelSpec, directory: Path) -> LoadedModel:
        from backends.mlc import artifacts
        from backends.mlc.runtime import Session

        cfg = self.cfg  # parsed by prepare()
        library, params, _ = artifacts.load(self._entry)
        itemsize = np.dtype(self.compute_dtype).itemsize
        kv_per_token = kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, itemsize)
        self.session = Session(library, params, self.device, self.kv_options, kv_per_token)
        return LoadedModel(self.session.param_bytes, artifacts.sizes(self._entry))

    # --- contract ---------------------------------------------------------------------------
    def _generate(self, request: GenerationRequest) -> GenerationOutput:
        if request.batch > self.kv_options.max_batch:
            raise BackendError(f"{self.label}: batch {request.batch} exceeds max_batch {self.kv_options.max_batch}")
        try:
            out = self.session.generate(request, stop_token_set(self.special.eos_ids, request.stop_token_ids))
        except ValueError as exc:
            raise BackendError(f"{self.label}: {exc}") from None
        cfg = self.cfg
        out.extra["kv_cache_bytes_fp16_analytic"] = kv_bytes_per_token(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 2) * out.extra["kv_cache_tokens"]
        return out

    def _score_logits(self, window: ScoringWindow) -> np.ndarray:
        """float32 ``[n_scored, vocab]``, computed chunk by chunk through the paged KV cache."""
        return self.session.score_logits(list(window.token_ids), window.first_scored)

    def info(self) -> dict[str, Any]:
        import tvm

        mode = self.mode
        o = self.kv_options
        fp16_note = None
        if mode.scale_dtype == "float16" and self.compute_dtype == "float32":
            fp16_note = ("f16 mode on CPU: weights/scales stored fp16, compute and KV cache fp32 "
                         f"(CPU fp16 flags: {sorted(cpu_flags() & {'f16c', 'avx512_fp16'}) or 'none'})")
        return {
            "backend": self.label,
            "library": {"tvm": tvm.__version__},
            "device": self.device,
            "threads": self.threads,
            "compute_dtype": self.compute_dtype,
            "compute_note": fp16_note,
            **self._info,
            "attn_implementation": "TVM TIRPagedKVCache (fused-QKV, RoPE in cache); " + (
                "CPU kernels: quantarena's tiled, parallel, vectorised attention (backends/mlc/attention.py)"
                if self.device == "cpu" and self.options.attention == "fast" else
                "TVM's own attention kernels (dlight on CUDA; scalar, single-threaded on CPU)"),
            "kv_cache": {
                "type": "paged (tvm.relax.frontend.nn.llm.kv_cache.TIRPagedKVCache)",
                "dtype": self.compute_dtype, "page_size": o.page_size,
                "context_window": o.context_window, "prefill_chunk": o.prefill_chunk,
                "sliding_window": o.sliding_window, "attention_sink": o.attention_sink,
                "max_batch": o.max_batch,
                # scoring (perplexity) calls: see runtime.Session.score_plan and docs/backends/mlc.md
                "score_chunk": 1 if o.sliding_window else o.prefill_chunk,
                "score_prefix": (o.sliding_window + o.attention_sink) or None,
                "score_attention": (
                    f"with the sliding window: positions < {o.sliding_window + o.attention_sink} in prefill "
                    f"calls of {o.prefill_chunk} (nothing evicted yet), then one token per decode call; a "
                    f"scored token at position t attends to positions [0, {o.attention_sink}), "
                    f"[t - {o.sliding_window}, t - 1] and itself, as in generation"
                    if o.sliding_window else "full causal attention"),
                "honoured": ["context_window", "prefill_chunk", "sliding_window",
                             "attention_sink", "max_batch"],
                "not_honoured": {"page_size": "fixed at 16 tokens: other sizes fail TVM 0.27's "
                                              "compact-layout check in the KV append kernel"},
            },
            "quantization": {
                "format": f"mlc-{mode.name}", "bits": mode.bits, "group_size": mode.group_size,
                "scale_dtype": mode.scale_dtype, "storage": "uint32" if mode.quantized else mode.scale_dtype,
                "layout": ("KN (input-major), column tiles of 32" if self.device == "cpu"
                           else "KN (input-major)"),
                "embedding_and_lm_head": self.embed_mode.name,
                "fused_dequantize_matmul": True,
                **self.weight_groups(),
            },
        }

    def weight_groups(self) -> dict[str, list[str]]:
        """Which weight matrices this variant quantizes (``backends.hf.backend.weight_groups``'s
        shape): the decoder's linear layers follow the variant's mode, the embedding and lm_head
        ``embed_mode`` (MLC-LLM quantizes them too unless ``quantize_embedding=0``); norm vectors
        stay in the scale dtype."""
        linear = "linear layers (qkv_proj, o_proj, gate_up_proj, down_proj)"
        tied = getattr(getattr(self, "cfg", None), "tie_word_embeddings", False)
        embed = "embed_tokens (= lm_head, tied)" if tied else "embed_tokens, lm_head"
        quantized, kept = [], []
        for group, mode in ((linear, self.mode), (embed, self.embed_mode)):
            (quantized if mode.quantized else kept).append(
                group if mode.quantized else f"{group} ({mode.scale_dtype})")
        return {"quantized": quantized, "kept": kept}

    def close(self) -> None:
        super().close()
        self.session = None
