"""Fault injection: each fault happens for real (a SIGKILL, a hang, garbage on the event stream, a
load that never returns, a signal to the runner, a second run, a cut results file, a file-size
limit, an unwritable folder), and no fault loses a finished result. Faults inside a cell come from
``tests/fault_workloads.py``; docs/reliability.md lists each fault with its test."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from harness.cli import main
from tests.results_files import records
from reports.records import read_records
from tests.fault_workloads import MARKER_ENV, PLAN_ENV
from workloads import registry

ROOT = Path(__file__).resolve().parents[1]
FAULT = "tests.fault_workloads:FaultWorkload"
RUN = ["run", "--model", "tiny-llama", "--backends", "hf:fp32", "--workloads", "fault"]
# the CLI in a process of its own, with the fault workload registered (for signals and limits)
DRIVER = ("import sys; from workloads import registry; registry.WORKLOADS['fault'] = %r; "
          "from harness.cli import main; sys.exit(main(sys.argv[1:]))" % FAULT)


@pytest.fixture(autouse=True)
def fault_workload(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the worker processes import tests.fault_workloads
    monkeypatch.setitem(registry.WORKLOADS, "fault", FAULT)
    monkeypatch.setenv(PLAN_ENV, "ok")  # plan() changes it; restored after the test
    monkeypatch.setenv(MARKER_ENV, str(tmp_path))


def plan(behaviours: str) -> list[str]:
    """Cells 1..n of the fault workload doing ``behaviours`` (comma list; the workers read it from
    the environment they inherit): the flags that make them."""
    os.environ[PLAN_ENV] = behaviours
    return ["--fault-cells", ",".join(str(i) for i in range(1, len(behaviours.split(",")) + 1))]


def workers_of(pid: int) -> list[psutil.Process]:
    """Live worker processes (``python -m harness.worker``) below process ``pid``."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "harness.worker" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def gone(pid: int) -> bool:
    """Not in the process table, or only as a zombie waiting for its reaper."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def when(condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_worker_sigkilled_mid_cell_fails_exactly_that_cell_and_the_next_cells_run_in_a_fresh_worker(tmp_path):
    out = tmp_path / "out"

    def kill_during_second_cell():
        when(lambda: len(records(out)) == 1)  # ok:1 is recorded: the worker is inside long:2
        for worker in workers_of(os.getpid()):
            worker.kill()

    killer = threading.Thread(target=kill_during_second_cell)
    killer.start()
    code = main([*RUN, *plan("ok,long,ok,ok"), "--out", str(out)])
    killer.join()
    assert code == 1
    got = {r["cell_id"]: r for r in records(out)}
    assert [r["status"] for r in got.values()] == ["ok", "failed", "ok", "ok"]
    assert "worker killed by SIGKILL" in got["fault-2"]["error"]
    pid = {cell: r["metrics"].get("worker_pid") for cell, r in got.items()}
    assert pid["fault-3"] == pid["fault-4"] != pid["fault-1"]  # one fresh worker for the rest


def test_a_hanging_worker_times_out_that_cell_only_and_leaves_no_orphan(tmp_path):
    out = tmp_path / "out"
    code = main([*RUN, *plan("ok,hang,ok"), "--timeout", "20", "--out", str(out)])  # loading takes seconds
    assert code == 1
    got = {r["cell_id"]: r for r in records(out)}
    assert [r["status"] for r in got.values()] == ["ok", "failed", "ok"]
    assert "timed out after 20 s" in got["fault-2"]["error"]
    child = int((tmp_path / "child.pid").read_text())  # the hanging cell's own child process
    when(lambda: gone(child), 10)
    assert not workers_of(os.getpid())


@pytest.mark.parametrize("behaviour,needle", [
    ("garbage", "a line that is not a JSON event: 'this is not a JSON event'"),
    ("unknown", 'an unknown event: {"event": "surprise"'),
    ("foreign", "an event for a cell it was not given"),
])
def test_garbage_or_an_unknown_event_fails_the_current_cell_with_it_and_the_run_goes_on(tmp_path, behaviour, needle):
    out = tmp_path / "out"
    code = main([*RUN, *plan(f"ok,{behaviour},ok"), "--timeout", "60", "--out", str(out)])
    assert code == 1
    got = {r["cell_id"]: r for r in records(out)}
    assert [r["status"] for r in got.values()] == ["ok", "failed", "ok"]
    assert needle in got["fault-2"]["error"]
    assert not workers_of(os.getpid())


@pytest.fixture
def model_that_blocks_on_load(tmp_path, tiny_model):
    """A copy of the tiny checkpoint whose weights file is a FIFO: opening it blocks forever, a
    real load that never returns."""
    from backends.models import checkpoint_dir

    directory = tmp_path / "fifo-model"
    shutil.copytree(checkpoint_dir(tiny_model), directory)
    (directory / "model.safetensors").unlink()
    os.mkfifo(directory / "model.safetensors")
    return directory


def test_a_load_that_hangs_is_tried_twice_then_every_remaining_cell_fails_at_once(tmp_path, model_that_blocks_on_load):
    out = tmp_path / "out"
    started = time.monotonic()
    code = main(["run", "--model", str(model_that_blocks_on_load), "--backends", "hf:fp32", "--workloads", "fault",
                 *plan("ok,ok,ok,ok,ok"), "--timeout", "2", "--out", str(out)])
    elapsed = time.monotonic() - started
    assert code == 1
    errors = [r["error"] for r in records(out)]
    assert len(errors) == 5
    assert all("timed out after 2 s" in e for e in errors[:2])
    assert all("not run: the worker was lost while loading 2 times" in e for e in errors[2:])
    assert elapsed < 5 * 2  # two timeouts, not one per cell


def test_a_load_that_crashes_is_tried_twice_then_every_remaining_cell_fails(tmp_path, model_that_blocks_on_load):
    out = tmp_path / "out"
    killed: list[int] = []
    finished = threading.Event()

    def crash_each_worker():  # every worker dies while loading (it is stuck opening the FIFO)
        while not finished.is_set():
            for worker in workers_of(os.getpid()):
                if worker.pid not in killed:
                    killed.append(worker.pid)
                    worker.kill()
            time.sleep(0.05)

    killer = threading.Thread(target=crash_each_worker)
    killer.start()
    try:
        code = main(["run", "--model", str(model_that_blocks_on_load), "--backends", "hf:fp32", "--workloads",
                     "fault", *plan("ok,ok,ok,ok"), "--timeout", "60", "--out", str(out)])
    finally:
        finished.set()
        killer.join()
    assert code == 1 and len(killed) == 2  # two workers started, not one per cell
    errors = [r["error"] for r in records(out)]
    assert all("worker killed by SIGKILL" in e for e in errors[:2])
    assert all("not run: the worker was lost while loading 2 times" in e for e in errors[2:]) and len(errors) == 4


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_or_sigterm_stops_the_current_cell_keeps_finished_records_and_writes_the_report(tmp_path, signum, code):
    out = tmp_path / "out"
    runner = subprocess.Popen([sys.executable, "-c", DRIVER, *RUN, *plan("ok,long,ok"),
                               "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        when(lambda: len(records(out)) == 1 and workers_of(runner.pid))
        worker = workers_of(runner.pid)[0].pid
        signalled = time.time()
        runner.send_signal(signum)
        stdout, stderr = runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == code, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stdout
    assert [r["cell_id"] for r in records(out) if r["status"] == "ok"] == ["fault-1"]
    report = out / "report.md"  # written on the way out, of what finished
    assert report.stat().st_mtime >= signalled and "hf:fp32" in report.read_text()
    when(lambda: gone(worker), 10)  # the cell it was running was stopped, its worker is gone


def test_a_second_run_into_the_same_folder_exits_2_naming_the_holders_pid(tmp_path, capsys):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", DRIVER, *RUN, *plan("long"), "--out", str(out)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        when(lambda: workers_of(first.pid))  # the first run holds the folder and is measuring
        assert main([*RUN, *plan("ok"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"is in use by another run (pid {first.pid})" in err
    finally:
        first.terminate()
        first.wait(timeout=60)
    assert main([*RUN, *plan("ok"), "--out", str(out)]) == 0  # free again once it ended


def test_a_results_file_cut_mid_line_is_read_with_a_warning_and_resume_redoes_that_cell(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("model: tiny-llama\nbackends: [hf:fp32]\nworkloads: [fault]\nbaseline: none\n"
                     "axes:\n  cell: [1, 2, 3]\n")
    plan("ok,ok,ok")
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out)]) == 0
    results = out / "results.jsonl"
    data = results.read_bytes()
    cut = data.rstrip(b"\n").rfind(b"\n") + 1
    results.write_bytes(data[:cut + 40])  # the last record loses its end: a run killed while appending
    capsys.readouterr()
    assert main(["report", str(results)]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "skipped a last line cut mid-write" in err
    assert [r["cell_id"] for r in read_records(results)] == ["fault-1", "fault-2"]
    assert main(["sweep", str(sweep), "--out", str(out), "--resume"]) == 0
    assert [r["cell_id"] for r in records(out)] == ["fault-1", "fault-2", "fault-3"]


def test_a_full_disk_while_writing_results_is_one_line_and_every_earlier_record_is_intact(tmp_path):
    measure = tmp_path / "measure"
    assert main([*RUN, *plan("ok"), "--out", str(measure)]) == 0
    line = len((measure / "results.jsonl").read_bytes())
    limit = int(line * 1.5)  # room for one record, not two

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG

    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", DRIVER, *RUN, *plan("ok,ok,ok"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, preexec_fn=limited, timeout=300)
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and "every record before this one is intact" in last
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].endswith("\n") and json.loads(lines[0])["cell_id"] == "fault-1"


def test_an_output_folder_that_cannot_be_written_is_exit_2_before_any_cell_runs(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*RUN, "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write there" in err
    if os.geteuid() != 0:  # root writes through permissions; the path through a file covers root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main([*RUN, "--out", str(locked / "out")]) == 2
        assert "cannot write there" in capsys.readouterr().err


def test_a_runner_killed_outright_leaves_the_report_of_every_variant_that_finished(tmp_path):
    sweep = tmp_path / "sweep.yaml"  # variant seed=0 runs cell 1 (ok); variant seed=1 runs 1 (ok) then 2 (long)
    sweep.write_text("model: tiny-llama\nbackends: [hf:fp32]\nworkloads: [fault]\nbaseline: none\n"
                     "axes:\n  cell: [1, 2]\n  hf.seed: [0, 1]\nexclude: [{hf.seed: 0, cell: 2}]\n")
    plan("ok,long")
    out = tmp_path / "out"
    runner = subprocess.Popen([sys.executable, "-c", DRIVER, "sweep", str(sweep), "--out", str(out)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        when(lambda: len(records(out)) == 2)  # seed=0 finished; seed=1 is inside its long cell
        runner.kill()  # SIGKILL: no chance to write anything on the way out
        runner.wait(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
    report = (out / "report.md").read_text()
    assert "hf:fp32 [seed=0]" in report  # rendered when that variant finished
    assert [r["status"] for r in records(out)] == ["ok", "ok"]
