"""bitsandbytes weight quantization on top of the transformers backend.

Variants (Dettmers et al.): ``int8`` is LLM.int8() (vector-wise int8 with fp16 outlier
decomposition, threshold 6.0; arXiv:2208.07339); ``nf4`` / ``fp4`` are 4-bit NormalFloat / float
with block size 64 (QLoRA, arXiv:2305.14314); ``nf4-dq`` adds double quantization of the
block scales. bitsandbytes >= 0.48 ships CPU kernels, so every variant runs on CPU as well as CUDA.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import Field

from backends.base import Availability
from backends.hf.backend import TransformersBackend, TransformersOptions
from backends.models import TorchLoadOptions


class BitsAndBytesOptions(TransformersOptions):
    """``bnb`` options: the transformers ones plus the 4-bit matmul compute dtype."""

    compute_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="dtype of the 4-bit matmuls; default float16 on CUDA, float32 on CPU")


class BitsAndBytesBackend(TransformersBackend):
    """transformers + bitsandbytes quantized linear layers (embeddings and lm_head stay unquantized,
    as transformers' bitsandbytes integration does).

    Options: ``BitsAndBytesOptions``.
    """

    name = "bnb"
    variants = {
        "int8": "bitsandbytes LLM.int8() (int8 weights, fp16 outliers above 6.0)",
        "nf4": "bitsandbytes 4-bit NormalFloat, block 64",
        "fp4": "bitsandbytes 4-bit float, block 64",
        "nf4-dq": "bitsandbytes NF4 with double-quantized block scales",
    }
    default_variants = ("int8", "nf4", "fp4", "nf4-dq")
    Options = BitsAndBytesOptions

    @classmethod
    def availability(cls, variant: str) -> Availability:
        if importlib.util.find_spec("bitsandbytes") is None:
            return Availability.no("bitsandbytes is not installed: pip install quantarena[bnb]")
        return Availability.yes()

    @property
    def compute_dtype(self) -> str:
        return self.options.compute_dtype or ("float16" if self.device == "cuda" else "float32")

    def quantization_config(self):
        import torch
        from transformers import BitsAndBytesConfig

        if self.variant == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4" if self.variant == "fp4" else "nf4",
            bnb_4bit_use_double_quant=self.variant == "nf4-dq",
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
        )

    def torch_load_options(self) -> TorchLoadOptions:
        options = super().torch_load_options()
        options.quantization_config = self.quantization_config()
        return options

    def extra_weight_bytes(self) -> int:
        """Block absmax / nested scales (4-bit) and row scales SCB (int8), which bitsandbytes keeps
        outside the parameters."""
        import torch

        total = 0
        for module in self.model.modules():
            weight = getattr(module, "weight", None)
            state = getattr(weight, "quant_state", None)
            if state is not None:
                tensors = [state.absmax, state.code]
                if getattr(state, "state2", None) is not None:
                    tensors += [state.state2.absmax, state.state2.code]
                total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            scb = getattr(weight, "SCB", None)
            if isinstance(scb, torch.Tensor):
                total += scb.numel() * scb.element_size()
        return total

    def quantization_info(self) -> dict[str, Any]:
        import bitsandbytes

        config = self.quantization_config().to_dict()
        prefix = "llm_int8_threshold" if self.variant == "int8" else "bnb_4bit"
        keep = {k: v for k, v in config.items() if k.startswith(prefix)}
        return {"format": f"bnb-{self.variant}", "bitsandbytes": bitsandbytes.__version__,
                "config": {k: str(v) for k, v in keep.items()}}
