"""The transformers baseline, and the torch machinery every transformers-based backend shares.

``TransformersBackend`` implements the whole ``Backend`` contract for a ``*ForCausalLM``:
subclasses (bitsandbytes, quantized KV cache) override only how the model is loaded
(``torch_load_options``), what generation is given (``generation_kwargs``) and how they describe
themselves (``info``), so timing, scoring and accounting are the same code for all of them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from backends.base import (
    Availability,
    Backend,
    BackendError,
    GenerationOutput,
    GenerationRequest,
    LoadedModel,
    ScoringWindow,
)
from backends.device import default_device, dtype_availability
from backends.kv import kv_fp16_analytic_bytes
from backends.models import ModelError, ModelSpec, TorchLoadOptions, load_causal_lm
from backends.options import BackendOptions, check_sink_window
from backends.tokens import left_pad, stop_token_set, trim_at_stop



def _itemsize(dtype: str) -> int:
    """Bytes per element of a torch dtype name (``"bfloat16"`` -> 2)."""
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]

class TransformersOptions(BackendOptions):
    """Options of the transformers backends (``hf``, and the ``bnb`` / ``kvq`` ones built on it)."""

    attn: Literal["sdpa", "eager"] = Field("sdpa", description="attention implementation")
    sliding_window: int = Field(0, ge=0, description="StreamingLLM cache: keep only the last N tokens' KV "
                                "(plus the sink; 0 = off)")
    attention_sink: int = Field(0, ge=0, description="with a sliding window, also keep the first N tokens")
    window_chunk: int = Field(256, ge=1, description="tokens per forward when scoring through the "
                              "sliding-window cache (exact for any value: an explicit mask)")

    @model_validator(mode="after")
    def _sink_within_window(self):
        check_sink_window(self.sliding_window, self.attention_sink)
        return self


class TokenTimer:
    """A transformers generation streamer that timestamps every decoding step as it is produced.

    transformers calls ``put`` once with the prompt and then once per step with that step's new
    tokens ``[batch]`` (after sampling, before the next forward). On CUDA the stream is
    synchronised first so the stamp is when the token exists, not when its kernel was queued.

    Args:
        synchronize: called before each stamp (``torch.cuda.synchronize`` on CUDA), or None.
        on_first_step: called once, right after the first step's stamp (the prefill has then
            finished and the cache holds exactly the prompt), e.g. to measure the KV cache; its
            cost falls into the second step's interval, not into TTFT.
    """

    def __init__(self, synchronize=None, on_first_step=None):
        self.step_times_s: list[float] = []
        self._seen_prompt = False
        self._synchronize = synchronize
        self._on_first_step = on_first_step

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        if self._synchronize is not None:
            self._synchronize()
        self.step_times_s.append(time.perf_counter())
        if self._on_first_step is not None and len(self.step_times_s) == 1:
            self._on_first_step()

    def end(self) -> None:
        pass


def module_weight_bytes(model) -> int:
    """Bytes of a torch module's parameters and buffers as stored (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def weight_groups(model) -> dict[str, list[str]]:
    """Which weight matrices a torch model holds quantized and which at full precision, by module
    kind (the last part of the module name: ``q_proj``, ``embed_tokens``, ``lm_head``, ...).

    Only matrices (weights of two or more dimensions) are listed; norm vectors are always kept.
    A weight counts as quantized when it is a bitsandbytes parameter (``Params4bit``,
    ``Int8Params``) or has a non-floating dtype. A kind quantized in some layers only reads
    ``q_proj (3/4)``; ``lm_head`` tied to the embedding says so. An unquantized model gives
    ``{"quantized": [], "kept": ["all (<dtype>)"]}``.
    """
    import torch

    counts: dict[str, list[int]] = {}  # kind -> [quantized, kept]
    dtypes: dict[str, set[str]] = {}
    owners: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        kind = name.rsplit(".", 1)[-1]
        pointer = weight.data_ptr()
        if pointer in owners:
            tied[kind] = owners[pointer]
        owners.setdefault(pointer, kind)
        quantized = type(weight).__name__ in ("Params4bit", "Int8Params") or not weight.dtype.is_floating_point
        counts.setdefault(kind, [0, 0])[0 if quantized else 1] += 1
        if not quantized:
            dtypes.setdefault(kind, set()).add(str(weight.dtype).replace("torch.", ""))

    def describe(kind: str, index: int) -> str:
        q, k = counts[kind]
        text = kind if (q if index == 0 else k) == q + k else f"{kind} ({q if index == 0 else k}/{q + k})"
        extras = sorted(dtypes.get(kind, ())) if index == 1 else []
        if kind in tied:
            extras.append(f"tied to {tied[kind]}")
        return f"{text} ({', '.join(extras)})" if extras else text

    quantized = [describe(kind, 0) for kind, (q, _) in counts.items() if q]
    if not quantized:
        all_dtypes = sorted(set().union(*dtypes.values())) if dtypes else []
        return {"quantized": [], "kept": [f"all ({', '.join(all_dtypes)})"]}
    return {"quantized": quantized, "kept": [describe(kind, 1) for kind, (_, k) in counts.items() if k]}


def cache_bytes(cache) -> int:
    """Bytes held by every tensor reachable from a transformers cache object (each storage once):
    keys and values, and for quantized caches their packed payload, scales and zero points and the
    full-precision residual. Walks attributes generically so new cache classes are counted too;
    tensor subclasses that wrap other tensors (``__tensor_flatten__``) are counted by their parts."""
    import torch

    seen: set[int] = set()
    total = 0
    stack = [cache]
    visited: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in visited or obj is None:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor) and hasattr(obj, "__tensor_flatten__"):
            # a wrapper tensor subclass (optimum-quanto's packed / quantized tensors) owns no
            # storage itself: count the plain tensors it is made of (payload, scale, shift)
            stack.extend(getattr(obj, name) for name in obj.__tensor_flatten__()[0])
        elif isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
            stack.extend(vars(obj).values())
    return total


def cache_tokens(cache, batch: int) -> int:
    """Cached positions in ``cache`` summed over the batch (padding included: it is stored); for a
    ``SinkWindowCache`` the positions it holds, not the tokens it has seen."""
    held = getattr(cache, "held_positions", None)
    return (len(held()) if held is not None else int(cache.get_seq_length())) * batch


class TransformersBackend(Backend):
    """Hugging Face transformers, unquantized: the baseline every other row is compared with.

    Options: ``TransformersOptions`` (``attn``) and the shared ``device`` / ``threads`` / ``seed``.
    """

    name = "hf"
    variants = {
        "fp32": "transformers, fp32 weights and compute",
        "bf16": "transformers, bf16 weights and compute",
        "fp16": "transformers, fp16 weights and compute",
    }
    default_variants = ("fp32", "bf16", "fp16")
    Options = TransformersOptions
    _DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    runtime_modules = ("torch", "transformers", "transformers.modeling_utils", "transformers.generation.utils")

    def __init__(self, variant: str, options=None):
        super().__init__(variant, options)
        self.model = None
        self.device = default_device() if self.options.device == "auto" else self.options.device

    # --- what subclasses vary -------------------------------------------------------------
    @classmethod
    def availability(cls, variant: str) -> Availability:
        return dtype_availability(cls._DTYPES.get(variant, "float32"), default_device())

    @property
    def compute_dtype(self) -> str:
        return self._DTYPES[self.variant]

    def weight_bytes_estimate(self, shape) -> int:
        """Every parameter in the compute dtype."""
        size = _itemsize(self.compute_dtype)
        return shape.weight_bytes(linear=size, embed=size, norm=size)

    def kv_element_bytes(self) -> float:
        return float(_itemsize(self.compute_dtype))

    def torch_load_options(self) -> TorchLoadOptions:
        """How to build the model (dtype, device, attention, quantization config)."""
        return TorchLoadOptions(dtype=self.compute_dtype, device=self.device,
                                attn_implementation=self.options.attn)

    def generation_kwargs(self) -> dict[str, Any]:
        """Extra ``model.generate`` arguments."""
        return {}

    def new_cache(self):
        """A fresh, empty KV cache for one generation or scoring pass (a transformers ``Cache``).
        The default is the ``DynamicCache`` ``generate`` would build itself; the quantized-KV
        backend returns its quantized / hybrid caches. With ``sliding_window`` set it is a
        ``SinkWindowCache`` (StreamingLLM sink + window, ``backends.hf.sink_cache``)."""
        if self.options.sliding_window:
            from backends.hf.sink_cache import SinkWindowCache

            return SinkWindowCache(self.model.config, self.options.sliding_window, self.options.attention_sink)
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def quantization_info(self) -> dict[str, Any]:
        """The weight format, for ``info()``."""
        return {"format": self.compute_dtype, "weights": "unquantized"}

    def extra_weight_bytes(self) -> int:
        """Quantization state stored outside parameters and buffers (bytes)."""
        return 0

    # --- the contract -----------------------------------------------------------------------
    def _load(self, model: ModelSpec, directory: Path) -> LoadedModel:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"{self.label}: device=cuda but torch sees no CUDA device")
        torch.set_num_threads(self.threads)
        try:
            self.model = load_causal_lm(model, self.torch_load_options())
        except (OSError, ValueError, RuntimeError, ImportError, ModelError) as exc:
            raise BackendError(f"{self.label}: cannot load {model.name}: {exc}") from exc
        return LoadedModel(self.weight_bytes())

    def weight_bytes(self) -> int:
        return module_weight_bytes(self.model) + self.extra_weight_bytes()

    def _synchronize(self):
        import torch

        return torch.cuda.synchronize if self.device == "cuda" else None

    def _generate(self, request: GenerationRequest) -> GenerationOutput:
        """``model.generate`` with a ``TokenTimer``; the TTFT origin is ``request.start_s`` (before
        padding, the device copy, the new cache and ``generate``'s own set-up)."""
        import torch

        ids, mask = left_pad(request.prompt_token_ids, self.special.pad_id)
        if self.options.sliding_window and not mask.all():
            raise BackendError(f"{self.label}: sliding_window needs prompts of equal length in a batch "
                               "(left padding would sit in the attention sink)")
        input_ids = torch.from_numpy(ids).to(self.device)
        attention_mask = torch.from_numpy(mask).to(self.device)
        stop_ids = stop_token_set(self.special.eos_ids, request.stop_token_ids)
        cache = self.new_cache()
        extra: dict[str, Any] = {}
        batch = input_ids.shape[0]

        def measure_prefill() -> None:
            extra["kv_cache_bytes_prefill"] = cache_bytes(cache)
            extra["kv_cache_tokens_prefill"] = cache_tokens(cache, batch)

        timer = TokenTimer(self._synchronize(), on_first_step=measure_prefill)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=request.max_new_tokens,
                min_new_tokens=request.min_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stop_ids,
                pad_token_id=self.special.pad_id,
                streamer=timer,
                past_key_values=cache,
                return_dict_in_generate=True,
                **self.generation_kwargs(),
            )
        new_tokens = output.sequences[:, input_ids.shape[1]:].tolist()
        stops = set(stop_ids)
        extra["kv_cache_bytes"] = cache_bytes(output.past_key_values)
        extra["kv_cache_tokens"] = cache_tokens(output.past_key_values, batch)
        extra["kv_cache_bytes_fp16_analytic"] = kv_fp16_analytic_bytes(
            self.model.config, extra["kv_cache_tokens"]
        )
        return GenerationOutput(
            [trim_at_stop(row, stops) for row in new_tokens], request.start_s, timer.step_times_s, extra
        )

    def _score_logits(self, window: ScoringWindow) -> np.ndarray:
        """One forward pass over the window (no cache); float32 ``[window.n_scored, vocab]``.
        With ``sliding_window`` set, every token goes through a ``SinkWindowCache`` instead, in
        chunks of ``window_chunk`` with the exact sink + window mask (``sink_window_logits``)."""
        import torch

        if self.options.sliding_window:
            from backends.hf.sink_cache import sink_window_logits

            return sink_window_logits(self.model, self.new_cache(), window.token_ids, window.first_scored,
                                      self.options.window_chunk, self.device)
        ids = torch.tensor([list(window.token_ids)], dtype=torch.long, device=self.device)
        # the LM head only where a scored token is predicted (~9% less work at 512 of 1024 scored
        # on SmolLM2, whose 49,152 x 576 head is a fifth of the model; the GEMM's row count changes
        # its blocking, so logits may differ in the last float32 bit: default-suite perplexities
        # moved by < 1e-8 relative)
        kept = torch.arange(window.first_scored - 1, len(window.token_ids) - 1, device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=kept).logits[0]
        return logits.float().cpu().numpy()

    def info(self) -> dict[str, Any]:
        import torch
        import transformers

        config = self.model.config if self.model is not None else None
        return {
            "backend": self.label,
            "library": {"torch": torch.__version__, "transformers": transformers.__version__},
            "device": self.device,
            "threads": torch.get_num_threads(),
            "compute_dtype": self.compute_dtype,
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "kv_cache": self.window_info() or {"type": "DynamicCache", "dtype": self.compute_dtype},
            "quantization": {**self.quantization_info(),
                             **(weight_groups(self.model) if self.model is not None else {})},
        }

    def window_info(self) -> dict[str, Any]:
        """The sink + sliding-window cache's settings for ``info()`` ({} when it is off)."""
        o = self.options
        if not o.sliding_window:
            return {}
        return {"type": "SinkWindowCache", "dtype": self.compute_dtype, "sliding_window": o.sliding_window,
                "attention_sink": o.attention_sink,
                "held": "first attention_sink + last sliding_window positions (window excludes the sink, "
                        "as mlc)",
                "positions": "keys keep their original RoPE positions (not re-positioned in the cache)",
                "scoring": f"every token through the cache, chunks of {o.window_chunk} with an exact mask"}

    def close(self) -> None:
        super().close()
        self.model = None
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()
