"""The Slurm executor: jobs through submitit, their records gathered into the run, a job killed
mid-run, ``harness status``, and bad settings. Runs on submitit's local executor (the same jobs as
local processes) everywhere, and on a real single-node Slurm cluster (slurmctld + slurmd started
here by ``tests/slurm_local.py``) where one can be brought up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.cli import main
from tests.results_files import ok_keys, records

pytest.importorskip("submitit", reason="the [slurm] extra is not installed")

SWEEP = """
model: tiny-llama
backends: [hf:fp32]
baseline: none
workloads: [latency]
latency: {output_len: 8, warmup: 0, repetitions: 1}
axes:
  n_in: [8, 16, 24]
  hf.seed: [0, 1]
"""


def write_sweep(tmp_path: Path, text: str = SWEEP) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def stop_a_job_once_it_wrote_a_cell(out: Path, thread: threading.Thread, stop) -> str | None:
    """While the run in ``thread`` goes on: as soon as one of its Slurm jobs has written a cell (it
    is then running its next one), ``stop(job)`` it (its ``OUT/slurm/jobs.json`` entry); returns
    that job's label, or None if the run ended first or 300 s passed."""
    index = out / "slurm" / "jobs.json"
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline:
        done = {r["label"] for r in records(out)}
        if index.exists() and done:
            job = next(j for j in json.loads(index.read_text()) if j["label"] in done)
            stop(job)
            return job["label"]
        time.sleep(0.05)
    return None


def test_slurm_jobs_via_submitit_give_the_same_ok_cells_as_local_and_status_lists_them(tmp_path, data_dir, capsys):
    path = write_sweep(tmp_path)
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    assert main(["sweep", str(path), "--out", str(local)]) == 0
    assert main(["sweep", str(path), "--out", str(slurm), "--executor", "slurm", "--slurm-local"]) == 0
    assert len(ok_keys(local)) == 6 and ok_keys(slurm) == ok_keys(local)
    jobs = json.loads((slurm / "slurm" / "jobs.json").read_text())
    assert [job["label"] for job in jobs] == ["hf:fp32 [seed=0]", "hf:fp32 [seed=1]"]
    for job in jobs:  # each job wrote its own part file; the driver gathered every line of it
        part = slurm / "slurm" / "parts" / job["part"]
        assert len(part.read_text().splitlines()) == 3
    capsys.readouterr()
    assert main(["status", str(slurm)]) == 0
    out = capsys.readouterr().out
    assert "6 ok, 0 failed, 0 waiting" in out and jobs[0]["job_id"] in out


def test_a_slurm_job_killed_mid_run_costs_its_unwritten_cells_and_the_other_job_finishes(tmp_path, data_dir):
    path = write_sweep(tmp_path, SWEEP.replace("output_len: 8", "output_len: 96").replace("repetitions: 1",
                                                                                       "repetitions: 2"))
    out = tmp_path / "out"
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(
        main(["sweep", str(path), "--out", str(out), "--executor", "slurm", "--slurm-local"])))
    thread.start()
    # a local job's id is its pid
    killed = stop_a_job_once_it_wrote_a_cell(out, thread, lambda job: os.kill(int(job["job_id"]), signal.SIGKILL))
    thread.join(timeout=600)
    assert killed is not None and codes == [1]
    got = records(out)
    assert len(got) == 6
    failed = [r for r in got if r["status"] == "failed"]
    assert failed and all(r["label"] == killed for r in failed)
    assert all("slurm job" in r["error"] and "ended" in r["error"] for r in failed)
    assert all(r["status"] == "ok" for r in got if r["label"] != killed)


@pytest.mark.parametrize("text,needle", [
    ("slurm:\n  partition: gpu\n  tim_min: 30\n", ":3: slurm.tim_min: unknown key; valid: partition, account"),
    ("slurm: {cpus_per_job: 0}\n", ":1: slurm.cpus_per_job: Input should be greater than or equal to 1"),
])
def test_a_bad_slurm_section_names_its_line(tmp_path, capsys, text, needle):
    path = write_sweep(tmp_path, text + "backends: [hf:fp32]\nmodel: tiny-llama\nworkloads: [latency]\n")
    code = main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out"), "--executor", "slurm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_status_of_a_folder_without_a_run_is_one_line_exit_2(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no plan.json here" in err


RUN = ["run", "--model", "tiny-llama", "--backends", "hf:fp32", "--workloads", "latency"]


def test_a_missing_slurm_extra_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # what Python does for a module that is not installed
    code = main([*RUN, "--out", str(tmp_path / "out"), "--executor", "slurm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install -e '.[slurm]'" in err


def test_no_slurm_on_the_machine_is_one_line_before_any_cell_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun / sbatch on it
    code = main([*RUN, "--out", str(tmp_path / "out"), "--executor", "slurm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no Slurm on this machine" in err and "--slurm-local" in err
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A real single-node Slurm cluster (munge, slurmctld, slurmd, slurmdbd for sacct) started here
    by scripts/slurm-local.sh; skipped with the reason where it cannot be brought up."""
    from tests import slurm_local

    info = slurm_local.start_local_slurm(tmp_path_factory.mktemp("slurm"))
    if info is None:
        pytest.skip(f"no local Slurm cluster: {slurm_local.last_error}")
    yield info
    slurm_local.stop_local_slurm(info)


def sacct_states(out: Path, timeout_s: float = 60) -> dict[str, str]:
    """label -> Slurm state via ``harness.status`` (sacct), polled until no job is still active
    (sacct lags a job's end by a second or two)."""
    from harness.status import run_status

    deadline = time.monotonic() + timeout_s
    while True:
        states = {row.label: row.state for row in run_status(out)}
        if all(state not in ("PENDING", "RUNNING", "COMPLETING") and not state.startswith("unknown")
               for state in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(1)


def test_a_real_slurm_cluster_runs_the_same_ok_cells_as_local_and_status_reads_their_states(
        tmp_path, data_dir, slurm_cluster):
    path = write_sweep(tmp_path)
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    assert main(["sweep", str(path), "--out", str(local)]) == 0
    assert main(["sweep", str(path), "--out", str(slurm), "--executor", "slurm",
                 "--slurm-partition", slurm_cluster["partition"], "--slurm-time", "10"]) == 0
    assert len(ok_keys(local)) == 6 and ok_keys(slurm) == ok_keys(local)
    jobs = json.loads((slurm / "slurm" / "jobs.json").read_text())
    assert all("_" in job["job_id"] for job in jobs)  # one array: ARRAYID_TASK
    assert sacct_states(slurm) == {"hf:fp32 [seed=0]": "COMPLETED", "hf:fp32 [seed=1]": "COMPLETED"}


def test_a_cancelled_slurm_job_costs_its_unwritten_cells_with_the_state_and_resume_completes(
        tmp_path, data_dir, slurm_cluster):
    path = write_sweep(tmp_path, SWEEP.replace("output_len: 8", "output_len: 96").replace("repetitions: 1",
                                                                                       "repetitions: 2"))
    out = tmp_path / "out"
    args = ["sweep", str(path), "--out", str(out), "--executor", "slurm", "--slurm-partition",
            slurm_cluster["partition"], "--slurm-time", "10"]
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(args)))
    thread.start()
    cancelled = stop_a_job_once_it_wrote_a_cell(
        out, thread, lambda job: subprocess.run(["scancel", job["job_id"]], check=True, timeout=30))
    thread.join(timeout=600)
    assert cancelled is not None and codes == [1]
    failed = [r for r in records(out) if r["status"] == "failed"]
    assert failed and all(r["label"] == cancelled for r in failed)
    # the running cell's worker got scancel's SIGTERM (recorded by the job); the cells the job never
    # reached are recorded by the driver with Slurm's state
    assert all("CANCELLED" in r["error"] or "worker killed by SIGTERM" in r["error"] for r in failed)
    assert any("CANCELLED" in r["error"] for r in failed)
    assert len(records(out)) == 6
    assert main([*args, "--resume"]) == 0 and len(ok_keys(out)) == 6


def test_a_submission_slurm_refuses_is_one_line_and_exit_2(tmp_path, capsys, slurm_cluster):
    code = main([*RUN, "--out", str(tmp_path / "out"), "--executor", "slurm", "--slurm-partition", "no-such-partition"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "the submission failed" in err and "partition" in err.lower()
