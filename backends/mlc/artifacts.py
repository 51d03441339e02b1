"""On-disk cache of compiled libraries and converted weights.

One directory per (checkpoint, quantization mode, compute dtype, target, TVM version, source hash
of this backend's model/quantization/schedule code), under ``cache_root() / "mlc"``:
``lib.so`` (``Executable.export_library``), ``params.npz`` (converted weights, export order),
``meta.json`` (parameter names, convert and compile seconds) and ``manifest.json`` (each file's
size and sha256, ``backends.artifact_cache``). Written to a temporary directory, manifest last,
and renamed, so a crash never leaves a half-written entry that looks complete.

``check`` detects a missing file or manifest, a file truncated or extended, ``meta.json`` or a
small ``lib.so`` with any byte changed, and ``params.npz`` or a large ``lib.so`` overwritten
(its size, first and last 64 KiB and 6 blocks between are hashed). A few bytes changed between
those blocks are not seen by the manifest: ``np.load`` then fails the zip member's CRC, or TVM
fails to load the library, and ``Backend.load`` discards the entry and rebuilds it once.
An entry from before manifests (three files, a ``meta.json`` without ``"manifest"``) is adopted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from backends.artifact_cache import CacheEntry, atomic_write_text, note_rebuild, publish_dir
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


FILES = ("lib.so", "params.npz", "meta.json")


def cache_entry(directory: Path) -> CacheEntry:
    """The entry at ``directory``: the whole directory, manifest ``manifest.json``."""
    return CacheEntry(Path(directory), label="mlc cache entry")


def _legacy(directory: Path):
    """The old rule (before manifests): the three files exist, and ``meta.json`` lacks
    ``"manifest": true``, which this version writes (and adds on adoption), so that an entry
    with a manifest that loses it is incomplete, not legacy."""

    def adopt(old: dict[str, Any] | None) -> dict[str, Any] | None:
        if old is not None or not all((Path(directory) / f).is_file() for f in FILES):
            return None
        try:
            meta = json.loads((Path(directory) / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("manifest"):
            return None
        try:  # from now on the entry is one with a manifest: losing it means a rebuild
            atomic_write_text(Path(directory) / "meta.json", json.dumps({**meta, "manifest": True}, indent=1))
        except OSError:  # a read-only cache
            pass
        return {}

    return adopt


def check(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)`` for a sound entry, ``(None, reason)`` for a corrupt or incomplete one,
    ``(None, None)`` when there is none (see the module docstring for what is detected)."""
    manifest, reason = cache_entry(directory).check(legacy=_legacy(directory))
    if manifest is not None and not set(FILES) <= set(manifest["files"]):
        return None, f"the manifest does not list {', '.join(FILES)}"
    return manifest, reason


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a sound entry (nothing is discarded)."""
    return check(directory)[0] is not None


def usable(directory: Path) -> bool:
    """Whether ``directory`` holds a sound entry; a corrupt or incomplete one is discarded with a
    ``note_rebuild`` line, for the caller to build again."""
    manifest, reason = check(directory)
    if reason is not None:
        entry = cache_entry(directory)
        note_rebuild(entry.title, reason)
        entry.discard()
    return manifest is not None


def write_params(path: Path, params: Iterable[tuple[str, np.ndarray]]) -> list[str]:
    """Write ``params`` to an ``.npz`` one array at a time (the layout ``np.savez`` writes:
    uncompressed zip64 members ``<name>.npy``), so only the array being written is in memory;
    returns the names in order."""
    names = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in params:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
            names.append(name)
    return names


class Staging:
    """A cache entry being built: files go into ``path`` (a temporary directory beside the entry);
    ``meta`` is written as ``meta.json`` when the block ends without error, then the manifest
    (last) and the rename (``publish_dir``). On an error the directory is removed."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory.with_name(self.directory.name + f".tmp{time.time_ns()}")
        self.meta: dict[str, Any] = {}

    def __enter__(self) -> "Staging":
        self.path.mkdir(parents=True)
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            (self.path / "meta.json").write_text(json.dumps({**self.meta, "manifest": True}, indent=1))
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        publish_dir(self.path, cache_entry(self.directory))


def load(directory: Path):
    """``(library module, params in export order, meta)`` of a complete entry; ``params`` is an
    iterator reading one array at a time, so the caller can move each to the device before the
    next is read."""
    import tvm

    meta = json.loads((directory / "meta.json").read_text())

    def params():
        with np.load(directory / "params.npz") as npz:
            for name in meta["names"]:
                yield npz[name]

    return tvm.runtime.load_module(str(directory / "lib.so")), params(), meta


def sizes(directory: Path) -> dict[str, int]:
    """``library_bytes`` and ``weights_bytes_on_disk`` of an entry."""
    return {"library_bytes": (directory / "lib.so").stat().st_size,
            "weights_bytes_on_disk": (directory / "params.npz").stat().st_size}
