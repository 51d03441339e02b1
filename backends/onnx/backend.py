"""ONNX Runtime backend: the optimum-exported decoder with KV cache, fp32 / dynamic INT8 / 4-bit.

The model is exported once from ``checkpoint_dir(spec)`` (the same weights every other backend
reads), quantized with onnxruntime's own quantizers, and cached on disk (``artifacts.py``). The
decoding loop is ours, over one ``InferenceSession`` with I/O binding: prefill of the left-padded
batch with an empty past, then one token per step with the previous step's ``present`` tensors
bound as ``past_key_values`` (they stay on the device), so decode is incremental and every step is
stamped with ``perf_counter`` as its tokens exist on the host. Generation sets the graph's
``logits_to_keep`` input (``export.add_logits_to_keep``) to 1: prefill runs the ``lm_head`` on the
last position only and copies ``[batch, 1, vocab]`` to the host, as the other backends do; scoring
sets it to 0 (every position).

Execution provider: ``CUDAExecutionProvider`` when a CUDA device is visible and onnxruntime-gpu is
installed (``pip install quantarena[gpu]``), else ``CPUExecutionProvider``; the provider actually
used (``session.get_providers()[0]``) and why CUDA was not used are recorded in ``info()``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, field_validator

from backends.base import (Availability, Backend, BackendError, GenerationOutput, GenerationRequest, LoadedModel,
                           Preparation, ScoringWindow, largest_peak)
from backends.decoding import greedy_decode
from backends.device import cuda_available
from backends.kv import kv_bytes_per_token
from backends.models import ModelSpec, checkpoint_identity
from backends.onnx import artifacts
from backends.onnx.export import LOGITS_TO_KEEP
from backends.onnx.quantize import Int4Settings, Int8Settings
from backends.options import BackendOptions
from backends.tokens import left_pad, stop_token_set

# Down projections of the MLP and the first and last decoder layers stay fp32 in the default
# int8 graph: dynamic INT8 quantizes activations per tensor, and the inputs of down_proj (and of
# the outermost layers) carry outliers that one uint8 scale cannot represent. The study behind
# this choice is in docs/backends/onnx.md.
DEFAULT_INT8_EXCLUDE_PATTERNS = ("/mlp/down_proj/", "/layers.0/", "/layers.{last}/")



# Peak memory optimum's export adds, per byte of fp32 weights (backends.memory.StepPeak around
# export_decoder, this machine, optimum-onnx of pyproject.toml): tiny-llama 220 MB for 12.9 MB;
# SmolLM2-135M 2.67 GB for 538 MB (x4.96); bf16 Llamas of 158 M and 442 M parameters 2.71 GB for
# 633 MB (x4.27) and 7.42 GB for 1.77 GB (x4.20). Llama-3-8B would need about 160 GB.
EXPORT_PEAK_PER_FP32_BYTE = 5.0
EXPORT_PEAK_CONSTANT = 256 * 2**20

class OnnxOptions(BackendOptions):
    """``onnx`` options; ``threads`` is ONNX Runtime's ``intra_op_num_threads`` (inter-op: 1)."""

    int8_per_channel: bool = Field(True, description="int8: one scale per output channel (else per tensor)")
    int8_reduce_range: bool = Field(False, description="int8: 7-bit weights (CPUs without VNNI)")
    int8_exclude: str = Field("default", description="int8: MatMuls kept fp32: default (down_proj, first "
                              "and last layer), none, or ;-separated node-name substrings")
    int4_block_size: int = Field(32, ge=16, description="int4: input rows per scale (power of two >= 16)")
    int4_symmetric: bool = Field(True, description="int4: no zero points (rtn only)")
    int4_algorithm: Literal["rtn", "hqq"] = Field("rtn", description="int4: round-to-nearest or HQQ")
    int4_accuracy_level: int = Field(0, ge=0, le=4, description="int4: 0 = fp32 activations, 4 = int8 in the kernel")

    @field_validator("int4_block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two >= 16")
        return value


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime over the optimum export of a ``*ForCausalLM`` (decoder with past key values).

    Options: ``OnnxOptions`` (``python -m harness list --options onnx``).
    """

    name = "onnx"
    variants = {
        "fp32": "ONNX Runtime, optimum export, fp32 (this backend's reference)",
        "int8": "ONNX Runtime dynamic INT8 MatMuls (per-channel weights, sensitive layers fp32)",
        "int4": "ONNX Runtime MatMulNBits 4-bit block-wise weight-only (RTN, symmetric, block 32)",
    }
    default_variants = ("fp32", "int8", "int4")
    Options = OnnxOptions
    runtime_modules = ("onnxruntime",)

    def __init__(self, variant: str, options=None):
        super().__init__(variant, options)
        self.session = None
        self.artifact: artifacts.Artifact | None = None
        self.provider_note: str | None = None
        self._layout: dict[str, Any] = {}
        self._weight_groups: dict[str, list[str]] = {}

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
        not used and why.

        Raises:
            BackendError: ``device=cuda`` where the CUDA provider cannot run.
        """
        import onnxruntime as ort

        wanted = self.options.device
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
        choice = self.options.int8_exclude
        if choice == "default":
            patterns = tuple(p.replace("{last}", str(n_layers - 1)) for p in DEFAULT_INT8_EXCLUDE_PATTERNS)
        elif choice == "none":
            patterns = ()
        else:
            patterns = tuple(p for p in choice.split(";") if p)
        return Int8Settings(per_channel=self.options.int8_per_channel,
                            reduce_range=self.options.int8_reduce_range, exclude=patterns)

    def int4_settings(self) -> Int4Settings:
        """The int4 settings from the options (defaults: RTN, symmetric, block 32, fp32 activations)."""
        o = self.options
        return Int4Settings(block_size=o.int4_block_size, symmetric=o.int4_symmetric,
                            accuracy_level=o.int4_accuracy_level, algorithm=o.int4_algorithm)

    def settings(self, n_layers: int) -> dict[str, Any]:
        """Every option that changes the graph for this variant (part of the cache key)."""
        if self.variant == "int8":
            return self.int8_settings(n_layers).to_dict()
        if self.variant == "int4":
            return self.int4_settings().to_dict()
        return {"method": "none", "task": artifacts.EXPORT_TASK}

    # --- the pre-flight estimate (backends.footprint) ----------------------------------------
    def weight_bytes_estimate(self, shape) -> int:
        """MatMul weights at the variant's size (int8: 1 byte; int4: 4 bits and an fp32 scale per
        block), the embedding (a Gather) and norms fp32. int8 keeps its default exclusions fp32
        (every down_proj, the first and last layers; other exclusion lists are estimated as the
        default). The lm_head is counted even when tied: the graph holds its own copy."""
        if self.variant == "fp32":
            linear = 4.0
            quantized = shape.linear_params
        elif self.variant == "int8":
            linear = 1.0
            quantized = shape.linear_params
            if self.options.int8_exclude != "none":
                per_layer = shape.linear_params // shape.layers
                quantized = max(0, shape.layers - 2) * (per_layer - shape.hidden * shape.intermediate)
        else:
            linear = 0.5 + 4 / self.options.int4_block_size
            quantized = shape.linear_params
        # a tied lm_head stays fp32 in both quantizers (tiny-llama's and SmolLM2's int8 and int4
        # graphs list it as kept)
        head = shape.vocab * shape.hidden * (4.0 if shape.tied else linear)
        return int(quantized * linear + (shape.linear_params - quantized) * 4 + shape.embed_params * 4
                   + head + shape.norm_params * 4)

    def preparation_bytes_estimate(self, shape) -> int:
        """optimum's export (torch tracing and the ONNX protobuf) holds several copies of the fp32
        weights: ``EXPORT_PEAK_PER_FP32_BYTE`` x the fp32 parameter bytes, measured."""
        return int(EXPORT_PEAK_PER_FP32_BYTE * shape.params * 4) + EXPORT_PEAK_CONSTANT

    # --- building the graph ------------------------------------------------------------------
    def _fp32_artifact(self, directory: Path, identity: str) -> artifacts.Artifact:
        from backends.onnx.export import export_decoder

        def build(target: Path) -> dict[str, float]:
            from backends.memory import StepPeak

            with StepPeak() as peak:
                seconds = export_decoder(directory, target)
            return {"export_s": seconds, "export_peak_bytes": peak.growth_bytes}

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
        identity = checkpoint_identity(directory)
        fp32 = self._fp32_artifact(directory, identity)
        if self.variant == "fp32":
            return fp32
        n_layers = self._n_layers(directory)
        settings = self.settings(n_layers)

        def build(target: Path) -> dict[str, float]:
            from backends.memory import StepPeak

            exclude = self._expand_exclusions(fp32.model_path, settings["exclude"])
            with StepPeak() as peak:
                seconds = self._quantize(fp32.model_path, target, n_layers, exclude)
            return {"export_s": fp32.manifest["export_s"], "quantize_s": seconds,
                    "export_peak_bytes": fp32.manifest.get("export_peak_bytes"),
                    "quantize_peak_bytes": peak.growth_bytes}

        artifact = artifacts.get_or_build(self.spec.name, self.variant, identity, settings, build,
                                          check=self._check_loads)
        artifact.export_done_now = not fp32.cache_hit
        return artifact

    def _quantize(self, source: Path, target: Path, n_layers: int, exclude: tuple[str, ...]) -> float:
        """Quantize the fp32 graph ``source`` into ``target`` for this variant; returns seconds."""
        from backends.onnx.quantize import quantize_int4, quantize_int8

        if self.variant == "int8":
            base = self.int8_settings(n_layers)
            return quantize_int8(source, target / artifacts.MODEL_FILE,
                                 Int8Settings(base.per_channel, base.reduce_range, exclude))
        base = self.int4_settings()
        return quantize_int4(source, target / artifacts.MODEL_FILE,
                             Int4Settings(base.block_size, base.symmetric, base.accuracy_level,
                                          base.algorithm, exclude))

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
    def prepare(self, model: ModelSpec, directory: Path) -> Preparation:
        """Export (and quantize) once into the artifact cache; the device is checked first."""
        self.spec = model
        self._providers()  # a device the machine cannot give fails before any export
        self.artifact = self._artifact(directory)
        self.cached_entry = artifacts.cache_entry(self.artifact.directory) if self.artifact.cache_hit else None
        self._weight_groups = artifacts.cached_weight_groups(self.artifact.directory, self.artifact.model_path)
        manifest = self.artifact.manifest
        return Preparation(export_s=manifest["export_s"], quantize_s=manifest["quantize_s"],
                           artifact_bytes=int(manifest["artifact_bytes"]),
                           peak_rss_bytes=largest_peak(manifest.get("export_peak_bytes"), manifest.get("quantize_peak_bytes")),
                           artifact_dir=str(self.artifact.directory), cache_hit=self.artifact.cache_hit)

    def _load(self, model: ModelSpec, directory: Path) -> LoadedModel:
        import onnxruntime as ort

        providers = self._providers()
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
        self._layout = self._read_layout()
        manifest = self.artifact.manifest
        details = {"folded_weight_bytes": manifest["folded_weight_bytes"], "provider": self.provider,
                   "export_done_now": self.artifact.export_done_now}
        return LoadedModel(int(manifest["weight_bytes"]), details)

    def _read_layout(self) -> dict[str, Any]:
        """Input/output names and the KV shape and dtype of the session."""
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if not past:
            raise BackendError(f"{self.label}: the exported graph has no past_key_values inputs")
        first = past[0]
        input_names = {i.name for i in self.session.get_inputs()}
        if LOGITS_TO_KEEP not in input_names:
            raise BackendError(f"{self.label}: the exported graph has no {LOGITS_TO_KEEP} input "
                               f"(an export from before it was added): delete {self.artifact.directory}")
        return {
            "past_names": [p.name for p in past],
            "present_names": [p.name.replace("past_key_values.", "present.") for p in past],
            "kv_heads": int(first.shape[1]),
            "head_dim": int(first.shape[3]),
            "kv_dtype": np.float16 if first.type == "tensor(float16)" else np.float32,
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
            last_only: compute only the last position's logits (``logits_to_keep = 1``: the graph
                runs ``lm_head`` on that position alone) and return ``[batch, vocab]`` (prefill and
                decode), else compute and return all ``[batch, seq, vocab]`` (``logits_to_keep = 0``).

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
        # a shape argument: stays on the host (ORT copies it if a device kernel needs it)
        binding.bind_cpu_input(LOGITS_TO_KEEP, np.array(1 if last_only else 0, dtype=np.int64))
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
        logits = outputs[0].numpy()  # [batch, 1, vocab] when last_only, else [batch, seq, vocab]
        if last_only:
            logits = logits[:, -1, :]
        return logits, list(outputs[1:])

    _ELEMENT_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2}

    @classmethod
    def _kv_bytes(cls, presents: list) -> int:
        """Bytes held by the ``present`` key/value OrtValues ``[batch, kv_heads, seq, head_dim]``."""
        return int(sum(int(np.prod(v.shape())) * cls._ELEMENT_BYTES[v.data_type()] for v in presents))

    @staticmethod
    def _kv_tokens(presents: list) -> int:
        """Cached positions summed over the batch (left padding included: it is stored):
        ``batch x seq`` of the first ``present`` ``[batch, kv_heads, seq, head_dim]``."""
        shape = presents[0].shape()
        return int(shape[0] * shape[2])

    def _generate(self, request: GenerationRequest) -> GenerationOutput:
        pad = self.special.pad_id
        input_ids, mask = left_pad(request.prompt_token_ids, pad)
        # Position ids as transformers computes them for left padding: cumsum(mask) - 1, pads at 1.
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
        state: dict[str, Any] = {"mask": mask}
        extra: dict[str, Any] = {}

        def prefill() -> np.ndarray:
            logits, state["presents"] = self._run(input_ids, mask, positions, None, last_only=True)
            return logits

        def step(chosen: np.ndarray, live: np.ndarray) -> np.ndarray:
            state["mask"] = np.concatenate([state["mask"], np.ones((request.batch, 1), dtype=np.int64)], axis=1)
            position = (state["mask"].sum(axis=1, keepdims=True) - 1).astype(np.int64)
            fed = np.where(live, chosen, pad)[:, None]
            logits, state["presents"] = self._run(fed, state["mask"], position, state["presents"], last_only=True)
            return logits

        def measure_prefill() -> None:
            extra["kv_cache_bytes_prefill"] = self._kv_bytes(state["presents"])
            extra["kv_cache_tokens_prefill"] = self._kv_tokens(state["presents"])

        out = greedy_decode(request, stop_token_set(self.special.eos_ids, request.stop_token_ids),
                            prefill, step, measure_prefill)
        extra["kv_cache_bytes"] = self._kv_bytes(state["presents"])
        extra["kv_cache_tokens"] = self._kv_tokens(state["presents"])
        layout = self._layout
        extra["kv_cache_bytes_fp16_analytic"] = kv_bytes_per_token(
            len(layout["present_names"]) // 2, layout["kv_heads"], layout["head_dim"], 2) * extra["kv_cache_tokens"]
        out.extra = extra
        return out

    def _score_logits(self, window: ScoringWindow) -> np.ndarray:
        """One forward pass per window (empty past, all-ones mask); float32 ``[n_scored, vocab]``."""
        ids = np.array([window.token_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        positions = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits, _ = self._run(ids, mask, positions, None, last_only=False)
        first = window.first_scored
        return np.asarray(logits[0, first - 1 : -1], dtype=np.float32)

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
            "quantization": {"format": f"onnx-{self.variant}", **manifest.get("settings", {"method": "none"}),
                             **self._weight_groups},
            "export": {"task": artifacts.EXPORT_TASK, "tool": "optimum.exporters.onnx.main_export",
                       "logits_to_keep": "input added after export; 1 in generation (last position only)"},
            "artifact_dir": str(self.artifact.directory) if self.artifact is not None else None,
        }

    def close(self) -> None:
        super().close()
        self.session = None
