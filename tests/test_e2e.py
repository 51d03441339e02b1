"""End to end: the CLI on the embedded SmolLM2 with the real WikiText-2 data."""

import pytest

from harness.cli import main
from reports.records import read_records

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, data_dir):
    import os

    os.environ["HARNESS_DATA_DIR"] = str(data_dir)
    out = tmp_path_factory.mktemp("e2e")
    code = main(["run", "--model", "smollm2-135m", "--backends", "hf:fp32,bnb:nf4",
                 "--input-lens", "64", "--output-len", "8", "--warmup", "1", "--repetitions", "2",
                 "--ppl-context", "512", "--ppl-stride", "256", "--max-eval-tokens", "1024",
                 "--out", str(out)])
    return code, out, read_records(out / "results.jsonl")


def test_every_cell_succeeds(smollm2_run):
    code, _, records = smollm2_run
    assert code == 0, [r["error"] for r in records]
    assert {(r["label"], r["workload"]) for r in records} == {
        ("hf:fp32", "latency"), ("hf:fp32", "wikitext2"), ("bnb:nf4", "latency"), ("bnb:nf4", "wikitext2")}


def test_perplexity_is_a_real_language_model_and_nf4_costs_quality(smollm2_run):
    _, _, records = smollm2_run
    ppl = {r["label"]: r["metrics"] for r in records if r["workload"] == "wikitext2"}
    # a random model over a 49k vocabulary would score ~49152; SmolLM2 is in the teens
    assert 5 < ppl["hf:fp32"]["ppl"] < 40
    assert ppl["hf:fp32"]["n_tokens"] == 1024  # BOS first (SmolLM2's tokenizer adds one): every token scored
    assert ppl["bnb:nf4"]["ppl"] > ppl["hf:fp32"]["ppl"]
    assert ppl["bnb:nf4"]["ppl"] < 2 * ppl["hf:fp32"]["ppl"]


def test_nf4_is_compared_with_the_fp32_baseline_on_the_same_tokens(smollm2_run):
    _, _, records = smollm2_run
    ppl = {r["label"]: r for r in records if r["workload"] == "wikitext2"}
    base, nf4 = ppl["hf:fp32"]["metrics"]["agreement"], ppl["bnb:nf4"]["metrics"]["agreement"]
    assert base["baseline"] == "hf:fp32" and base["store"].startswith("baseline/")
    assert nf4["baseline"] == "hf:fp32" and nf4["n_tokens"] == 1024
    assert 0 < nf4["kld_mean"] < 1 and nf4["kld_median"] <= nf4["kld_p99"] <= nf4["kld_max"]
    assert 50 < nf4["top1_pct"] < 100 and nf4["rms_dp_pct"] > 0
    # ln(PPL(q)/PPL(base)) is the paired mean of the NLL differences: the two perplexities' log ratio
    assert nf4["ln_ppl_ratio"] == pytest.approx(
        ppl["bnb:nf4"]["metrics"]["mean_nll"] - ppl["hf:fp32"]["metrics"]["mean_nll"], rel=1e-6)
    latency = {r["label"]: r for r in records if r["workload"] == "latency"}
    assert 0 <= latency["bnb:nf4"]["metrics"]["generation_agreement"]["fdt_min"] <= 8


def test_nf4_weights_are_smaller(smollm2_run):
    _, _, records = smollm2_run
    weights = {r["label"]: r["load"]["weight_bytes"] for r in records}
    assert weights["bnb:nf4"] < 0.7 * weights["hf:fp32"]


def test_report_carries_model_note_and_tables(smollm2_run):
    _, out, _ = smollm2_run
    report = (out / "report.md").read_text()
    assert "dequantized from the GGUF Q4_1 file" in report
    assert "## Perplexity (WikiText-2 raw, test)" in report
    assert "sliding window, context 512, stride 256, 1024 tokens" in report
    assert (out / "speed_vs_perplexity.png").is_file() and (out / "speed_vs_perplexity.csv").is_file()
