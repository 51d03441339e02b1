"""The StreamingLLM sink + sliding-window cache of the transformers backends (tiny random Llama):
which positions it keeps, exactness of chunked scoring, equality with full attention when the
window covers the context, generation through it, and bad option combinations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.base import BackendError, ScoringWindow, backend_class
from backends.hf.sink_cache import SinkWindowCache, SinkWindowLayer, sink_window_logits, sink_window_mask
from backends.kv import kv_fp16_analytic_bytes

TOKENS = tuple(range(300, 360))  # 60 tokens


@pytest.fixture(scope="module")
def hf(tiny_backends):
    """Loaded hf:fp32 backends on the tiny model, keyed by their options."""
    return lambda **options: tiny_backends("hf", "fp32", threads=1, **options)


def expected_positions(n: int, window: int, sink: int) -> list[int]:
    return sorted(set(range(min(sink, n))) | set(range(max(0, n - window), n)))


@pytest.mark.parametrize("chunks", [[1] * 23, [5, 1, 9, 8], [23]])
def test_layer_keeps_first_sink_and_last_window_positions(chunks):
    layer = SinkWindowLayer(window=6, sink=3)
    seen = 0
    for size in chunks:
        positions = torch.arange(seen, seen + size, dtype=torch.float32)
        keys = positions.view(1, 1, size, 1).expand(1, 2, size, 4).clone()  # each key holds its position
        layer.update(keys, -keys)
        seen += size
        want = expected_positions(seen, 6, 3)
        assert layer.positions.tolist() == want
        assert layer.keys.shape[-2] == len(want) <= 3 + 6
        assert layer.keys[0, 1, :, 0].tolist() == [float(p) for p in want]
        assert layer.values[0, 0, :, 3].tolist() == [-float(p) for p in want]
    assert layer.get_seq_length() == seen


def test_scoring_leaves_cache_with_sink_and_window_in_every_layer(hf):
    backend = hf()
    cache = SinkWindowCache(backend.model.config, window=16, sink=4)
    sink_window_logits(backend.model, cache, TOKENS, 30, 7, "cpu")
    n_fed = len(TOKENS) - 1  # the last token is only a target
    for layer in cache.layers:
        assert layer.positions.tolist() == expected_positions(n_fed, 16, 4)
        assert layer.keys.shape[-2] == 20
    assert cache.get_seq_length() == n_fed


def test_window_covering_context_equals_full_attention(hf):
    window = ScoringWindow(TOKENS, 20)
    full = hf()._score_logits(window)
    windowed = hf(sliding_window=len(TOKENS), attention_sink=4, window_chunk=9)._score_logits(window)
    assert windowed.shape == full.shape == (40, backend_vocab(hf()))
    np.testing.assert_allclose(windowed, full, atol=1e-4)


def backend_vocab(backend) -> int:
    return backend.model.config.vocab_size


def test_small_window_changes_logits_and_chunking_is_exact(hf):
    window = ScoringWindow(TOKENS, 20)
    full = hf()._score_logits(window)
    by_token = hf(sliding_window=8, attention_sink=2, window_chunk=1)._score_logits(window)
    chunked = hf(sliding_window=8, attention_sink=2, window_chunk=13)._score_logits(window)
    assert np.abs(by_token - full).max() > 1e-3
    np.testing.assert_allclose(chunked, by_token, atol=1e-4)
    # independent reference: one cache-less forward with the sink + window mask over all tokens
    model = hf().model
    ids = torch.tensor([list(TOKENS)])
    mask = sink_window_mask(torch.zeros(0, dtype=torch.long), 0, len(TOKENS), 8, 2, torch.float32)
    with torch.inference_mode():
        reference = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0, 19:-1].numpy()
    np.testing.assert_allclose(by_token, reference, atol=1e-4)


def test_generation_holds_sink_plus_window_and_matches_full_when_window_covers(hf):
    prompts = [list(range(200, 230))] * 2
    small = hf(sliding_window=8, attention_sink=2).generate(prompts, 6, min_new_tokens=6)
    assert small.extra["kv_cache_tokens"] == 2 * 10
    config = hf().model.config
    # fp32 keys/values of the 10 held positions x 2 rows, plus each layer's int64 [10] position index
    assert small.extra["kv_cache_bytes"] == (kv_fp16_analytic_bytes(config, 2 * 10) * 2
                                             + config.num_hidden_layers * 10 * 8)
    wide = hf(sliding_window=64, attention_sink=2).generate(prompts, 6, min_new_tokens=6)
    assert wide.token_ids == hf().generate(prompts, 6, min_new_tokens=6).token_ids


def test_bad_combinations_are_refused():
    with pytest.raises(BackendError, match="attention_sink needs sliding_window"):
        backend_class("hf")("fp32", {"attention_sink": 4})
    with pytest.raises(BackendError, match="smaller than sliding_window"):
        backend_class("hf")("fp32", {"sliding_window": 4, "attention_sink": 4})
    with pytest.raises(BackendError, match="kvq:fp16 only"):
        backend_class("kvq")("int4", {"sliding_window": 64})


def test_padded_batch_is_refused(hf):
    with pytest.raises(BackendError, match="equal length"):
        hf(sliding_window=8).generate([list(range(200, 230)), list(range(200, 210))], 2)


def test_kvq_fp16_scores_through_the_sink_window_cache(tiny_model, hf):
    backend = backend_class("kvq")("fp16", {"threads": 1, "sliding_window": 8, "attention_sink": 2})
    backend.load(tiny_model)
    try:
        window = ScoringWindow(TOKENS, 20)
        expected = hf(sliding_window=8, attention_sink=2)._score_logits(window)
        np.testing.assert_allclose(backend._score_logits(window), expected, atol=1e-4)
        assert backend.info()["kv_cache"]["type"] == "SinkWindowCache"
    finally:
        backend.close()


def test_bnb_inherits_the_cache_and_matches_its_full_run_when_window_covers(tiny_model):
    window = ScoringWindow(TOKENS, 20)
    logits = []
    for options in ({}, {"sliding_window": len(TOKENS), "attention_sink": 2, "window_chunk": 11}):
        backend = backend_class("bnb")("nf4", {"threads": 1, **options})
        backend.load(tiny_model)
        try:
            logits.append(backend._score_logits(window))
            assert backend.info()["kv_cache"]["type"] == ("SinkWindowCache" if options else "DynamicCache")
        finally:
            backend.close()
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4)


def test_greedy_generation_past_the_window_follows_the_sink_window_logits(hf):
    backend = hf(sliding_window=8, attention_sink=2)
    prompt = list(range(400, 408))  # within the window: the one-shot prefill is exact too
    generated = backend.generate([prompt], 14, min_new_tokens=14).token_ids[0]
    sequence = prompt + generated
    cache = SinkWindowCache(backend.model.config, window=8, sink=2)
    logits = sink_window_logits(backend.model, cache, sequence, len(prompt), 1, "cpu")
    assert len(generated) == 14
    assert logits.argmax(-1).tolist() == generated  # row j predicts sequence[len(prompt) + j]
