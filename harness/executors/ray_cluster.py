"""The Ray executor (``--executor ray``, the ``[ray]`` extra): each backend variant's worker runs in
a Ray task on whichever node has the resources, and its events stream back to this driver, which
appends each record as its cell finishes.

- Isolation and limits are the local ones: the task starts the same worker process
  (``harness.worker_process.worker_events``: its own process group, the per-cell timeout, killed
  with its parent), so a crash costs one cell and the variant goes on in a fresh task.
- Resources: on a cluster with GPUs, one GPU per task (Ray sets ``CUDA_VISIBLE_DEVICES``, which the
  worker inherits) and ``cpus_per_job`` CPUs (default 1); on a CPU cluster, ``cpus_per_job`` CPUs
  (default: the CPUs of the smallest node, so that a measuring worker has a node to itself). The
  worker computes with that many threads (``HARNESS_THREADS``, ``OMP_NUM_THREADS``), so Ray's
  accounting never lets two measuring workers share a GPU or oversubscribe a node's cores.
- Each record carries the fingerprint of the node that measured it (hostname, CPU, GPUs, driver,
  Ray node id), not the driver's.
- A task lost with its node (or a Ray worker killed) ends that worker's stream: its running cell
  is recorded as failed with the Ray error, and the variant's remaining cells go to a new task
  that Ray places on a live node. Tasks are never retried by Ray (``max_retries=0``): a retry
  would measure cells twice.
- The baseline job (``RunConfig.baseline``) runs to completion first: the others read the
  distributions it writes under ``OUT/baseline/``, so ``OUT`` must be on a filesystem every node
  sees (as on any cluster with a shared home or scratch).
- ``address``: ``HOST:PORT`` of a running cluster's GCS (``ray start --head`` prints it), checked
  with a 5 s TCP connect before Ray is asked (whose own connect retries for minutes); ``auto``: the
  cluster this machine belongs to; None: a local cluster is started for the run and stopped after.
"""

from __future__ import annotations

import functools
import os
import socket
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterator

from harness.plan import Job, UsageError
from harness.worker_process import WORKER_EXIT, worker_events

INSTALL_HINT = "pip install -e '.[ray]'"
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    """The ``ray`` module. Raises UsageError naming the extra when it is not installed."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_address(address: str) -> None:
    """Raise UsageError unless ``HOST:PORT`` accepts a TCP connection within 5 s (``auto`` and
    ``ray://`` client addresses are left to Ray)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r}: expected HOST:PORT (the GCS address 'ray start --head' "
                         "prints), 'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UsageError(f"--ray-address {address}: cannot reach a Ray cluster there "
                         f"({exc.strerror or type(exc).__name__})") from None


@functools.lru_cache(maxsize=1)
def _node_env() -> dict[str, Any]:
    """This node's fingerprint (once per Ray worker process: it runs a bandwidth measurement)."""
    import ray

    from harness.env import fingerprint

    return {**fingerprint(), "ray_node_id": ray.get_runtime_context().get_node_id()}


def _worker_task(payload: dict[str, Any], log_path: str, cell_timeout_s: float,
                 threads: int | None) -> Iterator[dict[str, Any]]:
    """The body of the Ray task: the node's fingerprint, then the worker's events."""
    yield {"event": "env", "env": _node_env()}
    yield from worker_events(payload, Path(log_path), cell_timeout_s, threads)


def _forwarded_env() -> dict[str, str]:
    """Environment the workers need wherever they run: the harness's own variables (data folder,
    cache folders) and ``PYTHONPATH``."""
    return {k: v for k, v in os.environ.items() if k.startswith(("HARNESS_", "HF_")) or k == "PYTHONPATH"}


class RayExecutor:
    """Runs jobs as Ray tasks, concurrently as far as the cluster's resources allow.

    Args:
        address: see the module docstring; None starts a local cluster.
        cpus_per_job: CPUs (and worker threads) per task; None: see the module docstring.

    Raises:
        UsageError: Ray not installed, or ``address`` unreachable (from the constructor, before any
            cell runs).
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_job: int | None = None):
        self.ray = import_ray()
        if address:
            check_address(address)
        self.address, self.cpus_per_job = address, cpus_per_job
        self._resources: dict[str, Any] = {}
        self._task = None

    def describe(self) -> str:
        where = self.address or "a local cluster"
        return f"ray: {where}, {self._resources or 'resources decided at start'} per backend variant"

    def start(self) -> None:
        """Connect (or start a local cluster) and decide each task's resources."""
        ray = self.ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False,
                                      "runtime_env": {"env_vars": _forwarded_env()}}
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError) as exc:
                raise UsageError(f"--executor ray: cannot start or join a Ray cluster "
                                 f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        total = ray.cluster_resources()
        node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        if total.get("GPU", 0) >= 1:
            self._resources = {"num_gpus": 1, "num_cpus": self.cpus_per_job or 1}
        else:
            smallest = min([c for c in node_cpus if c > 0] or [1])
            self._resources = {"num_cpus": self.cpus_per_job or smallest}
        self._task = ray.remote(max_retries=0)(_worker_task)

    def launch(self, payload: dict[str, Any], log_path: Path, cell_timeout_s: float) -> Iterator[dict[str, Any]]:
        """A worker in a Ray task: its events as they come; a Ray failure (node or worker lost)
        ends the stream with ``worker_exit`` naming it."""
        ray = self.ray
        stream = self._task.options(**self._resources).remote(
            payload, str(Path(log_path).resolve()), cell_timeout_s, int(self._resources["num_cpus"]))
        finished = False
        try:
            for ref in stream:
                event = ray.get(ref)
                finished = event.get("event") == WORKER_EXIT
                yield event
        except ray.exceptions.RayError as exc:
            finished = True
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            yield {"event": WORKER_EXIT, "reason": f"lost with its Ray task or node ({type(exc).__name__}: {first})"}
        finally:
            if not finished:  # the reader stopped early (e.g. load failed): stop the task
                try:
                    ray.cancel(stream, force=True)
                except Exception:  # already finished or its node gone: nothing to stop
                    pass

    def run(self, runner, jobs: list[Job]) -> None:
        """The baseline job first (the others compare with what it writes), then every other job
        at once: Ray queues those the cluster has no resources for yet."""
        started_here = not self.ray.is_initialized()
        self.start()
        try:
            first = jobs[:1] if jobs and jobs[0].label == runner.config.baseline else []
            for job in first:
                runner.run_job(job, self.launch)
            rest = jobs[len(first):]
            if rest:
                pool = ThreadPoolExecutor(max_workers=len(rest), thread_name_prefix="ray-job")
                futures = [pool.submit(runner.run_job, job, self.launch) for job in rest]
                try:
                    wait(futures)
                except BaseException:  # SIGINT / SIGTERM: stop the tasks, so the job threads end now
                    self._stop_tasks()
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                pool.shutdown(wait=True)
                errors = [f.exception() for f in futures if f.exception() is not None]
                if errors:  # every other job has finished and kept its records; now report the bug
                    raise errors[0]
        finally:
            if started_here and self.ray.is_initialized():
                self.ray.shutdown()

    def _stop_tasks(self) -> None:
        """Disconnect from the cluster: a local one stops, and every task of this driver is
        cancelled, which ends each job thread's stream."""
        if self.ray.is_initialized():
            self.ray.shutdown()
