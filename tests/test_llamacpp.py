"""llama.cpp backend: GGUF files from the same weights, llama.cpp's quantizer, KV types, and the
llama-perplexity protocol against a direct loop through llama-cpp-python."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from backends.base import BackendError, ScoringWindow, backend_class, variant_availability
from workloads.wikitext2 import llamacpp_chunks

pytestmark = pytest.mark.skipif(not variant_availability("llamacpp", "f32").ok,
                                reason="llama-cpp-python is not installed")

PROMPT = [785, 3575, 282, 4649, 314, 198, 28, 1675, 1017, 42]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """Backends by variant (and options), loaded once per module."""
    cache: dict = {}

    def get(variant: str, **options):
        key = (variant, tuple(sorted(options.items())))
        if key not in cache:
            backend = backend_class("llamacpp")(variant, {"threads": 2, **options})
            cache[key] = (backend, backend.load(tiny_model))
        return cache[key]

    yield get
    for backend, _ in cache.values():
        backend.close()


@pytest.fixture(scope="module")
def hf(tiny_model):
    backend = backend_class("hf")("fp32", {"threads": 2})
    backend.load(tiny_model)
    yield backend
    backend.close()


def test_f32_gguf_written_from_the_checkpoint_gives_transformers_logits(loaded, hf):
    backend, report = loaded("f32")
    assert "written from the transformers checkpoint" in report.details["source"]
    assert report.details["tensor_types"] == {"F32": report.details["tensor_types"]["F32"]}
    window = ScoringWindow(tuple(range(500, 560)), n_context=5)
    ours, reference = backend.loglikelihood([window])[0], hf.loglikelihood([window])[0]
    np.testing.assert_allclose(ours, reference, atol=2e-3)
    assert backend.generate([PROMPT], 8, min_new_tokens=8).token_ids == hf.generate([PROMPT], 8, min_new_tokens=8).token_ids


def test_quantized_variant_is_built_by_llama_cpp_once_and_then_cached(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTARENA_CACHE", str(tmp_path))
    first = backend_class("llamacpp")("q8_0", {"threads": 2})
    built = first.load(tiny_model)
    assert built.preparation.cache_hit is False and built.preparation.quantize_s > 0
    assert built.preparation.peak_rss_bytes > 0  # the larger of writing the source and quantizing
    assert built.details["tensor_types"].get("Q8_0", 0) > 0
    first.close()
    import gguf

    def unread(*args, **kwargs):
        raise AssertionError("a cache hit re-read the GGUF's tensor infos")

    monkeypatch.setattr(gguf, "GGUFReader", unread)  # the hit takes the tensor summary from the manifest
    again = backend_class("llamacpp")("q8_0", {"threads": 2})
    hit = again.load(tiny_model)
    assert hit.details["tensor_types"] == built.details["tensor_types"]
    assert again.info()["quantization"]["quantized"] == first.info()["quantization"]["quantized"] != []
    assert hit.preparation.cache_hit is True and hit.preparation.quantize_s == built.preparation.quantize_s
    assert hit.preparation.peak_rss_bytes == built.preparation.peak_rss_bytes
    assert (tmp_path / "llamacpp").is_dir() and hit.preparation.artifact_dir.startswith(str(tmp_path))
    again.close()
    monkeypatch.undo()  # an entry from before the summary was kept: read once, then kept in its manifest
    manifest_path = Path(hit.preparation.artifact_dir) / "q8_0.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["tensors"]
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.setenv("QUANTARENA_CACHE", str(tmp_path))
    older = backend_class("llamacpp")("q8_0", {"threads": 2})
    assert older.load(tiny_model).details["tensor_types"] == built.details["tensor_types"]
    older.close()
    assert json.loads(manifest_path.read_text())["tensors"]["tensor_types"] == built.details["tensor_types"]


def test_quantized_weights_are_smaller_and_cost_some_accuracy(loaded):
    f32, f32_report = loaded("f32")
    q4, q4_report = loaded("q4_0")
    assert q4_report.weight_bytes < 0.5 * f32_report.weight_bytes
    window = ScoringWindow(tuple(range(600, 664)), n_context=1)
    a, b = f32.loglikelihood([window])[0], q4.loglikelihood([window])[0]
    assert not np.allclose(a, b) and np.all(np.isfinite(b))


def test_kv_cache_types_change_kv_bytes_as_their_block_sizes_say():
    """On SmolLM2 (head_dim 64; the tiny model's 16 is below ggml's block of 32), its shipped Q4_1 file."""
    from backends.models import resolve_model

    spec = resolve_model("smollm2-135m")
    prompt = list(range(1000, 1064))
    sizes = {}
    for kv in ("f16", "q8_0", "q4_0"):
        backend = backend_class("llamacpp")("q4_1", {"threads": 2, "type_k": kv, "type_v": kv})
        backend.load(spec)
        sizes[kv] = backend.generate([prompt], 4, min_new_tokens=4).extra["kv_cache_bytes"]
        assert backend.info()["kv_cache"]["type_v"] == kv
        backend.close()
    # ggml blocks of 32 values: f16 64 bytes, q8_0 34 bytes, q4_0 18 bytes (plus a small state header)
    assert sizes["q8_0"] / sizes["f16"] == pytest.approx(34 / 64, rel=0.05)
    assert sizes["q4_0"] / sizes["f16"] == pytest.approx(18 / 64, rel=0.05)


def test_kv_bytes_grow_with_cached_tokens_and_match_the_fp16_formula(loaded):
    backend, _ = loaded("f32")
    out = backend.generate([PROMPT, PROMPT[:4]], 5, min_new_tokens=5)
    assert out.extra["kv_cache_tokens"] == len(PROMPT) + 4 + 2 * (5 - 1)  # the last token is never fed back
    assert 0 < out.extra["kv_cache_bytes_prefill"] < out.extra["kv_cache_bytes"]
    assert out.extra["kv_cache_bytes"] == pytest.approx(out.extra["kv_cache_bytes_fp16_analytic"], rel=0.1)


def test_start_precedes_context_sizing_and_kv_clearing(loaded, monkeypatch):
    """The TTFT origin (``Backend.generate``'s ``request.start_s``) comes before the per-request
    state (context sizing, clearing the KV cache), as for every backend."""
    import time

    backend, _ = loaded("f32")
    calls = []
    for name in ("_ensure_context", "_clear"):
        original = getattr(backend, name)

        def probe(*args, _original=original, _name=name):
            calls.append((_name, time.perf_counter()))
            return _original(*args)

        monkeypatch.setattr(backend, name, probe)
    out = backend.generate([PROMPT], 3, min_new_tokens=3)
    assert [name for name, _ in calls] == ["_ensure_context", "_clear"]
    assert out.start_s < calls[0][1] and calls[-1][1] < out.step_times_s[0]


def test_bad_options_are_one_line_errors():
    with pytest.raises(BackendError, match="llamacpp: option type_k='q5_1': Input should be 'f16', 'q8_0' or 'q4_0'"):
        backend_class("llamacpp")("q4_0", {"type_k": "q5_1"})
    with pytest.raises(BackendError, match="type_v other than f16 needs flash_attn"):
        backend_class("llamacpp")("q4_0", {"type_v": "q8_0", "flash_attn": "off"})


def test_fixed_context_too_small_for_a_request_says_so(tiny_model):
    backend = backend_class("llamacpp")("f32", {"n_ctx": 64})
    backend.load(tiny_model)
    with pytest.raises(BackendError, match="needs 120 KV cells; n_ctx is 64"):
        backend.generate([list(range(100, 200))], 20)
    backend.close()


def test_unsupported_architecture_is_refused(tmp_path):
    from backends.llamacpp.gguf_files import UnsupportedModel, write_source_from_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModel, match="model_type 'gpt2'"):
        write_source_from_checkpoint(tmp_path, tmp_path / "out.gguf")


def test_llamacpp_chunks_follow_llama_perplexity():
    ids = list(range(100, 1125))  # 1025 tokens: two chunks of 512, the tail dropped
    windows = llamacpp_chunks(ids, 512, bos=1)
    assert len(windows) == 2
    assert windows[1].token_ids[0] == 1 and windows[1].token_ids[1:] == tuple(ids[513:1024])
    # llama.cpp scores logits at positions first .. n_ctx-2 (first = n_ctx/2): tokens 257 .. 511
    assert windows[0].first_scored == 257 and windows[0].n_scored == 255
    assert llamacpp_chunks(ids, 512, bos=None)[0].token_ids[0] == 100


# --- the embedded model and the shared data --------------------------------------------------------
@pytest.mark.e2e
def test_q4_1_perplexity_equals_a_direct_llama_cpp_loop_and_f32_equals_transformers(data_dir, monkeypatch):
    import llama_cpp

    from backends.models import load_tokenizer, resolve_model
    from workloads.data import wikitext2_token_ids
    from workloads.metrics import perplexity
    from workloads.wikitext2 import adds_bos

    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    spec = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(spec)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    windows = llamacpp_chunks(wikitext2_token_ids(tokenizer)[:2048], 512, bos)

    def ppl(name: str, variant: str, **options) -> float:
        backend = backend_class(name)(variant, {"threads": 2, **options})
        backend.load(spec)
        value = perplexity(np.concatenate(backend.loglikelihood(windows)))["ppl"]
        backend.close()
        return value

    def direct(flash_attn: bool) -> float:
        """llama-cpp-python's own Llama class over the shipped file, every logit kept."""
        llm = llama_cpp.Llama(model_path=spec.location, n_ctx=512, n_batch=512, logits_all=True,
                              n_threads=2, verbose=False, flash_attn=flash_attn)
        nll = []
        for window in windows:
            llm.reset()
            llm.eval(list(window.token_ids))
            scores = np.asarray(llm.scores[: len(window.token_ids)], dtype=np.float64)
            for pos in range(window.first_scored - 1, len(window.token_ids) - 1):
                row = scores[pos]
                nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[window.token_ids[pos + 1]])
        return math.exp(float(np.mean(nll)))

    # flash attention changes llama.cpp's numbers (about 0.5% PPL here): compare like with like
    assert ppl("llamacpp", "q4_1", flash_attn="on") == pytest.approx(direct(True), rel=1e-6)
    assert ppl("llamacpp", "q4_1", flash_attn="off") == pytest.approx(direct(False), rel=1e-6)
    assert ppl("llamacpp", "f32") == pytest.approx(ppl("hf", "fp32"), rel=0.005)
