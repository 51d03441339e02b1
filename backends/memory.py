"""Memory measurement shared by every backend and workload (bytes throughout).

On CPU the peak is the process's resident set size sampled by a background thread (psutil), the
same method optimum-benchmark's memory tracker uses; on CUDA it is also
``torch.cuda.max_memory_allocated`` (the caching allocator's view) and, where ``pynvml`` is
installed, the per-process GPU memory NVML reports (which includes the CUDA context and memory
allocated outside torch, e.g. by ONNX Runtime or TVM).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import psutil

_PROCESS = psutil.Process(os.getpid())


def _torch_cuda():
    """torch.cuda if torch is already imported and CUDA is initialised, else None (no import cost)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda


def nvml_process_bytes() -> int | None:
    """GPU memory NVML attributes to this process (all devices), or None without pynvml/CUDA."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        total = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    total += int(proc.usedGpuMemory)
        return total
    except pynvml.NVMLError:
        return None


def process_memory() -> dict[str, int]:
    """A snapshot: ``rss`` bytes, plus ``cuda_allocated`` / ``cuda_reserved`` /
    ``cuda_max_allocated`` / ``nvml_process`` bytes when CUDA is in use."""
    snapshot = {"rss": _PROCESS.memory_info().rss}
    cuda = _torch_cuda()
    if cuda is not None:
        snapshot["cuda_allocated"] = cuda.memory_allocated()
        snapshot["cuda_reserved"] = cuda.memory_reserved()
        snapshot["cuda_max_allocated"] = cuda.max_memory_allocated()
        nvml = nvml_process_bytes()
        if nvml is not None:
            snapshot["nvml_process"] = nvml
    return snapshot


class PeakMemorySampler:
    """Context manager that records the peak RSS (and CUDA peaks) while its block runs.

    RSS is sampled every ``interval_s`` seconds (default 5 ms) on a daemon thread; sampling holds
    the GIL for microseconds, far below the noise of what it measures. ``result()`` returns
    ``{"peak_rss": bytes, "peak_cuda_allocated": bytes?, "peak_nvml_process": bytes?}``.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self._peak_rss = 0
        self._peak_nvml: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda_peak: int | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak_rss = max(self._peak_rss, _PROCESS.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemorySampler":
        cuda = _torch_cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        self._peak_rss = _PROCESS.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak_rss = max(self._peak_rss, _PROCESS.memory_info().rss)
        cuda = _torch_cuda()
        if cuda is not None:
            cuda.synchronize()
            self._cuda_peak = cuda.max_memory_allocated()
            self._peak_nvml = nvml_process_bytes()

    def result(self) -> dict[str, int]:
        out = {"peak_rss": self._peak_rss}
        if self._cuda_peak is not None:
            out["peak_cuda_allocated"] = self._cuda_peak
        if self._peak_nvml is not None:
            out["peak_nvml_process"] = self._peak_nvml
        return out
