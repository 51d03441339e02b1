"""The one contract every inference backend meets, and the lazy registry that finds them.

The contract is modelled on lm-evaluation-harness's small model API (``loglikelihood``,
``generate_until``) plus what a latency benchmark needs (per-token timestamps, memory, load cost),
as optimum-benchmark separates a backend from the scenario that measures it. A backend knows
nothing about workloads; workloads only call the public methods below.

What this layer owns, so that it is the same for every backend: option parsing (``Options``),
request validation, the ``load`` clock (entry to a first generated token: weights resident),
one-time preparation reported under one vocabulary (``Preparation``), the scoring loop over
windows (target log-probabilities, and the baseline-agreement statistics, from the logits each
backend returns), and the special tokens. A backend implements ``_load``, ``_generate``,
``_score_logits`` and ``info`` (``docs/adding-a-backend.md`` walks through one).

Time stamps are ``time.perf_counter()`` seconds throughout; byte counts are plain ``int`` bytes.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np

from backends.artifact_cache import CacheEntry, collect_rebuilds, note_rebuild
from backends.models import ModelError, ModelSpec, checkpoint_dir, checkpoint_facts
from backends.options import BackendOptions, OptionError, parse_options
from backends.scoring import CompactLogprobs, WindowScore, score_rows
from backends.tokens import SpecialTokens, check_prompts

if TYPE_CHECKING:
    from backends.footprint import MemoryEstimate, ModelShape


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out (host or device): not a reason to rebuild a cache entry."""
    return (isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__
            or "out of memory" in str(exc).lower())


class BackendError(RuntimeError):
    """A backend could not do what was asked (bad variant or option, failed load, unsupported
    model, a request it cannot serve); the message is one line."""


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
class Preparation:
    """One-time work before a load, cached on disk, under one vocabulary for every backend.

    Seconds are those measured when the artifact was built (also reported on a cache hit, so a
    reader sees what a cold start costs); ``wall_s`` is what this call spent.

    Attributes:
        checkpoint_s: the shared checkpoint conversion (GGUF -> transformers, random init).
        checkpoint_peak_bytes: the peak resident memory that conversion added (bytes).
        export_s: graph export (ONNX). quantize_s: offline weight quantization (ONNX).
        convert_s: weight conversion / quantization into the engine's layout (TVM).
        compile_s: compilation (TVM).
        artifact_bytes: bytes of the cached artifact on disk. artifact_dir: where it is.
        peak_rss_bytes: peak resident memory a preparation step added (bytes,
            ``backends.memory.StepPeak``), the largest step; None when not measured. Measured when
            the artifact was built and reported on cache hits too, like the seconds.
        cache_hit: the artifact was found complete and sound in the cache (its manifest check
            passed: ``backends.artifact_cache``); False when it was built, or rebuilt, by this
            load (``LoadReport.details["cache_rebuilt"]`` then says why); None: nothing beyond
            the checkpoint.
        wall_s: wall seconds of preparation in this call (about 0 on a cache hit).
    """

    checkpoint_s: float | None = None
    checkpoint_peak_bytes: int | None = None
    export_s: float | None = None
    quantize_s: float | None = None
    convert_s: float | None = None
    compile_s: float | None = None
    artifact_bytes: int | None = None
    peak_rss_bytes: int | None = None
    artifact_dir: str | None = None
    cache_hit: bool | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def largest_peak(*peaks: int | None) -> int | None:
    """The largest of some preparation steps' peaks (bytes), for ``Preparation.peak_rss_bytes``;
    steps that were not measured (None: an entry built before peaks were recorded) are left out,
    None when none was."""
    return max((p for p in peaks if p is not None), default=None)


@dataclass
class LoadedModel:
    """What a backend's ``_load`` returns: ``weight_bytes`` (parameters and buffers as stored,
    quantized tensors at their packed size with their scales) and backend-specific ``details``
    (e.g. ONNX Runtime's session-creation seconds)."""

    weight_bytes: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What loading cost (measured by ``Backend.load``, the same for every backend).

    Attributes:
        load_s: wall seconds from ``load()`` entry, after preparation, to the first token of a
            one-token generation: the model is ready, its weights resident (memory-mapped weights
            are paged in by that first forward pass). ``load_call_s + first_forward_s``.
        load_call_s: the backend's own loading (reading weights, building sessions / VMs).
        first_forward_s: the first one-token generation.
        weight_bytes: see ``LoadedModel``.
        preparation: one-time work (``Preparation``), not part of ``load_s``.
        details: backend-specific extras; ``cache_rebuilt``: one line per cache entry (the
            converted checkpoint or the backend's artifact) this load found corrupt or
            incomplete and rebuilt, with the reason (absent when nothing was rebuilt).
        memory: what loading left resident, measured by ``Backend.load`` around ``_load`` and the
            first generation (``backends.memory.LoadMemory``): ``rss_before_load_bytes``,
            ``rss_after_load_bytes``, ``model_resident_bytes`` (after - before, host RSS, with
            ``malloc_trim`` first: ``"called"`` or ``"skipped: <reason>"``); on CUDA also
            ``cuda_allocated_before_load_bytes`` / ``cuda_allocated_after_load_bytes`` /
            ``model_resident_cuda_allocated_bytes`` (torch's allocator) and
            ``nvml_process_after_load_bytes``. Host and device bytes are separate keys.
    """

    load_s: float
    load_call_s: float
    first_forward_s: float
    weight_bytes: int
    preparation: Preparation = field(default_factory=Preparation)
    details: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The record's ``load`` field: ``prepare`` holds the preparation, ``details`` the extras,
        and the ``memory`` keys sit at the top level (``load.model_resident_bytes``, ...)."""
        return {"load_s": self.load_s, "weight_bytes": self.weight_bytes, "load_call_s": self.load_call_s,
                "first_forward_s": self.first_forward_s, **self.memory, "prepare": self.preparation.to_dict(),
                "details": dict(self.details)}


@dataclass(frozen=True)
class GenerationRequest:
    """One batched greedy generation (vLLM's ``RequestFuncInput`` in spirit).

    Attributes:
        prompt_token_ids: ``[batch][n_in]`` token ids; lengths may differ.
        max_new_tokens: the most tokens to generate per prompt (>= 1).
        min_new_tokens: stop tokens are suppressed before this many; ``max_new_tokens`` gives an
            exact output length (latency runs).
        stop_token_ids: a sequence stops after emitting one of these or an end-of-sequence id.
        start_s: the TTFT origin, ``perf_counter()`` seconds, one point for every backend: stamped by
            ``Backend.generate`` once the request is validated, just before it is handed to the
            backend's ``_generate``, i.e. before any per-request work (padding, host-to-device
            copies, KV cache / sequence creation, ``model.generate`` set-up). Every backend reports
            it unchanged as ``GenerationOutput.start_s``. Defaults to the construction time.
    """

    prompt_token_ids: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    start_s: float = field(default_factory=time.perf_counter, compare=False)

    @property
    def batch(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def longest_prompt(self) -> int:
        return max(len(p) for p in self.prompt_token_ids)


@dataclass
class GenerationOutput:
    """The result of one batched greedy generation (vLLM's ``RequestFuncOutput`` in spirit).

    Attributes:
        token_ids: one list of generated token ids per prompt (prompt excluded), ``[batch][<= n_out]``.
        start_s: the request's ``GenerationRequest.start_s`` (``perf_counter()`` just before the
            backend received the validated prompt; see there).
        step_times_s: ``perf_counter()`` taken as each decoding step's tokens became available on
            the host, one per generated position (``len == max(len(t) for t in token_ids)``).
            ``step_times_s[0] - start_s`` is the time to first token (TTFT).
        extra: measurements taken during this call: ``kv_cache_bytes`` (bytes the KV cache holds at
            the end: payload, scales and any full-precision residual), ``kv_cache_bytes_prefill``
            (the same right after prefill), ``kv_cache_tokens`` where the backend can tell.
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

    Life cycle: ``availability(variant)`` -> ``__init__(variant, options)`` -> ``load(model)`` ->
    any number of ``generate`` / ``loglikelihood`` / ``memory`` calls -> ``close()``.

    Class attributes:
        name: registry key, e.g. ``"hf"``.
        variants: variant name -> one-line description, e.g. ``{"nf4": "bitsandbytes 4-bit NormalFloat"}``.
        default_variants: what ``--backends NAME`` alone expands to.
        Options: the typed options (a ``BackendOptions`` subclass).

    Raises (construction):
        BackendError: an unknown variant, or options that ``Options`` or ``check_options`` reject.
    """

    name: ClassVar[str]
    variants: ClassVar[dict[str, str]]
    default_variants: ClassVar[tuple[str, ...]]
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    # Modules the engine runs on, imported by ``load`` before its memory baseline
    # (``rss_before_load_bytes``) so that library code is not counted as the model's memory.
    runtime_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, variant: str, options: Mapping[str, Any] | BackendOptions | None = None):
        if variant not in self.variants:
            raise BackendError(
                f"unknown variant {self.name}:{variant}; choose from {', '.join(self.variants)}"
            )
        self.variant = variant
        try:
            self.options = parse_options(self.Options, self.name, options)
        except OptionError as exc:
            raise BackendError(str(exc)) from None
        self.check_options()
        self.special: SpecialTokens | None = None
        self.spec: ModelSpec | None = None
        # The cache entry ``prepare`` found sound and reads (None on a build or with no cache): if
        # reading it raises, ``load`` discards it and prepares again (``backends.artifact_cache``).
        self.cached_entry: CacheEntry | None = None
        self._prepared_s = 0.0

    @property
    def label(self) -> str:
        """``name:variant``, the row label in every table."""
        return f"{self.name}:{self.variant}"

    @property
    def threads(self) -> int:
        """The CPU threads the engine computes with: option ``threads``, else the physical cores."""
        from backends.device import physical_cores

        return self.options.threads or physical_cores()

    @classmethod
    def availability(cls, variant: str) -> Availability:
        """Whether ``variant`` can run here; the reason names the missing package or device."""
        return Availability.yes()

    def check_options(self) -> None:
        """Checks that depend on the variant (the options model checks the rest).

        Raises:
            BackendError: with the option named.
        """

    # --- loading ---------------------------------------------------------------------------------
    def load(self, model: ModelSpec) -> LoadReport:
        """Prepare (cached), load and make ``model`` ready; the clock is this method's, the same
        for every backend (see ``LoadReport``).

        A cache entry that fails its manifest check is rebuilt by the code that checks it
        (``backends.artifact_cache``). If reading an entry that passed (``cached_entry``, set by
        ``prepare`` on a cache hit) raises in the rest of ``prepare``, in ``_load`` or in the first
        generation, that entry is discarded and the whole preparation and load run once more (not
        for out-of-memory errors); a second failure is raised. Every rebuild is one line in
        ``details["cache_rebuilt"]`` and a ``CacheRebuildWarning``.

        Raises:
            BackendError: unavailable here, or the model cannot be prepared or loaded.
        """
        availability = self.availability(self.variant)
        if not availability.ok:
            raise BackendError(f"{self.label}: {availability.reason}")
        self._seed()
        with collect_rebuilds() as rebuilds:
            started = time.perf_counter()
            try:
                directory = checkpoint_dir(model)
            except ModelError as exc:
                raise BackendError(f"{self.label}: {exc}") from None
            spent = 0.0  # preparation seconds of a first attempt that failed
            for attempt in (1, 2):
                self.cached_entry = None
                try:
                    report = self._prepare_and_load(model, directory, started)
                    break
                except Exception as exc:
                    entry = self.cached_entry
                    if attempt == 2 or entry is None or _out_of_memory(exc):
                        raise
                    spent += self._prepared_s
                    message = (str(exc).strip().splitlines() or [""])[0][:200]
                    note_rebuild(entry.title, f"loading it raised {type(exc).__name__}: {message}")
                    entry.discard()
                    self.close()
                    started = time.perf_counter()
        report.preparation.wall_s += spent
        if rebuilds:
            report.details["cache_rebuilt"] = "; ".join(rebuilds)
        return report

    def _prepare_and_load(self, model: ModelSpec, directory: Path, started: float) -> LoadReport:
        """One attempt of ``load`` after the checkpoint: prepare, ``_load``, the first token."""
        self._prepared_s = 0.0
        preparation = self.prepare(model, directory)
        checkpoint = checkpoint_facts(directory)
        preparation.checkpoint_s = checkpoint.get("prepare_s")
        preparation.checkpoint_peak_bytes = checkpoint.get("peak_rss_bytes")
        preparation.wall_s = self._prepared_s = time.perf_counter() - started
        self.special = SpecialTokens.from_checkpoint(directory)
        self.spec = model
        from backends.memory import LoadMemory

        memory = LoadMemory(self.runtime_modules)  # imports, trims and reads RSS: before the clock
        begin = time.perf_counter()
        loaded = self._load(model, directory)
        called = time.perf_counter()
        first = self.generate([[self.special.eos_ids[0] if self.special.eos_ids else 0]], 1, min_new_tokens=1)
        ready = first.step_times_s[0]
        return LoadReport(ready - begin, called - begin, ready - called, int(loaded.weight_bytes),
                          preparation, dict(loaded.details), memory.finish())

    def _seed(self) -> None:
        random.seed(self.options.seed)
        np.random.seed(self.options.seed)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.manual_seed(self.options.seed)

    def prepare(self, model: ModelSpec, directory: Path) -> Preparation:
        """One-time, cached work before ``_load`` (export, quantize, convert, compile). A backend
        with a cache checks its entry (``backends.artifact_cache.CacheEntry``), rebuilds a corrupt
        one, and sets ``self.cached_entry`` to the entry on a cache hit.

        Args:
            model: the model. directory: its local checkpoint (already converted).

        Raises:
            BackendError: the artifact cannot be built.
        """
        return Preparation()

    @abc.abstractmethod
    def _load(self, model: ModelSpec, directory: Path) -> LoadedModel:
        """Load the prepared model from ``directory`` / the artifact cache into memory.

        Raises:
            BackendError: the model cannot be loaded in this variant (with the reason).
        """

    def _require_loaded(self, what: str) -> SpecialTokens:
        if self.special is None:
            raise BackendError(f"{self.label}: {what}() before load()")
        return self.special

    # --- generation and scoring ------------------------------------------------------------------
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
            prompt_token_ids: ``[batch][n_in]`` token ids; prompts may differ in length.
            max_new_tokens: the most tokens to generate per prompt (>= 1).
            min_new_tokens: suppress stop tokens before this many tokens.
            stop_token_ids: generation of a sequence stops after it emits one of these (the stop
                token is included in its output); end-of-sequence always stops unless suppressed.

        Returns:
            a ``GenerationOutput`` with per-step host timestamps taken as tokens were produced;
            ``start_s`` is stamped here (``GenerationRequest.start_s``), after validation and
            right before ``_generate``, so TTFT starts at the same point for every backend.

        Raises:
            BackendError: before ``load()``, no/empty prompts, an id outside the vocabulary,
                ``max_new_tokens < 1``, or a backend that reports another start than the request's.
        """
        special = self._require_loaded("generate")
        try:
            check_prompts(self.label, prompt_token_ids, special.vocab_size)
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        if max_new_tokens < 1:
            raise BackendError(f"{self.label}: max_new_tokens must be >= 1, got {max_new_tokens}")
        prompts = tuple(tuple(int(t) for t in p) for p in prompt_token_ids)
        stops = tuple(int(t) for t in stop_token_ids)
        # The TTFT origin (the same point for every backend): the request is validated and
        # converted; everything per-request from here on (padding, KV cache, engine set-up) is timed.
        request = GenerationRequest(prompts, int(max_new_tokens), int(min_new_tokens or 0), stops,
                                    start_s=time.perf_counter())
        output = self._generate(request)
        if output.start_s != request.start_s:
            raise BackendError(f"{self.label}: _generate must report request.start_s as start_s "
                               "(the TTFT origin is stamped by Backend.generate)")
        return output

    @abc.abstractmethod
    def _generate(self, request: GenerationRequest) -> GenerationOutput:
        """Serve a validated request; end-of-sequence ids are ``self.special.eos_ids``.

        Returns a ``GenerationOutput`` whose ``start_s`` is ``request.start_s`` (do not stamp
        another start: per-request set-up belongs to the time to first token)."""

    def loglikelihood(self, windows: Sequence[ScoringWindow]) -> list[np.ndarray]:
        """Per-token log-probabilities (natural log, float64) of each window's scored positions.

        Returns:
            one array per window, shape ``[window.n_scored]``.

        Raises:
            BackendError: before ``load()``, or a token id outside the vocabulary.
        """
        return [self.score_window(window).logprobs for window in windows]

    def score_window(self, window: ScoringWindow, *, keep_topk: int = 0,
                     reference: CompactLogprobs | None = None) -> WindowScore:
        """Score one window from the backend's logits (``_score_logits``): the target tokens'
        log-probabilities and, when asked, the compact top-k distributions (a baseline) or the
        per-token agreement with a baseline's (``backends.scoring``). The logits of one window
        (float32 ``[n_scored, vocab]``: 100 MB at 512 x 49152) are dropped before returning.

        Args:
            window: the tokens and how many of them are context only.
            keep_topk: > 0: also return ``CompactLogprobs`` with this many tokens per position.
            reference: a baseline's ``CompactLogprobs`` for this window's scored positions: also
                return per-token KLD(base || this backend) and top-1 agreement.

        Raises:
            BackendError: before ``load()``, a token id outside the vocabulary, logits of the wrong
                shape, or a ``reference`` of another length.
        """
        special = self._require_loaded("loglikelihood")
        if window.n_scored == 0:
            return WindowScore(np.zeros(0))
        try:
            check_prompts(self.label, [window.token_ids], special.vocab_size)
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        logits = np.asarray(self._score_logits(window), dtype=np.float32)
        if logits.ndim != 2 or logits.shape[0] != window.n_scored:
            raise BackendError(f"{self.label}: logits of shape {logits.shape} for {window.n_scored} scored tokens")
        if reference is not None and len(reference) != window.n_scored:
            raise BackendError(f"{self.label}: baseline has {len(reference)} positions, the window "
                               f"scores {window.n_scored}")
        return score_rows(logits, np.asarray(window.token_ids[window.first_scored:]), keep_topk, reference)

    @abc.abstractmethod
    def _score_logits(self, window: ScoringWindow) -> np.ndarray:
        """float32 ``[window.n_scored, vocab]`` logits of one validated, non-empty window: row ``j``
        is the distribution of the token at position ``window.first_scored + j`` given the tokens
        before it (the logits at positions ``first_scored - 1 .. n - 2``). ``vocab`` is the
        model's output width (it may exceed the tokenizer's)."""

    # --- the pre-flight memory estimate (backends.footprint) -----------------------------------
    def weight_bytes_estimate(self, shape: "ModelShape") -> int:
        """Bytes the variant's weights take once loaded (``backends.footprint``); the default is
        every parameter in float32. Backends with other storage override it."""
        return shape.weight_bytes(linear=4, embed=4)

    def kv_element_bytes(self) -> float:
        """Bytes per cached K or V element (the default: float32)."""
        return 4.0

    def preparation_bytes_estimate(self, shape: "ModelShape") -> int:
        """Host memory a cold-cache preparation needs beyond the process: streamed conversions hold
        one float32 matrix and a working set (``tests/test_streaming_prep.py`` checks the bound)."""
        from backends.footprint import WORKING_SET_BYTES

        return shape.largest_matrix_params * 4 + WORKING_SET_BYTES

    def estimate_memory(self, shape: "ModelShape", tokens: int, batch: int) -> "MemoryEstimate":
        """What this variant needs to run ``batch`` sequences of ``tokens`` tokens (bytes, host and
        device apart: ``backends.footprint.MemoryEstimate.build``)."""
        from backends.footprint import MemoryEstimate

        return MemoryEstimate.build(getattr(self, "device", None) or "cpu", self.weight_bytes_estimate(shape),
                                    shape.kv_bytes(tokens, batch, self.kv_element_bytes()),
                                    shape.working_bytes(tokens, batch), self.preparation_bytes_estimate(shape))

    # --- description ------------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Current memory use in bytes: ``rss`` always; ``cuda_allocated``, ``cuda_reserved``,
        ``cuda_max_allocated`` where the backend runs on CUDA."""
        from backends.memory import process_memory

        return process_memory()

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Self-description for the results: ``backend`` (label), ``library`` versions, ``device``,
        ``threads``, ``compute_dtype``, ``attn_implementation``, ``kv_cache`` (dict), and
        ``quantization`` (dict with at least ``format``)."""

    def close(self) -> None:
        """Release the model. The default forgets the special tokens; backends drop their state too."""
        self.special = None


# Registered backends: name -> "module:Class". Imported lazily so that a missing optional
# dependency (bitsandbytes, onnxruntime, tvm) disables only that backend, with its reason.
REGISTRY: dict[str, str] = {
    "hf": "backends.hf.backend:TransformersBackend",
    "bnb": "backends.hf_bnb.backend:BitsAndBytesBackend",
    "onnx": "backends.onnx.backend:OnnxRuntimeBackend",
    "kvq": "backends.kvq.backend:KVQuantBackend",
    "mlc": "backends.mlc.backend:MLCBackend",
    "llamacpp": "backends.llamacpp.backend:LlamaCppBackend",
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
