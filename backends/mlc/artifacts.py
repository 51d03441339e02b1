"""On-disk cache of compiled libraries and converted weights.

One directory per (checkpoint, quantization mode, compute dtype, target, TVM version, source hash
of this backend's model/quantization/schedule code), under ``cache_root() / "mlc"``:
``lib.so`` (``Executable.export_library``), ``params.npz`` (converted weights, export order) and
``meta.json`` (parameter names, convert and compile seconds). Written to a temporary directory and
renamed, so a crash never leaves a half-written entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from backends.models import cache_root

_SOURCES = ("model.py", "quant.py", "schedules.py", "attention.py", "fastmath.py", "compile.py", "convert.py")


def source_hash() -> str:
    """Hash of the code that determines a compiled artifact, so edits invalidate old entries."""
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:12]


def artifact_dir(checkpoint: Path, mode: str, dtype: str, target_key: str, root: Path | None = None) -> Path:
    """Where the artifacts for this combination live (may not exist yet), under ``root``
    (default ``cache_root() / "mlc"``)."""
    import tvm

    key = f"{Path(checkpoint).name}-{mode}-{dtype}-{target_key}-tvm{tvm.__version__}-{source_hash()}"
    return Path(root or cache_root() / "mlc") / key.replace("/", "_")


def is_complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in ("lib.so", "params.npz", "meta.json"))


def save(directory: Path, executable, params: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write an entry atomically (temporary directory, then rename)."""
    tmp = directory.with_name(directory.name + f".tmp{time.time_ns()}")
    tmp.mkdir(parents=True)
    try:
        executable.export_library(str(tmp / "lib.so"))
        np.savez(tmp / "params.npz", **params)
        (tmp / "meta.json").write_text(json.dumps({**meta, "names": list(params)}, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load(directory: Path):
    """``(library module, [params in export order], meta)`` of a complete entry."""
    import tvm

    meta = json.loads((directory / "meta.json").read_text())
    with np.load(directory / "params.npz") as npz:
        params = [npz[name] for name in meta["names"]]
    return tvm.runtime.load_module(str(directory / "lib.so")), params, meta


def sizes(directory: Path) -> dict[str, int]:
    """``library_bytes`` and ``weights_bytes_on_disk`` of an entry."""
    return {"library_bytes": (directory / "lib.so").stat().st_size,
            "weights_bytes_on_disk": (directory / "params.npz").stat().st_size}
