"""reports.records: schema-1 upgrade, and JSONL / CSV / SQLite giving equal schema-2 records."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from reports.records import (FIELDS, SCHEMA_VERSION, ResultsError, ResultsWriter, flatten,
                             is_text_column, normalize, read_records, unflatten, upgrade_v1,
                             write_tables)

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "example-report" / "results.jsonl"

ENV = {"cpu": "AMD EPYC", "cores_physical": 2, "cores_logical": 4, "ram_bytes": 25276510208,
       "gpus": [{"name": "NVIDIA H100", "driver": "550.54", "memory": "81559 MiB"}],
       "cuda_driver": "550.54", "os": "Linux-6.18-x86_64", "python": "3.11",
       "packages": {"torch": "2.14", "transformers": "4.57.6", "numpy": "2"},
       "git_commit": "123456789012", "threads_env": {"OMP_NUM_THREADS": "2"}}
MODEL = {"name": "smollm2-135m", "source": "hub", "location": "/models/smollm2", "hub_id": "1234",
         "notes": ["fp16 weights", 'a "quoted", comma\nnewline note']}


def _record(**changes) -> dict:
    base = {"schema": 2, "run_id": "20261121", "cell_id": "squad-n4", "label": "hf:int8",
            "backend": "hf", "variant": "int8",
            "options": {"threads": 4, "compile": True, "dtype": "bfloat16", "group": "128"},
            "workload": "squad", "params": {"n": 4, "shots": 1, "seed": 0, "batch_size": 2},
            "model": MODEL, "status": "ok", "error": None, "metrics": {}, "samples": {},
            "load": None, "info": {}, "env": ENV, "started_at": "2026-11-21T12:33:33+00:00",
            "duration_s": 12.5}
    return {**base, **changes}


SQUAD = _record(
    metrics={"exact_pct": 50.0, "f1_pct": 62.5, "exact_pct_ci95": [0.0, 100.0],
             "f1_pct_ci95": [12.5, 100.0], "total": 4, "HasAns_exact_pct": 0.0,
             "HasAns_f1_pct": 25.0, "HasAns_f1_pct_ci95": [0.0, 50.0], "HasAns_total": 2,
             "NoAns_accuracy_pct": 100.0, "NoAns_accuracy_pct_ci95": [100.0, 100.0],
             "NoAns_total": 2, "prompt_version": "v3", "shots": 1, "seed": 0,
             "prompt_example": "[INST] Context: ...\nQuestion: who?\nAnswer:", "chat_template": True},
    samples={"predictions": [
        {"id": "56de", "has_answer": True, "prompt_sha256": "0123456789abcdef",
         "output": "Answer: Normandy, in “France”\nmore", "answer": "Normandy", "normalized": "normandy",
         "em": 1, "f1": 1.0},
        {"id": "5ad3", "has_answer": False, "prompt_sha256": "1234567890123456",
         "output": "unanswerable", "answer": "unanswerable", "normalized": "", "em": 1, "f1": 1.0}]},
    load={"load_s": 2.5, "weight_bytes": 220177280, "load_call_s": 2.0, "first_forward_s": 0.5,
          "prepare": {"checkpoint_s": 19.2, "export_s": None, "cache_hit": False,
                      "artifact_dir": "/cache/hf-int8", "artifact_bytes": 1000},
          "details": {"provider": "CUDAExecutionProvider", "threads": 2}},
    info={"backend": "hf:int8", "library": {"torch": "2.14", "bitsandbytes": "0.50"},
          "device": "cuda:0", "threads": 2, "kv_cache": {"type": "DynamicCache", "dtype": "float16"},
          "devices": ["cuda:0", "cpu"], "flag_text": "true", "count_text": "007", "empty": "",
          "json_looking": "[not, json", "dotted": {"a.b": 1}, "nothing": {}})
LATENCY = _record(
    cell_id="latency-in128-out64-b1", workload="latency", params={"n_in": 128, "n_out": 64, "batch": 1},
    metrics={"ttft_ms": {"median": 20.5, "p90": float("nan"), "p99": 1e-05, "mean": 3.0, "std": 0.0,
                         "min": 1.0, "max": float("inf"), "n": 3},
             "peak_rss_bytes": 1050439680, "rss_bytes": 1051357184,
             "peak_cuda_allocated_bytes": 4 * 2**30, "kv_cache_bytes": 8801280, "kv_cache_tokens": 191},
    samples={"runs": [{"ttft_ms": 20.5, "n_out": 64.0}, {"ttft_ms": float("nan"), "n_out": 64.0}]},
    load={"load_s": 1.5, "weight_bytes": 538060160, "prepare": {}, "details": {}})
FAILED = _record(cell_id="wikitext2", workload="wikitext2", label="onnx:int4", backend="onnx",
                 variant="int4", options={}, status="failed",
                 error="[Errno 12] Cannot allocate memory: tried 2.00 GiB, 1,024 blocks",
                 load=None, duration_s=None, info={"backend": "onnx:int4"})
HANDMADE = [SQUAD, LATENCY, FAILED]


@pytest.fixture(scope="module")
def example_records() -> list[dict]:
    return read_records(EXAMPLE)


def test_schema1_example_is_upgraded_to_schema2(example_records):
    raw = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    assert len(example_records) == len(raw) == 48 and {r["schema"] for r in raw} == {1}
    assert all(r["schema"] == SCHEMA_VERSION == 2 and tuple(r) == FIELDS for r in example_records)
    latency = example_records[0]
    assert latency["metrics"]["peak_rss_bytes"] == raw[0]["metrics"]["memory"]["peak_rss"]
    assert latency["metrics"]["rss_bytes"] == raw[0]["metrics"]["memory"]["rss"]
    assert "memory" not in latency["metrics"]
    assert latency["load"]["prepare"] == {"checkpoint_s": raw[0]["load"]["checkpoint_prepare_s"]}
    onnx = next(r for r in example_records if r["label"] == "onnx:int8")
    assert onnx["load"]["prepare"]["export_s"] > 0 and onnx["load"]["prepare"]["cache_hit"] is True
    assert onnx["load"]["details"]["provider"] == "CPUExecutionProvider"
    assert "export_s" not in onnx["load"]["details"]
    mlc = next(r for r in example_records if r["label"] == "mlc:q4f16_1")
    assert mlc["load"]["prepare"]["cache_hit"] is False  # v1 artifact_cache_hit
    assert mlc["load"]["details"]["library_bytes"] > 0
    details = mlc["load"]["details"]
    assert mlc["load"]["prepare"]["artifact_bytes"] == details["library_bytes"] + details["weights_bytes_on_disk"]


def test_upgrade_v1_renames_squad_metrics_and_leaves_its_input_alone():
    v1 = {"schema": 1, "label": "hf:fp32", "metrics": {"exact": 50.0, "f1": 60.0, "exact_ci95": [1, 2],
          "HasAns_f1_ci95": [3, 4], "NoAns_accuracy": 100.0, "total": 4,
          "memory": {"peak_rss": 10, "cuda_max_allocated": 20}}, "load": None}
    before = json.dumps(v1)
    v2 = upgrade_v1(v1)
    assert json.dumps(v1) == before
    assert v2["metrics"] == {"exact_pct": 50.0, "f1_pct": 60.0, "exact_pct_ci95": [1, 2],
                             "HasAns_f1_pct_ci95": [3, 4], "NoAns_accuracy_pct": 100.0, "total": 4,
                             "peak_rss_bytes": 10, "cuda_max_allocated_bytes": 20}
    with pytest.raises(ResultsError):
        upgrade_v1(v2)


def test_flatten_joins_keys_and_unflatten_inverts_it():
    row = flatten(SQUAD)
    assert list(row)[:7] == ["schema", "run_id", "cell_id", "cell_key", "label", "backend", "variant"]
    assert row["options.threads"] == 4 and row["params.n"] == 4
    assert row["env.packages.torch"] == "2.14" and row["load.prepare.checkpoint_s"] == 19.2
    assert json.loads(row["model.notes"]) == MODEL["notes"]
    assert json.loads(row["info.dotted"]) == {"a.b": 1} and row["info.nothing"] == "{}"
    assert row["info.json_looking"] == '"[not, json"'
    assert flatten(LATENCY)["metrics.ttft_ms.p90"] is None
    back = unflatten(row)
    assert back["load"]["prepare"] == {"checkpoint_s": 19.2, "cache_hit": False,
                                       "artifact_dir": "/cache/hf-int8", "artifact_bytes": 1000}
    assert back == normalize(SQUAD) == normalize(normalize(SQUAD))
    assert "max" not in normalize(LATENCY)["metrics"]["ttft_ms"]  # inf -> None -> dropped


@pytest.mark.parametrize("which", ["example", "handmade"])
def test_jsonl_csv_and_sqlite_give_equal_records(which, example_records, tmp_path):
    records = example_records if which == "example" else HANDMADE
    writer = ResultsWriter(tmp_path / "run" / "results.jsonl")
    for record in records:
        writer.append(record)
    csv_path, db_path = write_tables(records, tmp_path / "tables")
    from_jsonl = read_records(writer.path)
    assert from_jsonl == [normalize(r) for r in records]
    assert read_records(csv_path) == from_jsonl
    assert read_records(db_path) == from_jsonl
    if which == "handmade":
        squad = from_jsonl[0]
        assert squad["info"]["flag_text"] == "true" and squad["info"]["count_text"] == "007"
        assert squad["info"]["empty"] == "" and squad["info"]["json_looking"] == "[not, json"
        assert squad["samples"]["predictions"][1]["has_answer"] is False
        assert from_jsonl[2]["load"] is None and from_jsonl[2]["error"].startswith("[Errno 12]")


def test_tables_put_field_columns_first_and_rewrite_atomically(example_records, tmp_path):
    csv_path, db_path = write_tables(example_records, tmp_path)
    columns = list(pd.read_csv(csv_path, nrows=0).columns)
    tops = [c.split(".", 1)[0] for c in columns]
    assert tops == sorted(tops, key=FIELDS.index)
    assert "metrics.ppl" in columns and "metrics.ttft_ms.median" in columns
    write_tables(example_records[:2], tmp_path)
    assert len(read_records(db_path)) == len(read_records(csv_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.sqlite"]


def test_sqlite_stores_integers_as_integer_and_floats_as_real(tmp_path):
    _, db_path = write_tables(HANDMADE, tmp_path)
    with sqlite3.connect(db_path) as db:
        rows = db.execute('SELECT typeof("schema"), typeof("params.n"), typeof("metrics.f1_pct"), '
                          'typeof("load.weight_bytes"), typeof("duration_s"), typeof("env.packages.torch"), '
                          'typeof("env.git_commit"), typeof("options.compile") FROM results').fetchall()
        declared = {row[2] for row in db.execute("PRAGMA table_info(results)")}
    assert rows[0] == ("integer", "integer", "real", "integer", "real", "text", "text", "text")
    assert rows[2][4] == "null"  # failed record: duration_s None
    assert declared == {""}


def test_csv_keeps_numeric_looking_package_version_and_git_commit_as_strings(tmp_path):
    csv_path, _ = write_tables(HANDMADE, tmp_path)
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    assert raw.loc[0, "env.packages.torch"] == "2.14" and raw.loc[0, "env.git_commit"] == "123456789012"
    assert raw.loc[0, "options.compile"] == "true" and raw.loc[2, "duration_s"] == ""
    record = read_records(csv_path)[0]
    assert record["env"]["packages"] == {"torch": "2.14", "transformers": "4.57.6", "numpy": "2"}
    assert record["env"]["git_commit"] == "123456789012" and record["model"]["hub_id"] == "1234"
    assert record["info"]["library"]["torch"] == "2.14" and record["options"]["group"] == "128"
    assert record["options"]["compile"] is True and record["metrics"]["HasAns_total"] == 2
    assert is_text_column("env.packages.numpy") and is_text_column("model.name")
    assert not is_text_column("metrics.ppl") and not is_text_column("env.cores_logical")


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("name, text, message", [
    ("missing.jsonl", None, "results file not found: {path}"),
    ("bad.jsonl", '{"schema": 2, "label": "a:b"}\n\nnot json\n', "{path}:3: not a JSON line"),
    ("other.jsonl", '{"name": "x"}\n', "{path}:1: not a quantarena record (no schema/label)"),
    ("list.jsonl", '[1, 2]\n', "{path}:1: not a quantarena record (no schema/label)"),
    ("future.jsonl", '{"schema": 99, "label": "a:b"}\n', "{path}:1: unknown schema 99 (expected 1 or 2)"),
    ("empty.jsonl", "\n\n", "{path}: no records"),
    ("latin1.jsonl", b"\xff\xfe{}",
     "{path}: not readable ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
    ("header.csv", "schema,label\n", "{path}: no records"),
    ("results.txt", "{}", "{path}: unknown results suffix '.txt' (expected .jsonl, .csv, .sqlite or .db)"),
    ("plain.csv", "a,b\n1,2\n", "{path}: not a quantarena table (no schema/label columns)"),
    ("blank.csv", "", "{path}: not readable (No columns to parse from file)"),
    ("text.db", "not sqlite at all, just text that is long enough to be a header......",
     "{path}: not readable (file is not a database)"),
])
def test_read_errors_are_one_line_results_errors(name, text, message, tmp_path):
    path = tmp_path / name if text is None else _write(tmp_path / name, text)
    with pytest.raises(ResultsError) as info:
        read_records(path)
    assert str(info.value) == message.format(path=path)
    assert "\n" not in str(info.value)


def test_sqlite_without_results_table_is_a_results_error(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(ResultsError, match=r"not readable \(no such table: results\)"):
        read_records(path)


def test_results_writer_appends_parsable_lines_with_nan_as_null(tmp_path):
    writer = ResultsWriter(tmp_path / "a" / "b" / "results.jsonl")
    writer.append(_record(duration_s=float("nan"), metrics={"ppl": float("inf"), "ppl_ci95": (1.0, math.nan)}))
    writer.append(FAILED)
    lines = writer.path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["duration_s"] is None and first["metrics"] == {"ppl": None, "ppl_ci95": [1.0, None]}
    assert json.loads(lines[1])["error"] == FAILED["error"]
    assert [r["label"] for r in read_records(writer.path)] == ["hf:int8", "onnx:int4"]
