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
import time
from typing import Any, Sequence

import numpy as np

from backends.base import (Availability, Backend, BackendError, GenerationOutput, LoadReport, ScoringWindow,
                           check_prompts, check_token_ids, stop_token_set)
from backends.hf.backend import cpu_flags
from backends.models import ModelError, ModelSpec, checkpoint_dir, prepare_seconds
from backends.mlc.quant import CPU_COLUMN_TILE, MODES


def tvm_default_device() -> str:
    """``"cuda"`` when TVM's own runtime sees a CUDA device (independent of whether torch is a CPU
    build), else ``"cpu"``; ``"cpu"`` too when TVM is not installed."""
    if importlib.util.find_spec("tvm") is None:
        return "cpu"
    import tvm

    return "cuda" if tvm.cuda(0).exist else "cpu"


_INT_OPTIONS = ("context_window", "prefill_chunk", "sliding_window", "attention_sink", "max_batch")


class MLCBackend(Backend):
    """TVM-compiled Llama with MLC-LLM group quantization and TVM's paged KV cache.

    Options (``--backend-option key=value``): ``device`` (``cpu``/``cuda``, default CUDA when
    present), ``threads`` (TVM worker threads, default all cores; must be set before TVM's first
    parallel call in the process), and the KV-cache settings of ``runtime.KVOptions``:
    ``context_window``, ``prefill_chunk``, ``sliding_window``, ``attention_sink``,
    ``max_batch`` (tokens / sequences); ``quantize_embedding`` (``1`` default, as MLC-LLM;
    ``0`` keeps embedding / lm_head unquantized in the scale dtype); ``attention`` (``fast`` default:
    this backend's parallel, vectorised CPU attention kernels; ``stock``: TVM's own scalar ones, for
    A/B comparisons); ``cache_dir`` (compiled-artifact cache, default ``cache_root()/mlc``).
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

    def __init__(self, variant: str, options: dict[str, Any] | None = None):
        super().__init__(variant, options)
        self.device = self.options.get("device") or tvm_default_device()
        if self.device not in ("cpu", "cuda"):
            raise BackendError(f"{self.label}: device must be cpu or cuda, got {self.device!r}")
        self.mode = MODES.get(variant)
        self.session = None
        self.spec: ModelSpec | None = None
        self._info: dict[str, Any] = {}
        self._eos: list[int] = []
        try:
            from backends.mlc.runtime import KVOptions

            values = {k: int(self.options[k]) for k in _INT_OPTIONS if k in self.options}
            self.kv_options = KVOptions(**values)
        except (TypeError, ValueError) as exc:
            raise BackendError(f"{self.label}: bad KV-cache option: {exc}") from None
        self.attention = str(self.options.get("attention", "fast"))
        if self.attention not in ("fast", "stock"):
            raise BackendError(f"{self.label}: attention must be fast or stock, got {self.attention!r}")
        o = self.kv_options
        if o.prefill_chunk <= 0 or o.max_batch <= 0:
            raise BackendError(f"{self.label}: prefill_chunk and max_batch must be positive")
        if o.attention_sink and not o.sliding_window:
            raise BackendError(f"{self.label}: attention_sink needs sliding_window > 0")
        if o.sliding_window and o.attention_sink >= o.sliding_window:
            raise BackendError(f"{self.label}: attention_sink must be smaller than sliding_window")

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
        flag = str(self.options.get("quantize_embedding", "1")).lower()
        if flag in ("1", "true", "yes") or not self.mode.quantized:
            return self.mode
        return MODES["q0f16" if self.mode.scale_dtype == "float16" else "q0f32"]

    @property
    def compute_dtype(self) -> str:
        """Activations and KV cache dtype: fp16 for f16 modes on CUDA; fp32 on CPU (no fast fp16
        here unless the CPU has AVX512-FP16, which TVM's LLVM path is not tuned for either)."""
        if self.device == "cuda" and self.mode.scale_dtype == "float16":
            return "float16"
        return "float32"

    # --- load -----------------------------------------------------------------------------
    def load(self, model: ModelSpec) -> LoadReport:
        availability = self.availability(self.variant)
        if not availability.ok:
            raise BackendError(f"{self.label}: {availability.reason}")
        if self.device == "cuda":
            import tvm

            if not tvm.cuda(0).exist:
                raise BackendError(f"{self.label}: device=cuda but TVM sees no CUDA device")
        if "threads" in self.options:
            os.environ["TVM_NUM_THREADS"] = str(int(self.options["threads"]))
        started = time.perf_counter()
        try:
            directory = checkpoint_dir(model)
        except ModelError as exc:
            raise BackendError(f"{self.label}: {exc}") from None
        from backends.mlc import artifacts
        from backends.mlc.compile import compile_module, make_target, target_key
        from backends.mlc.convert import convert, read_checkpoint
        from backends.mlc.model import LlamaConfig, UnsupportedModel, build_model, export_spec
        from backends.mlc.runtime import Session

        config = json.loads((directory / "config.json").read_text())
        try:
            cfg = LlamaConfig.from_hf(config)
        except UnsupportedModel as exc:
            raise BackendError(f"{self.label}: {exc}") from None
        dtype = self.compute_dtype
        embed_mode = self.embed_mode
        target = make_target(self.device, self.options.get("threads"))
        fast_attention = self.device == "cpu" and self.attention == "fast"
        suffix = ("" if embed_mode is self.mode else "-embf") + ("-stockattn" if self.attention == "stock" else "")
        entry = artifacts.artifact_dir(directory, self.variant + suffix,
                                       dtype, target_key(target),
                                       self.options.get("cache_dir"))
        cached = artifacts.is_complete(entry)
        # CPU kernels read weights in column tiles; dlight's CUDA rules expect plain KN
        tile_width = CPU_COLUMN_TILE if self.device == "cpu" else 0
        if not cached:
            import tvm

            with target:
                module = build_model(cfg, self.mode, dtype, embed_mode, tile_width)
                mod, named = module.export_tvm(export_spec(dtype))
            t0 = time.perf_counter()
            params = convert(read_checkpoint(directory), cfg, self.mode, dtype, [n for n, _ in named],
                             embed_mode, tile_width)
            convert_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            executable = compile_module(mod, target, self.mode.quantized, fast_attention)
            compile_s = time.perf_counter() - t0
            artifacts.save(entry, executable, params, {
                "convert_s": convert_s, "compile_s": compile_s, "tvm": tvm.__version__,
                "target": str(target), "mode": self.variant, "dtype": dtype})
        library, params, meta = artifacts.load(entry)
        itemsize = np.dtype(dtype).itemsize
        kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize
        self.session = Session(library, params, self.device, self.kv_options, kv_per_token)
        self.spec, self.cfg = model, cfg
        self._eos = self._eos_ids(directory, config)
        weight_bytes = int(sum(p.nbytes for p in params))
        extra = {
            "artifact_cache_hit": cached,
            "convert_s": meta["convert_s"],
            "compile_s": meta["compile_s"],
            **artifacts.sizes(entry),
            "artifact_dir": str(entry),
            "checkpoint_prepare_s": prepare_seconds(directory),
        }
        self._info = {"target": str(target), "target_key": target_key(target), "artifact_dir": str(entry)}
        return LoadReport(time.perf_counter() - started, weight_bytes, extra)

    @staticmethod
    def _eos_ids(directory, config: dict[str, Any]) -> list[int]:
        eos = None
        gen = directory / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is None:
            eos = config.get("eos_token_id")
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    # --- contract ---------------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                 min_new_tokens: int | None = None, stop_token_ids: Sequence[int] = ()) -> GenerationOutput:
        if self.session is None:
            raise BackendError(f"{self.label}: generate() before load()")
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        check_prompts(self.label, prompts, self.cfg.vocab_size)
        if max_new_tokens < 1:
            raise BackendError(f"{self.label}: max_new_tokens must be >= 1")
        if len(prompts) > self.kv_options.max_batch:
            raise BackendError(f"{self.label}: batch {len(prompts)} exceeds max_batch {self.kv_options.max_batch}")
        stops = set(stop_token_set(self._eos, stop_token_ids))
        try:
            # like transformers' min_new_tokens, every stop token is suppressed before the minimum
            tokens, start, steps, extra = self.session.generate(
                prompts, max_new_tokens, min_new_tokens or 0, stops, sorted(stops))
        except ValueError as exc:
            raise BackendError(f"{self.label}: {exc}") from None
        return GenerationOutput(tokens, start, steps, extra)

    def loglikelihood(self, windows: Sequence[ScoringWindow]) -> list[np.ndarray]:
        if self.session is None:
            raise BackendError(f"{self.label}: loglikelihood() before load()")
        results = []
        for window in windows:
            if not window.n_scored:
                results.append(np.zeros(0))
                continue
            ids = [int(t) for t in window.token_ids]
            check_token_ids(self.label, ids, self.cfg.vocab_size)
            results.append(self.session.score(ids, window.first_scored))
        return results

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
            "threads": int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)),
            "compute_dtype": self.compute_dtype,
            "compute_note": fp16_note,
            **self._info,
            "attn_implementation": "TVM TIRPagedKVCache (fused-QKV, RoPE in cache); " + (
                "CPU kernels: quantarena's tiled, parallel, vectorised attention (backends/mlc/attention.py)"
                if self.device == "cpu" and self.attention == "fast" else
                "TVM's own attention kernels (dlight on CUDA; scalar, single-threaded on CPU)"),
            "kv_cache": {
                "type": "paged (tvm.relax.frontend.nn.llm.kv_cache.TIRPagedKVCache)",
                "dtype": self.compute_dtype, "page_size": o.page_size,
                "context_window": o.context_window, "prefill_chunk": o.prefill_chunk,
                "sliding_window": o.sliding_window, "attention_sink": o.attention_sink,
                "max_batch": o.max_batch,
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
            },
        }

    def close(self) -> None:
        self.session = None
