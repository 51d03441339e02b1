"""MLC-LLM's group quantization modes, and the numpy reference of their packing.

A mode is named ``q{bits}f{scale bits}_{variant}`` as in MLC-LLM (``mlc_llm/quantization``):
``q0f32`` / ``q0f16`` store unquantized weights (fp32 / fp16); ``qNf16_*`` / ``qNf32_*`` store
symmetric ``N``-bit integers packed into ``uint32`` words with one fp16 / fp32 scale per group of
``group_size`` consecutive input channels. The formula is MLC-LLM's ``GroupQuantize``:

    max_int = 2**(bits-1) - 1;  scale = max|w_group| / max_int
    q = clip(round(w / scale) + max_int, 0, 2*max_int);  w_hat = (q - max_int) * scale

Packing: a linear weight ``W`` of torch shape ``[N, K]`` (out, in) is quantized input-major
("KN", as MLC-LLM's ``q4f16_0`` also does): ``packed[K // per_word, N]`` uint32 where word
``(r, n)`` holds ``W[n, r*per_word + i]`` in bits ``[i*bits, (i+1)*bits)``,
``per_word = 32 // bits``; ``scale[ceil(K / group), N]``. K need not divide by ``per_word`` or
``group``: the tail is zero padded (q3 packs 10 values in 30 bits of each word, group 40, as
MLC-LLM's ``q3f16_1``).

Storage layout: the KN arrays (packed words, scales, or unquantized weights) are stored in
column tiles, ``[N // t, rows, t]`` (``to_column_tiles``), so that the ``t`` output columns a CPU
kernel accumulates in vector registers read one contiguous block of memory instead of ``rows``
strided 128-byte pieces: the decode GEMV is memory-bound and streams about 2.6x faster from DRAM
that way (measured on the 113 MB SmolLM2 lm_head: 11.6 -> 30.7 GB/s). ``t = N`` (one tile) is
the plain KN layout, used for CUDA where dlight's GEMV/matmul rules expect it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantMode:
    """One quantization mode.

    Attributes:
        name: MLC-LLM's name, e.g. ``"q4f16_1"``.
        bits: weight bits (0 = unquantized).
        group_size: input channels sharing one scale (0 when unquantized).
        scale_dtype: ``"float16"`` or ``"float32"``: the scales' (or, unquantized, the weights')
            storage dtype; also the model dtype MLC-LLM computes in (f16 on CUDA here; on a CPU
            without fast fp16 this backend computes in fp32 and says so in ``info()``).
    """

    name: str
    bits: int
    group_size: int
    scale_dtype: str

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def per_word(self) -> int:
        """Values packed per uint32 word."""
        return 32 // self.bits

    @property
    def max_int(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def packed_shape(self, k: int, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(packed shape, scale shape)`` in KN form for a ``[N, K]`` torch weight."""
        return (-(-k // self.per_word), n), (-(-k // self.group_size), n)


CPU_COLUMN_TILE = 32  # output columns per tile on CPU: 2 AVX-512 / 4 AVX2 float vectors


def column_tile(n: int, width: int) -> int:
    """Columns per stored tile of an ``n``-column weight: ``width`` (a power of two), or the
    largest power of two dividing ``n`` when ``width`` does not; ``width <= 0`` means one tile
    (plain KN layout)."""
    if width <= 0:
        return n
    tile = width
    while n % tile:
        tile //= 2
    return tile


def to_column_tiles(a: np.ndarray, tile: int) -> np.ndarray:
    """``[rows, N]`` -> ``[N // tile, rows, tile]`` (contiguous); ``tile`` must divide ``N``."""
    rows, n = a.shape
    return np.ascontiguousarray(a.reshape(rows, n // tile, tile).transpose(1, 0, 2))


def from_column_tiles(a: np.ndarray) -> np.ndarray:
    """Inverse of ``to_column_tiles``: ``[N // tile, rows, tile]`` -> ``[rows, N]``."""
    tiles, rows, tile = a.shape
    return np.ascontiguousarray(a.transpose(1, 0, 2).reshape(rows, tiles * tile))


MODES: dict[str, QuantMode] = {
    "q0f32": QuantMode("q0f32", 0, 0, "float32"),
    "q0f16": QuantMode("q0f16", 0, 0, "float16"),
    "q4f32_1": QuantMode("q4f32_1", 4, 32, "float32"),
    "q4f16_1": QuantMode("q4f16_1", 4, 32, "float16"),
    "q4f16_0": QuantMode("q4f16_0", 4, 128, "float16"),
    "q3f16_1": QuantMode("q3f16_1", 3, 40, "float16"),
    "q8f16_1": QuantMode("q8f16_1", 8, 32, "float16"),
}


QUANTIZE_ROWS = 2048  # weight rows quantized at a time: bounds the float32 temporaries


def quantize(weight: np.ndarray, mode: QuantMode) -> tuple[np.ndarray, np.ndarray]:
    """Group-quantize and pack a torch-layout weight.

    Rows are independent (groups run along K), so they are quantized ``QUANTIZE_ROWS`` at a time:
    the temporaries stay a few MB whatever the weight's size (Llama-3-8B's 128256-row embedding).

    Args:
        weight: float array ``[N, K]`` (out features, in features).
        mode: a quantized mode (``bits > 0``).

    Returns:
        ``(packed uint32 [ceil(K/per_word), N], scale [ceil(K/group), N] in mode.scale_dtype)``.

    Raises:
        ValueError: ``weight`` is not 2-D or the mode is unquantized.
    """
    if weight.ndim != 2 or not mode.quantized:
        raise ValueError(f"quantize needs a 2-D weight and a quantized mode, got {weight.shape}, {mode.name}")
    n, k = weight.shape
    (packed_shape, scale_shape) = mode.packed_shape(k, n)
    packed = np.empty(packed_shape, np.uint32)
    scale = np.empty(scale_shape, mode.scale_dtype)
    for start in range(0, n, QUANTIZE_ROWS):
        stop = min(n, start + QUANTIZE_ROWS)
        packed[:, start:stop], scale[:, start:stop] = _quantize_rows(weight[start:stop], mode)
    return packed, scale


def _quantize_rows(weight: np.ndarray, mode: QuantMode) -> tuple[np.ndarray, np.ndarray]:
    """``quantize`` of a block of rows ``[n, K]`` -> ``(packed [words, n], scale [groups, n])``."""
    n, k = weight.shape
    w = np.asarray(weight, dtype=np.float32).T  # [K, n]
    groups = -(-k // mode.group_size)
    wg = np.zeros((groups * mode.group_size, n), np.float32)
    wg[:k] = w
    wg = wg.reshape(groups, mode.group_size, n)
    scale = (np.abs(wg).max(axis=1) / mode.max_int).astype(mode.scale_dtype)  # [groups, n]
    scale_f = scale.astype(np.float32)
    safe = np.where(scale_f == 0, 1.0, scale_f)[:, None, :]
    q = np.clip(np.round(wg / safe) + mode.max_int, 0, 2 * mode.max_int).astype(np.uint32)
    q = q.reshape(groups * mode.group_size, n)[:k]
    words = -(-k // mode.per_word)
    qp = np.zeros((words * mode.per_word, n), np.uint32)
    qp[:k] = q
    qp = qp.reshape(words, mode.per_word, n)
    packed = np.zeros((words, n), np.uint32)
    for i in range(mode.per_word):
        packed |= qp[:, i, :] << np.uint32(i * mode.bits)
    return packed, scale


def unpack(packed: np.ndarray, mode: QuantMode, k: int) -> np.ndarray:
    """The integer codes ``[K, N]`` (uint32, ``0 .. 2*max_int``) held in ``packed``."""
    mask = np.uint32((1 << mode.bits) - 1)
    parts = [(packed >> np.uint32(i * mode.bits)) & mask for i in range(mode.per_word)]
    return np.stack(parts, axis=1).reshape(-1, packed.shape[1])[:k]


def dequantize(packed: np.ndarray, scale: np.ndarray, mode: QuantMode, k: int) -> np.ndarray:
    """The reference dequantization: float32 ``[N, K]`` (torch layout) from ``quantize``'s output."""
    q = unpack(packed, mode, k).astype(np.float32) - mode.max_int
    s = np.repeat(scale.astype(np.float32), mode.group_size, axis=0)[:k]
    return (q * s).T.copy()


def fake_quantize(weight: np.ndarray, mode: QuantMode) -> np.ndarray:
    """``dequantize(quantize(weight))``: what the compiled kernels compute with, ``[N, K]`` float32."""
    packed, scale = quantize(weight, mode)
    return dequantize(packed, scale, mode, weight.shape[1])
