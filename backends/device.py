"""Where a backend runs: CUDA visibility, CPU features, native precision, thread counts.

Every backend chooses its device and threads through these helpers, so "cuda when visible" and
"threads" mean the same thing in every row of a report.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from backends.base import Availability



@functools.cache
def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cuda_available() -> bool:
    """True when torch sees a CUDA device (False with a CPU build of torch)."""
    import torch

    return torch.cuda.is_available()


def default_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``: GPU paths are chosen automatically."""
    return "cuda" if cuda_available() else "cpu"


def physical_cores() -> int:
    """Physical CPU cores this process may compute on: the machine's (logical ones where psutil
    cannot tell), at most the CPUs in its affinity mask (``taskset``, a Slurm allocation) and at
    most ``HARNESS_THREADS`` when an executor gives a cell a share of a node's CPUs."""
    import os

    cores = psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or 1
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    share = os.environ.get("HARNESS_THREADS", "")
    return max(1, min(cores, int(share))) if share.isdigit() and int(share) > 0 else cores


def dtype_availability(dtype: str, device: str) -> Availability:
    """Whether ``device`` computes in ``dtype`` (``float32``/``bfloat16``/``float16``) natively.

    Emulated half precision is not offered: its numbers would measure the emulation, not the format.
    """
    from backends.base import Availability

    if dtype == "float32":
        return Availability.yes()
    if device == "cuda":
        import torch

        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            return Availability.no("this GPU has no bf16 support")
        return Availability.yes()
    flags = cpu_flags()
    if dtype == "bfloat16" and not flags & {"avx512_bf16", "amx_bf16"}:
        return Availability.no("needs CUDA or a CPU with AVX512-BF16/AMX-BF16; this CPU emulates bf16")
    if dtype == "float16" and not flags & {"avx512_fp16", "amx_fp16"}:
        return Availability.no("needs CUDA or a CPU with AVX512-FP16/AMX-FP16; this CPU emulates fp16")
    return Availability.yes()
