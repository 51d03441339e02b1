"""The long-context perplexity workload (wikitext2-long): which tokens it scores, refusal of
lengths beyond the model's context, the workload on the tiny model against a direct computation
(with and without a sliding window), and a SmolLM2 run through the harness."""

from __future__ import annotations

import math

import pytest
import torch

from backends.base import backend_class
from backends.models import load_tokenizer
from harness.cli import main
from reports.records import read_records
from workloads.base import WorkloadError
from workloads.data import wikitext2_token_ids
from workloads.wikitext2_long import (REFUSED, WikiText2LongWorkload, WikiTextLongParams, check_context,
                                      long_segments)


@pytest.mark.parametrize("bos", [None, 1])
def test_scored_tokens_are_exactly_the_last_tail_of_each_segment_and_the_same_text_at_every_length(bos):
    ids = list(range(1000, 2000))
    text = 100 - (bos is not None)
    windows = long_segments(ids, 100, 30, 3, bos, anchor=150)
    for k, window in enumerate(windows):
        body = tuple(range(1000 + (k + 1) * 150 - text, 1000 + (k + 1) * 150))
        assert window.token_ids == ((bos,) if bos is not None else ()) + body
        assert len(window.token_ids) == 100 and window.n_scored == 30
        assert window.token_ids[window.first_scored:] == body[-30:]
    shorter = long_segments(ids, 60, 30, 3, bos, anchor=150)
    assert [w.token_ids[w.first_scored:] for w in shorter] == [w.token_ids[w.first_scored:] for w in windows]


def test_bad_tail_and_short_split_and_too_long_length_are_refused():
    with pytest.raises(WorkloadError, match="tail < length"):
        long_segments(list(range(500)), 100, 100, 1, None, 100)
    with pytest.raises(WorkloadError, match="exceeds --ppl-long-anchor"):
        long_segments(list(range(500)), 100, 10, 1, None, 99)
    with pytest.raises(WorkloadError, match="needs 300 tokens"):
        long_segments(list(range(250)), 100, 10, 3, None, 100)
    with pytest.raises(WorkloadError, match=REFUSED):
        check_context(4096, 2048)
    check_context(2048, 2048)


@pytest.fixture(scope="module")
def tiny_hf_backends(tiny_model):
    plain = backend_class("hf")("fp32", {"threads": 1})
    windowed = backend_class("hf")("fp32", {"threads": 1, "sliding_window": 32, "attention_sink": 4})
    for backend in (plain, windowed):
        backend.load(tiny_model)
    yield plain, windowed
    for backend in (plain, windowed):
        backend.close()


def test_tail_ppl_matches_direct_computation_and_window_changes_it(tiny_hf_backends, tiny_model, data_dir,
                                                                    monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    plain, windowed = tiny_hf_backends
    tokenizer = load_tokenizer(tiny_model)
    params = WikiTextLongParams(length=160, tail=40, segments=2, bos="no", anchor=200)
    result = WikiText2LongWorkload(params).run(plain, tokenizer, lambda d, t: None)
    ids = wikitext2_token_ids(tokenizer)
    nll = []
    for k in range(2):  # independent: labels of the context masked with -100, one forward each
        input_ids = torch.tensor([list(ids[(k + 1) * 200 - 160:(k + 1) * 200])])
        labels = input_ids.clone()
        labels[:, :120] = -100
        with torch.no_grad():
            nll.append(plain.model(input_ids, labels=labels).loss.item())
    assert result.metrics["n_tokens"] == 80 and result.metrics["segments"] == 2
    assert result.metrics["ppl"] == pytest.approx(math.exp(sum(nll) / 2), rel=1e-4)
    assert result.metrics["model_context_tokens"] == 2048
    assert "no BOS" in result.metrics["protocol"]
    with_window = WikiText2LongWorkload(params).run(windowed, tokenizer, lambda d, t: None)
    assert with_window.metrics["n_tokens"] == 80
    assert abs(with_window.metrics["mean_nll"] - result.metrics["mean_nll"]) > 1e-4
    with pytest.raises(WorkloadError, match=REFUSED):
        WikiText2LongWorkload(WikiTextLongParams(length=4096, tail=16)).run(plain, tokenizer, lambda d, t: None)


def test_harness_run_on_smollm2_records_tail_ppl_draws_it_and_refuses_beyond_context(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    code = main(["run", "--model", "smollm2-135m", "--backends", "hf:fp32", "--backend-option", "threads=2",
                 "--workloads", "wikitext2-long", "--ppl-long-lengths", "64,128,9000", "--ppl-long-tail", "32",
                 "--ppl-long-anchor", "9000",
                 "--out", str(tmp_path)])
    assert code == 1  # one cell failed (refused), its record and the others still written
    records = {r["cell_id"]: r for r in read_records(tmp_path / "results.jsonl")}
    ok = records["wikitext2-long-L128-t32-s1-a9000"]
    assert ok["status"] == "ok" and ok["metrics"]["n_tokens"] == 32
    assert 1 < ok["metrics"]["ppl"] < 1000 and ok["metrics"]["model_context_tokens"] == 8192
    refused = records["wikitext2-long-L9000-t32-s1-a9000"]
    assert refused["status"] != "ok" and REFUSED in refused["error"]
    report = (tmp_path / "report.md").read_text()
    assert "## Long-context perplexity" in report and "| hf:fp32 |" in report and "L=128" in report
    assert "wikitext2_long_ppl_vs_length.png" in report and (tmp_path / "wikitext2_long_ppl_vs_length.png").is_file()
    points = (tmp_path / "wikitext2_long_ppl_vs_length.csv").read_text().splitlines()
    assert len(points) == 3 and points[2].startswith("hf:fp32,hf:fp32,128,32,")
    assert float(points[2].split(",")[4]) == pytest.approx(ok["metrics"]["ppl"])
