"""Weight conversion: a transformers Llama checkpoint -> the compiled model's parameters, streamed.

Fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj`` (rows
concatenated in that order, as MLC-LLM's Llama does), and stores every linear weight (embedding
included) in the mode's format (``quant.py``). Norm weights stay float in the model dtype.

Parameters are produced one at a time, in the order the compiled module takes them, from tensors
read one at a time (``backends.safetensors_io``): memory holds one source tensor in float32, the
row-block temporaries of ``quant.quantize`` and the parameter being written, never the model
(Llama-3-8B: a 2.1 GB float32 embedding at most, not 32 GB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from backends.mlc.model import LlamaConfig
from backends.mlc.quant import QuantMode, column_tile, quantize, to_column_tiles
from backends.safetensors_io import SafetensorsCheckpoint


def linear_params(name: str, parts: list[Callable[[], np.ndarray]], mode: QuantMode,
                  tile_width: int) -> dict[str, np.ndarray]:
    """The stored parameters of one linear weight ``[N, K]`` (torch layout) whose rows are the
    concatenation of ``parts`` (each a function reading one ``[N_i, K]`` float32 tensor: they are
    read one after another, so only one is in memory), in column tiles of
    ``column_tile(N, tile_width)`` (``quant.py``). Rows quantize independently, so quantizing the
    parts apart and concatenating the results equals quantizing the fused weight."""
    if mode.quantized:
        packed, scale = [], []
        for read in parts:
            p, s = quantize(read(), mode)
            packed.append(p)
            scale.append(s)
        packed_all, scale_all = np.concatenate(packed, axis=1), np.concatenate(scale, axis=1)
        tile = column_tile(packed_all.shape[1], tile_width)
        return {f"{name}.q_weight": to_column_tiles(packed_all, tile),
                f"{name}.q_scale": to_column_tiles(scale_all, tile)}
    weight = np.concatenate([read().astype(mode.scale_dtype) for read in parts], axis=0)
    tile = column_tile(weight.shape[0], tile_width)
    return {f"{name}.weight": to_column_tiles(weight.T, tile)}


def iter_params(checkpoint: Path | SafetensorsCheckpoint, cfg: LlamaConfig, mode: QuantMode, dtype: str,
                names: Iterable[str], embed_mode: QuantMode | None = None,
                tile_width: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, value)`` of every parameter of ``build_model(cfg, mode, dtype, embed_mode,
    tile_width)``, in the order of ``names`` (the module's export order), each computed when it is
    reached (a fused weight's ``q_weight`` and ``q_scale`` together).

    Raises:
        KeyError: the checkpoint lacks a tensor the model needs, or ``names`` holds one this
            conversion does not produce.
    """
    ckpt = checkpoint if isinstance(checkpoint, SafetensorsCheckpoint) else SafetensorsCheckpoint(checkpoint)
    embed_mode = embed_mode or mode

    def tensor(name: str) -> Callable[[], np.ndarray]:
        key = name if name in ckpt else f"model.{name}"
        if key not in ckpt:
            raise KeyError(f"the checkpoint has no tensor {name}")
        return lambda: ckpt.float32(key)

    producers: dict[str, Callable[[], dict[str, np.ndarray]]] = {}

    def linear(name: str, parts: list[str], linear_mode: QuantMode) -> None:
        produce = lambda: linear_params(name, [tensor(p) for p in parts], linear_mode, tile_width)  # noqa: E731
        for suffix in ((".q_weight", ".q_scale") if linear_mode.quantized else (".weight",)):
            producers[name + suffix] = produce

    def norm(name: str) -> None:
        producers[name] = lambda: {name: tensor(name)().astype(dtype)}

    linear("embed_tokens", ["embed_tokens.weight"], embed_mode)
    if not cfg.tie_word_embeddings:
        linear("lm_head", ["lm_head.weight"], embed_mode)
    norm("norm.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        linear(p + "self_attn.qkv_proj", [p + f"self_attn.{x}_proj.weight" for x in "qkv"], mode)
        linear(p + "self_attn.o_proj", [p + "self_attn.o_proj.weight"], mode)
        linear(p + "mlp.gate_up_proj", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], mode)
        linear(p + "mlp.down_proj", [p + "mlp.down_proj.weight"], mode)
        norm(p + "input_layernorm.weight")
        norm(p + "post_attention_layernorm.weight")
    names = list(names)
    missing = [n for n in names if n not in producers]
    if missing:
        raise KeyError(f"conversion produced no value for {missing[:3]}")
    pending: dict[str, np.ndarray] = {}  # the sibling of a parameter just produced
    for name in names:
        if name not in pending:
            pending.update(producers[name]())
        yield name, pending.pop(name)

