"""Integrity of the on-disk caches: a manifest written last, checked on every load, and the rebuild
of an entry that fails the check or fails to load.

Every cache under ``backends.models.cache_root()`` (the converted checkpoint, the ONNX graphs, the
MLC/TVM artifacts, the llama.cpp GGUF files) keeps its entries through this module:

- ``write_manifest`` records, for each file of an entry, its size and a sha256 digest, and writes
  the manifest last (a temporary name, then a rename), so a manifest exists only for an entry whose
  files were all written. ``publish_dir`` does this for an entry built in a staging directory and
  renames the directory into place.
- ``CacheEntry.check`` reads the manifest and compares every file it lists. A missing manifest, an
  unreadable one, a missing file, a file whose size differs (a truncated or extended file) or whose
  digest differs (a file overwritten with other bytes, of any size) makes the entry unusable: the
  caller discards it, says why (``note_rebuild``: a ``CacheRebuildWarning`` and the load's
  ``details["cache_rebuilt"]``) and builds it again, so that load reports ``cache_hit`` False.
- ``Backend.load`` (``backends/base.py``) adds a second line of defence: when reading an entry that
  passed the check raises (the engine cannot parse the file), the entry named by
  ``Backend.cached_entry`` is discarded and rebuilt once; a second failure is raised.

What the digest covers, so that a check costs milliseconds even for the shards of an 8B model:
a file of at most ``FULL_HASH_BYTES`` (configs, tokenizers, manifests of facts, small libraries)
is hashed whole; a larger file (weights) is hashed over ``SAMPLES`` blocks of ``SAMPLE_BYTES``
spread evenly from its first to its last byte (``sample_offsets``; 512 KiB read per file), plus its
size. Detected: a missing file, any change of size, a small file with any byte changed, a large file
overwritten wholesale (garbage, zeros, another file of the same size) or changed in its first or last
64 KiB (headers, zip directories) or in any sampled block. Not detected by the manifest: a change of
a few bytes of a large file between sampled blocks (a flipped bit inside the weights); it is caught
only if the engine then fails to read the file (the rebuild-once above), otherwise the load uses the
damaged values. Files are not re-hashed while a model is loaded, only when a load checks its entry.

Entries written before manifests existed ("legacy") are adopted, not rebuilt: a cache that decides
an old entry was complete by its own old rule (``CacheEntry.check(legacy=...)``) has the manifest of
the files as they are now written for it, once, and from then on they are checked. Damage that
happened before adoption is therefore not seen by the manifest (the rebuild-once still applies).
A read-only cache adopts nothing and accepts the legacy entry as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1  # the "cache_manifest" value of a manifest this module wrote
FULL_HASH_BYTES = 4 << 20  # files up to this size are hashed whole
SAMPLE_BYTES = 64 << 10  # larger files: SAMPLES blocks of this size, first and last included
SAMPLES = 8


class CacheRebuildWarning(UserWarning):
    """A cache entry was found corrupt or incomplete and is being rebuilt (one line: which, why)."""


_REBUILDS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("quantarena_rebuilds", default=None)


@contextlib.contextmanager
def collect_rebuilds() -> Iterator[list[str]]:
    """Collect the ``note_rebuild`` lines of the code run inside (``Backend.load`` puts them in the
    load's ``details["cache_rebuilt"]``)."""
    notes: list[str] = []
    token = _REBUILDS.set(notes)
    try:
        yield notes
    finally:
        _REBUILDS.reset(token)


def note_rebuild(what: str, reason: str) -> str:
    """Say, in one line, that ``what`` is rebuilt and why: a ``CacheRebuildWarning`` (stderr, so the
    run's log) and a note for the current load. Returns the line."""
    line = f"{what} is corrupt or incomplete ({reason}); rebuilding it"
    warnings.warn(line, CacheRebuildWarning, stacklevel=3)
    notes = _REBUILDS.get()
    if notes is not None:
        notes.append(line)
    return line


def sample_offsets(size: int) -> list[int]:
    """Where the sampled blocks of a file of ``size`` bytes (> ``FULL_HASH_BYTES``) start: ``SAMPLES``
    offsets spread evenly from 0 to ``size - SAMPLE_BYTES``."""
    last = size - SAMPLE_BYTES
    return [round(i * last / (SAMPLES - 1)) for i in range(SAMPLES)]


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes", "sha256", "hashed"}`` of a file: ``hashed`` is ``"all"`` (the digest of every
    byte) or ``"sampled"`` (of its size and the ``sample_offsets`` blocks)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
            return {"bytes": size, "sha256": digest.hexdigest(), "hashed": "all"}
        digest.update(str(size).encode())
        for offset in sample_offsets(size):
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))
    return {"bytes": size, "sha256": digest.hexdigest(), "hashed": "sampled"}


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> Any:
    """``write(tmp)`` to a temporary sibling of ``path``, then rename it to ``path``: a reader
    never sees a half-written file; the temporary file is removed if ``write`` fails. Returns what
    ``write`` returned."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        result = write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (``replace_atomically``)."""
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def manifest_of(directory: Path, files: list[str] | None = None, facts: dict[str, Any] | None = None,
                name: str = MANIFEST) -> dict[str, Any]:
    """The manifest of ``files`` of ``directory`` (default: every regular file in it but the
    manifest ``name``) with ``facts``; nothing is written."""
    directory = Path(directory)
    if files is None:
        files = sorted(p.name for p in directory.iterdir()
                       if p.is_file() and p.name != name and ".tmp" not in p.name)
    return {**(facts or {}), "cache_manifest": MANIFEST_FORMAT,
            "files": {f: file_record(directory / f) for f in files}}


def write_manifest(directory: Path, files: list[str] | None = None, facts: dict[str, Any] | None = None,
                   name: str = MANIFEST) -> dict[str, Any]:
    """Write ``manifest_of(directory, files, facts, name)`` to ``directory/name``, after the files
    and atomically; returns it."""
    manifest = manifest_of(directory, files, facts, name)
    atomic_write_text(Path(directory) / name, json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return manifest


def verify_files(directory: Path, files: dict[str, Any]) -> str | None:
    """The first difference between ``directory`` and a manifest's ``files``, or None."""
    for name, recorded in files.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != recorded["bytes"]:
            return f"{name} has {size} bytes, the manifest says {recorded['bytes']}"
        if file_record(path)["sha256"] != recorded["sha256"]:
            what = "all its bytes" if recorded.get("hashed") == "all" else f"{SAMPLES} sampled blocks"
            return f"{name} differs from the manifest (sha256 of {what})"
    return None


@dataclass(frozen=True)
class CacheEntry:
    """One cache entry: a whole directory (``files`` None: every file in it) with its manifest, or
    some ``files`` of a directory shared with other entries (the llama.cpp GGUF of one variant)
    with a manifest of their own (``name``).

    Attributes:
        directory: where the files are. name: the manifest's file name in it.
        files: the entry's file names, for an entry that is not the whole directory.
        label: what the entry is, for the one-line notes (``"onnx cache entry"``).
    """

    directory: Path
    name: str = MANIFEST
    files: tuple[str, ...] | None = None
    label: str = "cache entry"

    @property
    def manifest_path(self) -> Path:
        return Path(self.directory) / self.name

    @property
    def title(self) -> str:
        return f"{self.label} {Path(self.directory).name}" + (f"/{self.files[0]}" if self.files else "")

    def exists(self) -> bool:
        """Whether anything of the entry is on disk (its directory, or one of its files)."""
        if self.files is None:
            return Path(self.directory).exists()
        return self.manifest_path.exists() or any((Path(self.directory) / f).exists() for f in self.files)

    def check(self, legacy: Callable[[dict[str, Any] | None], dict[str, Any] | None] | None = None
              ) -> tuple[dict[str, Any] | None, str | None]:
        """``(manifest, None)`` for a sound entry, ``(None, reason)`` for a corrupt or incomplete one,
        ``(None, None)`` when there is none.

        Args:
            legacy: for a manifest this module did not write (absent: None; or an older cache's own
                facts file), the cache's old rule: returns the facts to keep when the old rule says
                the entry is complete (it is then adopted: its manifest is written now), else None.
        """
        if not self.exists():
            return None, None
        old: dict[str, Any] | None = None
        if self.manifest_path.is_file():
            try:
                old = json.loads(self.manifest_path.read_text())
                if not isinstance(old, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError) as exc:
                return None, f"unreadable manifest {self.name} ({type(exc).__name__})"
            if old.get("cache_manifest") == MANIFEST_FORMAT:
                try:
                    reason = verify_files(self.directory, dict(old["files"]))
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    return None, f"malformed manifest {self.name} ({type(exc).__name__})"
                return (None, reason) if reason else (old, None)
        facts = legacy(old) if legacy is not None else None
        if facts is None:
            return None, f"no manifest {self.name}" if old is None else f"{self.name} is not a manifest"
        files = list(self.files) if self.files is not None else None
        if files is not None and not all((Path(self.directory) / f).is_file() for f in files):
            return None, "a file of the entry is missing"
        try:
            return write_manifest(self.directory, files, facts, self.name), None
        except OSError:  # a read-only cache: accept the legacy entry as it is, unrecorded
            return manifest_of(self.directory, files, facts, self.name), None

    def discard(self) -> None:
        """Delete the entry (its directory, or its files and manifest)."""
        if self.files is None:
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        self.manifest_path.unlink(missing_ok=True)  # first: a half-deleted entry has no manifest
        for name in self.files:
            (Path(self.directory) / name).unlink(missing_ok=True)

    def check_or_discard(self, legacy=None) -> dict[str, Any] | None:
        """The manifest of a sound entry; otherwise None, after discarding a corrupt or incomplete
        entry with a ``note_rebuild`` (the caller then builds it)."""
        manifest, reason = self.check(legacy)
        if manifest is None and reason is not None:
            note_rebuild(self.title, reason)
            self.discard()
        return manifest


def publish_dir(staging: Path, entry: CacheEntry, facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the manifest of the files built in ``staging`` and rename it to ``entry.directory``
    (replacing whatever is there); returns the manifest. If another process published the same
    entry meanwhile and it checks sound, that one is kept and ``staging`` removed.

    Raises:
        OSError: the rename failed for another reason (``staging`` is removed).
    """
    manifest = write_manifest(staging, None, facts, entry.name)
    target = Path(entry.directory)
    try:
        for _attempt in range(2):
            if target.exists():  # another process published it meanwhile: keep a sound one
                theirs, _ = entry.check()
                if theirs is not None:
                    return theirs
            shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(staging, target)
                return manifest
            except OSError:
                theirs, _ = entry.check()
                if theirs is not None:
                    return theirs
        raise OSError(f"cannot move {staging} to {target}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
