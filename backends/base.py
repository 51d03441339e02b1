"""The one contract every inference backend meets, and the lazy registry that finds them.

The contract is modelled on lm-evaluation-harness's small model API (``loglikelihood``,
``generate_until``) plus what a latency benchmark needs (per-token timestamps, memory, load cost),
as optimum-benchmark separates a backend from the scenario that measures it. A backend knows
nothing about workloads; workloads only call the methods below.

Time stamps are ``time.perf_counter()`` seconds throughout; byte counts are plain ``int`` bytes.
"""

from __future__ import annotations

import abc
import importlib
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from backends.models import ModelSpec


class BackendError(RuntimeError):
    """A backend could not do what was asked (bad variant, failed load, unsupported model)."""


@dataclass(frozen=True)
class Availability:
    """Whether a backend variant can run on this machine, and if not, exactly why."""

    ok: bool
    reason: str = "available"

    @classmethod
    def yes(cls) -> "Availability":
        return cls(True)

    @classmethod
    def no(cls, reason: str) -> "Availability":
        return cls(False, reason)


@dataclass
class LoadReport:
    """What loading cost.

    Attributes:
        load_s: wall seconds from ``load()`` entry to a model ready to generate.
        weight_bytes: bytes of the weights as stored in memory (parameters + buffers; quantized
            tensors at their packed size, scales and other quantization state included).
        extra: backend-specific costs, e.g. ``{"export_s": ..., "quantize_s": ...,
            "artifact_bytes": ...}`` for compiled or exported backends (seconds, bytes).
    """

    load_s: float
    weight_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationOutput:
    """The result of one batched greedy generation.

    Attributes:
        token_ids: one list of generated token ids per prompt (prompt excluded), ``[batch][n_out]``.
        start_s: ``perf_counter()`` just before the backend received the prompt.
        step_times_s: ``perf_counter()`` taken as each decoding step's tokens became available on
            the host, one per generated position (``len == max(len(t) for t in token_ids)``).
            ``step_times_s[0] - start_s`` is the time to first token (TTFT).
        extra: backend measurements taken during this call, e.g. ``kv_cache_bytes`` (bytes the KV
            cache holds at the end: payload, scales and any full-precision residual) and
            ``kv_cache_bytes_prefill`` (the same right after prefill), where the backend can tell.
    """

    token_ids: list[list[int]]
    start_s: float
    step_times_s: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return len(self.step_times_s)


@dataclass(frozen=True)
class ScoringWindow:
    """A window of tokens to score, as in the sliding-window perplexity protocol.

    Attributes:
        token_ids: the window, ``[n]`` token ids.
        n_context: how many leading tokens are context only. Scored positions are
            ``max(1, n_context) .. n-1``; position ``i``'s score is ``log p(token_ids[i] | token_ids[:i])``.
    """

    token_ids: tuple[int, ...]
    n_context: int

    @property
    def first_scored(self) -> int:
        return max(1, self.n_context)

    @property
    def n_scored(self) -> int:
        return max(0, len(self.token_ids) - self.first_scored)


class Backend(abc.ABC):
    """One inference engine, in one variant (a quantization format / precision / cache setting).

    Subclasses set the class attributes and implement the abstract methods. The life cycle is
    ``availability()`` -> ``__init__(variant, options)`` -> ``load(model)`` -> any number of
    ``generate`` / ``loglikelihood`` / ``memory`` calls -> ``close()``.

    Class attributes:
        name: registry key, e.g. ``"hf"``.
        variants: variant name -> one-line description, e.g. ``{"nf4": "bitsandbytes 4-bit NormalFloat"}``.
        default_variants: what ``--backends NAME`` alone expands to.
    """

    name: ClassVar[str]
    variants: ClassVar[dict[str, str]]
    default_variants: ClassVar[tuple[str, ...]]

    def __init__(self, variant: str, options: dict[str, Any] | None = None):
        if variant not in self.variants:
            raise BackendError(
                f"unknown variant {self.name}:{variant}; choose from {', '.join(self.variants)}"
            )
        self.variant = variant
        self.options = dict(options or {})

    @property
    def label(self) -> str:
        """``name:variant``, the row label in every table."""
        return f"{self.name}:{self.variant}"

    @classmethod
    def availability(cls, variant: str) -> Availability:
        """Whether ``variant`` can run here; the reason names the missing package or device."""
        return Availability.yes()

    @abc.abstractmethod
    def load(self, model: ModelSpec) -> LoadReport:
        """Load (and quantize / export / compile as the variant requires) ``model``.

        Raises:
            BackendError: the model cannot be loaded in this variant (with the reason).
        """

    @abc.abstractmethod
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        min_new_tokens: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> GenerationOutput:
        """Greedy generation for a batch of prompts, timing every decoding step as it happens.

        Args:
            prompt_token_ids: ``[batch][n_in]`` token ids; prompts may differ in length (left-padded
                internally where the backend batches).
            max_new_tokens: the most tokens to generate per prompt.
            min_new_tokens: suppress end-of-sequence before this many tokens; pass
                ``max_new_tokens`` for an exact output length (latency runs).
            stop_token_ids: generation of a sequence stops after it emits one of these (the stop
                token is included in its output). End-of-sequence always stops unless suppressed.

        Returns:
            a ``GenerationOutput`` with per-step host timestamps taken as tokens were produced.
        """

    @abc.abstractmethod
    def loglikelihood(self, windows: Sequence[ScoringWindow]) -> list[np.ndarray]:
        """Per-token log-probabilities (natural log, float64) of each window's scored positions.

        Returns:
            one array per window, shape ``[window.n_scored]``.
        """

    def memory(self) -> dict[str, int]:
        """Current memory use in bytes: ``rss`` always; ``cuda_allocated``, ``cuda_reserved``,
        ``cuda_max_allocated`` where the backend runs on CUDA."""
        from backends.memory import process_memory

        return process_memory()

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Self-description for the results: library versions, quantization format, attention
        implementation, KV-cache dtype, device, threads."""

    def close(self) -> None:
        """Release the model. The default drops references; backends with native state override."""


# Registered backends: name -> "module:Class". Imported lazily so that a missing optional
# dependency (bitsandbytes, onnxruntime, tvm) disables only that backend, with its reason.
REGISTRY: dict[str, str] = {
    "hf": "backends.hf.backend:TransformersBackend",
    "bnb": "backends.hf_bnb.backend:BitsAndBytesBackend",
    "onnx": "backends.onnx.backend:OnnxRuntimeBackend",
    "kvq": "backends.kvq.backend:KVQuantBackend",
    "mlc": "backends.mlc.backend:MLCBackend",
}


def backend_names() -> list[str]:
    return list(REGISTRY)


def backend_class(name: str) -> type[Backend]:
    """Import and return the backend class registered as ``name``.

    Raises:
        KeyError: ``name`` is not registered.
        ImportError: its module (or one of its hard dependencies) cannot be imported.
    """
    module_name, class_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def variant_availability(name: str, variant: str) -> Availability:
    """Availability of ``name:variant``, turning an import failure into a reason."""
    try:
        cls = backend_class(name)
    except ImportError as exc:  # a missing optional package disables this backend only
        return Availability.no(f"cannot import {exc.name or exc}: pip install quantarena[{name}]")
    return cls.availability(variant)


def check_token_ids(label: str, token_ids: Sequence[int], vocab_size: int) -> None:
    """Raises ``BackendError`` (prefixed with ``label``) if an id lies outside ``[0, vocab_size)``."""
    bad = next((t for t in token_ids if not 0 <= int(t) < vocab_size), None)
    if bad is not None:
        raise BackendError(f"{label}: token id {bad} is out of range, outside the vocabulary [0, {vocab_size})")


def check_prompts(label: str, prompt_token_ids: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Raises ``BackendError``: no prompts, an empty prompt, or a token id outside the vocabulary."""
    if not prompt_token_ids:
        raise BackendError(f"{label}: no prompts")
    for row, prompt in enumerate(prompt_token_ids):
        if len(prompt) == 0:
            raise BackendError(f"{label}: empty prompt (row {row})")
        check_token_ids(label, prompt, vocab_size)


def left_pad(prompt_token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad a batch of prompts, as batched decoder-only generation needs.

    Returns:
        ``(input_ids, attention_mask)``, both int64 ``[batch, max_len]``; the mask is 1 on real tokens.

    Raises:
        BackendError: no prompts, or an empty prompt.
    """
    if not prompt_token_ids:
        raise BackendError("no prompts")
    width = max(len(p) for p in prompt_token_ids)
    input_ids = np.full((len(prompt_token_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, prompt in enumerate(prompt_token_ids):
        if len(prompt) == 0:
            raise BackendError("empty prompt")
        input_ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return input_ids, mask


def stop_token_set(eos_token_ids: Sequence[int], stop_token_ids: Sequence[int]) -> list[int]:
    """The ids that end a sequence: the model's end-of-sequence ids, then the caller's stop ids,
    as ints, duplicates dropped, order kept."""
    return list(dict.fromkeys(int(t) for t in (*eos_token_ids, *stop_token_ids)))


def trim_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Cut a generated sequence after its first stop token (the stop token is kept)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1]
    return tokens
