"""Environment fingerprint written into every record, so any two rows can be compared later
(llama-bench prints build and hardware in every row for the same reason)."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil

PACKAGES = ("torch", "transformers", "bitsandbytes", "accelerate", "onnxruntime", "optimum-onnx",
            "optimum-quanto", "apache-tvm", "llama-cpp-python", "gguf", "numpy", "pydantic", "pandas")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None


def _gpus() -> list[dict[str, str]]:
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if not out:
        return []
    gpus = []
    for line in out.splitlines():
        name, driver, memory = (part.strip() for part in line.split(","))
        gpus.append({"name": name, "driver": driver, "memory": memory})
    return gpus


def _cuda_version() -> str | None:
    out = _run(["nvidia-smi"])
    if out and "CUDA Version:" in out:
        return out.split("CUDA Version:")[1].split()[0]
    return None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape results (``PACKAGES``), by name."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache level (sysfs ``cpu0/cache/index*/size``), or None."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None


TRIAD_REPEATS = 5
TRIAD_CHUNK = 1 << 15  # float64 elements per block (256 KiB): the s*c temporary stays in L2


def triad_bytes(n: int) -> int:
    """Bytes one STREAM triad ``a = b + s*c`` over ``n`` float64 elements is credited with: read b
    and c, write a: ``3 x 8 x n`` (STREAM's counting; the write-allocate read of ``a`` is not
    counted, as in STREAM)."""
    return 3 * 8 * n


def _triad(a, b, c, s: float, lo: int, hi: int, tmp) -> None:
    """``a[lo:hi] = b[lo:hi] + s * c[lo:hi]`` in cache-sized blocks, so the only memory traffic
    is STREAM's (numpy's ``b + s*c`` would stream a full-size temporary through memory too)."""
    import numpy as np

    for start in range(lo, hi, TRIAD_CHUNK):
        stop = min(start + TRIAD_CHUNK, hi)
        t = tmp[: stop - start]
        np.multiply(c[start:stop], s, out=t)
        np.add(b[start:stop], t, out=a[start:stop])


@functools.lru_cache(maxsize=1)
def memory_bandwidth(threads: int | None = None) -> dict[str, Any]:
    """This machine's main-memory bandwidth, measured with a STREAM-style triad (McCalpin, STREAM
    benchmark, ``a = b + s*c``) in numpy.

    Three float64 arrays of ``n`` elements, each at least 4x the last-level cache (64 MiB minimum,
    512 MiB maximum, and at most 1/16 of the available RAM); ``threads`` threads (default: the
    physical cores) each run the triad on their own contiguous slice (numpy releases the GIL in
    its loops); the best of ``TRIAD_REPEATS`` runs counts, bytes as STREAM counts them
    (``triad_bytes(n) = 3 x 8 x n``). Takes well under 2 s; run once per process, never inside a
    timed cell.

    Returns:
        ``bytes_s`` (bytes per second), ``method`` (text), ``array_bytes`` (per array),
        ``threads``, ``repeats``, ``best_s`` (seconds of the best triad).
    """
    import threading
    import time

    import numpy as np

    threads = threads or psutil.cpu_count(logical=False) or 1
    llc = _last_level_cache_bytes() or 32 * 1024 ** 2
    per_array = min(max(4 * llc, 64 * 1024 ** 2), 512 * 1024 ** 2,
                    max(psutil.virtual_memory().available // 16, 8 * 1024 ** 2))
    n = per_array // 8
    a = np.zeros(n)
    b = np.full(n, 1.0)
    c = np.full(n, 2.0)
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
    temps = [np.empty(TRIAD_CHUNK) for _ in range(threads)]
    best = float("inf")
    for _ in range(TRIAD_REPEATS):
        workers = [threading.Thread(target=_triad, args=(a, b, c, 3.0, lo, hi, tmp))
                   for (lo, hi), tmp in zip(bounds, temps)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - started)
    if not np.allclose(a[:: max(1, n // 1024)], 7.0):
        raise RuntimeError("STREAM triad produced wrong values")
    return {"bytes_s": triad_bytes(n) / best, "best_s": best, "array_bytes": n * 8, "threads": threads,
            "repeats": TRIAD_REPEATS,
            "method": f"STREAM triad a = b + s*c, numpy float64, {threads} threads, 3 arrays of "
                      f"{n * 8 / 2**20:.0f} MiB, best of {TRIAD_REPEATS}, bytes = 3 x 8 x N"}


def gpu_memory_bandwidth() -> list[dict[str, Any]]:
    """Each NVIDIA GPU's peak memory bandwidth from NVML (not measured): maximum memory clock
    (``nvmlDeviceGetMaxClockInfo(NVML_CLOCK_MEM)``, MHz) x bus width
    (``nvmlDeviceGetMemoryBusWidth``, bits) / 8 x 2 (double data rate), in bytes per second; e.g.
    an H100 SXM: 2619 MHz x 5120 bit / 8 x 2 = 3.35 TB/s, its datasheet figure. Empty without
    pynvml or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no pynvml, no driver: no GPU figure
        return []
    out = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
            bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
            out.append({"index": index, "bytes_s": clock_mhz * 1e6 * bus_bits / 8 * 2,
                        "memory_clock_mhz": clock_mhz, "bus_width_bits": bus_bits,
                        "method": "NVML peak: max memory clock x bus width / 8 x 2 (DDR), not measured"})
    except pynvml.NVMLError:
        return out
    return out


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    commit = _run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"])
    if commit and _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"]):
        commit += "-dirty"
    return commit


@functools.lru_cache(maxsize=1)
def fingerprint() -> dict[str, Any]:
    """Hostname, CPU model and cores, RAM bytes, GPUs (name, driver), CUDA driver version, Python, package
    versions and this project's git commit (``-dirty`` with uncommitted changes); the memory
    bandwidth the roofline uses: ``memory_bandwidth_bytes_s`` (host, measured by
    ``memory_bandwidth``, details under ``memory_bandwidth``) and ``gpu_memory_bandwidth`` (NVML
    peak per GPU, ``gpu_memory_bandwidth()``)."""
    bandwidth = memory_bandwidth()
    return {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
        "gpus": _gpus(),
        "cuda_driver": _cuda_version(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "memory_bandwidth_bytes_s": bandwidth["bytes_s"],
        "memory_bandwidth": bandwidth,
        "gpu_memory_bandwidth": gpu_memory_bandwidth(),
    }
