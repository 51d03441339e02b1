"""The GGUF files the llama.cpp backend loads: one source GGUF per model, quantized by llama.cpp.

Every variant derives from the same weights the other backends load:

- the embedded model (a GGUF package): ``q4_1`` is the shipped Q4_1 file as it is; the source of
  every other type is an F32 GGUF dequantized from it with the ``gguf`` package (the tensors are
  already in llama.cpp's layout, so the values are exactly what transformers dequantizes);
- a transformers checkpoint of the Llama family: a GGUF in the checkpoint's own float type (F32,
  BF16 or F16, as ``convert_hf_to_gguf.py --outtype auto`` keeps it; norm vectors F32) written
  with the ``gguf`` package's writer and tensor-name map, Q/K rows permuted as llama.cpp's
  ``convert_hf_to_gguf.py`` does (``LlamaModel.permute``), the BPE vocabulary from
  ``tokenizer.json``.

Both sources are written as a stream: every tensor's name, shape and type is declared first (from
the safetensors or GGUF header, nothing loaded), then the tensors are read, converted and written
one at a time, so the memory a conversion adds is about its largest tensor, not the model (an 8B
checkpoint of 16 GB converts on a 24 GiB machine; ``convert_peak_bytes`` records it).

Quantized types are made by llama.cpp's own quantizer (``llama_model_quantize``) from the source;
``f32`` is the source itself when that is F32, else llama.cpp's ALL_F32 "quantization" of it.
Files are cached under ``cache_root()/llamacpp/<checkpoint>-<key>/``; the key hashes the source's
identity, the llama-cpp-python version and ``FORMAT``, and files are written to a temporary name
and renamed, so a crash never leaves a file that looks complete.

Each GGUF ``<variant>.gguf`` of a folder (and the source, ``source.gguf``) is its own cache entry
(``file_entry``) with its manifest ``<variant>.json`` (the build facts, the file's size and sha256
of sampled blocks: ``backends.artifact_cache``), written after the file. The check on every load
detects a missing GGUF or manifest, a GGUF truncated or extended, or overwritten (its size, first
and last 64 KiB and 6 blocks between are hashed); such a file is deleted and built again (the
source too). A few bytes changed inside the tensor data between sampled blocks are not detected:
llama.cpp does not checksum tensors, and the load uses them. A header that llama.cpp cannot parse
makes the load fail, and ``Backend.load`` rebuilds the file once. A file from before manifests (a
``<variant>.json`` of facts without a file list, beside its GGUF) is adopted.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from backends.artifact_cache import CacheEntry, replace_atomically, write_manifest
from backends.memory import StepPeak
from backends.models import ModelSpec, cache_root, checkpoint_identity, file_identity
from backends.safetensors_io import SafetensorsCheckpoint, read_into

FORMAT = 2  # of the files this module writes; part of the cache key

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


def _atomic(target: Path, write: Callable[[Path], Any]) -> tuple[Any, float]:
    """Run ``write(tmp)`` and rename the file it wrote to ``target``; returns ``(what write
    returned, the seconds it took)``."""
    started = time.perf_counter()
    result = replace_atomically(target, write)
    return result, time.perf_counter() - started


def entry_dir(spec: ModelSpec, directory: Path) -> Path:
    """The cache folder of this model's GGUF files (may not exist yet)."""
    import llama_cpp

    identity = file_identity(spec.location) if spec.source == "gguf" else checkpoint_identity(directory)
    key = hashlib.sha256(json.dumps([identity, llama_cpp.__version__, FORMAT]).encode()).hexdigest()[:16]
    return cache_root() / "llamacpp" / f"{Path(directory).name}-{key}"


# --- the source ----------------------------------------------------------------------------------
def _write_streamed(writer, arrays) -> None:
    """Write a GGUF whose tensors ``writer`` has declared (``add_tensor_info``): header, metadata,
    tensor infos, then each array ``arrays`` yields, in the declared order, one at a time; closes
    the file.

    Raises:
        ValueError: an array's byte size differs from its declaration, or too few arrays.
    """
    try:
        declared = [(name, info.nbytes) for shard in writer.tensors for name, info in shard.items()]
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        written = 0
        for values in arrays:
            name, nbytes = declared[written]
            if values.nbytes != nbytes:
                raise ValueError(f"{name}: {values.nbytes} bytes, {nbytes} declared")
            writer.write_tensor_data(np.ascontiguousarray(values))
            written += 1
        if written != len(declared):
            raise ValueError(f"{len(declared) - written} declared tensors were not written")
    finally:
        writer.close()


def dequantize_gguf(source: Path, target: Path) -> str:
    """Write ``target``: ``source`` with every tensor dequantized to F32 and its metadata kept
    (``general.file_type`` set to ALL_F32), one tensor at a time (read with ``pread``, dequantized
    in row blocks): the memory this adds is the largest tensor in F32 and the reader's parsed
    metadata (the vocabulary), not the model.

    Args:
        source: a GGUF file (any llama.cpp tensor types the ``gguf`` package can dequantize).
        target: the F32 GGUF to write.

    Returns:
        ``"F32"``: the GGUF type of the written tensors.
    """
    import gguf

    reader = gguf.GGUFReader(str(source))  # a read-only mapping: tensor data is read with pread below
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        shape = tuple(reversed([int(d) for d in tensor.shape]))  # GGUF lists dimensions innermost first
        writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), int(tensor.n_elements) * 4)

    def arrays():
        for tensor in reader.tensors:
            stored = read_into(source, tensor.data_offset, np.empty(tensor.data.shape, tensor.data.dtype))
            if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
                yield stored
                continue
            # row blocks of about 16 MiB: the package's dequantization makes temporaries a few times
            # the size of what it is given
            rows = stored.reshape(-1, stored.shape[-1])
            values = np.empty(tuple(reversed([int(d) for d in tensor.shape])), np.float32)
            out = values.reshape(len(rows), -1)
            step = max(1, (16 << 20) // (4 * out.shape[1]))
            for start in range(0, len(rows), step):
                out[start:start + step] = gguf.quants.dequantize(rows[start:start + step], tensor.tensor_type)
            yield values

    _write_streamed(writer, arrays())
    return "F32"


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Q or K projection from transformers' rotary layout (two halves per head) to
    llama.cpp's (interleaved pairs): ``LlamaModel.permute`` of llama.cpp's ``convert_hf_to_gguf.py``.

    Args:
        weights: ``[n_head * head_dim, hidden]``, any dtype (bf16 as uint16 bit patterns too).
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


# safetensors float dtype -> (numpy dtype written, llama.cpp file type name); bf16 as uint16 bits
_SOURCE_TYPES = {"F32": (np.float32, "ALL_F32"), "BF16": (np.uint16, "MOSTLY_BF16"), "F16": (np.float16, "MOSTLY_F16")}


def write_source_from_checkpoint(directory: Path, target: Path) -> str:
    """Write the source GGUF of a transformers Llama-family checkpoint, tensor by tensor, in the
    checkpoint's own float type: F32 for an f32 checkpoint, BF16 for bf16 (the bit patterns as
    stored), F16 for f16 (``convert_hf_to_gguf.py --outtype auto`` keeps the type too; a
    checkpoint whose matrices mix types is written F32, which holds each exactly). Norm vectors
    (1-D tensors) are F32, as llama.cpp's converter writes them. ``general.file_type`` is
    ALL_F32, MOSTLY_BF16 or MOSTLY_F16 accordingly.

    Shapes come from the safetensors headers; each tensor is then read with ``pread``
    (``backends.safetensors_io``), its Q/K rows permuted, and written before the next is read, so
    the memory this adds is about the largest tensor (twice it for a permuted Q/K, once more in
    F32 for a widened one), not the model.

    Returns:
        The GGUF type of the matrices written: ``"F32"``, ``"BF16"`` or ``"F16"``.

    Raises:
        UnsupportedModel: not a Llama-family ``*ForCausalLM``, a tokenizer other than BPE, no
            safetensors weights, a tensor without a GGUF name, or a dtype other than F32/BF16/F16.
    """
    import gguf

    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") not in ("llama", "mistral") or config.get("rope_scaling"):
        raise UnsupportedModel(f"model_type {config.get('model_type')!r} (rope_scaling "
                               f"{config.get('rope_scaling')}) is not supported: Llama family without rope scaling only")
    try:
        checkpoint = SafetensorsCheckpoint(directory)
    except FileNotFoundError:
        raise UnsupportedModel(f"{directory} has no safetensors weights") from None
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    gguf_names: dict[str, str] = {}  # checkpoint name -> GGUF name, in file order
    for key in checkpoint.names():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModel(f"no GGUF name for tensor {key}")
        if checkpoint.tensors[key].dtype not in _SOURCE_TYPES:
            raise UnsupportedModel(f"tensor {key} is {checkpoint.tensors[key].dtype}: F32, BF16 or F16 only")
        gguf_names[key] = name
    matrix_types = {checkpoint.tensors[key].dtype for key in gguf_names if len(checkpoint.tensors[key].shape) > 1}
    source_type = matrix_types.pop() if len(matrix_types) == 1 else "F32"
    # (checkpoint name, GGUF name, GGUF type written): norm vectors F32
    plan = [(key, name, source_type if len(checkpoint.tensors[key].shape) > 1 else "F32")
            for key, name in gguf_names.items()]

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
    writer.add_file_type(getattr(gguf.LlamaFileType, _SOURCE_TYPES[source_type][1]))
    tokens, types, merges = _bpe_vocabulary(directory, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    gguf.SpecialVocab(directory, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer)
    for key, name, written in plan:
        shape = checkpoint.tensors[key].shape  # numpy order: the writer reverses it for GGUF
        dtype = np.dtype(_SOURCE_TYPES[written][0])
        raw = gguf.GGMLQuantizationType.BF16 if written == "BF16" else None  # uint16 elements: shape kept
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)

    def arrays():
        for key, _name, written in plan:
            widen = written != checkpoint.tensors[key].dtype  # mixed types: F32 holds each exactly
            values = checkpoint.float32(key) if widen else checkpoint.raw(key)
            if key.endswith("q_proj.weight"):
                values = permute_qk(values, n_head)
            elif key.endswith("k_proj.weight"):
                values = permute_qk(values, n_kv)
            yield values
            del values

    _write_streamed(writer, arrays())
    return source_type


# --- the files of one variant ------------------------------------------------------------------
SOURCE = "source"  # the source GGUF's name in an entry folder: source.gguf, manifest source.json


def quantize(source: Path, target: Path, variant: str, threads: int) -> None:
    """Quantize the ``source`` GGUF (F32, BF16 or F16) to ``variant`` with llama.cpp's
    ``llama_model_quantize`` (``f32``: every matrix widened to F32).

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
    manifest ``<variant>.json`` (``variant`` ``SOURCE``: the source GGUF)."""
    return CacheEntry(Path(entry), name=f"{variant}.json", files=(f"{variant}.gguf",), label="llama.cpp cache entry")


_FACTS = ("convert_s", "quantize_s", "source", "source_type", "convert_peak_bytes", "quantize_peak_bytes", "tensors")


def _cached_facts(entry: Path, variant: str) -> dict[str, Any] | None:
    """The build facts (``_FACTS``; None for those an older entry lacks) of a sound cached GGUF of
    ``variant``; None when there is none (a corrupt one is deleted, with a note). A facts file
    from before manifests, beside its GGUF, is adopted."""

    def adopt(old: dict[str, Any] | None) -> dict[str, Any] | None:
        return old if old is not None and "source" in old and "convert_s" in old else None

    manifest = file_entry(entry, variant).check_or_discard(legacy=adopt)
    if manifest is None:
        return None
    return {k: manifest.get(k) for k in _FACTS}


def _with_tensors(entry: Path, variant: str, facts: dict[str, Any]) -> dict[str, Any]:
    """``facts`` of the cached ``<variant>.gguf`` with its ``tensor_summary``; an entry built before
    the summary was kept has it read once and written into its manifest."""
    if facts["tensors"] is None:
        facts["tensors"] = tensor_summary(entry / f"{variant}.gguf")
        write_manifest(entry, [f"{variant}.gguf"], facts, name=f"{variant}.json")
    return facts


def _measured(step: Callable[[], Any]) -> tuple[Any, int]:
    """``(step(), memory it added)``: the result and ``StepPeak.growth_bytes`` (bytes)."""
    with StepPeak() as peak:
        result = step()
    return result, peak.growth_bytes


def variant_file(spec: ModelSpec, directory: Path, variant: str, threads: int) -> tuple[Path, dict[str, Any]]:
    """The GGUF of ``variant`` for this model, built on a cache miss or when the cached file fails
    its manifest check (``file_entry``). The source GGUF (``source.gguf``, checked the same way)
    is written first when missing; ``f32`` is the source itself when the source is F32.

    Returns:
        ``(path, facts)``: facts are ``convert_s`` (writing the source), ``quantize_s``,
        ``convert_peak_bytes`` / ``quantize_peak_bytes`` (the resident memory each step added,
        ``backends.memory.StepPeak``; None where there was no such step or an older entry did not
        record it), ``source_type`` (the source's GGUF type: ``"F32"``, ``"BF16"``, ``"F16"``),
        ``cache_hit``, ``source`` (what the file was made from), ``tensors`` (the file's
        ``tensor_summary``, kept in its manifest) and ``entry`` (the file's ``CacheEntry``; None
        for the shipped Q4_1 file, which is not ours). Seconds and bytes are those measured when
        the file was built, on a cache hit too.

    Raises:
        UnsupportedModel: the checkpoint cannot be written as GGUF.
        RuntimeError: quantization failed.
    """
    entry = entry_dir(spec, directory)
    entry.mkdir(parents=True, exist_ok=True)
    target = entry / f"{variant}.gguf"
    if spec.source == "gguf" and variant == "q4_1" and Path(spec.location).name.lower().endswith("q4_1.gguf"):
        return Path(spec.location), {"convert_s": 0.0, "quantize_s": 0.0, "convert_peak_bytes": None,
                                      "quantize_peak_bytes": None, "source_type": "Q4_1", "cache_hit": True,
                                      "entry": None, "source": "the shipped Q4_1 file, as it is",
                                      "tensors": tensor_summary(Path(spec.location))}
    cached = _cached_facts(entry, variant)
    if cached is not None:
        return target, {**_with_tensors(entry, variant, cached), "cache_hit": True, "entry": file_entry(entry, variant)}
    source = entry / f"{SOURCE}.gguf"
    base = _cached_facts(entry, SOURCE)
    hit = base is not None
    if base is None:
        if spec.source == "gguf":
            (source_type, convert_s), peak = _measured(
                lambda: _atomic(source, lambda tmp: dequantize_gguf(Path(spec.location), tmp)))
            origin = f"F32 dequantized from {Path(spec.location).name}"
        else:
            (source_type, convert_s), peak = _measured(
                lambda: _atomic(source, lambda tmp: write_source_from_checkpoint(directory, tmp)))
            origin = f"{source_type} written from the transformers checkpoint"
        base = {"convert_s": convert_s, "quantize_s": 0.0, "source": origin, "source_type": source_type,
                "convert_peak_bytes": peak, "quantize_peak_bytes": None, "tensors": tensor_summary(source)}
        write_manifest(entry, [source.name], base, name=f"{SOURCE}.json")
    if variant == "f32" and base["source_type"] == "F32":
        return source, {**_with_tensors(entry, SOURCE, base), "cache_hit": hit, "entry": file_entry(entry, SOURCE)}
    (_, quantize_s), quantize_peak = _measured(
        lambda: _atomic(target, lambda tmp: quantize(source, tmp, variant, threads)))
    facts = {"convert_s": base["convert_s"], "quantize_s": quantize_s, "source_type": base["source_type"],
             "convert_peak_bytes": base["convert_peak_bytes"], "quantize_peak_bytes": quantize_peak,
             "source": f"llama_model_quantize({variant}) of the {base['source']}", "tensors": tensor_summary(target)}
    write_manifest(entry, [target.name], facts, name=f"{variant}.json")
    return target, {**facts, "cache_hit": False, "entry": file_entry(entry, variant)}


UNQUANTIZED_TYPES = ("F32", "F16", "BF16", "F64")


def tensor_summary(path: Path) -> dict[str, Any]:
    """What llama.cpp's quantizer chose for each tensor of a GGUF file, from one read of its
    tensor infos (``gguf.GGUFReader``, ~2 s for SmolLM2: it parses the vocabulary too, which is
    why the summary is kept in the variant's manifest instead of being read on every load).

    Returns:
        ``{"tensor_types": {type: count}, "weight_groups": {"quantized": [...], "kept": [...]}}``:
        how many tensors of each llama.cpp type (k-quants fall back per tensor where rows are not
        a multiple of 256), and which weight matrices are held quantized and which unquantized,
        by kind (``blk.N.attn_q.weight`` -> ``attn_q``; ``token_embd``, ``output``) with their
        types and how many tensors of the kind have each (``attn_v (Q6_K 15/30, Q4_K 15/30)``).
        Only tensors of two or more dimensions are in the groups (norm vectors stay F32); the
        groups have the shape of ``backends.hf.backend.weight_groups``.
    """
    import gguf

    counts: dict[str, int] = {}
    types: dict[str, dict[str, int]] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        name = tensor.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
        if len([d for d in tensor.shape if d > 1]) < 2:
            continue
        parts = tensor.name.split(".")
        kind = parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]
        by_type = types.setdefault(kind, {})
        by_type[name] = by_type.get(name, 0) + 1

    def describe(kind: str, wanted: bool) -> str | None:
        by_type = types[kind]
        total = sum(by_type.values())
        chosen = {t: n for t, n in by_type.items() if (t not in UNQUANTIZED_TYPES) == wanted}
        if not chosen:
            return None
        return f"{kind} (" + ", ".join(t if n == total else f"{t} {n}/{total}" for t, n in sorted(chosen.items())) + ")"

    groups = {"quantized": [text for kind in types if (text := describe(kind, True))],
              "kept": [text for kind in types if (text := describe(kind, False))]}
    return {"tensor_types": dict(sorted(counts.items())), "weight_groups": groups}


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each llama.cpp type a GGUF file holds (``tensor_summary``)."""
    return tensor_summary(path)["tensor_types"]
