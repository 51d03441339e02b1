"""Comparisons with the baseline: paired significance on synthetic data with a known difference,
relative columns and sanity flags on constructed records (each flag fires on its case) and not
on a real baseline's records."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

from reports.baseline import baseline_label, relative_cells, relative_rows
from reports.records import read_records
from reports.sanity import FLAG, degenerate, mark, sanity_flags
from reports.stats import mcnemar_exact, paired_bootstrap_mean, paired_bootstrap_ppl

DATA = Path(__file__).resolve().parent / "data"
BASELINE_RUN = DATA / "baseline-hf-fp32.jsonl"  # hf:fp32 of a real weight-quant recipe run (SmolLM2)
SWEEP = DATA / "sweep-results.jsonl"


def blocks(rng, n_blocks: int, shift: float, block: int = 128):
    """Per-block NLL sums of a baseline and of a system whose every token NLL is ``shift`` nats
    higher plus independent noise; both share the per-block difficulty (the pairing)."""
    difficulty = rng.gamma(3.0, 1.0, size=(n_blocks, block))  # token NLLs around 3 nats
    base = difficulty.sum(axis=1)
    q = (difficulty + shift + rng.normal(0, 0.05, size=difficulty.shape)).sum(axis=1)
    return q, base, np.full(n_blocks, block)


def test_paired_bootstrap_finds_a_known_perplexity_difference():
    q, base, tokens = blocks(np.random.default_rng(1), 64, shift=0.03)
    result = paired_bootstrap_ppl(q, base, tokens)
    assert result.estimate == pytest.approx(math.exp(0.03) - 1, abs=0.004)
    assert result.ci95[0] < math.exp(0.03) - 1 < result.ci95[1]
    assert result.ci95[0] > 0 and result.p_value < 0.01 and result.n == 64


def test_paired_bootstrap_does_not_find_a_difference_that_is_not_there():
    q, base, tokens = blocks(np.random.default_rng(2), 64, shift=0.0)
    result = paired_bootstrap_ppl(q, base, tokens)
    assert result.ci95[0] < 0 < result.ci95[1] and result.p_value > 0.05


def test_pairing_detects_what_an_unpaired_comparison_of_the_two_perplexities_would_miss():
    # a 0.5 % shift is far below the spread of block difficulty, but the pairing cancels that
    q, base, tokens = blocks(np.random.default_rng(3), 64, shift=0.005)
    spread = np.std(base / tokens) / math.sqrt(len(base))
    assert 0.005 < 2 * spread  # unpaired, the two means' error bars would overlap
    assert paired_bootstrap_ppl(q, base, tokens).p_value < 0.01


def test_paired_bootstrap_mean_on_per_question_scores():
    rng = np.random.default_rng(4)
    base = rng.uniform(0, 1, 400)
    better = np.clip(base + 0.1 + rng.normal(0, 0.05, 400), 0, None)
    result = paired_bootstrap_mean(better, base)
    assert result.estimate == pytest.approx(0.1, abs=0.01) and result.p_value < 0.01
    with pytest.raises(ValueError):
        paired_bootstrap_mean([1.0], [1.0, 2.0])


def test_mcnemar_exact_matches_the_binomial_tail():
    q = np.array([True] * 10 + [False] * 2 + [True] * 30 + [False] * 8)
    base = np.array([False] * 10 + [True] * 2 + [True] * 30 + [False] * 8)
    b, c, p = mcnemar_exact(q, base)
    assert (b, c) == (10, 2)
    # P(X <= 2 | n=12, 1/2) = (1 + 12 + 66) / 4096, two-sided
    assert p == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(base, base) == (0, 0, 1.0)


def _record(label, workload, metrics, params=None, samples=None, load=None, status="ok"):
    backend, _, variant = label.partition(":")
    return {"label": label, "backend": backend, "variant": variant, "workload": workload, "status": status,
            "metrics": metrics, "params": params or {}, "samples": samples or {}, "load": load or {},
            "info": {"device": "cpu"}, "options": {}, "error": None}


def _latency(label, decode, ttft, tokens=None, runs=None, weight=400e6, resident=450e6):
    return _record(label, "latency", {"decode_tok_s": {"median": decode}, "prefill_tok_s": {"median": 1000 / ttft * 128},
                                      "ttft_ms": {"median": ttft}},
                   params={"n_in": 128, "n_out": 32, "batch": 1},
                   samples={"token_ids": tokens or [list(range(32))], "runs": runs or []},
                   load={"weight_bytes": weight, "model_resident_bytes": resident})


def _ppl(label, ppl, agreement=None):
    return _record(label, "wikitext2", {"ppl": ppl, "ppl_se": 0.1, "n_tokens": 512, "protocol": "p",
                                        **({"agreement": agreement} if agreement else {})})


def test_relative_rows_give_speedups_savings_and_the_paired_ppl_change():
    q_blocks, base_blocks, _ = blocks(np.random.default_rng(5), 4, shift=0.02)
    base_ppl, q_ppl = _ppl("hf:fp32", 24.0), _ppl("bnb:nf4", 25.0, {"baseline": "hf:fp32", "kld_mean": 0.05})
    base_ppl["samples"] = {"nll_block_sums": base_blocks.tolist(), "nll_block_tokens": 128}
    q_ppl["samples"] = {"nll_block_sums": q_blocks.tolist(), "nll_block_tokens": 128}
    records = [_latency("hf:fp32", 20.0, 100.0), base_ppl,
               _latency("bnb:nf4", 30.0, 200.0, weight=100e6, resident=150e6), q_ppl]
    assert baseline_label(records) == "hf:fp32"
    rows = {row.label: row for row in relative_rows(records, "hf:fp32")}
    nf4 = rows["bnb:nf4"]
    assert nf4.decode_x == pytest.approx(1.5) and nf4.ttft_x == pytest.approx(0.5)
    assert nf4.weight_saving_pct == pytest.approx(75.0) and nf4.resident_saving_pct == pytest.approx(100 * (1 - 150 / 450))
    assert nf4.ppl_change.estimate == pytest.approx(math.exp(0.02) - 1, abs=0.01) and nf4.ppl_change.n == 4
    assert nf4.agreement == {"kld_mean": 0.05}
    cells = relative_cells(nf4)
    assert cells[:4] == ["bnb:nf4", "1.50x", "0.50x", "0.50x"]
    assert rows["hf:fp32"].decode_x == 1.0 and relative_cells(rows["hf:fp32"])[6] == "baseline"


def test_no_baseline_in_the_results_means_no_relative_columns():
    records = [_latency("bnb:nf4", 30.0, 200.0)]
    assert baseline_label(records) is None and baseline_label(records, "hf:fp32") is None


@pytest.mark.parametrize("case,reason", [
    (_ppl("q:broken", 16813.0), "perplexity 16,813.0 > 1,000"),
    (_ppl("q:worse", 40.0), "perplexity 40.00 is 1.7x the baseline's 24.00"),
    (_ppl("q:kld", 25.0, {"kld_mean": 1.7}), "mean KLD 1.70 nats > 1.0"),
    (_ppl("q:top1", 25.0, {"top1_pct": 31.0}), "top-1 agreement 31.0% < 50%"),
    (_latency("q:loop", 20.0, 100.0, tokens=[[5] * 20 + list(range(100, 112))]), "generation degenerate: token 5 is 20 of 32"),
    (_latency("q:noisy", 20.0, 100.0, runs=[{"ttft_ms": 100, "decode_tok_s": 20}, {"ttft_ms": 101, "decode_tok_s": 20},
                                            {"ttft_ms": 260, "decode_tok_s": 20}]), "TTFT outlier: a run at 260.0 vs median 101.0"),
])
def test_each_sanity_flag_fires_on_its_case(case, reason):
    flags = sanity_flags([_ppl("hf:fp32", 24.0), case], "hf:fp32")
    assert list(flags) == [case["label"]]
    assert flags[case["label"]][0].startswith(reason)
    marked = mark([case], flags)
    assert marked[0]["label"] == f"{case['label']} {FLAG}" and case["label"] == marked[0]["label"][:-2]


def test_no_sanity_flag_on_a_real_baseline():
    records = read_records(BASELINE_RUN)
    assert {r["label"] for r in records} == {"hf:fp32"} and {r["workload"] for r in records} == {"latency", "wikitext2"}
    assert sanity_flags(records, "hf:fp32") == {}


def test_the_speed_flag_catches_a_real_hiccup():
    # the prompt-lengths recipe's hf:fp32 cell at 16 prompt tokens had one timed run at twice the
    # TTFT of the other two (66, 163, 75 ms): real, and what the flag is for
    records = [r for r in read_records(SWEEP) if r["label"] == "hf:fp32" and r["workload"] == "latency"]
    flags = sanity_flags(records, "hf:fp32")
    assert flags == {"hf:fp32": ["TTFT outlier: a run at 163.5 vs median 75.3 (n_in=16, batch=1)"]}


def test_random_weights_are_not_flagged_for_looping():
    looping = _latency("hf:fp32", 20.0, 100.0, tokens=[[5] * 32])
    assert sanity_flags([looping], "hf:fp32") == {"hf:fp32": ["generation degenerate: token 5 is 32 of 32 tokens"]}
    looping["model"] = {"name": "tiny-llama", "source": "random"}
    assert sanity_flags([looping], "hf:fp32") == {}


def test_millisecond_jitter_on_a_tiny_model_is_not_a_speed_outlier():
    # 3.2 -> 7.5 ms is +130 %, but 4 ms of scheduling jitter; a decode rate of 558 vs 276 tok/s
    # over 15 tokens is 27 vs 54 ms of decode: 27 ms, below the 50 ms floor, too
    jitter = _latency("hf:fp32", 558.0, 3.2, runs=[{"ttft_ms": 3.2, "decode_tok_s": 558.0}, {"ttft_ms": 3.0, "decode_tok_s": 560.0},
                                                   {"ttft_ms": 7.5, "decode_tok_s": 276.0}])
    jitter["params"]["n_out"] = 16
    assert sanity_flags([jitter], "hf:fp32") == {}


def test_a_normal_sentence_is_not_degenerate():
    assert degenerate([464, 3290, 373, 257, 1110, 1755, 11, 290, 262, 3290]) is None
    assert degenerate([1, 1, 1]) is None  # too short to judge


def test_report_baseline_flag_picks_the_row_and_an_unknown_label_exits_2(tmp_path, capsys):
    import shutil

    from harness.cli import main

    results = tmp_path / "results.jsonl"
    shutil.copy(SWEEP, results)
    assert main(["report", str(results), "--baseline", "mlc:q4f16_1"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Relative to the baseline **`mlc:q4f16_1`**" in report
    assert main(["report", str(results), "--baseline", "hf:nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--baseline hf:nope: no ok record with that label" in err and len(err.splitlines()) == 1
