"""Read and write safetensors checkpoints one tensor at a time, in bounded memory.

``safetensors``' own API reads through ``mmap`` (every page touched stays in the process's
resident set while the file is open, so reading a 16 GB checkpoint tensor by tensor still peaks at
16 GB of RSS) and writes a whole ``dict`` of tensors at once. Preparing a Llama-3-8B on a 24 GiB
machine needs neither: this module reads one tensor with ``pread`` into fresh memory and writes a
file whose header is computed up front from the shapes, then each tensor as it is produced. The
format is the one of https://github.com/huggingface/safetensors (8-byte little-endian header
length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian
data); files written here are read by ``safetensors`` and transformers like any other.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

# safetensors dtype -> numpy dtype of the stored bytes (bf16 has no numpy dtype: kept as uint16)
STORED = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
# torch / config dtype names -> safetensors dtype
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bf16 numbers given as their uint16 bit patterns (exact: bf16 is the top
    half of a float32)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns of float32 ``values``, rounded to nearest even (as torch's
    ``.to(torch.bfloat16)``); NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    return np.where(np.isnan(values), np.uint32(0x7FC0), rounded).astype(np.uint16)


def read_into(path: Path, offset: int, out: np.ndarray) -> np.ndarray:
    """Fill the contiguous array ``out`` with ``out.nbytes`` bytes of ``path`` from ``offset``
    (``pread`` into the array's own memory: no mapping of the file stays resident); returns ``out``.

    Raises:
        OSError: the file ends first.
    """
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as handle:
        done = 0
        while done < out.nbytes:  # pread may return less than asked for large reads
            count = os.preadv(handle.fileno(), [view[done:]], offset + done)
            if count <= 0:
                raise OSError(f"{path}: short read at byte {offset + done}")
            done += count
    return out


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: its dtype (``"BF16"``, ``"F32"``...), shape, the file and
    the absolute byte range of its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _header(path: Path) -> dict:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length)), 8 + length


class SafetensorsCheckpoint:
    """The tensors of every ``*.safetensors`` file in a checkpoint directory, read on demand.

    Raises:
        FileNotFoundError: ``directory`` holds no ``*.safetensors`` file.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {self.directory}")
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            header, base = _header(path)
            header.pop("__metadata__", None)
            for name, item in header.items():
                start, end = item["data_offsets"]
                self.tensors[name] = TensorInfo(name, item["dtype"], tuple(item["shape"]), path, base + start, base + end)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        """Tensor names in file order (files sorted by name)."""
        return list(self.tensors)

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors[name]
        if info.dtype not in STORED:
            raise ValueError(f"{name}: safetensors dtype {info.dtype} is not supported")
        return info

    def raw(self, name: str) -> np.ndarray:
        """The stored values of ``name`` (bf16 as uint16 bit patterns), read into new memory.

        Raises:
            KeyError: no such tensor. ValueError: a dtype this module does not know.
        """
        info = self._info(name)
        return read_into(info.path, info.start, np.empty(info.shape, STORED[info.dtype]))

    def float32(self, name: str) -> np.ndarray:
        """``name`` as float32 (bf16 and f16 widened exactly), in exactly the memory of the float32
        result: 16-bit values are read into the second half of the result's own buffer and widened
        front to back in chunks, each chunk copied out before the words it overwrites (word ``i``
        ends at byte ``4(i+1)``, at or before where the unread value ``i+1`` starts, ``2n + 2(i+1)``).
        """
        info = self._info(name)
        if info.dtype not in ("BF16", "F16"):
            return self.raw(name).astype(np.float32, copy=False)
        n = int(np.prod(info.shape, dtype=np.int64))
        words = np.empty(n, np.uint32)
        stored = words.view(np.uint16)[n:]  # bytes [2n, 4n) of the result
        read_into(info.path, info.start, stored)
        result = words.view(np.float32)
        step = 1 << 20
        for start in range(0, n, step):
            stop = min(n, start + step)
            chunk = stored[start:stop].copy()
            result[start:stop] = bf16_to_f32(chunk) if info.dtype == "BF16" else chunk.view(np.float16)
        return result.reshape(info.shape)


class SafetensorsWriter:
    """Write one safetensors file whose tensors are declared up front and then written in order,
    one at a time (only the tensor being written is in memory).

    Args:
        path: the file to write.
        specs: ``[(name, safetensors dtype, shape)]`` in the order ``write`` will be called.
        metadata: the header's ``__metadata__`` (strings only, as the format requires).
    """

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._expected: list[tuple[str, int]] = []
        for name, dtype, shape in specs:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(STORED[dtype]).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, nbytes))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._handle = open(path, "wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0

    def write(self, name: str, values: np.ndarray) -> None:
        """Append the next declared tensor (bf16 given as uint16 bit patterns).

        Raises:
            ValueError: ``name`` is not the next declared tensor or has the wrong byte size.
        """
        expected, nbytes = self._expected[self._next]
        data = np.ascontiguousarray(values)
        if name != expected or data.nbytes != nbytes:
            raise ValueError(f"expected {expected} ({nbytes} bytes), got {name} ({data.nbytes} bytes)")
        self._handle.write(memoryview(data.reshape(-1).view(np.uint8)))
        self._next += 1

    def write_chunks(self, name: str, chunks: Iterator[np.ndarray]) -> None:
        """Append the next declared tensor given as consecutive row chunks (for tensors larger than
        the working set one wants to hold)."""
        expected, nbytes = self._expected[self._next]
        if name != expected:
            raise ValueError(f"expected {expected}, got {name}")
        written = 0
        for chunk in chunks:
            data = np.ascontiguousarray(chunk)
            self._handle.write(memoryview(data.reshape(-1).view(np.uint8)))
            written += data.nbytes
        if written != nbytes:
            raise ValueError(f"{name}: wrote {written} bytes, declared {nbytes}")
        self._next += 1

    def close(self) -> None:
        """Flush and close; raises ValueError when a declared tensor was never written."""
        self._handle.close()
        if self._next != len(self._expected):
            raise ValueError(f"{len(self._expected) - self._next} declared tensors were not written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self._handle.close()
