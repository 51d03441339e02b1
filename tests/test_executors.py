"""Executors: the same sweep on a real two-node Ray cluster (``ray.cluster_utils.Cluster``) as
locally, a node killed mid-sweep, and the one-line errors of each executor's bad input."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from harness.cli import main
from tests.results_files import ok_keys, records

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

# Two backend variants (hf:fp32 at two seeds), three latency cells each, long enough (a few seconds
# per cell) that a node can be killed while one of them runs.
SWEEP = """
model: tiny-llama
backends: [hf:fp32]
baseline: none
workloads: [latency]
latency: {output_len: 160, warmup: 0, repetitions: 2}
axes:
  n_in: [8, 16, 24]
  hf.seed: [0, 1]
"""


@pytest.fixture
def cluster():
    """A real Ray cluster of two nodes on this machine, one CPU each (so one measuring task per
    node), with fast node-death detection."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster, worker
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def test_local_and_a_two_node_ray_cluster_give_the_same_ok_cells_each_with_its_nodes_fingerprint(
        tmp_path, data_dir, cluster):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.replace("output_len: 160", "output_len: 8"))
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert main(["sweep", str(path), "--out", str(local)]) == 0
    head, worker = cluster
    assert main(["sweep", str(path), "--out", str(remote), "--executor", "ray", "--ray-address", head.address]) == 0
    assert len(ok_keys(local)) == 6 and ok_keys(remote) == ok_keys(local)
    nodes = {r["env"]["ray_node_id"] for r in records(remote)}
    assert worker.node_id in nodes and len(nodes) == 2  # both nodes measured, each record says which
    assert all(r["env"].get("hostname") for r in records(remote))


def test_a_node_killed_mid_sweep_costs_only_its_running_cell_and_a_local_resume_completes_it(tmp_path, data_dir, cluster):
    head, worker = cluster
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    out = tmp_path / "out"
    args = ["sweep", str(path), "--out", str(out), "--executor", "ray", "--ray-address", head.address]
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(args)))
    thread.start()
    killed_label = None
    deadline = time.monotonic() + 300
    while killed_label is None and thread.is_alive() and time.monotonic() < deadline:
        on_worker = [r for r in records(out) if r["env"].get("ray_node_id") == worker.node_id]
        if on_worker:  # that variant's next cell is now running on the worker node: kill the node
            killed_label = on_worker[0]["label"]
            head.remove_node(worker, allow_graceful=False)
        time.sleep(0.05)
    thread.join(timeout=600)
    assert killed_label is not None, "no cell ran on the worker node"
    assert codes == [1]  # a cell failed
    got = records(out)
    failed = [r for r in got if r["status"] == "failed"]
    assert len(failed) == 1, [(r["label"], r["cell_id"], r["error"]) for r in failed]
    assert failed[0]["label"] == killed_label and "lost with its Ray task or node" in failed[0]["error"]
    assert len(got) == 6 and len(ok_keys(out)) == 5  # the variant's later cells ran on the live node

    # resume works across executors: the cell key names no executor or node
    assert main(["sweep", str(path), "--out", str(out), "--resume"]) == 0
    assert len(ok_keys(out)) == 6
    assert len(records(out)) == 7  # only the lost cell was run again, locally


def test_a_ray_worker_process_killed_mid_cell_costs_that_cell_and_its_variant_goes_on_in_a_new_task(
        tmp_path, data_dir, cluster):
    import psutil

    head, _ = cluster
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.replace("  hf.seed: [0, 1]\n", ""))  # one variant, three cells
    out = tmp_path / "out"
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(
        ["sweep", str(path), "--out", str(out), "--executor", "ray", "--ray-address", head.address])))
    thread.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        if records(out):  # the first cell is recorded: the task's worker is inside the second
            tasks = [t for t in map(_ray_parent_of_worker, psutil.process_iter(["cmdline"])) if t is not None]
            if tasks:  # the Ray worker process running our task (never another run's processes)
                killed = tasks[0]
                killed.kill()
        time.sleep(0.05)
    thread.join(timeout=600)
    assert killed is not None and codes == [1]
    got = records(out)
    assert [r["status"] for r in got] == ["ok", "failed", "ok"]
    assert "lost with its Ray task or node" in got[1]["error"]


def _ray_parent_of_worker(process):
    """The Ray worker process (``ray::...``) whose child ``process`` is a harness worker, else None."""
    import psutil

    try:
        if "harness.worker" not in " ".join(process.info["cmdline"] or []):
            return None
        parent = process.parent()
        return parent if parent is not None and " ".join(parent.cmdline()).startswith("ray::") else None
    except psutil.Error:
        return None


def test_an_unreachable_ray_address_is_one_line_and_exit_2(tmp_path, capsys):
    started = time.monotonic()
    code = main(["run", "--model", "tiny-llama", "--backends", "hf:fp32", "--workloads", "latency",
                 "--out", str(tmp_path / "out"), "--executor", "ray", "--ray-address", "127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot reach a Ray cluster there" in err and "127.0.0.1:9" in err
    assert time.monotonic() - started < 60  # not Ray's minutes of retries
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_a_missing_ray_extra_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what Python does for a module that is not installed
    code = main(["run", "--model", "tiny-llama", "--backends", "hf:fp32", "--workloads", "latency",
                 "--out", str(tmp_path / "out"), "--executor", "ray"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install -e '.[ray]'" in err


@pytest.mark.parametrize("args,needle", [
    (["--ray-address", "10.0.0.1:6379"], "--ray-address and --ray-cpus need --executor ray"),
    (["--slurm-partition", "gpu"], "--slurm-partition needs --executor slurm"),
    (["--executor", "ray", "--ray-address", "no-port"], "expected HOST:PORT"),
    (["--executor", "slurm", "--slurm-cpus", "0"], "expected an integer >= 1"),
    (["--executor", "mpi"], "invalid choice: 'mpi'"),
])
def test_executor_flags_in_the_wrong_place_are_one_line_exit_2(tmp_path, capsys, args, needle):
    code = main(["run", "--model", "tiny-llama", "--backends", "hf:fp32", "--workloads", "latency",
                 "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
