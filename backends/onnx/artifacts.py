"""The on-disk cache of exported and quantized ONNX graphs, and its validation.

One cache entry is a directory ``cache_root()/onnx/<model>-<variant>-<key>/`` holding ``model.onnx``
(plus any external-data file the exporter wrote) and ``manifest.json``. The key hashes everything
that changes the graph: the checkpoint's identity (path, config and weight-file sizes and mtimes),
the variant, the quantization settings and the versions of optimum-onnx, onnxruntime, onnx,
transformers and torch. An entry is built in a temporary sibling directory and renamed into place
with the manifest written last (``backends.artifact_cache.publish_dir``), so a half-written entry
never has a manifest. The manifest lists every file with its size and sha256 (whole for files up
to 4 MiB, sampled blocks beyond: see ``backends.artifact_cache``). A manifest that is missing,
unreadable, from another key, or lists a file that is missing, of another size or with another
digest marks the entry corrupt, as does a ``model.onnx`` that ``onnx.load`` cannot parse (the
``check`` of ``get_or_build``): it is deleted and rebuilt with a ``CacheRebuildWarning``, never
trusted. A graph whose bytes changed between sampled blocks and still parses is not detected.
An entry from before these manifests (its manifest lists sizes only) is adopted if its files have
those sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from backends.artifact_cache import CacheEntry, atomic_write_text, note_rebuild, publish_dir
from backends.base import BackendError
from backends.models import cache_root

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
EXPORT_TASK = "text-generation-with-past"  # decoder with past key values: incremental decode
FORMAT = 3  # of the entry and its manifest; part of the key, so a format change rebuilds
# (3: the export has a logits_to_keep input, see export.add_logits_to_keep)
REQUIRED = ("key", "files", "export_s", "quantize_s", "artifact_bytes", "weight_bytes",
            "folded_weight_bytes", "opset", "settings", "versions")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an exported or quantized graph (part of the key)."""
    import importlib.metadata as metadata

    versions = {}
    for package in ("optimum-onnx", "optimum", "onnxruntime", "onnx", "transformers", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    if versions["onnxruntime"] == "absent":  # the GPU wheel has another distribution name
        try:
            versions["onnxruntime"] = metadata.version("onnxruntime-gpu")
        except metadata.PackageNotFoundError:
            pass
    return versions


def entry_key(identity: str, variant: str, settings: dict[str, Any]) -> str:
    """16 hex digits of sha256 over identity, variant, settings and library versions."""
    payload = json.dumps(
        {"model": identity, "variant": variant, "settings": settings, "versions": library_versions(),
         "format": FORMAT},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Artifact:
    """A valid cache entry.

    Attributes:
        directory: the entry directory; ``model_path`` is its ``model.onnx``.
        manifest: what was recorded when it was built: ``export_s`` and ``quantize_s`` (seconds the
            build took; ``quantize_s`` is 0 for fp32), ``artifact_bytes`` (bytes on disk of every
            graph file), ``weight_bytes`` (bytes of the graph's initializers), ``opset``,
            ``settings``, ``versions``, ``files`` (name -> ``{bytes, sha256, hashed}``).
        cache_hit: True when the entry existed and was valid before this load.
        rebuilt_reason: why an existing entry was discarded and rebuilt, if it was.
        export_done_now: whether this load ran the ONNX export (for a quantized entry: whether
            its fp32 parent was exported now).
    """

    directory: Path
    manifest: dict[str, Any]
    cache_hit: bool
    rebuilt_reason: str | None = None
    export_done_now: bool | None = None

    def __post_init__(self):
        if self.export_done_now is None:  # a quantized entry sets it from its fp32 parent
            self.export_done_now = not self.cache_hit

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE


def entry_dir(model_name: str, variant: str, key: str) -> Path:
    """``cache_root()/onnx/<last part of model_name>-<variant>-<key>``."""
    return cache_root() / "onnx" / f"{Path(model_name).name}-{variant}-{key}"


def cache_entry(directory: Path) -> CacheEntry:
    """The entry at ``directory``: the whole directory, manifest ``manifest.json``."""
    return CacheEntry(Path(directory), MANIFEST, label="onnx cache entry")


def _legacy(directory: Path) -> Callable[[dict[str, Any] | None], dict[str, Any] | None]:
    """The old rule for a manifest of sizes only (before ``backends.artifact_cache``): every file
    listed has its size. Returns the adopter ``CacheEntry.check`` calls."""

    def adopt(old: dict[str, Any] | None) -> dict[str, Any] | None:
        files = (old or {}).get("files")
        if not isinstance(files, dict) or MODEL_FILE not in files:
            return None
        for name, size in files.items():
            path = Path(directory) / name
            if not isinstance(size, int) or not path.is_file() or path.stat().st_size != size:
                return None
        return {k: v for k, v in old.items() if k != "files"}

    return adopt


def validate(directory: Path, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """Check an entry: returns ``(manifest, None)`` if valid, ``(None, reason)`` if not, and
    ``(None, None)`` if there is no entry at all. Files are checked by ``CacheEntry.check``."""
    manifest, reason = cache_entry(directory).check(legacy=_legacy(directory))
    if manifest is None:
        return None, reason
    missing = [name for name in REQUIRED if name not in manifest]
    if missing:
        return None, f"manifest lacks {', '.join(missing)}"
    if manifest.get("key") != key:
        return None, "manifest key does not match the entry"
    if MODEL_FILE not in manifest["files"]:
        return None, f"manifest lists no {MODEL_FILE}"
    return manifest, None


def graph_facts(model_path: Path) -> dict[str, Any]:
    """Facts about an ONNX graph, for the manifest.

    Returns:
        ``opset`` (default-domain opset version); ``weight_bytes``: bytes of the weights the
        session holds: initializers and Constant-node tensors (external data included), plus
        ``folded_weight_bytes``: the outputs of Transpose nodes applied to an initializer, which
        onnxruntime's constant folding materialises as new weights when the session is created
        (optimum's export of a tied lm_head is ``MatMul(h, Transpose(embed_tokens))``, so the
        session keeps a second, transposed copy of the embedding).
    """
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)

    def tensor_bytes(tensor) -> int:
        count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            return (count + 1) // 2
        return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize

    initializers = {t.name: tensor_bytes(t) for t in model.graph.initializer}
    total = sum(initializers.values())
    folded = 0
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    total += tensor_bytes(attribute.t)
        elif node.op_type == "Transpose" and node.input[0] in initializers:
            folded += initializers[node.input[0]]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "weight_bytes": int(total + folded), "folded_weight_bytes": int(folded)}


QUANTIZED_MATMULS = ("MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul", "QLinearMatMul",
                     "MatMulIntegerToFloat", "MatMulBnb4")
WEIGHT_GROUPS_DIR = "onnx-weight-groups"  # under cache_root(): one JSON per artifact entry, outside it


def weight_groups(model_path: Path) -> dict[str, list[str]]:
    """Which weight matrices the graph holds quantized and which fp32, by kind: the path part of
    the node name before the op (optimum names ``/model/layers.3/self_attn/q_proj/MatMul``).

    Quantized: nodes of a quantized MatMul op (``QUANTIZED_MATMULS``); kept: ``MatMul`` with a
    constant weight (an initializer, or a ``Transpose`` of one, which onnxruntime folds into a
    second, transposed copy at session creation: marked so) and ``Gather`` of an initializer (the
    embedding). A kind quantized in some layers only reads ``down_proj (2/30)``. Norm vectors are
    not listed (always fp32). Same return shape as ``backends.hf.backend.weight_groups``.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    transposed = {node.output[0] for node in graph.node
                  if node.op_type == "Transpose" and node.input[0] in constants}
    counts: dict[str, list[int]] = {}
    notes: dict[str, str] = {}
    for node in graph.node:
        parts = [part for part in node.name.split("/") if part]
        kind = parts[-2] if len(parts) >= 2 else node.name
        if node.op_type in QUANTIZED_MATMULS:
            counts.setdefault(kind, [0, 0])[0] += 1
        elif node.op_type == "MatMul" and len(node.input) > 1 and (
                node.input[1] in constants or node.input[1] in transposed):
            counts.setdefault(kind, [0, 0])[1] += 1
            if node.input[1] in transposed:
                notes[kind] = "folded transposed copy"
        elif node.op_type == "Gather" and node.input[0] in constants:
            counts.setdefault(kind, [0, 0])[1] += 1

    def describe(kind: str, index: int) -> str:
        q, k = counts[kind]
        n = q if index == 0 else k
        text = kind if n == q + k else f"{kind} ({n}/{q + k})"
        return f"{text} ({notes[kind]})" if index == 1 and kind in notes else text

    quantized = [describe(kind, 0) for kind, (q, _) in counts.items() if q]
    if not quantized:
        return {"quantized": [], "kept": ["all (float32)"]}
    return {"quantized": quantized, "kept": [describe(kind, 1) for kind, (_, k) in counts.items() if k]}


def cached_weight_groups(artifact_dir: Path, model_path: Path) -> dict[str, list[str]]:
    """``weight_groups(model_path)``, read from / written to
    ``cache_root()/WEIGHT_GROUPS_DIR/<artifact_dir name>.json`` (outside the entry, whose files the
    manifest lists) so the graph is parsed once per artifact; a missing or unreadable file is
    recomputed. The entry name carries its key (model, variant, settings)."""
    folder = cache_root() / WEIGHT_GROUPS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    sidecar = folder / f"{Path(artifact_dir).name}.json"
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        pass
    groups = weight_groups(model_path)
    try:
        atomic_write_text(sidecar, json.dumps(groups))
    except OSError:  # a read-only cache: the figure is still returned
        pass
    return groups


def get_or_build(
    model_name: str,
    variant: str,
    identity: str,
    settings: dict[str, Any],
    build: Callable[[Path], dict[str, float]],
    check: Callable[[Path], None] | None = None,
) -> Artifact:
    """Return the valid cache entry for ``(model, variant, settings)``, building it if needed.

    Args:
        model_name: the model's name (only its last path part appears in the directory name).
        variant: ``fp32``, ``int8`` or ``int4``.
        identity: ``checkpoint_identity`` of the source checkpoint.
        settings: every option that changes the graph (JSON-serialisable); part of the key.
        build: writes ``model.onnx`` (and any external data) into the empty directory it is given
            and returns ``{"export_s": s, "quantize_s": s}``; raises ``BackendError`` on failure.
        check: optional deep check of a cached entry (e.g. create an inference session); raising
            any exception marks the entry corrupt and it is rebuilt.

    Raises:
        BackendError: the build failed (the partial entry is removed).
    """
    key = entry_key(identity, variant, settings)
    directory = entry_dir(model_name, variant, key)
    manifest, reason = validate(directory, key)
    if manifest is not None and check is not None:
        try:
            check(directory / MODEL_FILE)
        except Exception as exc:  # a corrupt graph: any loader error means "rebuild"
            manifest, reason = None, f"{MODEL_FILE} does not load ({type(exc).__name__}: {str(exc)[:120]})"
    if manifest is not None:
        return Artifact(directory, manifest, cache_hit=True)
    entry = cache_entry(directory)
    if reason is not None:
        note_rebuild(entry.title, reason)
        entry.discard()
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        timings = build(staging)
        if not (staging / MODEL_FILE).is_file():
            raise BackendError(f"the {variant} build wrote no {MODEL_FILE}")
        sizes = [p.stat().st_size for p in staging.iterdir() if p.is_file()]
        facts = {
            "key": key,
            "model": model_name,
            "variant": variant,
            "settings": settings,
            "versions": library_versions(),
            "export_s": float(timings.get("export_s", 0.0)),
            "quantize_s": float(timings.get("quantize_s", 0.0)),
            "artifact_bytes": int(sum(sizes)),
            **{k: int(v) for k, v in timings.items() if k.endswith("_peak_bytes") and v is not None},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **graph_facts(staging / MODEL_FILE),
        }
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = publish_dir(staging, entry, facts)
    return Artifact(directory, manifest, cache_hit=False, rebuilt_reason=reason)
