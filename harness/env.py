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


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    commit = _run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"])
    if commit and _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"]):
        commit += "-dirty"
    return commit


@functools.lru_cache(maxsize=1)
def fingerprint() -> dict[str, Any]:
    """CPU model and cores, RAM bytes, GPUs (name, driver), CUDA driver version, Python, package
    versions and this project's git commit (``-dirty`` with uncommitted changes)."""
    return {
        "cpu": _cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
        "gpus": _gpus(),
        "cuda_driver": _cuda_version(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": _versions(),
        "git_commit": git_commit(),
        "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }
