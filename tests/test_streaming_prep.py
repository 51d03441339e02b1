"""Preparation in bounded memory (issue 17): random weights and the mlc conversion stream tensor by
tensor, so their peak memory is one float32 tensor plus a constant working set, not the model.

The model here is a mid-size bf16 Llama (12 layers, 1024 wide: 317 MB of bf16 weights, 33.5 MB
in its largest float32 tensor), large enough that holding it whole would break the bounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MID_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 2816,
    "max_position_embeddings": 2048, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 8,
    "num_hidden_layers": 12, "num_key_value_heads": 4, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 8192,
}
LARGEST_FP32 = 8192 * 1024 * 4  # the embedding (and lm_head) in float32
WORKING_SET = 96 * 2**20  # the constant the bounds allow beyond one float32 tensor (and the output)


def _run_measured(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (imports done before the measured step) and return the
    JSON it prints last: this process's own memory cannot blur the measurement."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mid_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mid") / "config.json"
    path.write_text(json.dumps(MID_CONFIG))
    return path


@pytest.fixture(scope="module")
def mid_checkpoint(mid_config, tmp_path_factory) -> tuple[Path, dict]:
    """The mid-size random checkpoint, built in a fresh process, with the build's measured peak."""
    target = tmp_path_factory.mktemp("mid-ckpt")
    facts = _run_measured(
        "import json; from pathlib import Path; import transformers, numpy\n"
        "from backends.models import build_random_checkpoint, stand_in_tokenizer_dir\n"
        "stand_in_tokenizer_dir()\n"
        f"print(json.dumps(build_random_checkpoint(Path({str(mid_config)!r}), Path({str(target)!r}))))")
    return target, facts


def test_random_checkpoint_is_bf16_in_the_configs_dtype_and_half_the_fp32_size(mid_checkpoint):
    from backends.safetensors_io import SafetensorsCheckpoint

    directory, _ = mid_checkpoint
    checkpoint = SafetensorsCheckpoint(directory)
    assert {info.dtype for info in checkpoint.tensors.values()} == {"BF16"}
    params = sum(int(np.prod(info.shape)) for info in checkpoint.tensors.values())
    on_disk = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    assert params * 2 <= on_disk < params * 2 + 1_000_000  # 2 bytes a weight plus the headers


def test_random_checkpoint_build_peak_is_below_one_fp32_tensor_plus_working_set(mid_checkpoint):
    directory, facts = mid_checkpoint
    model_bf16 = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    bound = LARGEST_FP32 + WORKING_SET
    assert bound < model_bf16 / 2  # a builder holding the model would break the bound
    assert 0 < facts["peak_rss_bytes"] <= bound


def test_random_checkpoint_loads_in_transformers_with_llama_init_statistics(mid_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM

    directory, _ = mid_checkpoint
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    weights = model.model.layers[3].mlp.down_proj.weight.detach().float()
    assert abs(float(weights.std()) - MID_CONFIG["initializer_range"]) < 0.001
    assert abs(float(weights.mean())) < 0.001
    assert torch.equal(model.model.norm.weight.float(), torch.ones(1024))
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # untied: own values


def test_random_checkpoint_is_the_same_bytes_when_built_again_and_sharded_the_same(mid_config, tmp_path, monkeypatch):
    from backends import models
    from backends.safetensors_io import SafetensorsCheckpoint

    config = json.loads(mid_config.read_text())
    config["num_hidden_layers"] = 2
    small = tmp_path / "config.json"
    small.write_text(json.dumps(config))
    one, two, sharded = (tmp_path / name for name in ("one", "two", "sharded"))
    for target in (one, two, sharded):
        target.mkdir()
    models.build_random_checkpoint(small, one)
    models.build_random_checkpoint(small, two)
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    monkeypatch.setattr(models, "SHARD_BYTES", 20 * 2**20)
    models.build_random_checkpoint(small, sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    whole, parts = SafetensorsCheckpoint(one), SafetensorsCheckpoint(sharded)
    assert set(whole.names()) == set(parts.names())
    for name in whole.names():
        assert np.array_equal(whole.raw(name), parts.raw(name)), name


def test_mlc_conversion_peak_is_below_one_fp32_tensor_plus_working_set_and_output(mid_checkpoint, tmp_path):
    directory, _ = mid_checkpoint
    out = tmp_path / "params.npz"
    facts = _run_measured(
        "import json; from pathlib import Path; import numpy, tvm\n"
        "from backends.memory import StepPeak\n"
        "from backends.mlc import artifacts\n"
        "from backends.mlc.convert import iter_params\n"
        "from backends.mlc.model import LlamaConfig, build_model, export_spec\n"
        "from backends.mlc.quant import MODES\n"
        f"directory = Path({str(directory)!r})\n"
        "cfg = LlamaConfig.from_hf(json.loads((directory / 'config.json').read_text()))\n"
        "with tvm.target.Target('llvm'):\n"
        "    mod, named = build_model(cfg, MODES['q4f16_1'], 'float32', None, 32).export_tvm(export_spec('float32'))\n"
        "with StepPeak() as peak:\n"
        f"    artifacts.write_params(Path({str(out)!r}), iter_params(directory, cfg, MODES['q4f16_1'], 'float32',\n"
        "                           [n for n, _ in named], None, 32))\n"
        "print(json.dumps(peak.to_dict()))")
    with np.load(out) as npz:
        largest_output = max(npz[name].nbytes for name in npz.files)
    model_bf16 = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    bound = LARGEST_FP32 + WORKING_SET + largest_output
    assert bound < model_bf16 / 2  # converting the model whole (624 MB in float32) breaks it
    assert 0 < facts["growth_bytes"] <= bound


def test_quantizing_in_row_blocks_equals_quantizing_the_whole_weight(monkeypatch):
    from backends.mlc import quant

    weight = np.random.default_rng(0).standard_normal((77, 96)).astype(np.float32)
    whole = quant.quantize(weight, quant.MODES["q4f16_1"])
    monkeypatch.setattr(quant, "QUANTIZE_ROWS", 8)
    blocks = quant.quantize(weight, quant.MODES["q4f16_1"])
    assert np.array_equal(whole[0], blocks[0]) and np.array_equal(whole[1], blocks[1])


def test_mlc_fused_weight_converted_from_parts_equals_quantizing_the_concatenation(tmp_path):
    from backends.mlc.convert import linear_params
    from backends.mlc.quant import MODES, column_tile, quantize, to_column_tiles

    rng = np.random.default_rng(1)
    gate, up = (rng.standard_normal((64, 96)).astype(np.float32) for _ in range(2))
    got = linear_params("mlp.gate_up_proj", [lambda: gate, lambda: up], MODES["q4f16_1"], 32)
    packed, scale = quantize(np.concatenate([gate, up]), MODES["q4f16_1"])
    tile = column_tile(128, 32)
    assert np.array_equal(got["mlp.gate_up_proj.q_weight"], to_column_tiles(packed, tile))
    assert np.array_equal(got["mlp.gate_up_proj.q_scale"], to_column_tiles(scale, tile))


def test_reading_bf16_and_f16_as_float32_widens_exactly_across_chunks(tmp_path):
    import torch
    from safetensors.torch import save_file

    from backends.safetensors_io import SafetensorsCheckpoint

    values = torch.randn(3001, 517)  # 1.55 M values: more than one widening chunk (1 M)
    save_file({"b": values.to(torch.bfloat16), "h": values.to(torch.float16), "f": values},
              str(tmp_path / "model.safetensors"))
    checkpoint = SafetensorsCheckpoint(tmp_path)
    assert np.array_equal(checkpoint.float32("b"), values.to(torch.bfloat16).float().numpy())
    assert np.array_equal(checkpoint.float32("h"), values.to(torch.float16).float().numpy())
    assert np.array_equal(checkpoint.float32("f"), values.numpy())
    assert checkpoint.float32("b").dtype == np.float32 and checkpoint.float32("b").shape == (3001, 517)


def test_random_checkpoint_takes_the_tokenizer_beside_its_config_and_keys_the_cache_by_it(mid_config, tmp_path,
                                                                                        monkeypatch):
    """A local directory with a config and a tokenizer but no weights (a Hub model's small files)
    gets random weights with its own tokenizer, not the embedded model's; another tokenizer beside
    the same config is another cache entry."""
    from transformers import AutoTokenizer

    from backends import models

    monkeypatch.setenv("QUANTARENA_CACHE", str(tmp_path / "cache"))
    config = json.loads(mid_config.read_text())
    config.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                  num_key_value_heads=1)
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").write_text(json.dumps(config))
    stand_in = AutoTokenizer.from_pretrained(models.stand_in_tokenizer_dir())
    stand_in.add_tokens(["<quantarena-own-token>"])  # makes it a tokenizer the stand-in is not
    stand_in.save_pretrained(own)
    spec = models.resolve_model(str(own), random_weights=True)
    built = models.checkpoint_dir(spec)
    assert "<quantarena-own-token>" in AutoTokenizer.from_pretrained(built).get_vocab()
    (own / "tokenizer.json").write_text((own / "tokenizer.json").read_text().replace("quantarena-own", "quantarena-two"))
    rebuilt = models.checkpoint_dir(spec)
    assert rebuilt != built
    assert "<quantarena-two-token>" in AutoTokenizer.from_pretrained(rebuilt).get_vocab()
