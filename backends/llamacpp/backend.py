"""llama.cpp through llama-cpp-python's low-level bindings: GGUF k-quants in the same table.

The high-level ``Llama`` class serves one sequence and samples inside llama.cpp; here the loop is
ours (``backends.decoding.greedy_decode``) over ``llama_decode`` with a ``llama_batch``: every
prompt is its own sequence id in one batch (no padding: each sequence has its own positions), only
the positions whose logits are needed are computed, and each step is stamped as its tokens exist
on the host. Weights come from ``gguf_files`` (a source GGUF in the checkpoint's float type,
written tensor by tensor; llama.cpp's own quantizer).

CUDA: with a llama.cpp built with ``-DGGML_CUDA=on`` (see the README), ``device`` auto offloads
every layer (``n_gpu_layers``); a CPU build runs on the CPU and says so in ``info()``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from backends.base import (Availability, Backend, BackendError, GenerationOutput, GenerationRequest, LoadedModel,
                           Preparation, ScoringWindow, largest_peak)
from backends.decoding import greedy_decode
from backends.kv import kv_bytes_per_token
from backends.llamacpp.gguf_files import FTYPES, UnsupportedModel, variant_file
from backends.models import ModelSpec
from backends.options import BackendOptions
from backends.tokens import stop_token_set

_KV_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}
_FLASH = {"auto": "LLAMA_FLASH_ATTN_TYPE_AUTO", "on": "LLAMA_FLASH_ATTN_TYPE_ENABLED",
          "off": "LLAMA_FLASH_ATTN_TYPE_DISABLED"}
_BACKEND_READY = False



# Bits per weight of each file type: block layouts of ggml-common.h (q8_0: 34 bytes per 32 weights,
# q4_0: 18, q4_1: 20, q6_K: 210 per 256...) and, for the mixes, the sizes llama.cpp's quantize README
# lists for Llama-2-7B (Q4_K_M 4.89, Q5_K_M 5.68, Q3_K_M 3.91, Q2_K 3.35 bits per weight).
BITS_PER_WEIGHT = {"f32": 32.0, "f16": 16.0, "q8_0": 8.5, "q6_k": 6.5625, "q5_k_m": 5.68, "q4_k_m": 4.89,
                   "q4_0": 4.5, "q4_1": 5.0, "q3_k_m": 3.91, "q2_k": 3.35, "iq4_nl": 4.5}

class LlamaCppOptions(BackendOptions):
    """``llamacpp`` options; ``threads`` is llama.cpp's ``n_threads`` and ``n_threads_batch``."""

    n_ctx: int = Field(0, ge=0, description="KV-cache tokens shared by all sequences; 0 = sized to the "
                       "largest request so far (at least 512), re-created outside timed regions")
    n_batch: int = Field(512, ge=1, description="most tokens per llama_decode call (logical batch)")
    n_ubatch: int = Field(512, ge=1, description="most tokens per compute graph (physical batch)")
    max_batch: int = Field(8, ge=1, description="most sequences per request (llama.cpp n_seq_max)")
    type_k: Literal["f16", "q8_0", "q4_0"] = Field("f16", description="KV-cache type of keys")
    type_v: Literal["f16", "q8_0", "q4_0"] = Field("f16", description="KV-cache type of values "
                                                   "(quantized needs flash attention)")
    flash_attn: Literal["auto", "on", "off"] = Field("auto", description="llama.cpp flash attention")
    n_gpu_layers: int | None = Field(None, ge=-1, description="layers offloaded to the GPU; default: "
                                     "all with a CUDA build and device != cpu, else 0")

    @model_validator(mode="after")
    def _quantized_values_need_flash_attention(self):
        if self.type_v != "f16" and self.flash_attn == "off":
            raise ValueError("type_v other than f16 needs flash_attn (llama.cpp cannot store V quantized without it)")
        return self


def _llama():
    """The bindings, with llama.cpp's backends initialised once per process."""
    global _BACKEND_READY
    import llama_cpp

    if not _BACKEND_READY:
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
    return llama_cpp


class LlamaCppBackend(Backend):
    """llama.cpp (GGUF) in one file type per variant, named as llama.cpp names them.

    Options: ``LlamaCppOptions`` (``python -m harness list --options llamacpp``).
    """

    name = "llamacpp"
    variants = {
        "f32": "llama.cpp, f32 GGUF (the same weights as every backend's fp32)",
        "f16": "llama.cpp, f16 weights",
        "q8_0": "llama.cpp Q8_0: 8-bit blocks of 32, one fp16 scale",
        "q6_k": "llama.cpp Q6_K k-quant (6.56 bits per weight)",
        "q5_k_m": "llama.cpp Q5_K_M k-quant mix",
        "q4_k_m": "llama.cpp Q4_K_M k-quant mix: the common default for CPU inference",
        "q4_0": "llama.cpp Q4_0: 4-bit blocks of 32, one fp16 scale",
        "q4_1": "llama.cpp Q4_1: 4-bit blocks of 32, scale and minimum (the embedded model's own file)",
        "q3_k_m": "llama.cpp Q3_K_M k-quant mix",
        "q2_k": "llama.cpp Q2_K k-quant",
        "iq4_nl": "llama.cpp IQ4_NL: non-linear 4-bit, no importance matrix needed",
    }
    default_variants = ("f32", "q8_0", "q4_k_m", "q4_1", "q4_0")
    Options = LlamaCppOptions
    runtime_modules = ("llama_cpp",)

    def __init__(self, variant: str, options=None):
        super().__init__(variant, options)
        self.path: Path | None = None
        self._model = self._ctx = self._batch = None
        self._n_ctx = 0
        self._n_vocab = 0
        self._kv_per_token_fp16 = 0
        self._source = ""
        self._tensor_types: dict[str, int] | None = None
        self._weight_groups: dict[str, list[str]] = {}

    @classmethod
    def availability(cls, variant: str) -> Availability:
        if importlib.util.find_spec("llama_cpp") is None:
            return Availability.no("llama-cpp-python is not installed: pip install quantarena[llamacpp] "
                                   "(builds llama.cpp from source, 5-11 minutes on 2 cores)")
        return Availability.yes()

    @property
    def gpu_layers(self) -> int:
        """Layers offloaded to the GPU (0 on a CPU build or with device=cpu)."""
        llama = _llama()
        if self.options.n_gpu_layers is not None:
            return self.options.n_gpu_layers
        return -1 if llama.llama_supports_gpu_offload() and self.options.device != "cpu" else 0

    # --- the pre-flight estimate (backends.footprint) ---------------------------------------------
    def weight_bytes_estimate(self, shape) -> int:
        """Bits per weight of the file type (``BITS_PER_WEIGHT``: llama.cpp's block layouts, and for
        the k-quant mixes the sizes ``llama-quantize`` reports on Llama-2-7B), norms in f32."""
        size = BITS_PER_WEIGHT[self.variant] / 8
        return shape.weight_bytes(linear=size, embed=size)

    def kv_element_bytes(self) -> float:
        """Keys and values at their cache types (f16: 2; q8_0: 34 bytes per 32; q4_0: 18 per 32)."""
        sizes = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
        return (sizes[self.options.type_k] + sizes[self.options.type_v]) / 2

    def preparation_bytes_estimate(self, shape) -> int:
        """The streamed source writer (one float32 matrix) and llama.cpp's quantizer, which holds a
        tensor in f32 and its quantized copy per thread (``llama-quant.cpp``)."""
        from backends.footprint import WORKING_SET_BYTES

        return shape.largest_matrix_params * 4 * 2 + WORKING_SET_BYTES

    # --- preparation and load --------------------------------------------------------------------
    def prepare(self, model: ModelSpec, directory: Path) -> Preparation:
        """The variant's GGUF: the source written once, quantized by llama.cpp, cached.
        ``peak_rss_bytes`` is the larger of the memory writing the source and quantizing added."""
        llama = _llama()
        if self.options.device == "cuda" and not llama.llama_supports_gpu_offload():
            raise BackendError(f"{self.label}: device=cuda but this llama.cpp is a CPU build: reinstall with "
                               "CMAKE_ARGS=-DGGML_CUDA=on pip install --force-reinstall llama-cpp-python")
        try:
            self.path, facts = variant_file(model, directory, self.variant, self.threads)
        except (UnsupportedModel, RuntimeError) as exc:
            raise BackendError(f"{self.label}: {exc}") from None
        self._source = facts["source"]
        self.cached_entry = facts["entry"] if facts["cache_hit"] else None
        self._weight_groups = facts["tensors"]["weight_groups"]
        self._tensor_types = facts["tensors"]["tensor_types"]
        return Preparation(convert_s=facts["convert_s"], quantize_s=facts["quantize_s"],
                           artifact_bytes=self.path.stat().st_size,
                           peak_rss_bytes=largest_peak(facts["convert_peak_bytes"], facts["quantize_peak_bytes"]),
                           artifact_dir=str(self.path.parent), cache_hit=facts["cache_hit"])

    def _load(self, model: ModelSpec, directory: Path) -> LoadedModel:
        llama = _llama()
        params = llama.llama_model_default_params()
        params.n_gpu_layers = self.gpu_layers
        self._model = llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise BackendError(f"{self.label}: llama.cpp cannot load {self.path}")
        self._n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self._model))
        head_dim = llama.llama_model_n_embd(self._model) // llama.llama_model_n_head(self._model)
        self._kv_per_token_fp16 = kv_bytes_per_token(llama.llama_model_n_layer(self._model),
                                                     llama.llama_model_n_head_kv(self._model), head_dim, 2)
        self._ensure_context(self.options.n_ctx or 512)
        self._batch = llama.llama_batch_init(max(self.options.n_batch, self.options.max_batch), 0, 1)
        return LoadedModel(int(llama.llama_model_size(self._model)),
                           {"source": self._source, "tensor_types": self._tensor_types})

    def _ensure_context(self, tokens: int) -> None:
        """A context holding ``tokens`` KV cells (all sequences together), re-created when a request
        needs more and ``n_ctx`` is 0. In ``_generate`` it runs after the request's ``start_s`` (the
        TTFT origin stamped by ``Backend.generate``): per-request state counts in TTFT for every
        backend, and latency warm-up runs of the same shape absorb a re-creation.

        Raises:
            BackendError: a fixed ``n_ctx`` is too small for the request.
        """
        llama = _llama()
        if self._ctx is not None and tokens <= self._n_ctx:
            return
        if self._ctx is not None and self.options.n_ctx:
            raise BackendError(f"{self.label}: the request needs {tokens} KV cells; n_ctx is {self.options.n_ctx}")
        size = self.options.n_ctx or max(512, -(-tokens // 256) * 256)
        if self._ctx is not None:
            llama.llama_free(self._ctx)
        params = llama.llama_context_default_params()
        params.n_ctx = size
        params.n_batch = self.options.n_batch
        params.n_ubatch = min(self.options.n_ubatch, self.options.n_batch)
        params.n_seq_max = self.options.max_batch
        params.n_threads = params.n_threads_batch = self.threads
        params.type_k = getattr(llama, _KV_TYPES[self.options.type_k])
        params.type_v = getattr(llama, _KV_TYPES[self.options.type_v])
        params.flash_attn_type = getattr(llama, _FLASH[self.options.flash_attn])
        params.kv_unified = True  # n_ctx is shared by the sequences of a request, not split
        params.no_perf = True
        self._ctx = llama.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise BackendError(f"{self.label}: llama.cpp cannot create a context of {size} tokens")
        self._n_ctx = size

    # --- running ---------------------------------------------------------------------------------
    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """One ``llama_decode`` of ``(token, position, sequence, wants logits)`` entries; returns the
        float32 logits ``[n_outputs, vocab]`` of the flagged entries, in order."""
        llama = _llama()
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, wants) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, int(wants)
        code = llama.llama_decode(self._ctx, batch)
        if code != 0:
            raise BackendError(f"{self.label}: llama_decode returned {code}")
        outputs = sum(1 for entry in entries if entry[3])
        if not outputs:
            return np.zeros((0, self._n_vocab), dtype=np.float32)
        pointer = llama.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(outputs, self._n_vocab)).copy()

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """``_decode`` in slices of ``n_batch`` entries; the flagged logits of all slices, in order."""
        step = self.options.n_batch
        parts = [self._decode(entries[i:i + step]) for i in range(0, len(entries), step)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _clear(self) -> None:
        llama = _llama()
        llama.llama_memory_clear(llama.llama_get_memory(self._ctx), True)

    def _kv_bytes(self, sequences: int) -> int:
        """KV bytes llama.cpp's own state accounting gives for the live sequences (K and V of every
        layer, at the cache types; ``llama_state_seq_get_size``)."""
        llama = _llama()
        return int(sum(llama.llama_state_seq_get_size(self._ctx, seq) for seq in range(sequences)))

    def _generate(self, request: GenerationRequest) -> GenerationOutput:
        if request.batch > self.options.max_batch:
            raise BackendError(f"{self.label}: batch {request.batch} exceeds max_batch {self.options.max_batch}")
        prompts = request.prompt_token_ids
        self._ensure_context(sum(len(p) for p in prompts) + request.batch * request.max_new_tokens)
        self._clear()
        extra: dict[str, Any] = {}
        lengths = [len(p) for p in prompts]

        def prefill() -> np.ndarray:
            entries = [(token, pos, seq, pos == len(prompt) - 1)
                       for seq, prompt in enumerate(prompts) for pos, token in enumerate(prompt)]
            return self._run(entries)  # one row per sequence, in sequence order

        def step(chosen: np.ndarray, live: np.ndarray) -> np.ndarray:
            rows = [seq for seq in range(request.batch) if live[seq]]
            logits = np.zeros((request.batch, self._n_vocab), dtype=np.float32)
            logits[rows] = self._decode([(int(chosen[seq]), lengths[seq], seq, True) for seq in rows])
            for seq in rows:
                lengths[seq] += 1
            return logits

        def measure_prefill() -> None:
            extra["kv_cache_bytes_prefill"] = self._kv_bytes(request.batch)
            extra["kv_cache_tokens_prefill"] = sum(lengths)

        out = greedy_decode(request, stop_token_set(self.special.eos_ids, request.stop_token_ids),
                            prefill, step, measure_prefill)
        tokens = sum(lengths)
        extra.update(kv_cache_bytes=self._kv_bytes(request.batch), kv_cache_tokens=tokens,
                     kv_cache_bytes_fp16_analytic=self._kv_per_token_fp16 * tokens)
        out.extra = extra
        return out

    def _score_logits(self, window: ScoringWindow) -> np.ndarray:
        """The window as one sequence, logits only where a scored token is predicted; float32
        ``[n_scored, vocab]``."""
        ids = window.token_ids
        first = window.first_scored
        self._ensure_context(len(ids))
        self._clear()
        return self._run([(token, pos, 0, first - 1 <= pos < len(ids) - 1) for pos, token in enumerate(ids)])

    # --- description -------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        import llama_cpp

        llama = _llama()
        flash = self.options.flash_attn
        return {
            "backend": self.label,
            "library": {"llama-cpp-python": llama_cpp.__version__},
            "system_info": llama.llama_print_system_info().decode(errors="replace").strip(),
            "device": "cuda" if self.gpu_layers else "cpu",
            "gpu_layers": self.gpu_layers,
            "gpu_offload_supported": bool(llama.llama_supports_gpu_offload()),
            "threads": self.threads,
            "compute_dtype": "float32",
            "attn_implementation": f"llama.cpp (flash attention {flash})",
            "kv_cache": {"type": "llama.cpp unified KV cache", "type_k": self.options.type_k,
                         "type_v": self.options.type_v, "n_ctx": self._n_ctx},
            "quantization": {"format": f"gguf-{self.variant}", "llama_ftype": FTYPES[self.variant],
                             "source": self._source,
                             "tensor_types": self._tensor_types, **self._weight_groups},
            "gguf": str(self.path) if self.path else None,
        }

    def close(self) -> None:
        llama = _llama()
        super().close()
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
        if self._ctx:
            llama.llama_free(self._ctx)
        if self._model:
            llama.llama_model_free(self._model)
        self._model = self._ctx = self._batch = None

