"""Decode throughput against the memory-bandwidth roofline, computed from a latency record and
the environment fingerprint (never re-running anything).

The roofline model (Williams, Waterman and Patterson, "Roofline: an insightful visual performance
model for multicore architectures", CACM 52(4), 2009) bounds attainable throughput by
``min(peak compute, bandwidth x arithmetic intensity)``. Single-stream decode is memory-bound: each
step reads every weight once and the whole KV cache once to produce ``batch`` tokens, doing 2
FLOPs per weight and token (0.5 FLOP/byte at fp32, 4 at 4 bits per weight), far below a CPU's or
GPU's compute-to-bandwidth ratio at small batch (the "memory-bound decode" argument, e.g. Pope et al. 2022, "Efficiently Scaling
Transformer Inference", on the memory time of small-batch decoding; Kim et al. 2023,
"SqueezeLLM", on the memory wall). Its roofline is:

    bytes per decode step  = W + KV
    bytes per decoded token = (W + KV) / B
    roofline tok/s          = BW / bytes per decoded token = B x BW / (W + KV)
    % of roofline           = 100 x decode_tok_s / roofline tok/s

``W``: the backend's weight bytes (``load.weight_bytes``: weights as stored, quantized at packed
size with their scales); an upper bound on what one step reads, since an embedding table that is
not also the output projection is read one row per token. ``KV``: the KV cache summed over the
batch at the mean decode position, interpolated linearly between the measurement after prefill
(``kv_cache_bytes_prefill``, ``n_in`` positions) and the one at the end (``kv_cache_bytes``,
``n_in + n_out - 1`` positions). ``B``: sequences per step (weights are read once per step for
all of them). ``BW``: ``env.memory_bandwidth_bytes_s`` (a measured STREAM triad) on CPU, the GPU's
NVML peak (``env.gpu_memory_bandwidth``) on CUDA. ``decode_tok_s``: the record's median.
"""

from __future__ import annotations

from typing import Any


def bandwidth_for(record: dict[str, Any], env: dict[str, Any] | None = None) -> tuple[float | None, str | None]:
    """The memory bandwidth (bytes/s) that bounds ``record``'s decode, and where it comes from.

    CUDA rows (``info.device == "cuda"``) use the first GPU's NVML peak
    (``env.gpu_memory_bandwidth[0].bytes_s``); every other row the measured host bandwidth
    (``env.memory_bandwidth_bytes_s``). ``env`` defaults to the record's own. ``(None, None)``
    when the environment has no such figure (records made before it was measured).
    """
    env = env if env is not None else (record.get("env") or {})
    device = str((record.get("info") or {}).get("device") or "cpu")
    if device.startswith("cuda"):
        gpus = env.get("gpu_memory_bandwidth") or []
        if gpus and gpus[0].get("bytes_s"):
            return float(gpus[0]["bytes_s"]), gpus[0].get("method", "NVML peak")
        return None, None
    value = env.get("memory_bandwidth_bytes_s")
    if not value:
        return None, None
    return float(value), (env.get("memory_bandwidth") or {}).get("method", "STREAM triad")


def decode_roofline(record: dict[str, Any], env: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Bytes per decoded token and decode throughput as a share of the bandwidth roofline.

    Args:
        record: an ok latency record (``params.batch``, ``load.weight_bytes``,
            ``metrics.decode_tok_s.median``, ``metrics.kv_cache_bytes[_prefill]``, ``info.device``).
        env: the environment fingerprint; default the record's ``env``.

    Returns:
        None when the record is not an ok latency record or lacks the weight bytes, the decode
        rate or a bandwidth; else ``weight_bytes``, ``kv_bytes_per_step`` (bytes, batch total at
        the mean decode position; 0 when the backend reported no KV bytes), ``batch``,
        ``bytes_per_token`` (bytes), ``bandwidth_bytes_s``, ``bandwidth_method``,
        ``roofline_tok_s`` and ``decode_tok_s`` (tokens/s, all sequences together) and
        ``pct_of_roofline`` (percent). Formula: the module docstring.
    """
    if record.get("workload") != "latency" or record.get("status") != "ok":
        return None
    metrics = record.get("metrics") or {}
    weight = (record.get("load") or {}).get("weight_bytes")
    decode = (metrics.get("decode_tok_s") or {}).get("median")
    bandwidth, method = bandwidth_for(record, env)
    if not weight or not decode or not bandwidth:
        return None
    batch = int((record.get("params") or {}).get("batch", 1))
    end = metrics.get("kv_cache_bytes")
    start = metrics.get("kv_cache_bytes_prefill")
    if end and start:
        kv = (start + end) / 2
    else:
        kv = float(end or start or 0)
    per_token = (weight + kv) / batch
    roofline = bandwidth / per_token
    return {"weight_bytes": int(weight), "kv_bytes_per_step": kv, "batch": batch,
            "bytes_per_token": per_token, "bandwidth_bytes_s": bandwidth, "bandwidth_method": method,
            "roofline_tok_s": roofline, "decode_tok_s": float(decode),
            "pct_of_roofline": 100.0 * decode / roofline}
