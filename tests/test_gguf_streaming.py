"""The llama.cpp backend's source GGUF is written as a stream: tensor by tensor, in the checkpoint's
own float type (a bf16 checkpoint gives a BF16 GGUF with the stored bits), in memory bounded by the
largest tensor rather than the model, and llama.cpp loads and quantizes what it writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backends.base import variant_availability
from backends.models import ModelSpec, stand_in_tokenizer_dir
from backends.safetensors_io import SafetensorsCheckpoint, SafetensorsWriter, bf16_to_f32, f32_to_bf16

pytestmark = pytest.mark.skipif(not variant_availability("llamacpp", "f32").ok,
                                reason="llama-cpp-python is not installed")

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
VOCAB = 49152  # the stand-in tokenizer's size: the embedding may not be smaller
NUMPY_TYPES = {"F32": np.float32, "F16": np.float16}


def write_llama_checkpoint(directory: Path, hidden: int, intermediate: int, layers: int, heads: int,
                           kv_heads: int, dtype: str = "BF16") -> Path:
    """A random Llama checkpoint in ``directory``: ``model.safetensors`` written one tensor at a time
    (``dtype`` F32, F16 or BF16; untied ``lm_head``), a ``config.json`` like
    ``backends/configs/tiny-llama.json`` and the stand-in tokenizer's files; returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    specs = [("model.embed_tokens.weight", (VOCAB, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (hidden,)),
                  (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                  (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                  (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                  (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                  (p + "post_attention_layernorm.weight", (hidden,)),
                  (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                  (p + "mlp.up_proj.weight", (intermediate, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, intermediate))]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (VOCAB, hidden))]
    rng = np.random.default_rng(0)
    with SafetensorsWriter(directory / "model.safetensors", [(name, dtype, shape) for name, shape in specs]) as out:
        for name, shape in specs:
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02 if len(shape) > 1 else 0.1)
            values += np.float32(0.0 if len(shape) > 1 else 1.0)
            out.write(name, f32_to_bf16(values) if dtype == "BF16" else values.astype(NUMPY_TYPES[dtype]))
    config = json.loads((REPO_ROOT / "backends" / "configs" / "tiny-llama.json").read_text())
    config.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=VOCAB,
                  tie_word_embeddings=False,
                  torch_dtype={"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype])
    (directory / "config.json").write_text(json.dumps(config))
    for path in stand_in_tokenizer_dir().iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy(path, directory / path.name)
    return directory


def gguf_name_map(layers: int):
    """``checkpoint tensor name -> GGUF tensor name`` for a Llama of ``layers`` layers."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    return lambda key: names.get_name(key, try_suffixes=(".weight", ".bias"))


def expected_bits(checkpoint: SafetensorsCheckpoint, key: str, heads: int, kv_heads: int) -> np.ndarray:
    """What the GGUF should hold for ``key``: the stored bf16 bits (Q/K rows permuted as llama.cpp's
    converter does), or the exact float32 values of a norm vector."""
    from backends.llamacpp.gguf_files import permute_qk

    values = checkpoint.raw(key)
    if values.ndim == 1:
        return bf16_to_f32(values)
    if key.endswith("q_proj.weight"):
        return permute_qk(values, heads)
    if key.endswith("k_proj.weight"):
        return permute_qk(values, kv_heads)
    return values


# --- a mid-size bf16 checkpoint: 24 layers, 173M parameters, 346 MB -------------------------------
MID = dict(hidden=512, intermediate=2816, layers=24, heads=8, kv_heads=4)

CONVERT = """
import json, sys
from pathlib import Path
import gguf, numpy  # imported before the measured step: only the conversion's own memory counts
from backends.llamacpp.gguf_files import write_source_from_checkpoint
from backends.memory import StepPeak
with StepPeak() as peak:
    written = write_source_from_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps({"type": written, "growth_bytes": peak.growth_bytes, "method": peak.method}))
"""


@pytest.fixture(scope="module")
def mid_bf16(tmp_path_factory):
    """``(checkpoint directory, source GGUF, the conversion's report)``: the source written in a
    fresh Python process, so the peak is the conversion's alone."""
    root = tmp_path_factory.mktemp("gguf_streaming")
    directory = write_llama_checkpoint(root / "mid-llama", **MID)
    target = root / "source.gguf"
    done = subprocess.run([sys.executable, "-c", CONVERT, str(directory), str(target)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return directory, target, json.loads(done.stdout.strip().splitlines()[-1])


def test_bf16_checkpoint_is_written_as_bf16_gguf_with_the_stored_bits_and_qk_rows_permuted(mid_bf16):
    import gguf

    directory, target, report = mid_bf16
    assert report["type"] == "BF16"
    checkpoint = SafetensorsCheckpoint(directory)
    reader = gguf.GGUFReader(str(target))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    to_gguf = gguf_name_map(MID["layers"])
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(to_gguf(key) for key in checkpoint.names())
    for key in checkpoint.names():
        tensor = tensors[to_gguf(key)]
        expected = expected_bits(checkpoint, key, MID["heads"], MID["kv_heads"])
        assert tuple(reversed(tensor.shape.tolist())) == checkpoint.tensors[key].shape
        if expected.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(tensor.data, expected)
        else:  # the reader gives BF16 as bytes, two per value
            assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16
            np.testing.assert_array_equal(tensor.data.view(np.uint16).reshape(expected.shape), expected)
    assert not np.array_equal(checkpoint.raw("model.layers.0.self_attn.q_proj.weight"),
                              tensors["blk.0.attn_q.weight"].data.view(np.uint16))  # the permutation moved rows


def test_llama_cpp_loads_the_bf16_source_and_quantizes_it_to_q8_0(mid_bf16, tmp_path):
    import llama_cpp

    from backends.llamacpp.gguf_files import quantize, tensor_types

    directory, source, _ = mid_bf16
    parameters = sum(int(np.prod(info.shape)) for info in SafetensorsCheckpoint(directory).tensors.values())
    q8 = tmp_path / "q8_0.gguf"
    quantize(source, q8, "q8_0", threads=2)
    assert tensor_types(q8) == {"F32": 2 * MID["layers"] + 1, "Q8_0": 7 * MID["layers"] + 2}
    llama_cpp.llama_backend_init()
    for path in (source, q8):
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert model, f"llama.cpp cannot load {path.name}"
        try:
            assert llama_cpp.llama_model_n_params(model) == parameters
            assert llama_cpp.llama_model_n_layer(model) == MID["layers"]
        finally:
            llama_cpp.llama_model_free(model)


def test_conversion_adds_at_most_the_largest_tensor_in_f32_not_the_model(mid_bf16):
    directory, _, report = mid_bf16
    infos = SafetensorsCheckpoint(directory).tensors.values()
    model_bf16 = sum(info.nbytes for info in infos)
    largest_f32 = max(int(np.prod(info.shape)) * 4 for info in infos)
    bound = largest_f32 + 64 * MIB
    assert bound < 0.6 * model_bf16  # a writer holding every tensor could not pass
    assert 0 < report["growth_bytes"] <= bound, (report, bound, model_bf16)


# --- small checkpoints: the float type kept, and the cache's source and f32 files ---------------
SMALL = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)


@pytest.mark.parametrize("dtype, file_type", [("F32", "ALL_F32"), ("F16", "MOSTLY_F16")])
def test_source_keeps_an_f32_or_f16_checkpoint_type_with_norms_in_f32(tmp_path, dtype, file_type):
    import gguf

    from backends.llamacpp.gguf_files import write_source_from_checkpoint

    directory = write_llama_checkpoint(tmp_path / "ckpt", **SMALL, dtype=dtype)
    assert write_source_from_checkpoint(directory, tmp_path / "source.gguf") == dtype
    reader = gguf.GGUFReader(str(tmp_path / "source.gguf"))
    assert reader.fields["general.file_type"].contents() == getattr(gguf.LlamaFileType, file_type)
    checkpoint = SafetensorsCheckpoint(directory)
    to_gguf = gguf_name_map(SMALL["layers"])
    tensors = {t.name: t for t in reader.tensors}
    for key in checkpoint.names():
        tensor, stored = tensors[to_gguf(key)], checkpoint.raw(key)
        assert tensor.tensor_type.name == (dtype if stored.ndim > 1 else "F32")
        if key.endswith("mlp.up_proj.weight") or stored.ndim == 1:
            np.testing.assert_array_equal(tensor.data, stored.astype(np.float32) if stored.ndim == 1 else stored)


def test_variant_files_of_a_bf16_checkpoint_come_from_one_bf16_source_with_its_peaks(tmp_path, monkeypatch):
    import gguf

    from backends.llamacpp.gguf_files import tensor_types, variant_file

    monkeypatch.setenv("QUANTARENA_CACHE", str(tmp_path / "cache"))
    directory = write_llama_checkpoint(tmp_path / "small-bf16", **SMALL)
    spec = ModelSpec(name=str(directory), source="local", location=str(directory))
    path, facts = variant_file(spec, directory, "q8_0", threads=2)
    entry = path.parent
    assert path.name == "q8_0.gguf" and (entry / "source.gguf").is_file() and (entry / "source.json").is_file()
    assert facts["source_type"] == "BF16" and facts["cache_hit"] is False
    assert facts["convert_peak_bytes"] > 0 and facts["quantize_peak_bytes"] >= 0
    assert "BF16 written from the transformers checkpoint" in facts["source"]
    assert json.loads((entry / "source.json").read_text())["source_type"] == "BF16"

    f32, f32_facts = variant_file(spec, directory, "f32", threads=2)  # llama.cpp widens the BF16 source
    assert f32.name == "f32.gguf" and tensor_types(f32) == {"F32": 9 * SMALL["layers"] + 3}
    assert (f32_facts["convert_s"], f32_facts["convert_peak_bytes"]) == (facts["convert_s"], facts["convert_peak_bytes"])
    widened = {t.name: t for t in gguf.GGUFReader(str(f32)).tensors}["blk.1.ffn_down.weight"]
    stored = SafetensorsCheckpoint(directory).float32("model.layers.1.mlp.down_proj.weight")
    np.testing.assert_array_equal(widened.data, stored)  # bf16 -> f32 is exact

    again, hit = variant_file(spec, directory, "q8_0", threads=2)
    assert again == path and hit["cache_hit"] is True
    assert {k: hit[k] for k in ("convert_peak_bytes", "quantize_peak_bytes", "convert_s", "quantize_s")} == \
        {k: facts[k] for k in ("convert_peak_bytes", "quantize_peak_bytes", "convert_s", "quantize_s")}
