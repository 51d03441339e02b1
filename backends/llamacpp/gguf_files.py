"""The GGUF files the llama.cpp backend loads: one f32 source per model, quantized by llama.cpp.

Every variant derives from the same weights the other backends load:

- the embedded model (a GGUF package): ``q4_1`` is the shipped Q4_1 file as it is; the source of
  every other type is an f32 GGUF dequantized from it with the ``gguf`` package (the tensors are
  already in llama.cpp's layout, so the values are exactly what transformers dequantizes);
- a transformers checkpoint of the Llama family: an f32 GGUF written with the ``gguf`` package's
  writer and tensor-name map, Q/K rows permuted as llama.cpp's ``convert_hf_to_gguf.py`` does
  (``LlamaModel.permute``), the BPE vocabulary from ``tokenizer.json``.

Quantized types are made by llama.cpp's own quantizer (``llama_model_quantize``) from the f32
source. Files are cached under ``cache_root()/llamacpp/<checkpoint>-<key>/``; the key hashes the
source's identity and the llama-cpp-python version, and files are written to a temporary name and
renamed, so a crash never leaves a file that looks complete.

Each GGUF ``<variant>.gguf`` of a folder is its own cache entry (``file_entry``) with its manifest
``<variant>.json`` (the build facts, the file's size and sha256 of sampled blocks:
``backends.artifact_cache``), written after the file. The check on every load detects a missing
GGUF or manifest, a GGUF truncated or extended, or overwritten (its size, first and last 64 KiB
and 6 blocks between are hashed); such a file is deleted and built again (the f32 source too).
A few bytes changed inside the tensor data between sampled blocks are not detected: llama.cpp
does not checksum tensors, and the load uses them. A header that llama.cpp cannot parse makes
the load fail, and ``Backend.load`` rebuilds the file once. A file from before manifests (a
``<variant>.json`` of facts without a file list, beside its GGUF) is adopted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from backends.artifact_cache import CacheEntry, write_manifest
from backends.models import ModelSpec, cache_root, checkpoint_identity, file_identity

FORMAT = 1  # of the files this module writes; part of the cache key

# variant -> name of llama.cpp's LLAMA_FTYPE_* constant (llama.h)
FTYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
}


class UnsupportedModel(ValueError):
    """The checkpoint's architecture or tokenizer cannot be written as a llama.cpp GGUF here."""


def _atomic(target: Path, write: Callable[[Path], None]) -> float:
    """Run ``write(tmp)`` and rename the result to ``target``; returns the seconds it took."""
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    started = time.perf_counter()
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return time.perf_counter() - started


def entry_dir(spec: ModelSpec, directory: Path) -> Path:
    """The cache folder of this model's GGUF files (may not exist yet)."""
    import llama_cpp

    identity = file_identity(spec.location) if spec.source == "gguf" else checkpoint_identity(directory)
    key = hashlib.sha256(json.dumps([identity, llama_cpp.__version__, FORMAT]).encode()).hexdigest()[:16]
    return cache_root() / "llamacpp" / f"{Path(directory).name}-{key}"


# --- the f32 source ----------------------------------------------------------------------------
def dequantize_gguf(source: Path, target: Path) -> None:
    """Write ``target``: ``source`` with every tensor dequantized to f32 and its metadata kept
    (``general.file_type`` set to ALL_F32).

    Args:
        source: a GGUF file (any llama.cpp tensor types the ``gguf`` package can dequantize).
        target: the f32 GGUF to write.
    """
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.ascontiguousarray(values, dtype=np.float32))
    _write(writer)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Q or K projection from transformers' rotary layout (two halves per head) to
    llama.cpp's (interleaved pairs): ``LlamaModel.permute`` of llama.cpp's ``convert_hf_to_gguf.py``.

    Args:
        weights: ``[n_head * head_dim, hidden]``.
        n_head: heads of this projection (key/value heads for K).
    """
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _bpe_vocabulary(directory: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """``(tokens, token types, merges)`` of a byte-level BPE ``tokenizer.json``, padded with
    unused ``[PAD{i}]`` entries up to the embedding's ``vocab_size``.

    Raises:
        UnsupportedModel: no ``tokenizer.json`` or not a BPE model.
    """
    import gguf

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedModel(f"{directory} has no tokenizer.json")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModel(f"tokenizer type {model.get('type')!r} is not supported (BPE only)")
    size = max([vocab_size, *(i + 1 for i in model["vocab"].values()),
                *(t["id"] + 1 for t in tokenizer.get("added_tokens", []))])
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in model["vocab"].items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in tokenizer.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, [int(t) for t in types], merges


def write_f32_from_checkpoint(directory: Path, target: Path) -> None:
    """Write an f32 GGUF of a transformers Llama-family checkpoint (tensors read one at a time).

    Raises:
        UnsupportedModel: not a Llama-family ``*ForCausalLM``, or a tokenizer other than BPE.
    """
    import gguf
    import torch
    from safetensors import safe_open

    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") not in ("llama", "mistral") or config.get("rope_scaling"):
        raise UnsupportedModel(f"model_type {config.get('model_type')!r} (rope_scaling "
                               f"{config.get('rope_scaling')}) is not supported: Llama family without rope scaling only")
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_name(directory.name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types, merges = _bpe_vocabulary(directory, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    gguf.SpecialVocab(directory, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{directory} has no safetensors weights")
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UnsupportedModel(f"no GGUF name for tensor {key}")
                values = handle.get_tensor(key).to(torch.float32).numpy()
                if key.endswith("q_proj.weight"):
                    values = permute_qk(values, n_head)
                elif key.endswith("k_proj.weight"):
                    values = permute_qk(values, n_kv)
                writer.add_tensor(name, np.ascontiguousarray(values))
    _write(writer)


# --- the files of one variant ------------------------------------------------------------------
def quantize(source: Path, target: Path, variant: str, threads: int) -> None:
    """Quantize the f32 ``source`` to ``variant`` with llama.cpp's ``llama_model_quantize``.

    Raises:
        RuntimeError: llama.cpp reports a failure.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[variant])
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize to {variant} failed (see the log)")


def file_entry(entry: Path, variant: str) -> CacheEntry:
    """The cache entry of one variant's GGUF in the folder ``entry``: ``<variant>.gguf`` with its
    manifest ``<variant>.json``."""
    return CacheEntry(Path(entry), name=f"{variant}.json", files=(f"{variant}.gguf",), label="llama.cpp cache entry")


def _cached_facts(entry: Path, variant: str) -> dict[str, Any] | None:
    """The build facts of a sound cached GGUF of ``variant``; None when there is none (a corrupt one
    is deleted, with a note). A facts file from before manifests, beside its GGUF, is adopted."""

    def adopt(old: dict[str, Any] | None) -> dict[str, Any] | None:
        return old if old is not None and "source" in old and "convert_s" in old else None

    manifest = file_entry(entry, variant).check_or_discard(legacy=adopt)
    if manifest is None:
        return None
    return {k: manifest[k] for k in ("convert_s", "quantize_s", "source")}


def variant_file(spec: ModelSpec, directory: Path, variant: str, threads: int) -> tuple[Path, dict[str, Any]]:
    """The GGUF of ``variant`` for this model, built on a cache miss or when the cached file fails
    its manifest check (``file_entry``).

    Returns:
        ``(path, facts)``: facts are ``convert_s`` (writing the f32 source), ``quantize_s``,
        ``cache_hit``, ``source`` (what the file was made from) and ``entry`` (the file's
        ``CacheEntry``; None for the shipped Q4_1 file, which is not ours).

    Raises:
        UnsupportedModel: the checkpoint cannot be written as GGUF.
        RuntimeError: quantization failed.
    """
    entry = entry_dir(spec, directory)
    entry.mkdir(parents=True, exist_ok=True)
    target = entry / f"{variant}.gguf"
    if spec.source == "gguf" and variant == "q4_1" and Path(spec.location).name.lower().endswith("q4_1.gguf"):
        return Path(spec.location), {"convert_s": 0.0, "quantize_s": 0.0, "cache_hit": True, "entry": None,
                                      "source": "the shipped Q4_1 file, as it is"}
    cached = _cached_facts(entry, variant)
    if cached is not None:
        return target, {**cached, "cache_hit": True, "entry": file_entry(entry, variant)}
    source = entry / "f32.gguf"
    base = _cached_facts(entry, "f32") if variant != "f32" else None
    if base is None:
        if spec.source == "gguf":
            convert_s = _atomic(source, lambda tmp: dequantize_gguf(Path(spec.location), tmp))
            origin = f"f32 dequantized from {Path(spec.location).name}"
        else:
            convert_s = _atomic(source, lambda tmp: write_f32_from_checkpoint(directory, tmp))
            origin = "f32 written from the transformers checkpoint"
        base = {"convert_s": convert_s, "quantize_s": 0.0, "source": origin}
        write_manifest(entry, [source.name], base, name="f32.json")
    if variant == "f32":
        return source, {**base, "cache_hit": False, "entry": file_entry(entry, "f32")}
    quantize_s = _atomic(target, lambda tmp: quantize(source, tmp, variant, threads))
    facts = {"convert_s": base["convert_s"], "quantize_s": quantize_s,
             "source": f"llama_model_quantize({variant}) of the {base['source']}"}
    write_manifest(entry, [target.name], facts, name=f"{variant}.json")
    return target, {**facts, "cache_hit": False, "entry": file_entry(entry, variant)}


UNQUANTIZED_TYPES = ("F32", "F16", "BF16", "F64")


def weight_groups(path: Path) -> dict[str, list[str]]:
    """Which weight matrices a GGUF file holds quantized and which unquantized, by kind
    (``blk.N.attn_q.weight`` -> ``attn_q``; ``token_embd``, ``output``), with llama.cpp's tensor
    types and how many tensors of the kind have each (``attn_v (Q6_K 15/30, Q4_K 15/30)``).
    Only tensors of two or more dimensions are listed (norm vectors stay F32). Same return shape
    as ``backends.hf.backend.weight_groups``."""
    import gguf

    types: dict[str, dict[str, int]] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if len([d for d in tensor.shape if d > 1]) < 2:
            continue
        parts = tensor.name.split(".")
        kind = parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]
        by_type = types.setdefault(kind, {})
        by_type[tensor.tensor_type.name] = by_type.get(tensor.tensor_type.name, 0) + 1

    def describe(kind: str, wanted: bool) -> str | None:
        by_type = types[kind]
        total = sum(by_type.values())
        chosen = {t: n for t, n in by_type.items() if (t not in UNQUANTIZED_TYPES) == wanted}
        if not chosen:
            return None
        return f"{kind} (" + ", ".join(t if n == total else f"{t} {n}/{total}" for t, n in sorted(chosen.items())) + ")"

    quantized = [text for kind in types if (text := describe(kind, True))]
    kept = [text for kind in types if (text := describe(kind, False))]
    return {"quantized": quantized, "kept": kept}


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each llama.cpp type a GGUF file holds (what the quantizer chose: k-quants
    fall back per tensor where rows are not a multiple of 256)."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))
