"""The runner on the tiny model: records, isolation of a failing backend, timeouts, report."""

import json

import pytest

from harness.cli import main
from harness.results import read_records


@pytest.fixture
def data_env(data_dir, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))


def test_run_writes_records_report_and_isolates_failure(tmp_path, data_env):
    # attn=bogus makes every transformers load fail; a second job uses a valid backend.
    code = main(["run", "--model", "tiny-llama", "--backends", "hf:fp32,bnb:nf4", "--input-lens", "16",
                 "--output-len", "4", "--warmup", "0", "--repetitions", "2", "--out", str(tmp_path)])
    assert code == 0
    records = read_records(tmp_path / "results.jsonl")
    assert [r["label"] for r in records] == ["hf:fp32", "bnb:nf4"]
    for r in records:
        assert r["status"] == "ok" and r["workload"] == "latency"
        assert r["metrics"]["ttft_ms"]["n"] == 2
        assert r["metrics"]["decode_tok_s"]["median"] > 0
        assert len(r["samples"]["runs"]) == 2
        assert r["env"]["cores_logical"] >= 1 and "torch" in r["env"]["packages"]
        assert r["load"]["weight_bytes"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| hf:fp32 |" in report and "| bnb:nf4 |" in report
    # re-rendering from records alone gives the same report
    (tmp_path / "report.md").unlink()
    assert main(["report", str(tmp_path / "results.jsonl")]) == 0
    assert (tmp_path / "report.md").read_text() == report


def test_failing_load_is_recorded_and_others_still_run(tmp_path, data_env):
    code = main(["run", "--model", "tiny-llama", "--backends", "hf:fp32,hf:fp16,bnb:int8",
                 "--input-lens", "8", "--output-len", "2", "--warmup", "0", "--repetitions", "1",
                 "--backend-option", "attn=bogus-attention", "--out", str(tmp_path)])
    assert code == 1
    records = read_records(tmp_path / "results.jsonl")
    assert len(records) == 3 and all(r["status"] == "failed" for r in records)
    assert "load failed" in records[0]["error"] and "bogus-attention" in records[0]["error"]
    assert "Failures" in (tmp_path / "report.md").read_text()


def test_timeout_kills_only_that_cell(tmp_path, data_env):
    code = main(["run", "--model", "tiny-llama", "--backends", "hf:fp32", "--input-lens", "8,9",
                 "--output-len", "200", "--warmup", "0", "--repetitions", "500", "--timeout", "4",
                 "--out", str(tmp_path)])
    assert code == 1
    records = read_records(tmp_path / "results.jsonl")
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all("timed out after 4 s" in r["error"] for r in records)


def test_records_are_json_lines_without_nan(tmp_path, data_env):
    main(["run", "--model", "tiny-llama", "--backends", "hf:fp32", "--input-lens", "8",
          "--output-len", "1", "--warmup", "0", "--repetitions", "1", "--out", str(tmp_path)])
    line = (tmp_path / "results.jsonl").read_text().splitlines()[0]
    record = json.loads(line)
    assert record["metrics"]["tpot_ms"]["median"] is None  # one token: no decode phase, NaN -> null
    assert "NaN" not in line


def test_random_weights_run_of_a_registered_architecture(tmp_path, data_env):
    code = main(["run", "--model", "smollm2-135m", "--random-weights", "--backends", "hf:fp32",
                 "--input-lens", "8", "--output-len", "2", "--warmup", "0", "--repetitions", "1",
                 "--out", str(tmp_path)])
    assert code == 0
    (record,) = read_records(tmp_path / "results.jsonl")  # wikitext2 dropped: quality needs real weights
    assert record["workload"] == "latency" and record["model"]["source"] == "random"
    assert record["load"]["weight_bytes"] > 100e6  # the full 135M-parameter architecture
