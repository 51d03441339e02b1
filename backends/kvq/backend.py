"""Quantized KV cache (INT8 / INT4 / INT2, layer-wise hybrid) on the transformers backend.

Weights stay unquantized in the model's compute dtype; only the keys and values the attention
layers cache are stored at reduced precision. Attention is FlashAttention-2 where CUDA and
``flash-attn`` are present, SDPA otherwise; the implementation used, and why, is in ``info()``.

Measurements this backend puts in ``GenerationOutput.extra`` (bytes are plain ints; the first four
come from the shared ``TransformersBackend.generate`` and are produced by every transformers
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
from typing import Any, Sequence

import numpy as np

from backends.base import Availability, BackendError, GenerationOutput, ScoringWindow, check_token_ids
from backends.hf.backend import TransformersBackend, cuda_available, default_device
from backends.models import TorchLoadOptions

_BITS = {"int8": 8, "int4": 4, "int2": 2}
ATTN_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")


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


class KVQuantBackend(TransformersBackend):
    """transformers with a quantized / layer-wise hybrid KV cache (unquantized weights).

    Options (``--backend-option key=value``), all recorded in ``info()``:
        attn: ``auto`` (default: ``flash_attention_2`` when CUDA + flash-attn, else ``sdpa``),
            ``flash_attention_2``, ``sdpa`` or ``eager``.
        quant_backend: ``quanto`` (default, optimum-quanto) or ``hqq`` (where installed).
        q_group_size: elements per quantization group (default ``min(64, head_dim)``; must divide
            ``head_dim``).
        residual_length: recent tokens kept in full precision (default 128).
        axis_key, axis_value: quantization axes (default 0: per-token groups along head_dim).
        hybrid_n: ``kvq:hybrid`` keeps the first and last N layers unquantized (default 2);
            ``hybrid_first`` / ``hybrid_last`` set the two ends separately.
        hybrid_bits: precision of the middle layers of ``kvq:hybrid`` (2, 4 or 8; default 2).
        score_chunk: tokens per forward when scoring through the cache (default
            ``min(32, residual_length)``; at most ``residual_length``; 1 = token by token).
        compute_dtype: model dtype (default fp16 on CUDA, fp32 on CPU), plus the
            ``TransformersBackend`` options (``threads``, ``device``).

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

    def __init__(self, variant: str, options: dict[str, Any] | None = None):
        super().__init__(variant, options)
        self.attn_implementation, self.attn_reason = self._choose_attention()
        self.quant_backend = str(self.options.get("quant_backend", "quanto"))
        if self.quant_backend not in ("quanto", "hqq"):
            raise BackendError(f"{self.label}: quant_backend must be quanto or hqq, got {self.quant_backend!r}")
        if self.quantized and self.quant_backend == "hqq" and not _installed("hqq"):
            raise BackendError(f"{self.label}: quant_backend=hqq needs the hqq package: pip install hqq")
        self.residual_length = self._int_option("residual_length", 128, minimum=1)
        self.axis_key = self._int_option("axis_key", 0)
        self.axis_value = self._int_option("axis_value", 0)
        n = self._int_option("hybrid_n", 2, minimum=0)
        self.hybrid_first = self._int_option("hybrid_first", n, minimum=0)
        self.hybrid_last = self._int_option("hybrid_last", n, minimum=0)
        self.hybrid_bits = self._int_option("hybrid_bits", 2)
        if self.hybrid_bits not in (2, 4, 8):
            raise BackendError(f"{self.label}: hybrid_bits must be 2, 4 or 8, got {self.hybrid_bits}")
        self.score_chunk = self._int_option("score_chunk", min(32, self.residual_length), minimum=1)
        if self.quantized and self.score_chunk > self.residual_length:
            raise BackendError(
                f"{self.label}: score_chunk ({self.score_chunk}) must not exceed residual_length "
                f"({self.residual_length}), or scored tokens would skip the quantized store"
            )
        self._group_option = self.options.get("q_group_size")
        self.q_group_size: int | None = None  # resolved against head_dim in load()

    # --- options ------------------------------------------------------------------------------
    def _int_option(self, key: str, default: int, minimum: int | None = None) -> int:
        value = self.options.get(key, default)
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise BackendError(f"{self.label}: option {key} must be an integer, got {value!r}") from None
        if minimum is not None and number < minimum:
            raise BackendError(f"{self.label}: option {key} must be >= {minimum}, got {number}")
        return number

    def _choose_attention(self) -> tuple[str, str]:
        """The attention implementation to load with, and the reason it was chosen."""
        asked = str(self.options.get("attn", "auto"))
        if asked not in ATTN_CHOICES:
            raise BackendError(f"{self.label}: attn must be one of {', '.join(ATTN_CHOICES)}, got {asked!r}")
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
        default = "float16" if self.device == "cuda" else "float32"
        return str(self.options.get("compute_dtype", default))

    def torch_load_options(self) -> TorchLoadOptions:
        options = super().torch_load_options()
        options.attn_implementation = self.attn_implementation
        return options

    def load(self, model):
        report = super().load(model)
        text_config = self.model.config.get_text_config(decoder=True)
        head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        group = self._group_option if self._group_option is not None else min(64, head_dim)
        try:
            group = int(group)
        except (TypeError, ValueError):
            raise BackendError(f"{self.label}: option q_group_size must be an integer, got {group!r}") from None
        if group < 1 or head_dim % group:
            self.close()
            raise BackendError(f"{self.label}: q_group_size {group} must divide head_dim {head_dim}")
        self.q_group_size = group
        return report

    def quant_config(self, nbits: int):
        """The ``KVQuantConfig`` of this backend's quantized layers at ``nbits`` bits."""
        from backends.kvq.caches import KVQuantConfig

        return KVQuantConfig(
            nbits=nbits,
            backend=self.quant_backend,
            q_group_size=self.q_group_size,
            residual_length=self.residual_length,
            axis_key=self.axis_key,
            axis_value=self.axis_value,
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
                    self.model.config, self.full_precision_layers(), self.quant_config(self.hybrid_bits)
                )
            return uniform_quantized_cache(self.model.config, self.quant_config(_BITS[self.variant]))
        except (ValueError, ImportError) as exc:
            raise BackendError(f"{self.label}: cannot build the KV cache: {exc}") from None

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        min_new_tokens: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> GenerationOutput:
        out = super().generate(
            prompt_token_ids, max_new_tokens, min_new_tokens=min_new_tokens, stop_token_ids=stop_token_ids
        )
        tokens = out.extra.get("kv_cache_tokens") or 0
        if tokens:
            out.extra["kv_cache_bytes_per_token"] = out.extra["kv_cache_bytes"] / tokens
            out.extra["kv_cache_ratio_vs_fp16_analytic"] = (
                out.extra["kv_cache_bytes_fp16_analytic"] / out.extra["kv_cache_bytes"]
            )
        return out

    def loglikelihood(self, windows: Sequence[ScoringWindow]) -> list[np.ndarray]:
        """Per-token log-probabilities scored through this variant's KV cache: the window's
        context is prefilled through a fresh cache, then the rest is fed in chunks of at most
        ``score_chunk`` tokens (see ``backends.kvq.scoring``), so every scored token attends to
        keys and values that went through the cache. Returns float64 ``[window.n_scored]`` each.

        Raises:
            BackendError: called before ``load()``, or a token id outside the vocabulary.
        """
        from backends.kvq.scoring import cached_logprobs

        if self.model is None:
            raise BackendError(f"{self.label}: loglikelihood() before load()")
        vocab = self.model.config.get_text_config(decoder=True).vocab_size
        results = []
        for window in windows:
            check_token_ids(self.label, window.token_ids, vocab)
            if window.n_scored == 0:
                results.append(np.zeros(0))
                continue
            results.append(
                cached_logprobs(
                    self.model, self.new_cache(), window.token_ids, window.first_scored,
                    self.score_chunk, self.device,
                )
            )
        return results

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
            "scoring": f"through the cache, prefill then chunks of {self.score_chunk} tokens",
        }
        if not self.quantized:
            kv["type"] = "DynamicCache"
            kv["note"] = "the unquantized cache in the model dtype (fp32 on CPU, fp16 on CUDA)"
        else:
            bits = self.hybrid_bits if self.variant == "hybrid" else _BITS[self.variant]
            kv["type"] = "HybridPrecisionCache" if self.variant == "hybrid" or bits == 8 else "QuantizedCache"
            kv["quantization"] = {
                "nbits": bits,
                "backend": self.quant_backend,
                "q_group_size": self.q_group_size,
                "residual_length": self.residual_length,
                "axis_key": self.axis_key,
                "axis_value": self.axis_value,
            }
            if self.variant == "hybrid" and self.model is not None:
                kv["full_precision_layers"] = self.full_precision_layers()
        if self.quant_backend == "quanto" and _installed("optimum.quanto"):
            from importlib.metadata import version

            info["library"]["optimum-quanto"] = version("optimum-quanto")
        info["kv_cache"] = kv
        return info
