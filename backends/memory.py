"""Memory measurement shared by every backend and workload (bytes throughout).

On CPU the peak is the process's resident set size sampled by a background thread (psutil), the
same method optimum-benchmark's memory tracker uses; on CUDA it is also
``torch.cuda.max_memory_allocated`` (the caching allocator's view) and, where ``pynvml`` is
installed, the per-process GPU memory NVML reports (which includes the CUDA context and memory
allocated outside torch, e.g. by ONNX Runtime or TVM), sampled by the same thread.

Three figures answer three questions: ``LoadMemory`` gives the model-resident memory (RSS after
load minus RSS before it, heap trimmed both times), ``PeakMemorySampler`` the peak during a cell
and the working memory (that peak minus the RSS at the cell's start). Host and device bytes are
always separate keys.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from typing import Any

import psutil

_PROCESS = psutil.Process(os.getpid())


def rss_bytes() -> int:
    """This process's resident set size now (bytes, psutil ``memory_info().rss``)."""
    return _PROCESS.memory_info().rss


def malloc_trim() -> str:
    """Return free heap memory to the OS (glibc ``malloc_trim(0)``) so that RSS measures what is
    live, not what the allocator kept (e.g. the full-precision weights a quantizing loader read).

    Returns:
        ``"called"``, or ``"skipped: <reason>"`` where glibc is not the C library (macOS, musl,
        Windows): RSS then includes whatever the allocator kept.
    """
    if not sys.platform.startswith("linux"):
        return f"skipped: not glibc ({sys.platform})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError) as exc:
        return f"skipped: no malloc_trim in the C library ({exc})"
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return "called"


def _torch_cuda():
    """torch.cuda if torch is already imported and CUDA is initialised, else None (no import cost)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None  # a CPU run on a GPU machine must not create a CUDA context by measuring
    return torch.cuda


_NVML_READY = False


def _nvml_init(pynvml) -> None:
    """``nvmlInit`` once per process (it is reference-counted and costs milliseconds)."""
    global _NVML_READY
    if not _NVML_READY:
        pynvml.nvmlInit()
        _NVML_READY = True


def nvml_process_bytes() -> int | None:
    """GPU memory NVML attributes to this process (all devices), or None without pynvml/CUDA."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        _nvml_init(pynvml)
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


class LoadMemory:
    """Model-resident memory: what loading a model left in this process, host and device apart.

    Construct it right before the backend's own loading (it imports ``runtime_modules`` so that
    library code is part of the baseline, trims the heap, then reads RSS and, on CUDA, torch's
    allocated bytes); call ``finish()`` once the model is ready (after its first generation).

    ``finish()`` returns (bytes are ``int``):

    - ``rss_before_load_bytes`` / ``rss_after_load_bytes``: process RSS, each read after
      ``malloc_trim(0)`` (so memory the allocator freed but kept, e.g. the full-precision
      weights a quantizing loader read first, is not counted);
    - ``model_resident_bytes``: after - before: the weights and whatever else the engine keeps
      for the model (graphs, compiled modules, a KV cache preallocated at load), including
      memory-mapped weight pages once touched;
    - ``load_peak_rss_bytes``: the peak RSS while loading (``StepPeak``: the kernel's mark), which
      for a quantize-on-load engine (bitsandbytes) is the memory its quantization needed;
    - ``malloc_trim``: ``"called"`` or ``"skipped: <reason>"``;
    - with CUDA in use by torch: ``cuda_allocated_before_load_bytes``,
      ``cuda_allocated_after_load_bytes``, ``model_resident_cuda_allocated_bytes`` (torch's
      caching allocator; engines that allocate outside torch show 0 here) and, with pynvml,
      ``nvml_process_after_load_bytes`` (everything NVML attributes to the process, CUDA
      context included).
    """

    def __init__(self, runtime_modules: tuple[str, ...] = ()):
        import importlib

        for module in runtime_modules:
            try:
                importlib.import_module(module)
            except ImportError:  # availability() already reported a missing engine
                pass
        self.trim = malloc_trim()
        self.rss_before = rss_bytes()
        cuda = _torch_cuda()
        self.cuda_before = cuda.memory_allocated() if cuda is not None else None
        self.peak = StepPeak(trim=False).__enter__()

    def finish(self) -> dict[str, Any]:
        self.peak.__exit__(None, None, None)
        trim = malloc_trim()
        after = rss_bytes()
        out: dict[str, Any] = {"rss_before_load_bytes": self.rss_before, "rss_after_load_bytes": after,
                               "model_resident_bytes": after - self.rss_before,
                               "load_peak_rss_bytes": self.peak.peak_bytes,
                               "malloc_trim": trim if trim != "called" else self.trim}
        cuda = _torch_cuda()
        if cuda is not None:
            cuda.synchronize()
            before = self.cuda_before or 0
            allocated = cuda.memory_allocated()
            out.update(cuda_allocated_before_load_bytes=before, cuda_allocated_after_load_bytes=allocated,
                       model_resident_cuda_allocated_bytes=allocated - before)
            nvml = nvml_process_bytes()
            if nvml is not None:
                out["nvml_process_after_load_bytes"] = nvml
        return out


class PeakMemorySampler:
    """Context manager that records peak memory while its block runs, host and device apart.

    Host: the process RSS is read at entry (``start_rss``) and then every ``interval_s`` seconds
    (default 5 ms) on a daemon thread, and once more at exit; the peak is the largest reading.
    Device (CUDA, when torch has initialised it): ``torch.cuda.reset_peak_memory_stats`` at entry,
    ``torch.cuda.max_memory_allocated`` at exit (the caching allocator's exact peak), and, with
    ``pynvml``, the per-process NVML figure sampled by the same thread (every ``nvml_every``-th
    tick, 25 ms by default: an NVML query takes about a millisecond), so it is a peak, not a
    snapshot at exit. Sampling holds the GIL for microseconds, far below the noise of what it
    measures.

    ``result()`` returns bytes (``int``):

    - ``peak_rss``: the largest RSS reading; ``start_rss``: RSS at entry;
      ``working_peak_rss = peak_rss - start_rss``: the host memory the block added at its peak
      (inference working memory: activations, KV cache, logits, scratch buffers);
    - on CUDA: ``peak_cuda_allocated``, ``start_cuda_allocated``, ``working_peak_cuda_allocated``
      (the same difference on the device allocator), and ``peak_nvml_process`` with pynvml.

    Host and device figures are never added together.
    """

    def __init__(self, interval_s: float = 0.005, nvml_every: int = 5):
        self.interval_s = interval_s
        self.nvml_every = max(1, nvml_every)
        self._start_rss = 0
        self._peak_rss = 0
        self._peak_nvml: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda_start: int | None = None
        self._cuda_peak: int | None = None
        self._sample_nvml = False

    def _sample_device(self) -> None:
        value = nvml_process_bytes()
        if value is not None:
            self._peak_nvml = max(self._peak_nvml or 0, value)

    def _sample(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self._peak_rss = max(self._peak_rss, rss_bytes())
            if self._sample_nvml and tick % self.nvml_every == 0:
                self._sample_device()
            tick += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemorySampler":
        cuda = _torch_cuda()
        if cuda is not None:
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
            self._cuda_start = cuda.memory_allocated()
            self._sample_nvml = nvml_process_bytes() is not None
        self._start_rss = self._peak_rss = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        cuda = _torch_cuda()
        if cuda is not None:
            cuda.synchronize()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak_rss = max(self._peak_rss, rss_bytes())
        if cuda is not None:
            self._cuda_peak = cuda.max_memory_allocated()
            if self._sample_nvml:
                self._sample_device()

    def result(self) -> dict[str, int]:
        out = {"peak_rss": self._peak_rss, "start_rss": self._start_rss,
               "working_peak_rss": self._peak_rss - self._start_rss}
        if self._cuda_peak is not None:
            out["peak_cuda_allocated"] = self._cuda_peak
            if self._cuda_start is not None:
                out["start_cuda_allocated"] = self._cuda_start
                out["working_peak_cuda_allocated"] = self._cuda_peak - self._cuda_start
        if self._peak_nvml is not None:
            out["peak_nvml_process"] = self._peak_nvml
        return out


def _read_hwm() -> int | None:
    """``VmHWM`` of this process in bytes (the kernel's peak resident set), None without procfs."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (``echo 5 > /proc/self/clear_refs``,
    Linux >= 4.0, proc(5)); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


_OPEN_STEPS: list["StepPeak"] = []  # nested steps: an inner reset of the mark must not hide an outer peak


class StepPeak:
    """Peak resident memory of one step of work in this process (bytes), e.g. a conversion.

    On Linux the kernel's own high-water mark is reset at the start (``/proc/self/clear_refs``)
    and read at the end (``VmHWM``), so no allocation between samples is missed; elsewhere a
    ``PeakMemorySampler`` thread samples RSS. Heap is trimmed first so the start is what is live.

    Attributes (after the ``with`` block):
        start_bytes: RSS at the start. peak_bytes: the peak RSS during the step.
        growth_bytes: ``peak_bytes - start_bytes``: the memory the step itself needed.
        method: ``"VmHWM"`` or ``"sampled"``.
    """

    def __init__(self, trim: bool = True):
        self.trim = trim  # False where the caller has just trimmed (LoadMemory)
        self.start_bytes = self.peak_bytes = self.growth_bytes = 0
        self.method = ""
        self._sampler: PeakMemorySampler | None = None
        self._inner_peak = 0

    def __enter__(self) -> "StepPeak":
        if self.trim:
            malloc_trim()
        self.start_bytes = rss_bytes()
        for outer in _OPEN_STEPS:  # what the outer steps reached so far, before the mark is reset
            outer._inner_peak = max(outer._inner_peak, _read_hwm() or 0)
        _OPEN_STEPS.append(self)
        if _reset_hwm() and _read_hwm() is not None:
            self.method = "VmHWM"
        else:
            self.method = "sampled"
            self._sampler = PeakMemorySampler()
            self._sampler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._sampler is not None:
            self._sampler.__exit__(*exc)
            self.peak_bytes = max(self._sampler.result()["peak_rss"], rss_bytes())
        else:
            self.peak_bytes = max(_read_hwm() or 0, rss_bytes())
        self.peak_bytes = max(self.peak_bytes, self._inner_peak)
        self.growth_bytes = max(0, self.peak_bytes - self.start_bytes)
        if self in _OPEN_STEPS:
            _OPEN_STEPS.remove(self)
        for outer in _OPEN_STEPS:
            outer._inner_peak = max(outer._inner_peak, self.peak_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"peak_rss_bytes": self.peak_bytes, "growth_bytes": self.growth_bytes, "method": self.method}
