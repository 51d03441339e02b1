"""Model-resident and working memory, the bandwidth roofline, KV-byte keys and the KV table."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import backends.memory as memory
from backends.base import backend_class, variant_availability
from backends.memory import PeakMemorySampler

MB = 1024 * 1024


# --- memory -------------------------------------------------------------------------------------
def test_load_trims_the_heap_and_model_resident_bytes_are_positive_and_below_post_load_rss(tiny_model, monkeypatch):
    calls = []
    real = memory.malloc_trim

    def counting() -> str:
        calls.append(1)
        return real()

    monkeypatch.setattr(memory, "malloc_trim", counting)
    backend = backend_class("hf")("fp32", {"threads": 1})
    try:
        load = backend.load(tiny_model).to_dict()
    finally:
        backend.close()
    assert len(calls) == 2  # before and after the load
    if sys.platform.startswith("linux"):
        assert load["malloc_trim"] == "called"
    assert load["model_resident_bytes"] == load["rss_after_load_bytes"] - load["rss_before_load_bytes"]
    assert 0 < load["model_resident_bytes"] < load["rss_after_load_bytes"]


def test_quantized_load_keeps_no_tensor_inside_the_mapped_checkpoint(tiny_model):
    """bitsandbytes keeps the embedding and norms as views into the mmapped safetensors file,
    which would keep the whole (fully paged-in) file resident; the loader copies them out."""
    from backends.models import _mapped_checkpoint_ranges

    if variant_availability("bnb", "nf4").ok is False or not sys.platform.startswith("linux"):
        pytest.skip("needs bitsandbytes and /proc/self/maps")
    backend = backend_class("bnb")("nf4", {"threads": 1})
    try:
        backend.load(tiny_model)
        ranges = _mapped_checkpoint_ranges()
        inside = [name for name, t in list(backend.model.named_parameters()) + list(backend.model.named_buffers())
                  if any(low <= t.data_ptr() < high for low, high in ranges)]
    finally:
        backend.close()
    assert inside == []


def test_malloc_trim_reports_called_on_glibc_or_why_not():
    result = memory.malloc_trim()
    assert result == "called" or result.startswith("skipped: ")
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert result == "called"


def test_working_memory_is_the_cell_peak_minus_the_rss_at_its_start():
    with PeakMemorySampler(interval_s=0.001) as sampler:
        block = np.ones(64 * MB // 8)  # 64 MiB, every page touched
        block.sum()
        del block
    result = sampler.result()
    assert result["working_peak_rss"] == result["peak_rss"] - result["start_rss"]
    assert result["working_peak_rss"] >= 48 * MB


# --- bandwidth and roofline ---------------------------------------------------------------------
def test_blocked_triad_computes_b_plus_s_times_c_across_block_edges():
    from harness.env import TRIAD_CHUNK, _triad

    n = 2 * TRIAD_CHUNK + 123
    b, c, a = np.arange(n, dtype=float), np.full(n, 2.0), np.zeros(n)
    _triad(a, b, c, 3.0, 5, n, np.empty(TRIAD_CHUNK))
    assert a[:5].tolist() == [0.0] * 5
    np.testing.assert_array_equal(a[5:], b[5:] + 6.0)


def test_triad_bandwidth_is_positive_and_counts_three_arrays_of_eight_byte_elements():
    from harness.env import memory_bandwidth, triad_bytes

    assert triad_bytes(1000) == 3 * 8 * 1000
    result = memory_bandwidth()
    assert result["bytes_s"] > 0
    assert result["bytes_s"] == pytest.approx(triad_bytes(result["array_bytes"] // 8) / result["best_s"])
    assert result["array_bytes"] >= 64 * MB


def _latency_record(label="x:y", batch=4, device="cpu", decode=50.0, weight=100e6, kv=(10e6, 30e6)):
    return {"workload": "latency", "status": "ok", "label": label,
            "params": {"n_in": 128, "n_out": 8, "batch": batch},
            "load": {"weight_bytes": weight}, "info": {"device": device},
            "metrics": {"decode_tok_s": {"median": decode, "p90": decode},
                        "kv_cache_bytes_prefill": kv[0], "kv_cache_bytes": kv[1]},
            "env": {"memory_bandwidth_bytes_s": 10e9, "memory_bandwidth": {"method": "triad"},
                    "gpu_memory_bandwidth": [{"bytes_s": 3e12, "method": "NVML peak"}]}}


def test_roofline_share_of_a_constructed_record_reads_weights_once_per_step_for_the_batch():
    from reports.roofline import decode_roofline

    roof = decode_roofline(_latency_record())
    # KV at the mean decode position: (10 + 30) / 2 = 20 MB; (100 + 20) MB / 4 tokens per step
    assert roof["bytes_per_token"] == pytest.approx(30e6)
    assert roof["roofline_tok_s"] == pytest.approx(10e9 / 30e6)
    assert roof["pct_of_roofline"] == pytest.approx(100 * 50 / (10e9 / 30e6))
    gpu = decode_roofline(_latency_record(device="cuda", batch=1))
    assert gpu["bandwidth_bytes_s"] == 3e12 and gpu["roofline_tok_s"] == pytest.approx(3e12 / 120e6)
    assert decode_roofline({**_latency_record(), "env": {}}) is None  # no bandwidth: no figure


def test_latency_table_shows_working_memory_and_roofline_share():
    from reports.table import LATENCY_COLUMNS, latency_rows

    record = _latency_record()
    record["metrics"].update(working_peak_rss_bytes=3 * MB, peak_rss_bytes=500 * MB)
    row = dict(zip(LATENCY_COLUMNS, latency_rows([record])[0]))
    assert row["working MB"] == "3.0"
    assert row["decode % of roofline tok/s"] == "15.0% of 333.3"


# --- KV table -------------------------------------------------------------------------------------
def test_kv_table_keeps_batch_1_and_4_rows_of_one_label_and_divides_by_batch_times_n_in():
    from reports.table import kv_context_table

    records = []
    for batch in (1, 4):
        for n_in in (32, 64):
            records.append({"workload": "latency", "status": "ok", "label": "hf:fp32",
                            "params": {"n_in": n_in, "n_out": 4, "batch": batch},
                            "info": {"kv_cache": {"dtype": "float32"}},
                            "metrics": {"kv_cache_bytes_prefill": 1000 * batch * n_in}})
    header, rows = kv_context_table(records)
    assert header[1] == "batch" and "hf:fp32 (float32 KV)" in header[-1]
    by_batch = {row[1]: row for row in rows}
    assert set(by_batch) == {"1", "4"}
    assert by_batch["1"][-2] == by_batch["4"][-2] == "1,000"  # bytes per cached token
    assert by_batch["4"][-1] == "1.00x"  # against the reference at the same batch


# --- KV bytes keys and weight groups in real tiny-model runs ----------------------------------------
KV_KEYS = ("kv_cache_bytes", "kv_cache_bytes_prefill", "kv_cache_tokens", "kv_cache_tokens_prefill",
           "kv_cache_bytes_fp16_analytic")
VARIANTS = [("hf", "fp32"), ("bnb", "nf4"), ("kvq", "int4"), ("onnx", "fp32"), ("onnx", "int8"),
            ("mlc", "q4f32_1"), ("llamacpp", "f16")]


@pytest.mark.parametrize("name,variant", VARIANTS, ids=[f"{n}:{v}" for n, v in VARIANTS])
def test_each_backend_reports_the_kv_byte_keys_and_its_quantized_weights(tiny_model, name, variant):
    availability = variant_availability(name, variant)
    if not availability.ok:
        pytest.skip(availability.reason)
    # the tiny model has 2 layers, all of which the default int8 exclusions keep fp32
    options = {"threads": 1, **({"int8_exclude": "none"} if (name, variant) == ("onnx", "int8") else {})}
    backend = backend_class(name)(variant, options)
    try:
        backend.load(tiny_model)
        out = backend.generate([list(range(10, 18)), list(range(20, 28))], 3, min_new_tokens=3)
        quant = backend.info()["quantization"]
    finally:
        backend.close()
    extra = out.extra
    assert all(extra.get(key, 0) > 0 for key in KV_KEYS), {k: extra.get(k) for k in KV_KEYS}
    assert extra["kv_cache_tokens_prefill"] == 2 * 8
    assert extra["kv_cache_tokens"] == 2 * (8 + 3 - 1)
    if name != "mlc":  # paged: 8 and 10 positions both fill one 16-token page per sequence
        assert extra["kv_cache_bytes"] > extra["kv_cache_bytes_prefill"]
    if (name, variant) in (("hf", "fp32"), ("onnx", "fp32"), ("onnx", "int8")):  # fp32 caches, unpaged
        assert extra["kv_cache_bytes"] == 2 * extra["kv_cache_bytes_fp16_analytic"]
    if name == "mlc":  # TVM's page count (bytes / page bytes) agrees with ours; fp32 KV on CPU
        page_bytes = 16 * 2 * extra["kv_cache_bytes_fp16_analytic"] // extra["kv_cache_tokens"]
        assert extra["kv_cache_bytes"] == extra["kv_cache_pages_analytic"] * page_bytes
        assert extra["kv_cache_reserved_bytes"] >= extra["kv_cache_bytes"]
    if name == "llamacpp":  # f16 K and V rows plus a little metadata per cell
        assert extra["kv_cache_bytes_fp16_analytic"] <= extra["kv_cache_bytes"] < 1.1 * extra["kv_cache_bytes_fp16_analytic"]
    assert isinstance(quant["quantized"], list) and isinstance(quant["kept"], list)
    text = " ".join(quant["quantized"])
    kept = " ".join(quant["kept"])
    if (name, variant) == ("bnb", "nf4"):
        assert "q_proj" in text and "embed_tokens" in kept and "lm_head" not in text
    if name == "mlc":
        assert "embed_tokens" in text and "linear layers" in text
    if (name, variant) in (("hf", "fp32"), ("kvq", "int4"), ("onnx", "fp32")):
        assert quant["quantized"] == []
    if (name, variant) == ("onnx", "int8"):
        assert "q_proj" in text and "embed_tokens" in kept


def test_backend_configuration_lists_quantized_and_kept_weights():
    from reports.markdown import _info_rows

    record = {"label": "bnb:nf4", "info": {"device": "cpu", "quantization": {
        "format": "bnb-nf4", "quantized": ["q_proj", "down_proj"], "kept": ["embed_tokens (float32)"]}}}
    row = _info_rows([record])[0]
    assert row[-1] == "quantized: q_proj, down_proj; kept: embed_tokens (float32)"
