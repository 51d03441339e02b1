"""The pre-flight memory check (issue 17): estimates that match what backends load, and a variant
that cannot fit skipped before anything is built or loaded, with its estimate and what there is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends.footprint import GIB, MemoryEstimate, ModelShape, does_not_fit

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "backends" / "configs"


def test_llama3_8b_shape_counts_its_published_8_03_billion_parameters():
    shape = ModelShape.from_config(CONFIGS / "llama3-8b.json")
    assert shape.params == 8_030_261_248  # Meta-Llama-3-8B: 8.03 B parameters
    assert shape.largest_matrix_params == 128256 * 4096  # the embedding
    # 32 layers x (K and V) x 8 KV heads x 128 x 2 bytes = 128 KiB per token in fp16
    assert shape.kv_bytes(1, 1, 2) == 131072


def test_on_cpu_the_host_needs_the_larger_of_preparation_and_run_on_cuda_the_device_holds_the_run():
    run_bigger = MemoryEstimate.build("cpu", weights=10 * GIB, kv_cache=GIB, working=GIB, preparation=2 * GIB)
    prep_bigger = MemoryEstimate.build("cpu", weights=GIB, kv_cache=0, working=GIB, preparation=30 * GIB)
    assert run_bigger.host_bytes == 12 * GIB and prep_bigger.host_bytes == 30 * GIB
    on_cuda = MemoryEstimate.build("cuda", weights=10 * GIB, kv_cache=GIB, working=GIB, preparation=2 * GIB)
    assert (on_cuda.host_bytes, on_cuda.device_bytes) == (2 * GIB, 12 * GIB)


def test_does_not_fit_names_the_need_and_what_is_available():
    estimate = MemoryEstimate.build("cpu", weights=30 * GIB, kv_cache=GIB, working=GIB, preparation=GIB)
    reason = does_not_fit(estimate, host_available=20 * GIB, device_available=None)
    assert reason.startswith("does not fit in host memory: needs ~32.0 GiB") and "20.0 GiB available" in reason
    assert does_not_fit(estimate, host_available=40 * GIB, device_available=None) is None
    on_cuda = MemoryEstimate.build("cuda", weights=30 * GIB, kv_cache=GIB, working=GIB, preparation=GIB)
    assert "device memory" in does_not_fit(on_cuda, host_available=40 * GIB, device_available=24 * GIB)


@pytest.mark.parametrize("name, variant, tolerance", [
    ("hf", "fp32", 0.001), ("mlc", "q4f16_1", 0.02), ("mlc", "q0f32", 0.001), ("bnb", "nf4", 0.05),
    ("llamacpp", "q8_0", 0.05), ("onnx", "fp32", 0.01), ("onnx", "int8", 0.05), ("onnx", "int4", 0.05),
])
def test_weight_estimate_matches_the_weights_the_backend_loads(tiny_model, name, variant, tolerance):
    from backends.base import backend_class, variant_availability
    from backends.models import checkpoint_dir

    available = variant_availability(name, variant)
    if not available.ok:
        pytest.skip(available.reason)
    backend = backend_class(name)(variant, {})
    shape = ModelShape.from_config(checkpoint_dir(tiny_model) / "config.json")
    try:
        loaded = backend.load(tiny_model).weight_bytes
    finally:
        backend.close()
    estimate = backend.weight_bytes_estimate(shape)
    assert abs(estimate - loaded) <= tolerance * loaded, (estimate, loaded)


def test_a_variant_that_cannot_fit_is_skipped_before_anything_is_built(tmp_path):
    config = json.loads((CONFIGS / "llama3-8b.json").read_text())
    config["num_hidden_layers"] = 4096  # ~0.9 trillion parameters: fits no machine this runs on
    model = tmp_path / "huge"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    env = {**os.environ, "QUANTARENA_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--model", str(model), "--random-weights",
         "--backends", "hf:fp32,mlc:q4f16_1", "--workloads", "latency", "--input-lens", "8",
         "--output-len", "2", "--warmup", "0", "--repetitions", "1", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["label"] for r in records} == {"hf:fp32", "mlc:q4f16_1"}
    for record in records:
        assert record["status"] == "failed"
        assert "skipped before loading: does not fit in host memory: needs ~" in record["error"]
        assert "GiB available" in record["error"]
    assert not (cache / "checkpoints").exists() or not any((cache / "checkpoints").glob("huge-*"))
    assert "does not fit in host memory" in (out / "report.md").read_text()


def test_a_variant_that_fits_runs_and_its_record_carries_the_estimate(tmp_path, data_dir):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--model", "tiny-llama", "--backends", "hf:fp32",
         "--workloads", "latency", "--input-lens", "16", "--output-len", "4", "--warmup", "0",
         "--repetitions", "1", "--out", str(out)],
        cwd=REPO, env={**os.environ, "HARNESS_DATA_DIR": str(data_dir)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok"
    estimate = record["load"]["details"]["memory_estimate"]
    assert (estimate["tokens"], estimate["batch"]) == (20, 1)  # 16 prompt + 4 new tokens
    # fp32: every parameter at 4 bytes (the loaded model also holds RoPE's 8 inv_freq floats)
    assert abs(estimate["weights_bytes"] - record["load"]["weight_bytes"]) <= 64
    assert 0 < estimate["host_bytes"] < estimate["host_available_bytes"]
