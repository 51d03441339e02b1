"""KV-cache byte accounting shared by every backend (bytes throughout)."""

from __future__ import annotations


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes one cached position occupies over all layers, keys and values:
    ``2 (K and V) x layers x kv_heads x head_dim x itemsize`` (the standard KV-cache size formula,
    e.g. Pope et al. 2022, "Efficiently Scaling Transformer Inference", section 2)."""
    return 2 * layers * kv_heads * head_dim * itemsize


def kv_fp16_analytic_bytes(config, tokens: int) -> int:
    """The size an fp16 KV cache of ``tokens`` cached positions would have, in bytes.

    Args:
        config: a transformers model config (its text config is used); ``head_dim`` defaults to
            ``hidden_size // num_attention_heads``, ``num_key_value_heads`` to the head count.
        tokens: cached positions summed over the batch (``batch x sequence length``).
    """
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_bytes_per_token(config.num_hidden_layers, kv_heads, head_dim, 2) * tokens
