"""The shared base layer on its own: scoring, the greedy loop, special tokens, option routing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backends.base import GenerationRequest
from backends.decoding import greedy_decode
from backends.options import BackendOptions, OptionError, parse_options, split_addressed
from backends.scoring import target_logprobs
from backends.tokens import SpecialTokens


def test_target_logprobs_match_the_definition_across_chunks():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(600, 50)).astype(np.float32) * 10
    targets = rng.integers(0, 50, 600)
    expected = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    got = target_logprobs(logits, targets, chunk=256)  # 600 rows: three chunks, the last partial
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected[np.arange(600), targets], atol=1e-9)


def _scripted(rows: list[list[int]], vocab: int = 8):
    """prefill/step functions whose argmax follows ``rows[batch_row][step]``; records what was fed."""
    fed: list[tuple[list[int], list[bool]]] = []

    def logits_for(index: int) -> np.ndarray:
        out = np.zeros((len(rows), vocab), dtype=np.float32)
        for row, script in enumerate(rows):
            out[row, script[min(index, len(script) - 1)]] = 1.0
        return out

    def prefill():
        return logits_for(0)

    def step(chosen, live):
        fed.append((chosen.tolist(), live.tolist()))
        return logits_for(len(fed))

    return prefill, step, fed


def test_greedy_loop_stops_each_row_at_its_stop_token_and_stamps_every_step():
    prefill, step, fed = _scripted([[3, 7, 4, 4], [5, 5, 5, 5]])  # 7 is a stop token
    request = GenerationRequest(((1, 2), (1,)), max_new_tokens=4)
    hooked = []
    out = greedy_decode(request, [7], prefill, step, on_first_step=lambda: hooked.append(len(fed)))
    assert out.token_ids == [[3, 7], [5, 5, 5, 5]]  # the stop token is kept, then the row ends
    assert out.n_steps == 4 and all(b >= a for a, b in zip(out.step_times_s, out.step_times_s[1:]))
    assert out.step_times_s[0] >= out.start_s
    assert hooked == [0]  # called once, after the first stamp, before any decode step
    assert [live for _, live in fed] == [[True, True], [False, True], [False, True]]


def test_greedy_loop_suppresses_stop_tokens_before_min_new_tokens():
    prefill, step, _ = _scripted([[7, 7, 7]])
    out = greedy_decode(GenerationRequest(((1,),), 3, min_new_tokens=2), [7], prefill, step)
    assert out.token_ids[0][:2] != [7, 7] and out.token_ids[0][2] == 7


def test_special_tokens_prefer_generation_config_and_fall_back_to_eos_for_padding(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "vocab_size": 100}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    special = SpecialTokens.from_checkpoint(tmp_path)
    assert special == SpecialTokens((5, 6), 5, 100)


def test_options_route_by_prefix_and_reject_what_no_backend_has():
    class Small(BackendOptions):
        window: int = 0

    routed = split_addressed([("threads", "2"), ("a.window", "8")], {"a": Small, "b": BackendOptions})
    assert routed == {"a": {"threads": "2", "window": "8"}, "b": {"threads": "2"}}
    assert parse_options(Small, "a", routed["a"]).window == 8
    with pytest.raises(OptionError, match="unknown option 'window' for backends b"):
        split_addressed([("window", "8")], {"b": BackendOptions})
    with pytest.raises(OptionError, match="a: option window='x': Input should be a valid integer"):
        parse_options(Small, "a", {"window": "x"})
