"""KV-cache objects for the quantized-KV backend, built on transformers' cache-layer API.

* ``quantized_layer(...)``: one quantized cache layer. 2- and 4-bit use transformers'
  ``QuantoQuantizedLayer`` / ``HQQQuantizedLayer`` (KIVI-style: a quantized store plus a
  full-precision residual of at most ``residual_length`` recent tokens, re-quantized when full;
  Liu et al. 2024, arXiv:2402.02750). transformers' quanto layer stops at 4 bits, so 8-bit on the
  quanto backend is ``QuantoInt8Layer`` below: the same ``QuantizedLayer`` logic with
  optimum-quanto's symmetric absmax ``qint8`` per group.
* ``HybridPrecisionCache``: layer-wise selective precision (the first and last layers' KV kept
  unquantized, the middle ones quantized), which transformers does not ship.

transformers (a core dependency) is imported here; the backend module imports this module only
when it builds a cache. The optional packages (optimum-quanto, hqq) are imported inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from transformers.cache_utils import Cache, DynamicLayer, QuantizedLayer

QUANT_BACKENDS = ("quanto", "hqq")


@dataclass(frozen=True)
class KVQuantConfig:
    """How a quantized KV layer stores its tensors.

    Attributes:
        nbits: 2, 4 or 8 bits per stored key/value element.
        backend: ``"quanto"`` (optimum-quanto) or ``"hqq"``.
        q_group_size: elements sharing one scale (and zero point below 8 bits); with ``axis=0``
            the groups are consecutive elements of ``[batch, kv_heads, tokens, head_dim]``, i.e.
            per token and head along ``head_dim``. Must divide ``head_dim``.
        residual_length: the most recent tokens kept in full precision before re-quantizing.
        axis_key, axis_value: quantization axis for keys / values (quanto: 0 or -1; hqq: 0 or 1).
    """

    nbits: int
    backend: str = "quanto"
    q_group_size: int = 64
    residual_length: int = 128
    axis_key: int = 0
    axis_value: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class QuantoInt8Layer(QuantizedLayer):
    """transformers' ``QuantizedLayer`` (quantized store + full-precision residual) storing int8
    with optimum-quanto: a symmetric absmax scale per group of ``q_group_size`` consecutive
    elements (one scale in the model dtype per group, no zero point). transformers' own quanto
    layer accepts only 2 and 4 bits.

    Stored per group of G elements: G int8 bytes + one scale.

    Raises:
        ImportError: optimum-quanto is not installed.
    """

    def __init__(self, nbits=8, axis_key=0, axis_value=0, q_group_size=64, residual_length=128):
        super().__init__(8, axis_key, axis_value, q_group_size, residual_length)
        from optimum.quanto import AbsmaxOptimizer, qint8

        self.qtype = qint8
        self.optimizer = AbsmaxOptimizer()

    def _quantize(self, tensor, axis):
        from optimum.quanto import quantize_weight

        grouped = tensor.reshape(-1, self.q_group_size)  # [n_groups, G]: per-token groups
        scale = self.optimizer(grouped, self.qtype, 0)  # [n_groups, 1], model dtype
        return (quantize_weight(grouped, self.qtype, 0, scale, optimized=False), tensor.shape)

    def _dequantize(self, q_tensor):
        qtensor, shape = q_tensor
        return qtensor.dequantize().reshape(shape)


def quantized_layer(config: KVQuantConfig):
    """One quantized cache layer (a transformers ``CacheLayerMixin``).

    Raises:
        ValueError: ``nbits`` / axis not supported by the chosen backend.
        ImportError: the backend's package is not installed.
    """
    if config.backend == "hqq":
        from transformers.cache_utils import HQQQuantizedLayer

        layer_class = HQQQuantizedLayer
    elif config.backend == "quanto":
        if config.nbits == 8:
            layer_class = QuantoInt8Layer
        else:
            from transformers.cache_utils import QuantoQuantizedLayer

            layer_class = QuantoQuantizedLayer
    else:
        raise ValueError(f"unknown KV quantization backend {config.backend!r}; choose from {QUANT_BACKENDS}")
    return layer_class(
        nbits=config.nbits,
        axis_key=config.axis_key,
        axis_value=config.axis_value,
        q_group_size=config.q_group_size,
        residual_length=config.residual_length,
    )


def full_precision_layers(n_layers: int, n_first: int, n_last: int) -> list[int]:
    """Indices of the layers a hybrid cache keeps unquantized: the first ``n_first`` and the last
    ``n_last`` of ``n_layers`` (sorted, each once)."""
    if n_first < 0 or n_last < 0:
        raise ValueError("the number of full-precision layers cannot be negative")
    first = range(min(n_first, n_layers))
    last = range(max(0, n_layers - n_last), n_layers)
    return sorted(set(first) | set(last))


class HybridPrecisionCache(Cache):
    """Layer-wise mixed-precision KV cache (a transformers ``Cache`` of per-layer
    ``CacheLayerMixin`` objects): layers listed in ``full_layers`` keep their keys and values
    unquantized in a ``DynamicLayer`` (model dtype); the others use ``quantized_layer(quant)``
    (quantized store + full-precision residual). The first and last layers are the usual ones to
    protect, their attention being the most sensitive to KV error (layer-wise mixed precision as
    studied e.g. in KVTuner, arXiv:2502.04420).

    Args:
        model_config: the model's transformers config (``num_hidden_layers`` is read).
        full_layers: indices of the unquantized layers.
        quant: the ``KVQuantConfig`` of the quantized layers.

    Raises:
        ValueError: a layer index is out of range, or ``quant`` is not supported.
        ImportError: ``quant.backend``'s package is not installed.
    """

    def __init__(self, model_config, full_layers: Sequence[int], quant: KVQuantConfig):
        n_layers = model_config.get_text_config(decoder=True).num_hidden_layers
        self.full_layers = sorted(set(int(i) for i in full_layers))
        if any(i < 0 or i >= n_layers for i in self.full_layers):
            raise ValueError(f"full-precision layer index out of range 0..{n_layers - 1}")
        self.quant = quant
        layers = [
            DynamicLayer() if index in self.full_layers else quantized_layer(quant)
            for index in range(n_layers)
        ]
        super().__init__(layers=layers)


def uniform_quantized_cache(model_config, quant: KVQuantConfig):
    """transformers' ``QuantizedCache`` (every layer quantized alike) for 2/4 bits, or the same
    structure with ``QuantoInt8Layer`` for 8 bits on quanto (a hybrid cache with no full layers)."""
    if quant.nbits == 8 and quant.backend == "quanto":
        return HybridPrecisionCache(model_config, [], quant)
    from transformers.cache_utils import QuantizedCache

    return QuantizedCache(
        quant.backend,
        model_config,
        nbits=quant.nbits,
        axis_key=quant.axis_key,
        axis_value=quant.axis_value,
        q_group_size=quant.q_group_size,
        residual_length=quant.residual_length,
    )


def layer_storage(cache) -> list[str]:
    """What each layer of ``cache`` stores: ``"full"`` (unquantized) or ``"int<bits>"``."""
    out = []
    for layer in cache.layers:
        bits = getattr(layer, "nbits", None)
        out.append("full" if bits is None else f"int{bits}")
    return out
