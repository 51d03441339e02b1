"""Weight conversion: a transformers Llama checkpoint -> the compiled model's parameters.

Fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj`` (rows
concatenated in that order, as MLC-LLM's Llama does), and stores every linear weight (embedding
included) in the mode's format (``quant.py``). Norm weights stay float in the model dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from backends.mlc.model import LlamaConfig
from backends.mlc.quant import QuantMode, column_tile, quantize, to_column_tiles


def read_checkpoint(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of the ``*.safetensors`` files in ``directory`` as float32 numpy arrays."""
    import torch
    from safetensors.torch import load_file

    tensors: dict[str, np.ndarray] = {}
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    for file in files:
        for name, tensor in load_file(str(file)).items():
            tensors[name] = tensor.to(torch.float32).numpy()
    return tensors


def linear_params(name: str, weight: np.ndarray, mode: QuantMode, tile_width: int) -> dict[str, np.ndarray]:
    """The stored parameters of one linear weight ``[N, K]`` (torch layout), in column tiles of
    ``column_tile(N, tile_width)`` (``quant.py``)."""
    tile = column_tile(weight.shape[0], tile_width)
    if mode.quantized:
        packed, scale = quantize(weight, mode)
        return {f"{name}.q_weight": to_column_tiles(packed, tile), f"{name}.q_scale": to_column_tiles(scale, tile)}
    return {f"{name}.weight": to_column_tiles(weight.T.astype(mode.scale_dtype), tile)}


def convert(tensors: dict[str, np.ndarray], cfg: LlamaConfig, mode: QuantMode, dtype: str,
            names: Iterable[str], embed_mode: QuantMode | None = None,
            tile_width: int = 0) -> dict[str, np.ndarray]:
    """Parameters for ``build_model(cfg, mode, dtype, embed_mode, tile_width)``, keyed by its
    parameter names.

    Raises:
        KeyError: the checkpoint lacks a tensor the model needs, or ``names`` holds one this
            conversion does not produce.
    """
    t = {k.removeprefix("model."): v for k, v in tensors.items()}
    embed_mode = embed_mode or mode
    out = linear_params("embed_tokens", t["embed_tokens.weight"], embed_mode, tile_width)
    if not cfg.tie_word_embeddings:
        out.update(linear_params("lm_head", tensors["lm_head.weight"], embed_mode, tile_width))
    out["norm.weight"] = t["norm.weight"].astype(dtype)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        qkv = np.concatenate([t[p + f"self_attn.{x}_proj.weight"] for x in "qkv"], axis=0)
        out.update(linear_params(p + "self_attn.qkv_proj", qkv, mode, tile_width))
        out.update(linear_params(p + "self_attn.o_proj", t[p + "self_attn.o_proj.weight"], mode, tile_width))
        gate_up = np.concatenate([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]], axis=0)
        out.update(linear_params(p + "mlp.gate_up_proj", gate_up, mode, tile_width))
        out.update(linear_params(p + "mlp.down_proj", t[p + "mlp.down_proj.weight"], mode, tile_width))
        out[p + "input_layernorm.weight"] = t[p + "input_layernorm.weight"].astype(dtype)
        out[p + "post_attention_layernorm.weight"] = t[p + "post_attention_layernorm.weight"].astype(dtype)
    names = list(names)
    missing = [n for n in names if n not in out]
    if missing:
        raise KeyError(f"conversion produced no value for {missing[:3]}")
    return {n: out[n] for n in names}
