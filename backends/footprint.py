"""The pre-flight memory check: will a backend variant fit before it loads?

A variant that does not fit is skipped with its estimate and what the machine has, instead of
being killed by the kernel mid-run (and taking the run's time with it). The estimate is
deliberately simple and stated, as llama.cpp's and MLC-LLM's own "estimated memory" lines are:

    weights  = sum over tensor kinds (linear matrices, embedding, lm_head, norms) of
               parameters x bytes per parameter of the variant's storage format
    KV cache = layers x 2 x kv_heads x head_dim x bytes per element x tokens x batch
    working  = batch x tokens x (4 x hidden + 2 x intermediate + vocab) x 4 bytes (activations
               and float32 logits of a scored window) + WORKING_SET_BYTES (allocator slack,
               runtime buffers)
    preparation (a cold cache) = the backend's ``preparation_bytes`` (streamed conversions: one
               float32 matrix + WORKING_SET_BYTES; ONNX export: measured, see the onnx backend)

On CPU all of it is host memory; on CUDA weights, KV cache and working set are device memory and
the host needs the preparation. The check compares with ``psutil.virtual_memory().available``
(free plus reclaimable page cache) and, on CUDA, ``torch.cuda.mem_get_info``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
WORKING_SET_BYTES = 512 * 2**20


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a decoder-only transformer, from its ``config.json`` (Llama family
    names; others with the same keys work too).

    Attributes:
        layers, hidden, intermediate, heads, kv_heads, head_dim, vocab: the architecture.
        tied: the lm_head shares the embedding. max_context: ``max_position_embeddings``.
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_context: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any] | Path) -> "ModelShape":
        """Raises KeyError when a needed key is missing."""
        if isinstance(config, Path):
            config = json.loads(config.read_text())
        config = config.get("text_config", config)
        heads = int(config["num_attention_heads"])
        return cls(int(config["num_hidden_layers"]), int(config["hidden_size"]), int(config["intermediate_size"]),
                   heads, int(config.get("num_key_value_heads") or heads),
                   int(config.get("head_dim") or config["hidden_size"] // heads), int(config["vocab_size"]),
                   bool(config.get("tie_word_embeddings", False)), config.get("max_position_embeddings"))

    @property
    def linear_params(self) -> int:
        """Parameters of the per-layer matrices (attention q/k/v/o and the gated MLP), all layers."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The lm_head's own parameters (0 when tied to the embedding)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embed_params + self.head_params + self.norm_params

    @property
    def largest_matrix_params(self) -> int:
        """The largest single tensor a conversion holds in float32 (embedding or fused gate+up)."""
        return max(self.embed_params, 2 * self.hidden * self.intermediate)

    def weight_bytes(self, linear: float, embed: float, head: float | None = None, norm: float = 4.0) -> int:
        """Weight bytes at ``linear`` / ``embed`` / ``head`` / ``norm`` bytes per parameter
        (``head`` defaults to ``embed``)."""
        head = embed if head is None else head
        return int(self.linear_params * linear + self.embed_params * embed + self.head_params * head
                   + self.norm_params * norm)

    def kv_bytes(self, tokens: int, batch: int, element_bytes: float) -> int:
        """KV-cache bytes for ``batch`` sequences of ``tokens`` tokens (K and V, every layer)."""
        return int(self.layers * 2 * self.kv_heads * self.head_dim * element_bytes * tokens * batch)

    def working_bytes(self, tokens: int, batch: int) -> int:
        """Activations and float32 logits of one forward over ``batch x tokens``, plus the constant
        ``WORKING_SET_BYTES``."""
        return batch * tokens * (4 * self.hidden + 2 * self.intermediate + self.vocab) * 4 + WORKING_SET_BYTES


@dataclass
class MemoryEstimate:
    """What a variant needs (bytes): ``parts`` (weights, kv_cache, working, preparation) and where
    each lives; ``host_bytes`` and ``device_bytes`` are the totals the check compares."""

    parts: dict[str, int]
    device: str = "cpu"
    host_bytes: int = 0
    device_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, device: str, weights: int, kv_cache: int, working: int, preparation: int) -> "MemoryEstimate":
        """On CPU the host needs max(preparation, weights + KV + working): preparation ends before
        the load. On CUDA the device needs weights + KV + working, the host the preparation."""
        parts = {"weights": weights, "kv_cache": kv_cache, "working": working, "preparation": preparation}
        run = weights + kv_cache + working
        if device == "cuda":
            return cls(parts, device, host_bytes=preparation, device_bytes=run)
        return cls(parts, device, host_bytes=max(run, preparation))

    def to_dict(self) -> dict[str, Any]:
        return {"host_bytes": self.host_bytes, "device_bytes": self.device_bytes, **{f"{k}_bytes": v for k, v in self.parts.items()}}

    def describe(self) -> str:
        p = {k: v / GIB for k, v in self.parts.items()}
        return (f"weights {p['weights']:.1f} + KV cache {p['kv_cache']:.1f} + working {p['working']:.1f} GiB; "
                f"preparation {p['preparation']:.1f} GiB")


def available_memory(device: str) -> tuple[int, int | None]:
    """``(host bytes available, device bytes free or None)``: ``psutil.virtual_memory().available``
    and, for ``device == "cuda"``, ``torch.cuda.mem_get_info()[0]``."""
    import psutil

    host = psutil.virtual_memory().available
    if device != "cuda":
        return host, None
    import torch

    return host, int(torch.cuda.mem_get_info()[0])


def does_not_fit(estimate: MemoryEstimate, host_available: int, device_available: int | None) -> str | None:
    """The reason ``estimate`` does not fit what is available, or None when it fits."""
    if estimate.host_bytes > host_available:
        return (f"does not fit in host memory: needs ~{estimate.host_bytes / GIB:.1f} GiB "
                f"({estimate.describe()}), {host_available / GIB:.1f} GiB available")
    if device_available is not None and estimate.device_bytes > device_available:
        return (f"does not fit in device memory: needs ~{estimate.device_bytes / GIB:.1f} GiB "
                f"({estimate.describe()}), {device_available / GIB:.1f} GiB free")
    return None
