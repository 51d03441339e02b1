"""``python -m harness cache list|prune``: what the artifact caches hold on disk, and removing what
is no longer wanted.

The caches live under ``backends.models.cache_root()`` (``$QUANTARENA_CACHE``): ``checkpoints/``
(converted checkpoints), ``onnx/`` (exported graphs), ``mlc/`` (compiled TVM artifacts),
``llamacpp/`` (one GGUF file per variant, in a folder per checkpoint) and small side files
(``onnx-weight-groups/``). An entry's state is its manifest check (``backends.artifact_cache``):
``ok``, unverified (written before manifests), or the reason it is corrupt or incomplete (the
next load would rebuild it). "Last used" is
the newest access or modification time of its files (access times have a day's resolution under
Linux's default ``relatime``; on ``noatime`` filesystems it is the time the entry was written).
Names ending in ``.tmp...`` are builds in progress or left by a killed one.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from backends.artifact_cache import MANIFEST, CacheEntry

LEFTOVER_AGE_S = 3600.0  # a .tmp build older than this is a leftover, not one in progress
KINDS = ("checkpoints", "onnx", "mlc", "llamacpp", "other")


@dataclass
class CacheItem:
    """One cache entry: ``kind`` (one of ``KINDS``), ``path``, ``bytes`` on disk (file sizes),
    ``last_used`` (epoch seconds), ``state`` ("ok", "leftover build", or why it is unusable)."""

    kind: str
    path: Path
    bytes: int
    last_used: float
    state: str
    entry: CacheEntry | None = None

    def remove(self) -> None:
        """Delete the entry from disk."""
        if self.entry is not None:
            self.entry.discard()
        elif self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)


def _files(paths: list[Path]) -> dict[Path, os.stat_result]:
    """Every file of ``paths`` (files, or folders walked) with its stat."""
    found = {}
    for path in paths:
        for file in [path] if path.is_file() else path.rglob("*"):
            try:
                if file.is_file():
                    found[file] = file.stat()
            except OSError:
                continue
    return found


def _usage(files: dict[Path, os.stat_result]) -> tuple[int, float]:
    """(bytes, newest access or modification time) of ``files``."""
    return (sum(stat.st_size for stat in files.values()),
            max((max(stat.st_atime, stat.st_mtime) for stat in files.values()), default=0.0))


UNVERIFIED = "unverified: no manifest yet (written before manifests; its next load adopts or rebuilds it)"


def _state(entry: CacheEntry, files: dict[Path, os.stat_result]) -> str:
    """"ok", ``UNVERIFIED``, or why the entry is corrupt or incomplete (a load would rebuild it).
    The check reads ``files``; their access times are put back, so listing is not a use."""
    _, reason = entry.check()
    for file, stat in files.items():
        try:
            os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        except OSError:  # gone, or a read-only cache: last use then counts this check
            pass
    if reason is None:
        return "ok"
    if reason.startswith("no manifest") or reason.endswith("is not a manifest"):
        return UNVERIFIED
    return reason


def cache_items(root: Path) -> list[CacheItem]:
    """Every entry under the cache ``root``, in kind then name order (nothing is changed)."""
    items: list[CacheItem] = []
    now = time.time()
    for kind_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []:
        kind = kind_dir.name if kind_dir.name in KINDS else "other"
        for path in sorted(kind_dir.iterdir()):
            if ".tmp" in path.name:
                size, used = _usage(_files([path]))
                state = "leftover build" if now - used > LEFTOVER_AGE_S else "build in progress"
                items.append(CacheItem(kind, path, size, used, state))
            elif kind == "llamacpp" and path.is_dir():
                for gguf in sorted(path.glob("*.gguf")):
                    entry = CacheEntry(path, f"{gguf.stem}.json", (gguf.name,), "llama.cpp GGUF")
                    files = _files([gguf, path / entry.name])
                    items.append(CacheItem(kind, gguf, *_usage(files), _state(entry, files), entry))
            elif kind in ("checkpoints", "onnx", "mlc") and path.is_dir():
                entry = CacheEntry(path, "done.json" if kind == "checkpoints" else MANIFEST)
                files = _files([path])
                items.append(CacheItem(kind, path, *_usage(files), _state(entry, files), entry))
            else:
                items.append(CacheItem(kind, path, *_usage(_files([path])), "ok"))
    return items


def to_prune(items: list[CacheItem], older_than_days: float | None = None, everything: bool = False) -> list[CacheItem]:
    """The items ``prune`` removes: every one with ``everything``; else the corrupt or incomplete
    ones (a load would rebuild them) and leftover builds, plus, with ``older_than_days``, those not used for
    that long. A build in progress is never removed."""
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    chosen = []
    for item in items:
        if item.state == "build in progress":
            continue
        broken = item.state not in ("ok", UNVERIFIED)
        if everything or broken or (cutoff is not None and item.last_used < cutoff):
            chosen.append(item)
    return chosen


def human_bytes(count: int) -> str:
    """``count`` bytes as B / KB / MB / GB (powers of 1000, as ``du --si``)."""
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"
