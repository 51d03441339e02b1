"""The transformers baseline, and the torch machinery every transformers-based backend shares.

``TransformersBackend`` implements the whole ``Backend`` contract for a ``*ForCausalLM``:
subclasses (bitsandbytes, quantized KV cache) override only how the model is loaded
(``torch_load_options``), what generation is given (``generation_kwargs``) and how they describe
themselves (``info``), so timing, scoring and accounting are the same code for all of them.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import numpy as np

from backends.base import (
    Availability,
    Backend,
    BackendError,
    GenerationOutput,
    LoadReport,
    ScoringWindow,
    left_pad,
    stop_token_set,
    trim_at_stop,
)
from backends.models import ModelSpec, TorchLoadOptions, checkpoint_dir, load_causal_lm, prepare_seconds


@functools.lru_cache(maxsize=1)
@functools.cache
def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def default_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``: GPU paths are chosen automatically."""
    return "cuda" if cuda_available() else "cpu"


def dtype_availability(dtype: str, device: str) -> Availability:
    """Whether ``device`` computes in ``dtype`` natively (emulated half precision is not offered:
    its numbers would measure the emulation, not the format)."""
    import torch

    if dtype == "float32":
        return Availability.yes()
    if device == "cuda":
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            return Availability.no("this GPU has no bf16 support")
        return Availability.yes()
    flags = cpu_flags()
    if dtype == "bfloat16" and not flags & {"avx512_bf16", "amx_bf16"}:
        return Availability.no("needs CUDA or a CPU with AVX512-BF16/AMX-BF16; this CPU emulates bf16")
    if dtype == "float16" and not flags & {"avx512_fp16", "amx_fp16"}:
        return Availability.no("needs CUDA or a CPU with AVX512-FP16/AMX-FP16; this CPU emulates fp16")
    return Availability.yes()


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


def kv_fp16_analytic_bytes(config, tokens: int) -> int:
    """The size an fp16 KV cache of ``tokens`` cached positions would have, in bytes:
    ``2 (K and V) x layers x kv_heads x head_dim x tokens x 2 bytes`` (the standard KV-cache size
    formula, e.g. Pope et al. 2022, "Efficiently Scaling Transformer Inference", section 2).

    Args:
        config: a transformers model config (its text config is used); ``head_dim`` defaults to
            ``hidden_size // num_attention_heads``, ``num_key_value_heads`` to the head count.
        tokens: cached positions summed over the batch (``batch x sequence length``).
    """
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * 2


def cache_tokens(cache, batch: int) -> int:
    """Cached positions in ``cache`` summed over the batch (padding included: it is stored)."""
    return int(cache.get_seq_length()) * batch


class TransformersBackend(Backend):
    """Hugging Face transformers, unquantized: the baseline every other row is compared with.

    Options (``--backend-option key=value``): ``attn`` (``sdpa`` default, ``eager``), ``threads``
    (torch intra-op threads; default: torch's own, i.e. the physical cores).
    """

    name = "hf"
    variants = {
        "fp32": "transformers, fp32 weights and compute",
        "bf16": "transformers, bf16 weights and compute",
        "fp16": "transformers, fp16 weights and compute",
    }
    default_variants = ("fp32", "bf16", "fp16")
    _DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

    def __init__(self, variant: str, options: dict[str, Any] | None = None):
        super().__init__(variant, options)
        self.model = None
        self.spec: ModelSpec | None = None
        self.device = self.options.get("device") or default_device()

    # --- what subclasses vary -------------------------------------------------------------
    @classmethod
    def availability(cls, variant: str) -> Availability:
        return dtype_availability(cls._DTYPES.get(variant, "float32"), default_device())

    @property
    def compute_dtype(self) -> str:
        return self._DTYPES[self.variant]

    def torch_load_options(self) -> TorchLoadOptions:
        """How to build the model (dtype, device, attention, quantization config)."""
        return TorchLoadOptions(
            dtype=self.compute_dtype,
            device=self.device,
            attn_implementation=self.options.get("attn", "sdpa"),
        )

    def generation_kwargs(self) -> dict[str, Any]:
        """Extra ``model.generate`` arguments."""
        return {}

    def new_cache(self):
        """A fresh, empty KV cache for one generation or scoring pass (a transformers ``Cache``).
        The default is the ``DynamicCache`` ``generate`` would build itself; the quantized-KV
        backend returns its quantized / hybrid caches."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def quantization_info(self) -> dict[str, Any]:
        """The weight format, for ``info()``."""
        return {"format": self.compute_dtype, "weights": "unquantized"}

    def extra_weight_bytes(self) -> int:
        """Quantization state stored outside parameters and buffers (bytes)."""
        return 0

    # --- the contract -----------------------------------------------------------------------
    def load(self, model: ModelSpec) -> LoadReport:
        import torch

        if "threads" in self.options:
            torch.set_num_threads(int(self.options["threads"]))
        directory = checkpoint_dir(model)  # one-time GGUF conversion / random init is cached
        ready = time.perf_counter()
        try:
            self.model = load_causal_lm(model, self.torch_load_options())
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            raise BackendError(f"{self.label}: cannot load {model.name}: {exc}") from exc
        self.spec = model
        finished = time.perf_counter()
        extra = {"checkpoint_prepare_s": prepare_seconds(directory)}
        return LoadReport(finished - ready, self.weight_bytes(), extra)

    def weight_bytes(self) -> int:
        return module_weight_bytes(self.model) + self.extra_weight_bytes()

    def _synchronize(self):
        import torch

        return torch.cuda.synchronize if self.device == "cuda" else None

    def _pad_batch(self, prompt_token_ids: Sequence[Sequence[int]]):
        """Left-padded ``input_ids`` and ``attention_mask`` torch tensors ``[batch, n]`` on the device."""
        import torch

        ids, mask = left_pad(prompt_token_ids, self.pad_token_id)
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    @property
    def pad_token_id(self) -> int:
        config = self.model.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else self.model.config.pad_token_id
        if pad is None:
            pad = self.eos_token_ids[0]
        return int(pad)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        min_new_tokens: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> GenerationOutput:
        import torch

        if self.model is None:
            raise BackendError(f"{self.label}: generate() before load()")
        input_ids, attention_mask = self._pad_batch(prompt_token_ids)
        stop_ids = stop_token_set(self.eos_token_ids, stop_token_ids)
        cache = self.new_cache()
        extra: dict[str, Any] = {}
        batch = input_ids.shape[0]

        def measure_prefill() -> None:
            extra["kv_cache_bytes_prefill"] = cache_bytes(cache)
            extra["kv_cache_tokens_prefill"] = cache_tokens(cache, batch)

        timer = TokenTimer(self._synchronize(), on_first_step=measure_prefill)
        with torch.inference_mode():
            start = time.perf_counter()
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens or 0,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stop_ids,
                pad_token_id=self.pad_token_id,
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
            [trim_at_stop(row, stops) for row in new_tokens], start, timer.step_times_s, extra
        )

    def forward_logprobs(self, token_ids: Sequence[int], first_scored: int) -> np.ndarray:
        """Log-probabilities of ``token_ids[first_scored:]`` from one forward pass over the window.

        Returns:
            float64 array ``[len(token_ids) - first_scored]``.
        """
        import torch

        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False).logits[0, first_scored - 1 : -1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            picked = logprobs.gather(-1, ids[0, first_scored:].unsqueeze(-1)).squeeze(-1)
        return picked.double().cpu().numpy()

    def loglikelihood(self, windows: Sequence[ScoringWindow]) -> list[np.ndarray]:
        if self.model is None:
            raise BackendError(f"{self.label}: loglikelihood() before load()")
        return [
            self.forward_logprobs(w.token_ids, w.first_scored) if w.n_scored else np.zeros(0)
            for w in windows
        ]

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
            "kv_cache": {"type": "DynamicCache", "dtype": self.compute_dtype},
            "quantization": self.quantization_info(),
        }

    def close(self) -> None:
        self.model = None
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()
