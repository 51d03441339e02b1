"""``harness compare A B`` on results files: ratios per cell, verdicts against the noise band."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from harness.cli import main
from reports.compare import compare_rows
from reports.records import read_records

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "example-report" / "results.jsonl"
BETTER = {"decode_tok_s": "higher", "ttft_ms": "lower", "ppl": "lower"}


def _changed(records, label, workload, metric, factor):
    """A copy of ``records`` where one metric of one cell is scaled by ``factor``."""
    out = copy.deepcopy(records)
    for record in out:
        if record["label"] == label and record["workload"] == workload:
            value = record["metrics"][metric]
            if isinstance(value, dict):
                value["median"] *= factor
            else:
                record["metrics"][metric] = value * factor
    return out


def test_a_change_beyond_the_noise_is_flagged_with_its_direction_and_noise_is_not():
    base = read_records(EXAMPLE)
    new = _changed(_changed(base, "hf:fp32", "latency", "decode_tok_s", 1.5), "mlc:q0f32", "wikitext2", "ppl", 1.001)
    rows = {(r["label"], r["cell"], r["metric"]): r for r in compare_rows(base, new, BETTER)}
    faster = rows[("hf:fp32", "latency-in512-out64-b1", "decode_tok_s")]
    assert faster["ratio"] == pytest.approx(1.5) and faster["verdict"] == "better"
    slower = compare_rows(base, _changed(base, "hf:fp32", "latency", "ttft_ms", 2.0), BETTER)
    assert {r["verdict"] for r in slower if r["label"] == "hf:fp32" and r["metric"] == "ttft_ms"} == {"worse"}
    # +0.1% perplexity is far inside its standard error (about 5%)
    assert rows[("mlc:q0f32", "wikitext2", "ppl")]["verdict"] == "within noise"
    unchanged = rows[("onnx:int8", "latency-in512-out64-b1", "decode_tok_s")]
    assert unchanged["ratio"] == 1.0 and unchanged["verdict"] == "within noise"


def test_compare_command_reads_any_results_format_and_refuses_three_files(tmp_path, capsys):
    new = tmp_path / "new.jsonl"
    new.write_text("\n".join(json.dumps(r) for r in _changed(read_records(EXAMPLE), "hf:fp32", "latency",
                                                               "decode_tok_s", 2.0)) + "\n")
    assert main(["compare", str(EXAMPLE), str(new), "--out", str(tmp_path / "cmp.md")]) == 0
    text = (tmp_path / "cmp.md").read_text()
    assert "## Changes beyond the noise" in text and "| hf:fp32 | latency-in512-out64-b1 | decode_tok_s |" in text
    assert main(["compare", str(EXAMPLE), str(new), str(new)]) == 2
    assert "compare takes two results files" in capsys.readouterr().err
