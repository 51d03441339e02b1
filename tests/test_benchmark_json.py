"""``pytest --benchmark-only --benchmark-json`` carries the harness metrics, and harness renders it."""

import json
import os
import subprocess
import sys
from pathlib import Path

from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_json_carries_metrics_and_renders(tmp_path, data_dir):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/benchmarks/test_backends.py", "--benchmark-only",
         "-k", "hf:fp32", "--bench-rounds", "1", f"--benchmark-json={out}", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HARNESS_DATA_DIR": str(data_dir)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    by_name = {b["name"]: b for b in data["benchmarks"]}
    assert set(by_name) == {f"test_{s}[hf:fp32]" for s in ("prefill", "decode", "generate", "ppl_window")}
    decode = by_name["test_decode[hf:fp32]"]["extra_info"]
    assert decode["backend"] == "hf:fp32" and decode["n_out"] == 32
    assert decode["decode_tok_s"] > 0 and decode["ttft_ms"] > 0 and decode["tpot_ms"] > 0
    assert decode["peak_rss_bytes"] > 0 and decode["load"]["weight_bytes"] > 0
    assert decode["info"]["quantization"]["format"] == "float32"
    assert by_name["test_ppl_window[hf:fp32]"]["extra_info"]["ppl"] > 1
    assert main(["report", str(out)]) == 0
    rendered = (tmp_path / "bench.md").read_text()
    assert "| test_decode[hf:fp32] |" in rendered and "decode tok/s" in rendered
    assert main(["compare", str(out), str(out), "--out", str(tmp_path / "cmp.md")]) == 0
    assert "+0.0%" in (tmp_path / "cmp.md").read_text()
