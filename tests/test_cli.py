"""CLI error paths: one line on stderr, exit code 2, no traceback; and list / report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["run", "--backends", "nope"], "unknown backend 'nope'; choose from hf, bnb"),
    (["run", "--backends", "bnb:int3"], "unknown variant bnb:int3; choose from bnb:int8"),
    (["run", "--model", "no-such-model"], "unknown model 'no-such-model'; choose from smollm2-135m"),
    (["run", "--workloads", "latency,mmlu"], "unknown workload 'mmlu'; choose from latency"),
    (["run", "--input-lens", "12,x"], "--input-lens/--context-lengths: expected comma-separated integers"),
    (["run", "--output-len", "0"], "--output-len: expected positive integers"),
    (["run", "--backend-option", "threads"], "expected key=value"),
    (["run", "--ppl-context", "64", "--ppl-stride", "128", "--backends", "hf:fp32",
      "--workloads", "wikitext2"], "--ppl-stride 128 must be <= --ppl-context 64"),
    (["run", "--model", "tiny-llama", "--workloads", "wikitext2"], "refused on random weights"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_exit_2(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_missing_data_dir_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", "/nonexistent/data")
    assert main(["run", "--model", "tiny-llama", "--backends", "hf:fp32"]) == 2
    assert "HARNESS_DATA_DIR=/nonexistent/data is not a directory" in capsys.readouterr().err


def test_missing_data_file_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path))
    assert main(["run", "--model", "tiny-llama", "--backends", "hf:fp32"]) == 2
    assert "missing data:" in capsys.readouterr().err


def test_subprocess_error_has_no_traceback():
    proc = run_cli("run", "--backends", "hf:int3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown variant hf:int3; choose from hf:fp32, hf:bf16, hf:fp16"


def test_list_shows_availability_and_reasons():
    proc = run_cli("list")
    assert proc.returncode == 0
    assert "hf:fp32" in proc.stdout and "bnb:nf4" in proc.stdout
    assert "smollm2-135m (default)" in proc.stdout
    assert "wikitext2" in proc.stdout


def test_report_rejects_bad_results_file(tmp_path, capsys):
    bad = tmp_path / "results.jsonl"
    bad.write_text("not json\n")
    assert main(["report", str(bad)]) == 2
    assert "not a JSON line" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    bad.write_text(json.dumps({"hello": 1}) + "\n")
    assert main(["report", str(bad)]) == 2
    assert "not a quantarena record" in capsys.readouterr().err


def test_unreachable_hub_model_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "--model", "llama3-8b", "--backends", "hf:fp32"]) == 2
    err = capsys.readouterr().err
    assert "cannot fetch meta-llama/Meta-Llama-3-8B-Instruct" in err and "--random-weights" in err
    assert len(err.strip().splitlines()) == 1


def test_random_weights_specs_use_shipped_configs():
    from transformers import AutoConfig

    from backends.models import resolve_model

    spec = resolve_model("llama3-8b", random_weights=True)
    assert spec.random_weights and spec.hub_id == "meta-llama/Meta-Llama-3-8B-Instruct"
    config = AutoConfig.from_pretrained(spec.location)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.vocab_size) == (
        4096, 32, 8, 128256)


def test_expanded_unavailable_variants_are_left_out_named_ones_recorded():
    from backends.base import backend_class, variant_availability
    from harness.plan import Cell, build_jobs, parse_backends

    missing = [v for v in backend_class("hf").default_variants if not variant_availability("hf", v).ok]
    if not missing:
        pytest.skip("every hf variant is available on this machine")
    cells = [Cell("c", "latency", {})]
    jobs, left_out = build_jobs(parse_backends("hf"), cells, {})
    assert "hf:fp32" in [j.label for j in jobs] and f"hf:{missing[0]}" not in [j.label for j in jobs]
    assert any(item.startswith(f"hf:{missing[0]} (") for item in left_out)
    jobs, _ = build_jobs(parse_backends(f"hf:{missing[0]},hf"), cells, {})
    assert jobs[0].label == f"hf:{missing[0]}" and jobs[0].skip_reason


@pytest.mark.parametrize("backends,option,needle", [
    ("hf:fp32", "hf.attn=flash", "hf: option attn='flash': Input should be 'sdpa' or 'eager'"),
    ("hf:fp32", "hf.atn=sdpa", "hf: unknown option 'atn'; valid: device, threads, seed, attn"),
    ("bnb:nf4", "bnb.compute_dtype=int3", "bnb: option compute_dtype='int3': Input should be 'float32'"),
    ("bnb:nf4", "bnb.threads=0", "bnb: option threads='0': Input should be greater than or equal to 1"),
    ("kvq:int4", "kvq.residual_length=x", "kvq: option residual_length='x': Input should be a valid integer"),
    ("kvq:int4", "kvq.axis_key=2", "kvq: option axis_key='2': Input should be less than or equal to 1"),
    ("kvq:int4", "kvq.score_chunk=200", "kvq: score_chunk (200) must not exceed residual_length (128)"),
    ("onnx:int4", "onnx.int4_block_size=48", "onnx: option int4_block_size='48': must be a power of two"),
    ("onnx:int8", "onnx.int8_per_channel=maybe", "onnx: option int8_per_channel='maybe': Input should be a valid boolean"),
    ("onnx:fp32", "onnx.device=tpu", "onnx: option device='tpu': Input should be 'auto', 'cpu' or 'cuda'"),
    ("mlc:q4f16_1", "mlc.prefill_chunk=0", "mlc: option prefill_chunk='0': Input should be greater than or equal to 1"),
    ("mlc:q4f16_1", "mlc.sliding_window=wide", "mlc: option sliding_window='wide': Input should be a valid integer"),
    ("mlc:q0f32", "mlc.attention_sink=4", "mlc: attention_sink needs sliding_window > 0"),
    ("hf:fp32", "mlc.sliding_window=8", "option 'mlc.sliding_window' is for backend 'mlc', which is not in this run"),
    ("hf:fp32,bnb:nf4", "window=8", "unknown option 'window' for backends hf, bnb; valid: attention_sink, attn, compute_dtype"),
])
def test_bad_backend_option_is_one_line_exit_2(backends, option, needle, capsys):
    """Each backend's unknown, ill-typed and out-of-range options, typed as a new user would."""
    assert main(["run", "--model", "tiny-llama", "--backends", backends, "--backend-option", option]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unprefixed_option_goes_to_every_backend_that_has_it():
    from harness.plan import Cell, build_jobs, parse_backends

    jobs, _ = build_jobs(parse_backends("hf:fp32,onnx:fp32,kvq:int4"), [Cell("c", "latency", {})],
                         [("threads", "1"), ("attn", "eager"), ("kvq.residual_length", "64")])
    options = {job.label: job.options for job in jobs}
    assert all(o["threads"] == 1 for o in options.values())  # parsed to an int
    assert options["hf:fp32"]["attn"] == options["kvq:int4"]["attn"] == "eager"
    assert "attn" not in options["onnx:fp32"]  # onnx has no attn option
    assert options["kvq:int4"]["residual_length"] == 64 and "residual_length" not in options["hf:fp32"]


def test_list_options_prints_a_backends_typed_options():
    proc = run_cli("list", "--options", "mlc")
    assert proc.returncode == 0
    for needle in ("sliding_window", "attention_sink", "threads", "2048"):
        assert needle in proc.stdout
