"""bitsandbytes weight quantization on top of the transformers backend.

Variants (Dettmers et al.): ``int8`` is LLM.int8() (vector-wise int8 with fp16 outlier
decomposition, threshold 6.0; arXiv:2208.07339); ``nf4`` / ``fp4`` are 4-bit NormalFloat / float
with block size 64 (QLoRA, arXiv:2305.14314); ``nf4-dq`` adds double quantization of the
block scales. bitsandbytes >= 0.48 ships CPU kernels, so every variant runs on CPU as well as CUDA.

Which kernel a 4-bit matmul runs on CPU depends on the machine and on an optional package, and
bitsandbytes falls back silently (a log line at most); ``cpu_4bit_matmul_path`` reads it back after
load and ``info()["quantization"]["matmul_path"]`` records it.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Literal

from pydantic import Field

from backends.base import Availability
from backends.hf.backend import TransformersBackend, TransformersOptions
from backends.models import TorchLoadOptions


KERNELS_COMMUNITY = "kernels-community gemm_4bit_forward"
NATIVE_GEMV = "bitsandbytes native gemv_4bit_inference_cpu (bf16)"
DEQUANTIZE = "dequantize_4bit + torch matmul"


def cpu_4bit_matmul_path(model) -> dict[str, Any]:
    """The kernel bitsandbytes runs for ``model``'s 4-bit matmuls on CPU, read after a forward pass.

    How bitsandbytes 0.50 decides (``bitsandbytes/nn/modules.py`` ``Linear4bit.forward``,
    ``autograd/_functions.py`` ``matmul_4bit``, ``backends/cpu/ops.py``): with its native CPU
    library on a CPU with AVX512-BF16 (``functional.has_avx512bf16``), a layer's first forward
    repacks its weight (``quant_state.packing_format_for_cpu``) and every later matmul goes to the
    ``gemv_4bit`` op, which casts activations and block scales to bfloat16 and calls either the
    kernels-community ``gemm_4bit_forward`` kernel (fetched through the ``kernels`` package when
    ``backends.cpu.ops`` was imported: ``gemm_4bit_forward_kernel`` is not None) or, when that
    failed, the library's own ``gemv_4bit_inference_cpu_{nf4,fp4}_bf16``. Otherwise ``gemm_4bit``
    dequantizes the weight and runs a torch matmul in the compute dtype.

    Args:
        model: a loaded transformers model with ``bitsandbytes.nn.Linear4bit`` layers, after at
            least one forward pass (``Backend.load`` runs one).

    Returns:
        ``kernel``: ``KERNELS_COMMUNITY``, ``NATIVE_GEMV`` or ``DEQUANTIZE``; ``activation_dtype``
        ("bfloat16" on the first two, else None: the compute dtype); ``packed_layers`` /
        ``layers_4bit``: layers repacked for the fused kernel / all 4-bit layers;
        ``kernels_package``: whether the ``kernels`` package is importable; ``note``: why the
        kernels-community kernel is not used, when it is not.
    """
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    packed = sum(bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))
                 for m in layers)
    cpu_ops = sys.modules.get("bitsandbytes.backends.cpu.ops")
    community = getattr(cpu_ops, "gemm_4bit_forward_kernel", None) if cpu_ops is not None else None
    has_kernels = importlib.util.find_spec("kernels") is not None
    if packed == 0:
        kernel, note = DEQUANTIZE, ("weights not repacked for the fused CPU kernel (no AVX512-BF16, or no "
                                    "native bitsandbytes CPU library)")
    elif community is not None:
        kernel, note = KERNELS_COMMUNITY, None
    else:
        kernel = NATIVE_GEMV
        note = ("the kernels package is not installed" if not has_kernels else
                "kernels could not fetch kernels-community/quantization-bitsandbytes (offline?)")
        note += ": bitsandbytes fell back to its slower native kernel"
    return {"kernel": kernel, "activation_dtype": "bfloat16" if packed else None, "packed_layers": packed,
            "layers_4bit": len(layers), "kernels_package": has_kernels, "note": note}


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
    runtime_modules = TransformersBackend.runtime_modules + ("bitsandbytes", "transformers.integrations.bitsandbytes")

    @classmethod
    def availability(cls, variant: str) -> Availability:
        if importlib.util.find_spec("bitsandbytes") is None:
            return Availability.no("bitsandbytes is not installed: pip install quantarena[bnb]")
        return Availability.yes()

    @property
    def compute_dtype(self) -> str:
        return self.options.compute_dtype or ("float16" if self.device == "cuda" else "float32")

    def weight_bytes_estimate(self, shape) -> int:
        """Linear layers at int8 (LLM.int8) or 4 bits plus one float32 absmax per block of 64
        (double quantization: one int8 absmax per 64 and one float32 per 256 of those); the
        embedding, lm_head and norms in the compute dtype."""
        linear = {"int8": 1.0, "nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256)}.get(self.variant, 0.5 + 4 / 64)
        size = {"float32": 4, "float16": 2, "bfloat16": 2}[self.compute_dtype]
        return shape.weight_bytes(linear=linear, embed=size, norm=size)

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
        info = {"format": f"bnb-{self.variant}", "bitsandbytes": bitsandbytes.__version__,
                "config": {k: str(v) for k, v in keep.items()}}
        if self.variant != "int8" and self.model is not None:
            info["matmul_path"] = (cpu_4bit_matmul_path(self.model) if self.device == "cpu" else
                                   {"kernel": "bitsandbytes CUDA gemm_4bit (not inspected)"})
        return info
