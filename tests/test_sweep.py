"""Sweep files: the grid (per-backend and per-workload axes, links), errors with file and line,
and resume after a sweep was killed mid-run."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.sweep import load_sweep, plan_sweep
from reports.records import read_records

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def plan(path: Path):
    spec = load_sweep(path)
    return plan_sweep(spec, path, spec.workloads)


def test_axes_cross_only_the_backends_and_workloads_that_have_them(tmp_path):
    path = write(tmp_path, """
model: tiny-llama
backends: [hf:fp32, mlc:q0f32]
workloads: [latency, wikitext2]
latency: {output_len: 2}
axes:
  n_in: [16, 32, 64]
  mlc.prefill_chunk: [8, 16]
""")
    jobs, _ = plan(path)
    assert [job.label for job in jobs] == ["hf:fp32", "mlc:q0f32 [prefill_chunk=8]", "mlc:q0f32 [prefill_chunk=16]"]
    assert jobs[1].options["prefill_chunk"] == 8 and jobs[2].options["prefill_chunk"] == 16
    for job in jobs:  # 3 prompt lengths x latency, and wikitext2 once (it has no n_in)
        assert [c.cell_id for c in job.cells] == ["latency-in16-out2-b1", "latency-in32-out2-b1",
                                                  "latency-in64-out2-b1", "wikitext2"]
        assert all(c.params["n_out"] == 2 for c in job.cells if c.workload == "latency")


def test_linked_axes_move_together(tmp_path):
    path = write(tmp_path, """
backends: [mlc:q0f32]
workloads: [latency]
axes:
  mlc.sliding_window: [0, 512, 512]
  mlc.attention_sink: [0, 0, 4]
  batch_sizes: [1, 2]
link: [[mlc.sliding_window, mlc.attention_sink]]
""")
    jobs, _ = plan(path)
    assert [(j.options["sliding_window"], j.options["attention_sink"]) for j in jobs] == [(0, 0), (512, 0), (512, 4)]
    assert [c.params["batch"] for c in jobs[0].cells] == [1, 2]


def test_exclude_drops_exactly_the_cells_matching_every_key_of_an_entry(tmp_path):
    path = write(tmp_path, """
model: tiny-llama
backends: [hf:fp32, mlc:q0f32]
workloads: [latency, wikitext2]
latency: {output_len: 2}
axes:
  n_in: [16, 32]
  mlc.sliding_window: [0, 8]
exclude:
  - {workload: latency, mlc.sliding_window: 8}   # mlc windowed job: no latency cells
  - {backend: hf:fp32, n_in: 32}                 # hf: no 32-token latency cell
  - {backend: mlc:q4f16_1, workload: wikitext2}  # names a variant not in the sweep: matches nothing
""")
    jobs, _ = plan(path)
    cells = {job.label: [c.cell_id for c in job.cells] for job in jobs}
    assert cells == {
        "hf:fp32": ["latency-in16-out2-b1", "wikitext2"],
        "mlc:q0f32 [sliding_window=0]": ["latency-in16-out2-b1", "latency-in32-out2-b1", "wikitext2"],
        "mlc:q0f32 [sliding_window=8]": ["wikitext2"],
    }


def test_a_job_whose_every_cell_is_excluded_is_not_planned(tmp_path):
    path = write(tmp_path, """
model: tiny-llama
backends: [hf:fp32, mlc:q0f32]
workloads: [latency]
exclude: [{backend: mlc}]
""")
    jobs, _ = plan(path)
    assert [job.label for job in jobs] == ["hf:fp32"]


@pytest.mark.parametrize("text,where", [
    ("backends: [hf:fp32]\naxs: {n_in: [1]}\n", ":2: axs: unknown key; valid: model"),
    ("backends: [hf:fp32]\nlatency: {output_len: x}\n", ":2: latency.output_len: latency.n_out must be an integer >= 1"),
    ("backends: [hf:fp32]\naxes:\n  n_in: [16]\n  hf.attn: [sdpa, flash]\n",
     ":4: axes.hf.attn: hf: option attn='flash': Input should be 'sdpa' or 'eager' (at hf.attn=flash)"),
    ("backends: [hf:fp32]\naxes:\n  n_layers: [1, 2]\n", ":3: axes.n_layers: not a parameter of latency, wikitext2"),
    ("backends: [mlc:q0f32]\naxes:\n  mlc.sliding_window: [0, 512]\n  mlc.attention_sink: [0, 4]\n",
     ":3: axes.mlc.sliding_window: mlc: attention_sink needs sliding_window > 0 (at mlc.sliding_window=0, mlc.attention_sink=4)"),
    ("backends: [mlc:q0f32]\naxes:\n  mlc.sliding_window: [0, 512]\n  mlc.attention_sink: [0]\n"
     "link: [[mlc.sliding_window, mlc.attention_sink]]\n", ":5: link.0: linked axes need equally many values"),
    ("backends: hf:fp32\n", ":1: backends: Input should be a valid list"),
    ("backends: [hf:fp32]\nexclude:\n  - {n_layers: 2}\n",
     ":3: exclude.0.n_layers: not 'backend', 'workload' nor an axis of this sweep"),
    ("backends: [hf:fp32]\nexclude:\n  - {workload: squad}\n",
     ":3: exclude.0.workload: not a workload of this sweep (latency, wikitext2)"),
    ("backends: [hf:fp32]\nexclude:\n  - {}\n", ":3: exclude.0: an empty entry would drop every cell"),
    ("backends: [hf:fp32\n", "not YAML"),
])
def test_malformed_sweep_file_names_the_line_and_the_key(tmp_path, capsys, text, where):
    path = write(tmp_path, text)
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}" in err and where in err, err
    assert len(err.strip().splitlines()) == 1


SMALL = """
model: tiny-llama
backends: [hf:fp32]
workloads: [latency]
latency: {output_len: 16, warmup: 0, repetitions: 5}
axes:
  n_in: [8, 16, 24, 32, 40, 48]
"""


def test_resume_after_a_kill_runs_only_missing_and_failed_cells_without_duplicates(tmp_path, data_dir):
    env = {**os.environ, "HARNESS_DATA_DIR": str(data_dir)}
    path = write(tmp_path, SMALL)
    out = tmp_path / "out"
    results = out / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(path), "--out", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not results.is_file() or len(results.read_text().splitlines()) < 2):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker, mid-run
    proc.wait()
    lines = results.read_text().splitlines()
    assert 2 <= len(lines) < 6
    # the first finished cell failed; and the kill cut a record mid-line (as a power loss would)
    first = json.loads(lines[0])
    first.update(status="failed", error="injected: worker killed by SIGKILL")
    results.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    kept = {json.loads(line)["cell_key"] for line in lines[1:]}

    assert main(["sweep", str(path), "--out", str(out), "--resume"]) == 0
    records = read_records(results)
    assert len(records) == len(lines) + (6 - len(lines)) + 1  # old ones, the missing ones, the retried one
    ok = [r for r in records if r["status"] == "ok"]
    assert sorted(r["params"]["n_in"] for r in ok) == [8, 16, 24, 32, 40, 48]  # every cell once
    assert len({r["cell_key"] for r in ok}) == 6
    rerun = records[len(lines):]
    assert {r["cell_key"] for r in rerun}.isdisjoint(kept)  # nothing already ok was run again
    assert first["cell_key"] in {r["cell_key"] for r in rerun}  # the failed cell was retried
    assert read_records(out / "results.csv") == records
    report = (out / "report.md").read_text()
    assert len(re.findall(r"\| hf:fp32( ⚠)? \| 48 \|", report)) == 1  # the report shows each cell once
    assert main(["sweep", str(path), "--out", str(out), "--resume"]) == 0  # nothing left: runs nothing
    assert len(read_records(results)) == len(records)


def test_existing_results_without_resume_are_refused(tmp_path, capsys):
    path = write(tmp_path, SMALL)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").write_text("")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "already holds results: add --resume" in capsys.readouterr().err


SCALED = """
model: tiny-llama
backends: [hf:fp32]
workloads: [latency]
latency: {output_len: 2}
axes:
  n_in: [16, 32]
scales:
  full:
    model: smollm2-135m
    latency: {output_len: 8}
    axes:
      n_in: [64, 128, 256]
      bogus_axis: [1]
"""


def test_a_scale_replaces_the_top_level_keys_it_names(tmp_path):
    path = write(tmp_path, SCALED.replace("      bogus_axis: [1]\n", ""))
    cpu = load_sweep(path)
    full = load_sweep(path, "full")
    assert (cpu.model, cpu.axes["n_in"], cpu.workload_sections()["latency"]) == ("tiny-llama", [16, 32], {"output_len": 2})
    assert (full.model, full.axes["n_in"], full.workload_sections()["latency"]) == ("smollm2-135m", [64, 128, 256], {"output_len": 8})
    assert full.backends == cpu.backends == ["hf:fp32"]  # a key the scale does not name stays
    jobs, _ = plan_sweep(full, path, full.workloads)
    assert [c.cell_id for c in jobs[0].cells] == [f"latency-in{n}-out8-b1" for n in (64, 128, 256)]


def test_an_error_in_a_scale_names_the_line_inside_that_scale(tmp_path, capsys):
    path = write(tmp_path, SCALED)
    assert main(["sweep", str(path), "--scale", "full", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("axes.bogus_axis: not a parameter of latency nor a BACKEND.option")
    assert f"{path}:14:" in err  # the scale's bogus_axis line (top-level axes: line 6)
    assert main(["sweep", str(path), "--scale", "gpu", "--dry-run"]) == 2
    assert "no scale 'gpu' in this file; scales: full" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_plans_at_cpu_and_full_scale(recipe):
    for scale in (None, "full"):
        spec = load_sweep(recipe, scale)
        jobs, _ = plan_sweep(spec, recipe, spec.workloads)
        assert sum(len(job.cells) for job in jobs) > 1
    assert load_sweep(recipe, "full").model == "llama3-8b"


def test_the_sweep_baseline_runs_first_and_an_unknown_one_names_its_line(tmp_path, capsys):
    from harness.plan import baseline_first

    path = write(tmp_path, "backends: [hf:fp32, kvq:fp16]\nworkloads: [latency]\nbaseline: kvq:fp16\n")
    spec = load_sweep(path)
    jobs, _ = plan_sweep(spec, path, spec.workloads)
    ordered, label, note = baseline_first(jobs, spec.baseline)
    assert (label, note) == ("kvq:fp16", None) and [j.label for j in ordered] == ["kvq:fp16", "hf:fp32"]
    path.write_text("backends: [hf:fp32]\nworkloads: [latency]\nbaseline: hf:bogus\n")
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}:3: baseline:" in err and "hf:bogus" in err and len(err.splitlines()) == 1
