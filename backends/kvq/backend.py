"""Quantized KV cache (INT8 / INT4 / INT2, layer-wise hybrid) on the transformers backend.

Weights stay unquantized in the model's compute dtype; only the keys and values the attention
layers cache are stored at reduced precision. Attention is FlashAttention-2 where CUDA and
``flash-attn`` are present, SDPA otherwise; the implementation used, and why, is in ``info()``.

Measurements this backend puts in ``GenerationOutput.extra`` (bytes are plain ints; the first five
come from the shared ``TransformersBackend._generate`` and are produced by every transformers
backend):

* ``kv_cache_bytes``: bytes the cache holds at the end of generation: sum of the storage of every
  tensor reachable from it (quantized payload + scales + zero points + full-precision residual).
* ``kv_cache_bytes_prefill``: the same, right after the prefill (the cache holds the prompt).
* ``kv_cache_tokens``: cached positions at the end, summed over the batch (prompt + generated - 1
  per row, left padding included); ``kv_cache_tokens_prefill`` after the prefill.
* ``kv_cache_bytes_fp16_analytic``: ``2 x layers x kv_heads x head_dim x kv_cache_tokens x 2``
  bytes, what an fp16 cache of that many positions holds.
* ``kv_cache_bytes_per_token`` (this backend): ``kv_cache_bytes / kv_cache_tokens``.
* ``kv_cache_ratio_vs_fp16_analytic`` (this backend): ``kv_cache_bytes_fp16_analytic /
  kv_cache_bytes`` (> 1 means smaller than an fp16 cache). The compression ratio against the
  ``kvq:fp16`` row is for the report to take (on CPU that row's cache is fp32, see below).

The reference ``kvq:fp16`` is "the unquantized cache in the model dtype": fp16 on CUDA, fp32 on
CPU (CPUs without AVX512-FP16 emulate fp16, so its timings would measure the emulation).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from backends.base import (Availability, BackendError, GenerationOutput, GenerationRequest, LoadedModel,
                           ScoringWindow)
from backends.device import cuda_available
from backends.hf.backend import TransformersBackend, TransformersOptions
from backends.models import ModelSpec, TorchLoadOptions

_BITS = {"int8": 8, "int4": 4, "int2": 2}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (e.g. ``optimum``) is missing
        return False


def flash_attention_missing() -> str | None:
    """Why FlashAttention-2 cannot be used here (``"no CUDA device; flash-attn not installed"``),
    or None when it can (CUDA visible and the ``flash_attn`` package importable)."""
    reasons = []
    if not cuda_available():
        reasons.append("no CUDA device")
    if not _installed("flash_attn"):
        reasons.append("flash-attn not installed (pip install quantarena[gpu])")
    return "; ".join(reasons) or None


class KVQuantOptions(TransformersOptions):
    """``kvq`` options (all recorded in ``info()``)."""

    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="attention; auto = flash_attention_2 with CUDA + flash-attn, else sdpa")
    quant_backend: Literal["quanto", "hqq"] = Field("quanto", description="KV quantizer library")
    q_group_size: int | None = Field(
        None, ge=1, description="elements per quantization group; default min(64, head_dim); must divide head_dim")
    residual_length: int = Field(128, ge=1, description="recent tokens kept in full precision")
    axis_key: int = Field(0, ge=0, le=1, description="quantization axis of keys (0: per-token groups)")
    axis_value: int = Field(0, ge=0, le=1, description="quantization axis of values (0: per-token groups)")
    hybrid_n: int = Field(2, ge=0, description="kvq:hybrid keeps the first and last N layers unquantized")
    hybrid_first: int | None = Field(None, ge=0, description="kvq:hybrid unquantized leading layers (default hybrid_n)")
    hybrid_last: int | None = Field(None, ge=0, description="kvq:hybrid unquantized trailing layers (default hybrid_n)")
    hybrid_bits: int = Field(2, description="precision of kvq:hybrid's middle layers: 2, 4 or 8")
    score_chunk: int | None = Field(
        None, ge=1, description="tokens per forward when scoring through the cache; default "
        "min(32, residual_length), at most residual_length")
    compute_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="model dtype; default float16 on CUDA, float32 on CPU")

    @field_validator("hybrid_bits")
    @classmethod
    def _supported_bits(cls, value: int) -> int:
        if value not in (2, 4, 8):
            raise ValueError("must be 2, 4 or 8")
        return value

    @model_validator(mode="after")
    def _chunk_within_residual(self):
        if self.score_chunk is not None and self.score_chunk > self.residual_length:
            raise ValueError(f"score_chunk ({self.score_chunk}) must not exceed residual_length "
                             f"({self.residual_length}), or scored tokens would skip the quantized store")
        return self


class KVQuantBackend(TransformersBackend):
    """transformers with a quantized / layer-wise hybrid KV cache (unquantized weights).

    Options: ``KVQuantOptions`` (``python -m harness list --options kvq``).

    Raises (construction):
        BackendError: a malformed option, FlashAttention-2 asked for where it cannot run, or a
            quantization backend that is not installed.
    """

    name = "kvq"
    variants = {
        "fp16": "unquantized KV cache in the model dtype (fp16 on CUDA, fp32 on CPU): the reference",
        "int8": "8-bit KV cache (optimum-quanto qint8, absmax per group) + full-precision residual",
        "int4": "4-bit KV cache (transformers QuantizedCache, quanto qint4) + full-precision residual",
        "int2": "2-bit KV cache (transformers QuantizedCache, quanto qint2) + full-precision residual",
        "hybrid": "first/last N layers' KV unquantized, the middle layers quantized (default int2)",
        "fp16-sdpa": "the kvq:fp16 reference forced to SDPA, to compare with FlashAttention-2",
    }
    default_variants = ("fp16", "int8", "int4", "int2", "hybrid", "fp16-sdpa")
    Options = KVQuantOptions

    def __init__(self, variant: str, options=None):
        super().__init__(variant, options)
        o = self.options
        self.attn_implementation, self.attn_reason = self._choose_attention()
        self.hybrid_first = o.hybrid_n if o.hybrid_first is None else o.hybrid_first
        self.hybrid_last = o.hybrid_n if o.hybrid_last is None else o.hybrid_last
        self.score_chunk = o.score_chunk or min(32, o.residual_length)
        self.q_group_size: int | None = None  # resolved against head_dim in _load()

    def check_options(self) -> None:
        if self.quantized and self.options.sliding_window:
            raise BackendError(f"{self.label}: sliding_window works with kvq:fp16 only (the quantized "
                               "caches cannot evict positions)")
        if self.quantized and self.options.quant_backend == "hqq" and not _installed("hqq"):
            raise BackendError(f"{self.label}: quant_backend=hqq needs the hqq package: pip install hqq")

    def _choose_attention(self) -> tuple[str, str]:
        """The attention implementation to load with, and the reason it was chosen."""
        asked = self.options.attn
        missing = flash_attention_missing()
        if self.variant == "fp16-sdpa":
            return "sdpa", "forced by the fp16-sdpa variant (comparison with FlashAttention-2)"
        if asked == "flash_attention_2" and missing:
            raise BackendError(f"{self.label}: attn=flash_attention_2 is not possible here: {missing}")
        if asked == "auto":
            if missing:
                return "sdpa", f"FlashAttention-2 not used: {missing}"
            return "flash_attention_2", "CUDA and flash-attn present"
        return asked, "asked for with attn=" + asked

    @property
    def quantized(self) -> bool:
        return self.variant in _BITS or self.variant == "hybrid"

    # --- what differs from TransformersBackend --------------------------------------------
    @classmethod
    def availability(cls, variant: str) -> Availability:
        if variant == "fp16-sdpa":
            missing = flash_attention_missing()
            if missing:
                return Availability.no(
                    f"compares SDPA with FlashAttention-2 on kvq:fp16, which needs CUDA and flash-attn: {missing}"
                )
        if variant in _BITS or variant == "hybrid":
            if not _installed("optimum.quanto"):
                return Availability.no("optimum-quanto is not installed: pip install quantarena[kvq]")
        return Availability.yes()

    @property
    def compute_dtype(self) -> str:
        return self.options.compute_dtype or ("float16" if self.device == "cuda" else "float32")

    def kv_element_bytes(self) -> float:
        """The quantized cache's bits (hybrid: 8) plus a compute-dtype scale and zero point per
        group of 64; fp16 variants: 2."""
        bits = _BITS.get(self.variant, 8 if self.variant == "hybrid" else 16)
        return 2.0 if bits == 16 else bits / 8 + 2 * 4 / 64

    def torch_load_options(self) -> TorchLoadOptions:
        options = super().torch_load_options()
        options.attn_implementation = self.attn_implementation
        return options

    def _load(self, model: ModelSpec, directory: Path) -> LoadedModel:
        loaded = super()._load(model, directory)
        text_config = self.model.config.get_text_config(decoder=True)
        head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        group = self.options.q_group_size or min(64, head_dim)
        if head_dim % group:
            self.close()
            raise BackendError(f"{self.label}: q_group_size {group} must divide head_dim {head_dim}")
        self.q_group_size = group
        return loaded

    def quant_config(self, nbits: int):
        """The ``KVQuantConfig`` of this backend's quantized layers at ``nbits`` bits."""
        from backends.kvq.caches import KVQuantConfig

        return KVQuantConfig(
            nbits=nbits,
            backend=self.options.quant_backend,
            q_group_size=self.q_group_size,
            residual_length=self.options.residual_length,
            axis_key=self.options.axis_key,
            axis_value=self.options.axis_value,
        )

    def full_precision_layers(self) -> list[int]:
        """Layer indices whose KV stays unquantized (all for fp16, none for intN)."""
        from backends.kvq.caches import full_precision_layers

        n_layers = self.model.config.get_text_config(decoder=True).num_hidden_layers
        if self.variant in _BITS:
            return []
        if self.variant == "hybrid":
            return full_precision_layers(n_layers, self.hybrid_first, self.hybrid_last)
        return list(range(n_layers))

    def new_cache(self):
        """A fresh cache for this variant: ``DynamicCache`` (fp16 reference), transformers'
        ``QuantizedCache`` (int4/int2; int8 through ``QuantoInt8Layer``) or a
        ``HybridPrecisionCache``.

        Raises:
            BackendError: the quantization backend rejects the settings (bits, axis).
        """
        if not self.quantized:
            return super().new_cache()
        from backends.kvq.caches import HybridPrecisionCache, uniform_quantized_cache

        try:
            if self.variant == "hybrid":
                return HybridPrecisionCache(
                    self.model.config, self.full_precision_layers(), self.quant_config(self.options.hybrid_bits)
                )
            return uniform_quantized_cache(self.model.config, self.quant_config(_BITS[self.variant]))
        except (ValueError, ImportError) as exc:
            raise BackendError(f"{self.label}: cannot build the KV cache: {exc}") from None

    def _generate(self, request: GenerationRequest) -> GenerationOutput:
        out = super()._generate(request)
        tokens = out.extra.get("kv_cache_tokens") or 0
        if tokens:
            out.extra["kv_cache_bytes_per_token"] = out.extra["kv_cache_bytes"] / tokens
            out.extra["kv_cache_ratio_vs_fp16_analytic"] = (
                out.extra["kv_cache_bytes_fp16_analytic"] / out.extra["kv_cache_bytes"]
            )
        return out

    def _score_logits(self, window: ScoringWindow) -> np.ndarray:
        """Logits computed through this variant's KV cache: the window's context is prefilled
        through a fresh cache, then the rest is fed in chunks of at most ``score_chunk`` tokens
        (see ``backends.kvq.scoring``), so every scored token attends to keys and values that went
        through the cache. The unquantized variants (``kvq:fp16``) score the window in one forward
        instead: their cache hands back exactly the keys and values it was given, so the chunks
        would compute the same logits (``tests/test_kvq.py`` checks it) in 16 small forwards.
        float32 ``[window.n_scored, vocab]``."""
        if self.options.sliding_window or not self.quantized:  # kvq:fp16 (windows are fp16-only): hf's path
            return super()._score_logits(window)
        from backends.kvq.scoring import cached_logits

        return cached_logits(self.model, self.new_cache(), window.token_ids, window.first_scored,
                             self.score_chunk, self.device)

    def quantization_info(self) -> dict[str, Any]:
        return {"format": self.compute_dtype, "weights": "unquantized", "kv_cache": self.variant}

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["attn_implementation"] = (
            getattr(self.model.config, "_attn_implementation", None) if self.model is not None
            else self.attn_implementation
        )
        info["attn_reason"] = self.attn_reason
        kv: dict[str, Any] = {
            "variant": self.variant,
            "full_precision_dtype": self.compute_dtype,
            "scoring": (f"through the cache, prefill then chunks of {self.score_chunk} tokens" if self.quantized
                        else "one forward per window (an unquantized cache returns what it stored)"),
        }
        if self.options.sliding_window:
            kv.update(self.window_info())
        elif not self.quantized:
            kv["type"] = "DynamicCache"
            kv["note"] = "the unquantized cache in the model dtype (fp32 on CPU, fp16 on CUDA)"
        else:
            bits = self.options.hybrid_bits if self.variant == "hybrid" else _BITS[self.variant]
            kv["type"] = "HybridPrecisionCache" if self.variant == "hybrid" or bits == 8 else "QuantizedCache"
            kv["quantization"] = {
                "nbits": bits,
                "backend": self.options.quant_backend,
                "q_group_size": self.q_group_size,
                "residual_length": self.options.residual_length,
                "axis_key": self.options.axis_key,
                "axis_value": self.options.axis_value,
            }
            if self.variant == "hybrid" and self.model is not None:
                kv["full_precision_layers"] = self.full_precision_layers()
        if self.options.quant_backend == "quanto" and _installed("optimum.quanto"):
            from importlib.metadata import version

            info["library"]["optimum-quanto"] = version("optimum-quanto")
        info["kv_cache"] = kv
        return info
