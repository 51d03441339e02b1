"""Weight quantization of the exported fp32 decoder with onnxruntime's own quantizers.

``int8``: dynamic quantization (``onnxruntime.quantization.quantize_dynamic``): MatMul weights are
stored as int8 (symmetric; per output channel or per tensor) and each MatMul becomes
``DynamicQuantizeLinear`` (uint8 activations, one scale per tensor computed at run time) +
``MatMulInteger``. Only MatMuls with a constant weight are touched (``MatMulConstBOnly``); the
embedding ``Gather`` stays fp32. Nodes named in ``exclude`` keep fp32.

``int4``: block-wise weight-only quantization to 4 bits (``MatMulNBitsQuantizer``): each MatMul
with a constant weight becomes a ``com.microsoft.MatMulNBits`` node with packed 4-bit weights and
one fp32 scale per ``block_size`` input rows. ``rtn`` (round to nearest, ORT's DEFAULT algorithm)
is symmetric by default (asymmetric adds one 4-bit zero point per block); ``hqq`` (Half-Quadratic
Quantization, Badri & Shaji 2023) optimises a float zero point per block. Activations stay fp32
(``accuracy_level`` 0) or are quantized to int8 inside the kernel (``accuracy_level`` 4).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backends.base import BackendError

LM_HEAD_NODE = "/lm_head/MatMul"  # optimum's node name for the output projection of a *ForCausalLM


@dataclass(frozen=True)
class Int8Settings:
    """Dynamic INT8 settings (see the module docstring and docs/backends/onnx.md for the study
    that chose the defaults: first-1024-token WikiText-2 perplexity on SmolLM2-135M).

    Attributes:
        per_channel: one scale per output channel of each weight (else one per tensor).
        reduce_range: 7-bit weights (for CPUs without VNNI, where int8 x uint8 can saturate).
        exclude: node names kept in fp32, e.g. ``("/lm_head/MatMul",)``; a regular expression is
            not accepted, names must match exactly.
    """

    per_channel: bool = True
    reduce_range: bool = False
    exclude: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"method": "quantize_dynamic", "weight_type": "QInt8", "ops": ["MatMul"], **asdict(self),
                "exclude": list(self.exclude)}


@dataclass(frozen=True)
class Int4Settings:
    """4-bit MatMulNBits settings.

    Attributes:
        block_size: input rows sharing one scale (power of two >= 16).
        symmetric: no zero points (else one 4-bit zero point per block); ``rtn`` only.
        accuracy_level: 0 (fp32 activations; unset) or 1-4 (4 = int8 activations in the kernel).
        algorithm: ``rtn`` or ``hqq``.
        exclude: node names kept in fp32.
    """

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    algorithm: str = "rtn"
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.algorithm not in ("rtn", "hqq"):
            raise BackendError(f"int4 algorithm must be rtn or hqq, got {self.algorithm!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise BackendError(f"int4 block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise BackendError(f"int4 accuracy_level must be 0..4, got {self.accuracy_level}")

    def to_dict(self) -> dict[str, Any]:
        data = {"method": "MatMulNBits", "bits": 4, **asdict(self), "exclude": list(self.exclude)}
        if self.algorithm == "hqq":
            data["symmetric"] = False  # HQQ always fits a (float) zero point
        return data


@contextlib.contextmanager
def _root_logging_untouched():
    """onnxruntime's ``matmul_nbits_quantizer`` calls ``logging.basicConfig(level=INFO)`` on import
    and logs every node at INFO; keep the process's root logger as it was (handlers and level)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


def quantize_int8(source: Path, target: Path, settings: Int8Settings) -> float:
    """Write the dynamic-INT8 version of ``source`` (an fp32 .onnx) to ``target``; returns seconds.

    Raises:
        BackendError: the quantizer failed (message in one line).
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise BackendError(f"onnx int8 needs onnxruntime: pip install quantarena[onnx] ({exc})") from None
    started = time.perf_counter()
    try:
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=["MatMul"],
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(settings.exclude),
            use_external_data_format=source.stat().st_size > 1_900_000_000,  # protobuf's 2 GB limit
            extra_options={"MatMulConstBOnly": True},
        )
    except Exception as exc:
        raise BackendError(f"onnx int8 quantization failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return time.perf_counter() - started


def quantize_int4(source: Path, target: Path, settings: Int4Settings) -> float:
    """Write the 4-bit MatMulNBits version of ``source`` to ``target``; returns seconds.

    Raises:
        BackendError: the quantizer failed, or its module cannot be imported (onnxruntime's
            ``matmul_nbits_quantizer`` imports the package ``onnx-ir``).
    """
    try:
        import onnx

        with _root_logging_untouched():
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                HQQWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )
    except ImportError as exc:
        raise BackendError(
            f"onnx int4 needs onnxruntime's MatMulNBits quantizer and its dependency onnx-ir: "
            f"pip install quantarena[onnx] ({exc})"
        ) from None
    started = time.perf_counter()
    try:
        if settings.algorithm == "hqq":
            config = HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=4)
        else:
            config = DefaultWeightOnlyQuantConfig(
                block_size=settings.block_size,
                is_symmetric=settings.symmetric,
                accuracy_level=settings.accuracy_level or None,
                bits=4,
            )
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(source)),
            block_size=settings.block_size,
            is_symmetric=settings.symmetric,
            accuracy_level=settings.accuracy_level or None,
            nodes_to_exclude=list(settings.exclude),
            algo_config=config,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(
            str(target), use_external_data_format=source.stat().st_size > 1_900_000_000
        )
    except Exception as exc:
        raise BackendError(f"onnx int4 quantization failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return time.perf_counter() - started
