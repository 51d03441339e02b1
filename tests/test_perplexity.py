"""The sliding-window protocol and the perplexity workload against a direct computation."""

import math

import numpy as np
import pytest
import torch

from backends.base import backend_class
from backends.models import load_tokenizer
from workloads.base import WorkloadError
from workloads.data import wikitext2_token_ids
from workloads.wikitext2 import WikiText2Workload, WikiTextParams, adds_bos, sliding_windows


def test_windows_score_every_token_once():
    ids = list(range(1000))
    windows = sliding_windows(ids, context=256, stride=100)
    scored = []
    offset = 0
    for w in windows:
        begin = ids.index(w.token_ids[0])
        scored += list(range(begin + w.first_scored, begin + len(w.token_ids)))
        offset += 1
    assert scored == list(range(1, 1000))
    assert all(len(w.token_ids) <= 256 for w in windows)


@pytest.mark.parametrize("context,stride", [(10, 0), (10, 11)])
def test_bad_stride_rejected(context, stride):
    with pytest.raises(WorkloadError):
        sliding_windows(list(range(50)), context, stride)


@pytest.fixture(scope="module")
def tiny_hf(tiny_model):
    backend = backend_class("hf")("fp32")
    backend.load(tiny_model)
    return backend


def _direct_ppl(model, ids, context, stride):
    """The transformers guide's loop, written out independently: labels masked with -100."""
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll_sum += loss.item() * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / count), count


def test_workload_without_bos_matches_direct_computation(tiny_hf, tiny_model, data_dir, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    tokenizer = load_tokenizer(tiny_model)
    params = WikiTextParams(context=128, stride=64, max_eval_tokens=600, bos="no")
    result = WikiText2Workload(params).run(tiny_hf, tokenizer, lambda d, t: None)
    ids = list(wikitext2_token_ids(tokenizer)[:600])
    expected, count = _direct_ppl(tiny_hf.model, ids, 128, 64)
    assert result.metrics["n_tokens"] == count == 599
    assert result.metrics["ppl"] == pytest.approx(expected, rel=1e-4)
    assert len(result.samples["window_mean_nll"]) == result.metrics["n_windows"]
    assert result.metrics["protocol"].endswith("600 tokens, no BOS (--ppl-bos no)")


def test_default_puts_one_bos_before_the_text_as_the_guide_tokenizer_does(tiny_hf, tiny_model, data_dir,
                                                                          monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    tokenizer = load_tokenizer(tiny_model)
    assert adds_bos(tokenizer)  # the SmolLM2 tokenizer puts its BOS in front of text
    guide_ids = tokenizer("\n\n".join(["a b", "c"]))["input_ids"]
    assert guide_ids[0] == tokenizer.bos_token_id and guide_ids.count(tokenizer.bos_token_id) == 1
    result = WikiText2Workload(WikiTextParams(context=128, stride=64, max_eval_tokens=600)).run(
        tiny_hf, tokenizer, lambda d, t: None)
    ids = [tokenizer.bos_token_id] + list(wikitext2_token_ids(tokenizer)[:600])
    expected, count = _direct_ppl(tiny_hf.model, ids, 128, 64)
    assert result.metrics["n_tokens"] == count == 600  # every text token is scored, the first after BOS
    assert result.metrics["ppl"] == pytest.approx(expected, rel=1e-4)
    assert result.metrics["protocol"].endswith("600 tokens, BOS first")


def test_single_window_equals_one_forward(tiny_hf):
    ids = list(range(100, 164))
    (scores,) = tiny_hf.loglikelihood([sliding_windows(ids, 64, 64)[0]])
    with torch.no_grad():
        loss = tiny_hf.model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert -np.mean(scores) == pytest.approx(loss, rel=1e-5)


def test_wikitext2_token_ids_are_kept_on_disk_per_tokenizer(tiny_model, data_dir, tmp_path, monkeypatch):
    """The first worker tokenizes the text and keeps the ids; the next reads them without calling
    the tokenizer; a tokenizer with another definition gets its own file."""
    from workloads import data

    monkeypatch.setenv("QUANTARENA_CACHE", str(tmp_path))
    tokenizer = load_tokenizer(tiny_model)
    data.wikitext2_token_ids.cache_clear()
    first = data.wikitext2_token_ids(tokenizer)
    assert first == tuple(tokenizer(data.wikitext2_test_text(), add_special_tokens=False)["input_ids"])
    path = data.token_cache_path(tokenizer, data.wikitext2_test_text())
    assert path.is_file() and path.parent == tmp_path / "tokens"

    class Counting:
        """The tokenizer, counting the calls that tokenize."""

        calls = 0
        backend_tokenizer = tokenizer.backend_tokenizer

        def __call__(self, *args, **kwargs):
            Counting.calls += 1
            return tokenizer(*args, **kwargs)

    data.wikitext2_token_ids.cache_clear()
    assert data.wikitext2_token_ids(Counting()) == first and Counting.calls == 0
    other = load_tokenizer(tiny_model)
    other.add_tokens(["<an-added-token>"])
    assert data.token_cache_path(other, data.wikitext2_test_text()) != path
    data.wikitext2_token_ids.cache_clear()
