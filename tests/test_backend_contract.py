"""Every registered backend variant meets the Backend contract on the tiny model.

Parametrised over the registry, so a new backend is covered the day it is registered.
Unavailable variants skip with their reason; they never fail.
"""

from __future__ import annotations

import numpy as np
import pytest

from backends.base import REGISTRY, ScoringWindow, backend_class, variant_availability

VARIANTS = [(name, variant) for name in REGISTRY for variant in backend_class(name).variants]
_LOADED: dict[tuple[str, str], object] = {}


@pytest.fixture
def backend(request, tiny_model):
    name, variant = request.param
    availability = variant_availability(name, variant)
    if not availability.ok:
        pytest.skip(f"{name}:{variant} unavailable: {availability.reason}")
    if (name, variant) not in _LOADED:
        instance = backend_class(name)(variant)
        report = instance.load(tiny_model)
        instance.load_report = report
        _LOADED[(name, variant)] = instance
    return _LOADED[(name, variant)]


PROMPT = [785, 3575, 282, 4649, 314, 198, 28, 1675]  # arbitrary in-vocabulary ids


@pytest.mark.parametrize("backend", VARIANTS, indirect=True, ids=[f"{n}:{v}" for n, v in VARIANTS])
class TestContract:
    def test_load_report(self, backend):
        report = backend.load_report
        assert report.load_s > 0
        assert report.weight_bytes > 0

    def test_generate_exact_length_with_timestamps(self, backend):
        out = backend.generate([PROMPT], 6, min_new_tokens=6)
        assert [len(t) for t in out.token_ids] == [6]
        assert out.n_steps == 6
        assert out.step_times_s[0] > out.start_s
        assert all(b >= a for a, b in zip(out.step_times_s, out.step_times_s[1:]))

    def test_generate_batch_of_different_lengths_matches_single(self, backend):
        short = PROMPT[:5]
        batch = backend.generate([PROMPT, short], 4, min_new_tokens=4)
        single = backend.generate([short], 4, min_new_tokens=4)
        assert [len(t) for t in batch.token_ids] == [4, 4]
        # left padding with a proper attention mask must not change greedy output
        assert batch.token_ids[1] == single.token_ids[0]

    def test_greedy_is_deterministic(self, backend):
        a = backend.generate([PROMPT], 5, min_new_tokens=5).token_ids
        b = backend.generate([PROMPT], 5, min_new_tokens=5).token_ids
        assert a == b

    def test_stop_token_ends_generation(self, backend):
        free = backend.generate([PROMPT], 6, min_new_tokens=6).token_ids[0]
        stop = free[2]
        out = backend.generate([PROMPT], 6, stop_token_ids=[stop]).token_ids[0]
        assert out == free[: free.index(stop) + 1]

    def test_loglikelihood_shapes_and_agreement_with_greedy(self, backend):
        window = ScoringWindow(tuple(PROMPT), n_context=3)
        (scores,) = backend.loglikelihood([window])
        assert scores.shape == (len(PROMPT) - 3,)
        assert scores.dtype == np.float64
        assert np.all(np.isfinite(scores)) and np.all(scores <= 0)
        # the greedy next token is the most likely continuation: its log-prob beats the others'
        greedy = backend.generate([PROMPT], 1, min_new_tokens=1).token_ids[0][0]
        other = (greedy + 1) % 1000
        (with_greedy, with_other) = backend.loglikelihood([
            ScoringWindow(tuple(PROMPT) + (greedy,), len(PROMPT)),
            ScoringWindow(tuple(PROMPT) + (other,), len(PROMPT)),
        ])
        assert with_greedy[0] >= with_other[0]

    def test_context_only_window_scores_nothing(self, backend):
        (scores,) = backend.loglikelihood([ScoringWindow(tuple(PROMPT), n_context=len(PROMPT))])
        assert scores.shape == (0,)

    def test_memory_and_info(self, backend):
        memory = backend.memory()
        assert memory["rss"] > 0
        info = backend.info()
        for key in ("backend", "device", "quantization"):
            assert key in info, key
        assert info["backend"] == backend.label
