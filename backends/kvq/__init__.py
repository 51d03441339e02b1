"""Quantized KV cache (INT8/INT4/INT2, layer-wise hybrid) with FlashAttention-2 or SDPA."""
