"""The runner on the tiny model: records, isolation of a failing backend, timeouts, report."""

import json

import pytest

from harness.cli import main
from reports.records import read_records


@pytest.fixture
def data_env(data_dir, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))


def test_run_writes_the_same_records_as_jsonl_csv_and_sqlite_and_the_same_report_from_each(tmp_path, data_env):
    code = main(["run", "--model", "tiny-llama", "--backends", "hf:fp32,bnb:nf4", "--input-lens", "16",
                 "--output-len", "4", "--warmup", "0", "--repetitions", "2", "--out", str(tmp_path)])
    assert code == 0
    records = read_records(tmp_path / "results.jsonl")
    assert [r["label"] for r in records] == ["hf:fp32", "bnb:nf4"]
    for r in records:
        assert r["status"] == "ok" and r["workload"] == "latency" and r["schema"] == 2
        assert r["metrics"]["ttft_ms"]["n"] == 2
        assert r["metrics"]["decode_tok_s"]["median"] > 0 and r["metrics"]["peak_rss_bytes"] > 0
        assert len(r["samples"]["runs"]) == 2
        assert r["env"]["cores_logical"] >= 1 and "torch" in r["env"]["packages"]
        assert r["load"]["weight_bytes"] > 0
        assert r["load"]["load_s"] == pytest.approx(r["load"]["load_call_s"] + r["load"]["first_forward_s"])
        assert r["options"].get("threads") is None and r["options"]["attn"] == "sdpa"  # as parsed, defaults in
    assert read_records(tmp_path / "results.csv") == records
    assert read_records(tmp_path / "results.sqlite") == records
    report = (tmp_path / "report.md").read_text()
    assert "| hf:fp32 |" in report and "| bnb:nf4 |" in report
    # re-rendering from records alone gives the same report, from any of the three files
    for name in ("results.jsonl", "results.csv", "results.sqlite"):
        (tmp_path / "report.md").unlink()
        assert main(["report", str(tmp_path / name)]) == 0
        assert (tmp_path / "report.md").read_text() == report, name


def test_failing_load_is_recorded_and_others_still_run(tmp_path, data_env):
    # kvq's group size is checked against the model's head_dim (16) only when it loads
    code = main(["run", "--model", "tiny-llama", "--backends", "hf:fp32,kvq:int4,bnb:int8",
                 "--input-lens", "8", "--output-len", "2", "--warmup", "0", "--repetitions", "1",
                 "--backend-option", "kvq.q_group_size=5", "--out", str(tmp_path)])
    assert code == 1
    records = {r["label"]: r for r in read_records(tmp_path / "results.jsonl")}
    assert list(records) == ["hf:fp32", "kvq:int4", "bnb:int8"]
    assert records["kvq:int4"]["status"] == "failed"
    assert "load failed" in records["kvq:int4"]["error"] and "must divide head_dim 16" in records["kvq:int4"]["error"]
    assert records["hf:fp32"]["status"] == "ok" and records["bnb:int8"]["status"] == "ok"
    assert records["kvq:int4"]["options"]["q_group_size"] == 5 and records["hf:fp32"]["options"].get("q_group_size") is None
    assert "Failures" in (tmp_path / "report.md").read_text()


def test_every_cell_past_the_timeout_is_recorded_as_timed_out(tmp_path, data_env):
    # each of the two cells alone outlasts the timeout (tests/test_faults.py: a hang among ok cells)
    code = main(["run", "--model", "tiny-llama", "--backends", "hf:fp32", "--input-lens", "8,9",
                 "--output-len", "200", "--warmup", "0", "--repetitions", "500", "--timeout", "10",
                 "--out", str(tmp_path)])
    assert code == 1
    records = read_records(tmp_path / "results.jsonl")
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all("timed out after 10 s" in r["error"] for r in records)


def test_records_are_json_lines_without_nan(tmp_path, data_env):
    main(["run", "--model", "tiny-llama", "--backends", "hf:fp32", "--input-lens", "8",
          "--output-len", "1", "--warmup", "0", "--repetitions", "1", "--out", str(tmp_path)])
    line = (tmp_path / "results.jsonl").read_text().splitlines()[0]
    record = json.loads(line)
    assert record["metrics"]["tpot_ms"].get("median") is None  # one token: no decode phase, NaN -> null
    assert "NaN" not in line


def test_random_weights_run_of_a_registered_architecture(tmp_path, data_env):
    code = main(["run", "--model", "smollm2-135m", "--random-weights", "--backends", "hf:fp32",
                 "--input-lens", "8", "--output-len", "2", "--warmup", "0", "--repetitions", "1",
                 "--out", str(tmp_path)])
    assert code == 0
    (record,) = read_records(tmp_path / "results.jsonl")  # wikitext2 dropped: quality needs real weights
    assert record["workload"] == "latency" and record["model"]["source"] == "random"
    assert record["load"]["weight_bytes"] > 100e6  # the full 135M-parameter architecture
