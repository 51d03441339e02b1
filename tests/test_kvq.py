"""The quantized-KV backend: cache-size accounting, the hybrid cache's layers, scoring through the
cache, attention selection and bad input. Tiny random model unless marked e2e."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backends.base import BackendError, ScoringWindow, backend_class, variant_availability
from backends.device import cuda_available
from backends.kv import kv_fp16_analytic_bytes

PROMPTS = [list(range(200, 230)), list(range(300, 312))]  # batch of 2, left-padded to 30


@pytest.fixture(scope="module")
def kvq(tiny_backends):
    """Loaded kvq backends on the tiny model, one per variant (hybrid: layer 0 full, layer 1 int2)."""
    return lambda variant, **options: tiny_backends("kvq", variant, **options)


def expected_quantized_bytes(config, tokens: int, bits: int, group: int, scale_bytes: int) -> int:
    """Payload bits/8 per element + one scale (and below 8 bits one zero point) per group."""
    elements = kv_fp16_analytic_bytes(config, tokens) // 2
    per_group = scale_bytes * (1 if bits == 8 else 2)
    return elements * bits // 8 + (elements // group) * per_group


def test_registered_with_all_variants():
    cls = backend_class("kvq")
    assert set(cls.variants) == {"fp16", "int8", "int4", "int2", "hybrid", "fp16-sdpa"}
    for variant in ("fp16", "int8", "int4", "int2", "hybrid"):
        assert variant_availability("kvq", variant).ok


def test_fp16_cache_bytes_match_analytic_formula(kvq):
    backend = kvq("fp16")
    out = backend.generate(PROMPTS, 6, min_new_tokens=6)
    element = 4 if backend.compute_dtype == "float32" else 2
    width = max(len(p) for p in PROMPTS)
    assert out.extra["kv_cache_tokens_prefill"] == len(PROMPTS) * width
    assert out.extra["kv_cache_tokens"] == len(PROMPTS) * (width + 6 - 1)
    config = backend.model.config
    assert out.extra["kv_cache_bytes_prefill"] == kv_fp16_analytic_bytes(config, len(PROMPTS) * width) * element // 2
    assert out.extra["kv_cache_bytes_fp16_analytic"] == kv_fp16_analytic_bytes(config, out.extra["kv_cache_tokens"])
    assert out.extra["kv_cache_bytes"] == out.extra["kv_cache_bytes_fp16_analytic"] * element // 2
    assert out.extra["kv_cache_bytes_per_token"] == pytest.approx(element * out.extra["kv_cache_bytes_fp16_analytic"] / 2 / out.extra["kv_cache_tokens"])


@pytest.mark.parametrize("variant,bits", [("int8", 8), ("int4", 4), ("int2", 2)])
def test_quantized_prefill_bytes_are_payload_plus_scales(kvq, variant, bits):
    backend = kvq(variant)
    out = backend.generate(PROMPTS, 4, min_new_tokens=4)
    tokens = out.extra["kv_cache_tokens_prefill"]
    scale_bytes = 4 if backend.compute_dtype == "float32" else 2
    expected = expected_quantized_bytes(backend.model.config, tokens, bits, backend.q_group_size, scale_bytes)
    # right after prefill the whole prompt sits in the quantized store, no residual yet
    assert out.extra["kv_cache_bytes_prefill"] == expected
    # after decoding, the 3 fed tokens sit in the full-precision residual
    residual = kv_fp16_analytic_bytes(backend.model.config, len(PROMPTS) * 3) * scale_bytes // 2
    assert out.extra["kv_cache_bytes"] == expected + residual


def test_fewer_bits_hold_fewer_bytes(kvq):
    sizes = {v: kvq(v).generate(PROMPTS, 2, min_new_tokens=2).extra["kv_cache_bytes_prefill"]
             for v in ("fp16", "int8", "int4", "int2")}
    assert sizes["int2"] < sizes["int4"] < sizes["int8"] < sizes["fp16"]


def test_residual_is_flushed_into_the_quantized_store(kvq):
    backend = kvq("int4", residual_length=4, score_chunk=4)
    out = backend.generate([PROMPTS[0]], 12, min_new_tokens=12)
    tokens = out.extra["kv_cache_tokens"]
    scale_bytes = 4 if backend.compute_dtype == "float32" else 2
    all_quantized = expected_quantized_bytes(backend.model.config, tokens, 4, backend.q_group_size, scale_bytes)
    full = kv_fp16_analytic_bytes(backend.model.config, tokens) * scale_bytes // 2
    # at most residual_length tokens stay unquantized: far below the full-precision size
    assert all_quantized <= out.extra["kv_cache_bytes"] < all_quantized + full * 4 // tokens + 1


def _filled_cache(backend, n_tokens=40):
    from backends.kvq.scoring import cached_logits

    cache = backend.new_cache()
    cached_logits(backend.model, cache, list(range(100, 100 + n_tokens)), 1, backend.score_chunk, backend.device)
    return cache


@pytest.mark.parametrize("first,last,full", [(1, 0, [0]), (0, 1, [1])])
def test_hybrid_keeps_chosen_layers_unquantized(kvq, first, last, full):
    import torch
    from transformers.cache_utils import DynamicLayer, QuantizedLayer

    backend = kvq("hybrid", hybrid_first=first, hybrid_last=last, hybrid_bits=2)
    assert backend.full_precision_layers() == full
    assert backend.info()["kv_cache"]["full_precision_layers"] == full
    cache = _filled_cache(backend)
    for index, layer in enumerate(cache.layers):
        if index in full:
            assert type(layer) is DynamicLayer
            assert layer.keys.dtype == getattr(torch, backend.compute_dtype)
            assert layer.keys.shape[-2] == 39  # every fed token, unquantized
        else:
            assert isinstance(layer, QuantizedLayer) and layer.nbits == 2
            assert layer._quantized_keys._data is not None


def test_full_precision_layer_selection():
    from backends.kvq.caches import full_precision_layers

    assert full_precision_layers(30, 2, 2) == [0, 1, 28, 29]
    assert full_precision_layers(2, 1, 1) == [0, 1]
    assert full_precision_layers(4, 0, 0) == []
    with pytest.raises(ValueError):
        full_precision_layers(4, -1, 0)


def test_hybrid_size_lies_between_int2_and_full(kvq):
    hybrid = kvq("hybrid", hybrid_first=1, hybrid_last=0).generate(PROMPTS, 2, min_new_tokens=2)
    int2 = kvq("int2").generate(PROMPTS, 2, min_new_tokens=2)
    fp16 = kvq("fp16").generate(PROMPTS, 2, min_new_tokens=2)
    # one of two layers full, the other int2: exactly the mean of the two uniform caches
    expected = (int2.extra["kv_cache_bytes_prefill"] + fp16.extra["kv_cache_bytes_prefill"]) // 2
    assert hybrid.extra["kv_cache_bytes_prefill"] == expected


def test_fp16_scores_in_one_forward_which_equals_scoring_through_its_cache(kvq, tiny_model, monkeypatch):
    """Why kvq:fp16 scores in one forward: chunks through its unquantized cache give the same
    log-likelihoods as one forward over the window (and as hf:fp32's)."""
    from backends.kvq import scoring
    from backends.kvq.scoring import cached_logits
    from backends.scoring import score_rows

    hf = backend_class("hf")("fp32")
    hf.load(tiny_model)
    window = ScoringWindow(tuple(range(500, 700)), 20)
    reference = hf.loglikelihood([window])[0]
    hf.close()
    fp16 = kvq("fp16")
    chunked_calls = []
    monkeypatch.setattr(scoring, "cached_logits", lambda *a: chunked_calls.append(a) or cached_logits(*a))
    one_forward = fp16.loglikelihood([window])[0]
    assert not chunked_calls, "kvq:fp16 went through the chunked path"
    chunks = cached_logits(fp16.model, fp16.new_cache(), window.token_ids, window.first_scored,
                           fp16.score_chunk, fp16.device)
    through_cache = score_rows(chunks, np.asarray(window.token_ids[window.first_scored:])).logprobs
    assert one_forward.shape == reference.shape == (180,) and len(chunks) == 180
    np.testing.assert_allclose(one_forward, reference, atol=1e-5)
    np.testing.assert_allclose(through_cache, reference, atol=1e-5)
    assert "one forward" in fp16.info()["kv_cache"]["scoring"]


def test_int2_scoring_reads_the_quantized_cache(kvq, monkeypatch):
    from transformers.cache_utils import QuantoQuantizedLayer

    window = ScoringWindow(tuple(range(500, 700)), 20)
    fp16 = kvq("fp16").loglikelihood([window])[0]
    calls = []
    original = QuantoQuantizedLayer._dequantize
    monkeypatch.setattr(QuantoQuantizedLayer, "_dequantize", lambda self, q: calls.append(1) or original(self, q))
    int2 = kvq("int2").loglikelihood([window])[0]
    assert int2.shape == fp16.shape == (180,)
    assert calls, "scoring never read the quantized store"
    # the prefill's own logits never read the cache: identical for the first scored token
    assert int2[0] == pytest.approx(fp16[0], abs=1e-5)
    # every later token attends to dequantized int2 keys/values: they differ, far above fp noise
    assert np.abs(int2[1:] - fp16[1:]).max() > 1e-4
    int8 = kvq("int8").loglikelihood([window])[0]
    assert np.abs(int8 - fp16).mean() < np.abs(int2 - fp16).mean()


def test_attention_choice_and_fa2_skip_reason(kvq):
    backend = kvq("fp16")
    info = backend.info()
    if cuda_available():
        pytest.skip("CUDA present: the FlashAttention-2 path is exercised instead")
    assert info["attn_implementation"] == "sdpa"
    assert "no CUDA device" in info["attn_reason"]
    reason = variant_availability("kvq", "fp16-sdpa")
    assert not reason.ok and "CUDA" in reason.reason and "flash-attn" in reason.reason
    with pytest.raises(BackendError, match="flash_attention_2 is not possible here: no CUDA device"):
        backend_class("kvq")("fp16", {"attn": "flash_attention_2"})


def test_info_records_quantization_settings(kvq):
    info = kvq("int4").info()
    quant = info["kv_cache"]["quantization"]
    assert quant["nbits"] == 4 and quant["backend"] == "quanto"
    assert quant["q_group_size"] == 16 and quant["residual_length"] == 128  # tiny head_dim is 16
    assert info["kv_cache"]["full_precision_dtype"] == kvq("int4").compute_dtype
    assert "optimum-quanto" in info["library"]


@pytest.mark.parametrize(
    "variant,options,message",
    [
        ("int4", {"residual_length": "x"}, "kvq: option residual_length='x': Input should be a valid integer"),
        ("int4", {"residual_length": 8, "score_chunk": 16}, "must not exceed residual_length"),
        ("hybrid", {"hybrid_bits": "3"}, "option hybrid_bits='3': must be 2, 4 or 8"),
        ("fp16", {"attn": "magic"}, "option attn='magic': Input should be 'auto', 'flash_attention_2'"),
        ("int4", {"quant_backend": "foo"}, "option quant_backend='foo': Input should be 'quanto' or 'hqq'"),
        ("int4", {"residual": "8"}, "kvq: unknown option 'residual'; valid: device, threads, seed, attn"),
        ("int9", {}, "unknown variant kvq:int9"),
    ],
)
def test_bad_options_give_one_line_errors(variant, options, message):
    with pytest.raises(BackendError, match=message) as error:
        backend_class("kvq")(variant, options)
    assert "\n" not in str(error.value)


def test_bad_group_size_and_tokens(tiny_model, kvq):
    backend = backend_class("kvq")("int4", {"q_group_size": 5})
    with pytest.raises(BackendError, match="q_group_size 5 must divide head_dim 16"):
        backend.load(tiny_model)
    with pytest.raises(BackendError, match="outside the vocabulary"):
        kvq("int4").loglikelihood([ScoringWindow((1, 2, 10**9), 0)])
    with pytest.raises(BackendError, match="before load"):
        backend_class("kvq")("int2").loglikelihood([ScoringWindow((1, 2, 3), 0)])


def test_hf_baseline_reports_prefill_kv_bytes(tiny_model):
    hf = backend_class("hf")("fp32")
    hf.load(tiny_model)
    out = hf.generate(PROMPTS, 3, min_new_tokens=3)
    hf.close()
    assert out.n_steps == 3
    assert 0 < out.extra["kv_cache_bytes_prefill"] < out.extra["kv_cache_bytes"]
    assert out.extra["kv_cache_bytes"] == 2 * out.extra["kv_cache_bytes_fp16_analytic"]  # fp32


@pytest.mark.e2e
def test_smollm2_perplexity_through_the_cache(data_dir):
    from backends.models import load_tokenizer, resolve_model

    spec = resolve_model("smollm2-135m")
    text = (data_dir / "wikitext-2-raw-v1" / "test.txt").read_text()
    # 512 tokens (not the 1024 of the reported numbers) keeps this test near a minute on 2 cores
    ids = load_tokenizer(spec)(text[:20_000], add_special_tokens=False)["input_ids"][:512]
    window = ScoringWindow(tuple(ids), 0)
    ppl = {}
    for name, variant in (("hf", "fp32"), ("kvq", "fp16"), ("kvq", "int2")):
        backend = backend_class(name)(variant)
        backend.load(spec)
        ppl[f"{name}:{variant}"] = math.exp(-backend.loglikelihood([window])[0].mean())
        backend.close()
    assert ppl["kvq:fp16"] == pytest.approx(ppl["hf:fp32"], rel=0.005)
    assert ppl["kvq:int2"] > 1.1 * ppl["kvq:fp16"]


def test_context_length_sweep_through_the_harness(tmp_path, data_dir, monkeypatch):
    """``--context-lengths`` gives KV MB per length and precision; the report tabulates it."""
    from harness.cli import main
    from reports.records import read_records

    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    code = main(["run", "--model", "tiny-llama", "--backends", "kvq:fp16,kvq:int4", "--context-lengths", "32,64",
                 "--output-len", "3", "--warmup", "0", "--repetitions", "1", "--out", str(tmp_path)])
    assert code == 0
    kv = {(r["label"], r["params"]["n_in"]): r["metrics"] for r in read_records(tmp_path / "results.jsonl")}
    assert set(kv) == {(b, n) for b in ("kvq:fp16", "kvq:int4") for n in (32, 64)}
    for label in ("kvq:fp16", "kvq:int4"):
        assert kv[(label, 64)]["kv_cache_bytes_prefill"] == 2 * kv[(label, 32)]["kv_cache_bytes_prefill"]
    assert kv[("kvq:int4", 64)]["kv_cache_bytes_prefill"] < kv[("kvq:fp16", 64)]["kv_cache_bytes_prefill"]
    report = (tmp_path / "report.md").read_text()
    assert "## KV-cache MB vs context length" in report
    assert "| kvq:fp16 |" in report and "1.00x" in report
