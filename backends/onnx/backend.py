"""ONNX Runtime backend: the optimum-exported decoder with KV cache, fp32 / dynamic INT8 / 4-bit.

The model is exported once from ``checkpoint_dir(spec)`` (the same weights every other backend
reads), quantized with onnxruntime's own quantizers, and cached on disk (``artifacts.py``). The
decoding loop is ours, over one ``InferenceSession`` with I/O binding: prefill of the left-padded
batch with an empty past, then one token per step with the previous step's ``present`` tensors
bound as ``past_key_values`` (they stay on the device; only the last position's logits come to the
host), so decode is incremental and every step is stamped with ``perf_counter`` as its tokens
exist on the host.

Execution provider: ``CUDAExecutionProvider`` when a CUDA device is visible and onnxruntime-gpu is
installed (``pip install quantarena[gpu]``), else ``CPUExecutionProvider``; the provider actually
used (``session.get_providers()[0]``) and why CUDA was not used are recorded in ``info()``.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backends.base import (Availability, Backend, BackendError, GenerationOutput, LoadReport, ScoringWindow,
                           check_prompts, left_pad, stop_token_set, trim_at_stop)
from backends.hf.backend import cuda_available
from backends.models import ModelError, ModelSpec, checkpoint_dir, prepare_seconds
from backends.onnx import artifacts
from backends.onnx.quantize import Int4Settings, Int8Settings

# Down projections of the MLP and the first and last decoder layers stay fp32 in the default
# int8 graph: dynamic INT8 quantizes activations per tensor, and the inputs of down_proj (and of
# the outermost layers) carry outliers that one uint8 scale cannot represent. The study behind
# this choice is in docs/backends/onnx.md.
DEFAULT_INT8_EXCLUDE_PATTERNS = ("/mlp/down_proj/", "/layers.0/", "/layers.{last}/")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise BackendError(f"expected a boolean option value, got {value!r}")


def log_softmax_pick(logits: np.ndarray, targets: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``log softmax(logits)[i, targets[i]]`` for every row, in float64, ``chunk`` rows at a time.

    Args:
        logits: ``[n, vocab]`` float32.
        targets: ``[n]`` int token ids.

    Returns:
        float64 ``[n]`` natural-log probabilities.
    """
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), chunk):
        block = logits[start : start + chunk].astype(np.float64)
        peak = block.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(block - peak).sum(axis=-1)) + peak[:, 0]
        out[start : start + chunk] = block[np.arange(len(block)), targets[start : start + chunk]] - lse
    return out


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime over the optimum export of a ``*ForCausalLM`` (decoder with past key values).

    Options (``--backend-option key=value``):
        ``threads``: ``intra_op_num_threads`` (default ``torch.get_num_threads()``, what the torch
            backends use; inter-op threads are 1, sequential execution).
        ``device``: ``cpu`` or ``cuda`` (default: ``cuda`` when visible and onnxruntime-gpu is
            installed).
        ``int8_per_channel`` (default true), ``int8_exclude`` (``default``, ``none``, or a
            ``;``-separated list of node-name substrings kept fp32).
        ``int4_block_size`` (default 32), ``int4_symmetric`` (default true),
            ``int4_algorithm`` (``rtn`` default, ``hqq``), ``int4_accuracy_level`` (default 0: fp32
            activations).
    """

    name = "onnx"
    variants = {
        "fp32": "ONNX Runtime, optimum export, fp32 (this backend's reference)",
        "int8": "ONNX Runtime dynamic INT8 MatMuls (per-channel weights, sensitive layers fp32)",
        "int4": "ONNX Runtime MatMulNBits 4-bit block-wise weight-only (RTN, symmetric, block 32)",
    }
    default_variants = ("fp32", "int8", "int4")

    def __init__(self, variant: str, options: dict[str, Any] | None = None):
        super().__init__(variant, options)
        self.session = None
        self.spec: ModelSpec | None = None
        self.artifact: artifacts.Artifact | None = None
        self.threads: int | None = None
        self.provider_note: str | None = None
        self._layout: dict[str, Any] = {}

    # --- availability and settings -----------------------------------------------------------
    @classmethod
    def availability(cls, variant: str) -> Availability:
        for module, package in (("onnxruntime", "onnxruntime"), ("onnx", "onnx"),
                                ("optimum.exporters.onnx", "optimum-onnx")):
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return Availability.no(f"missing package {package}: pip install quantarena[onnx]")
        if variant == "int4" and importlib.util.find_spec("onnx_ir") is None:
            return Availability.no(
                "missing package onnx-ir (onnxruntime's MatMulNBits quantizer imports it): "
                "pip install quantarena[onnx]"
            )
        return Availability.yes()

    def _providers(self) -> list[str]:
        """The execution providers to ask for, best first; sets ``provider_note`` when CUDA is
        not used and why."""
        import onnxruntime as ort

        wanted = self.options.get("device")
        if wanted not in (None, "cpu", "cuda"):
            raise BackendError(f"{self.label}: device must be cpu or cuda, got {wanted!r}")
        has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
        visible = cuda_available() if wanted != "cpu" else False
        if wanted == "cpu":
            self.provider_note = "CPU requested (device=cpu)"
        elif not visible:
            self.provider_note = "no CUDA device visible: CPUExecutionProvider"
        elif not has_cuda_ep:
            self.provider_note = (
                "CUDA is visible but this onnxruntime has no CUDAExecutionProvider: "
                "pip install quantarena[gpu] (onnxruntime-gpu)"
            )
        else:
            self.provider_note = None
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if wanted == "cuda":
            raise BackendError(f"{self.label}: device=cuda requested but {self.provider_note}")
        return ["CPUExecutionProvider"]

    def int8_settings(self, n_layers: int) -> Int8Settings:
        """The int8 settings from the options (defaults: per-channel, down_proj and the first and
        last layers fp32)."""
        choice = str(self.options.get("int8_exclude", "default"))
        if choice == "default":
            patterns = tuple(p.replace("{last}", str(n_layers - 1)) for p in DEFAULT_INT8_EXCLUDE_PATTERNS)
        elif choice == "none":
            patterns = ()
        else:
            patterns = tuple(p for p in choice.split(";") if p)
        return Int8Settings(
            per_channel=_bool(self.options.get("int8_per_channel", True)),
            reduce_range=_bool(self.options.get("int8_reduce_range", False)),
            exclude=patterns,
        )

    def int4_settings(self) -> Int4Settings:
        """The int4 settings from the options (defaults: RTN, symmetric, block 32, fp32 activations).

        Raises:
            BackendError: a non-integer or out-of-range option.
        """
        try:
            return Int4Settings(
                block_size=int(self.options.get("int4_block_size", 32)),
                symmetric=_bool(self.options.get("int4_symmetric", True)),
                accuracy_level=int(self.options.get("int4_accuracy_level", 0)),
                algorithm=str(self.options.get("int4_algorithm", "rtn")),
            )
        except ValueError as exc:
            raise BackendError(f"{self.label}: bad int4 option: {exc}") from None

    def settings(self, n_layers: int) -> dict[str, Any]:
        """Every option that changes the graph for this variant (part of the cache key)."""
        if self.variant == "int8":
            return self.int8_settings(n_layers).to_dict()
        if self.variant == "int4":
            return self.int4_settings().to_dict()
        return {"method": "none", "task": artifacts.EXPORT_TASK}

    # --- building the graph ------------------------------------------------------------------
    def _fp32_artifact(self, directory: Path, identity: str) -> artifacts.Artifact:
        from backends.onnx.export import export_decoder

        def build(target: Path) -> dict[str, float]:
            return {"export_s": export_decoder(directory, target)}

        return artifacts.get_or_build(
            self.spec.name, "fp32", identity, {"method": "none", "task": artifacts.EXPORT_TASK},
            build, check=self._check_loads,
        )

    @staticmethod
    def _check_loads(model_path: Path) -> None:
        """Deep check of a cached graph: parse it (raises on a corrupt protobuf)."""
        import onnx

        onnx.load(str(model_path), load_external_data=False)

    def _artifact(self, directory: Path) -> artifacts.Artifact:
        identity = artifacts.checkpoint_identity(directory)
        fp32 = self._fp32_artifact(directory, identity)
        if self.variant == "fp32":
            return fp32
        n_layers = self._n_layers(directory)
        settings = self.settings(n_layers)

        def build(target: Path) -> dict[str, float]:
            from backends.onnx.quantize import quantize_int4, quantize_int8

            exclude = self._expand_exclusions(fp32.model_path, settings["exclude"])
            if self.variant == "int8":
                base = self.int8_settings(n_layers)
                seconds = quantize_int8(fp32.model_path, target / artifacts.MODEL_FILE,
                                        Int8Settings(base.per_channel, base.reduce_range, exclude))
            else:
                base = self.int4_settings()
                seconds = quantize_int4(fp32.model_path, target / artifacts.MODEL_FILE,
                                        Int4Settings(base.block_size, base.symmetric, base.accuracy_level,
                                                     base.algorithm, exclude))
            return {"export_s": fp32.manifest["export_s"], "quantize_s": seconds}

        artifact = artifacts.get_or_build(self.spec.name, self.variant, identity, settings, build,
                                          check=self._check_loads)
        artifact.export_done_now = not fp32.cache_hit
        return artifact

    @staticmethod
    def _n_layers(directory: Path) -> int:
        import json

        try:
            config = json.loads((directory / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot read {directory / 'config.json'}: {exc}") from None
        return int(config.get("num_hidden_layers", 0))

    @staticmethod
    def _expand_exclusions(model_path: Path, patterns: Sequence[str]) -> tuple[str, ...]:
        """Node names of weight MatMuls whose name contains one of ``patterns``."""
        if not patterns:
            return ()
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
        constants = {t.name for t in graph.initializer}
        return tuple(
            node.name for node in graph.node
            if node.op_type == "MatMul" and node.input[1] in constants
            and any(p in node.name for p in patterns)
        )

    # --- the contract ------------------------------------------------------------------------
    def load(self, model: ModelSpec) -> LoadReport:
        import onnxruntime as ort

        availability = self.availability(self.variant)
        if not availability.ok:
            raise BackendError(f"{self.label}: {availability.reason}")
        started = time.perf_counter()
        try:
            directory = checkpoint_dir(model)
        except ModelError as exc:
            raise BackendError(f"{self.label}: {exc}") from None
        self.spec = model
        resolved = time.perf_counter()
        # Options are checked before any export or quantization starts.
        providers = self._providers()
        self.threads = self._thread_count()
        self.settings(self._n_layers(directory))
        self.artifact = self._artifact(directory)
        built = time.perf_counter()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.artifact.model_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph exceptions
            raise BackendError(
                f"{self.label}: onnxruntime cannot load {self.artifact.model_path}: {str(exc)[:300]}"
            ) from exc
        if providers[0] == "CUDAExecutionProvider" and self.provider != "CUDAExecutionProvider":
            # onnxruntime falls back silently when the CUDA provider cannot start (cuDNN, driver).
            self.provider_note = f"CUDAExecutionProvider failed to initialise; ran on {self.provider}"
        self._layout = self._read_layout(directory)
        finished = time.perf_counter()
        manifest = self.artifact.manifest
        extra = {
            "export_s": manifest["export_s"],
            "quantize_s": manifest["quantize_s"],
            "artifact_bytes": manifest["artifact_bytes"],
            "folded_weight_bytes": manifest["folded_weight_bytes"],
            "cache_hit": self.artifact.cache_hit,
            "export_done_now": self.artifact.export_done_now,
            "build_s": built - resolved,  # export/quantize done in this call (0-ish on a cache hit)
            "session_s": finished - built,
            "resolve_s": resolved - started,
            "checkpoint_prepare_s": prepare_seconds(directory),
            "artifact_dir": str(self.artifact.directory),
            "provider": self.provider,
            "threads": self.threads,
        }
        if self.artifact.rebuilt_reason:
            extra["cache_rebuilt"] = self.artifact.rebuilt_reason
        # load_s: as for the other backends, the wall time of making the model ready from the
        # local checkpoint in this call (includes any export / quantization done now).
        return LoadReport(finished - resolved, int(manifest["weight_bytes"]), extra)

    def _thread_count(self) -> int:
        import torch

        value = self.options.get("threads")
        try:
            threads = int(value) if value is not None else torch.get_num_threads()
        except ValueError:
            raise BackendError(f"{self.label}: threads must be an integer, got {value!r}") from None
        if threads < 1:
            raise BackendError(f"{self.label}: threads must be >= 1, got {threads}")
        return threads

    def _read_layout(self, directory: Path) -> dict[str, Any]:
        """Input/output names, KV shape and dtype, vocabulary and special tokens of the session."""
        from transformers import GenerationConfig

        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if not past:
            raise BackendError(f"{self.label}: the exported graph has no past_key_values inputs")
        first = past[0]
        kv_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        import json

        config = json.loads((directory / "config.json").read_text())
        try:
            generation = GenerationConfig.from_pretrained(directory)
            eos = generation.eos_token_id
            pad = generation.pad_token_id
        except OSError:
            eos, pad = None, None
        eos = eos if eos is not None else config.get("eos_token_id")
        eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        pad = pad if pad is not None else config.get("pad_token_id")
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        input_names = {i.name for i in self.session.get_inputs()}
        return {
            "past_names": [p.name for p in past],
            "present_names": [p.name.replace("past_key_values.", "present.") for p in past],
            "kv_heads": int(first.shape[1]),
            "head_dim": int(first.shape[3]),
            "kv_dtype": kv_dtype,
            "vocab": int(logits.shape[2]) if isinstance(logits.shape[2], int) else int(config["vocab_size"]),
            "eos_ids": eos_ids,
            "pad_id": int(pad),
            "has_position_ids": "position_ids" in input_names,
        }

    @property
    def provider(self) -> str | None:
        return self.session.get_providers()[0] if self.session is not None else None

    @property
    def _device(self) -> str:
        return "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    # --- running the graph -------------------------------------------------------------------
    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list | None, last_only: bool):
        """One forward pass with I/O binding.

        Args:
            input_ids, position_ids: ``[batch, seq]`` int64; attention_mask ``[batch, past + seq]``.
            past: the previous step's ``present`` OrtValues (in graph order), or None for prefill.
            last_only: return only the last position's logits ``[batch, vocab]`` (decode), else
                all ``[batch, seq, vocab]``.

        Returns:
            ``(logits float32 numpy, present OrtValues)``; the presents stay on the device.
        """
        import onnxruntime as ort

        layout = self._layout
        binding = self.session.io_binding()
        device = self._device
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                            ("position_ids", position_ids)):
            if name == "position_ids" and not layout["has_position_ids"]:
                continue
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0))
        if past is None:
            empty = np.zeros((input_ids.shape[0], layout["kv_heads"], 0, layout["head_dim"]), layout["kv_dtype"])
            past = [ort.OrtValue.ortvalue_from_numpy(empty, device, 0)] * len(layout["past_names"])
        for name, value in zip(layout["past_names"], past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # logits always come to the host for argmax/scoring
        for name in layout["present_names"]:
            binding.bind_output(name, device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        if last_only:
            logits = logits[:, -1, :]
        return logits, list(outputs[1:])

    _ELEMENT_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2}

    @classmethod
    def _kv_bytes(cls, presents: list) -> int:
        """Bytes held by the ``present`` key/value OrtValues ``[batch, kv_heads, seq, head_dim]``."""
        return int(sum(int(np.prod(v.shape())) * cls._ELEMENT_BYTES[v.data_type()] for v in presents))

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        min_new_tokens: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> GenerationOutput:
        if self.session is None:
            raise BackendError(f"{self.label}: generate() before load()")
        if max_new_tokens < 1:
            raise BackendError(f"{self.label}: max_new_tokens must be >= 1, got {max_new_tokens}")
        check_prompts(self.label, prompt_token_ids, self._layout["vocab"])
        layout = self._layout
        batch = len(prompt_token_ids)
        input_ids, mask = left_pad(prompt_token_ids, layout["pad_id"])
        # Position ids as transformers computes them for left padding: cumsum(mask) - 1, pads at 1.
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
        stop_ids = stop_token_set(layout["eos_ids"], stop_token_ids)
        stops = np.array(stop_ids, dtype=np.int64)
        min_new = min_new_tokens or 0
        tokens = np.zeros((batch, 0), dtype=np.int64)
        finished = np.zeros(batch, dtype=bool)
        step_times: list[float] = []
        extra: dict[str, Any] = {}

        start = time.perf_counter()
        logits, presents = self._run(input_ids, mask, positions, None, last_only=True)
        for step in range(max_new_tokens):
            if step < min_new and len(stops):
                logits[:, stops] = -np.inf  # as transformers' MinNewTokensLengthLogitsProcessor
            chosen = logits.argmax(axis=-1).astype(np.int64)
            chosen = np.where(finished, layout["pad_id"], chosen)
            step_times.append(time.perf_counter())
            tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
            if step == 0:
                extra["kv_cache_bytes_prefill"] = self._kv_bytes(presents)
            finished |= np.isin(chosen, stops)
            if finished.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
            logits, presents = self._run(chosen[:, None], mask, positions, presents, last_only=True)
        extra["kv_cache_bytes"] = self._kv_bytes(presents)
        stop_set = set(stop_ids)
        return GenerationOutput([trim_at_stop(row, stop_set) for row in tokens.tolist()], start, step_times, extra)

    def loglikelihood(self, windows: Sequence[ScoringWindow]) -> list[np.ndarray]:
        """One forward pass per window (empty past, all-ones mask); float64 log-probs of the
        scored positions, ``[window.n_scored]`` each."""
        if self.session is None:
            raise BackendError(f"{self.label}: loglikelihood() before load()")
        results = []
        for window in windows:
            if window.n_scored == 0:
                results.append(np.zeros(0))
                continue
            check_prompts(self.label, [window.token_ids], self._layout["vocab"])
            ids = np.array([window.token_ids], dtype=np.int64)
            mask = np.ones_like(ids)
            positions = np.arange(ids.shape[1], dtype=np.int64)[None]
            logits, _ = self._run(ids, mask, positions, None, last_only=False)
            first = window.first_scored
            results.append(log_softmax_pick(logits[0, first - 1 : -1], ids[0, first:]))
        return results

    def memory(self) -> dict[str, int]:
        """``rss`` bytes; on CUDA also ``nvml_process`` (GPU memory of this process, which includes
        onnxruntime's CUDA arena) where pynvml is installed."""
        from backends.memory import nvml_process_bytes, process_memory

        snapshot = process_memory()
        if self._device == "cuda":
            gpu = nvml_process_bytes()
            if gpu is not None:
                snapshot["nvml_process"] = gpu
        return snapshot

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        manifest = self.artifact.manifest if self.artifact is not None else {}
        return {
            "backend": self.label,
            "library": {**manifest.get("versions", artifacts.library_versions()), "onnxruntime_runtime": ort.__version__},
            "provider": self.provider,
            "provider_note": self.provider_note,
            "device": self._device if self.session is not None else None,
            "threads": self.threads,
            "inter_op_threads": 1,
            "opset": manifest.get("opset"),
            "compute_dtype": "float32",
            "kv_cache": {"type": "ONNX past_key_values (I/O-bound OrtValues)", "dtype": "float32"},
            "quantization": {"format": f"onnx-{self.variant}", **manifest.get("settings", {"method": "none"})},
            "export": {"task": artifacts.EXPORT_TASK, "tool": "optimum.exporters.onnx.main_export"},
            "artifact_dir": str(self.artifact.directory) if self.artifact is not None else None,
        }

    def close(self) -> None:
        self.session = None
