"""Where jobs run: ``local`` (this machine, one job at a time: the default), ``ray`` (tasks on a Ray
cluster, ``ray_cluster``) or ``slurm`` (jobs on a Slurm cluster through submitit, ``slurm``).

An executor has ``run(runner, jobs)``: it gets every job's cells run and every record to
``runner`` (``harness.runner.Runner``), which writes them as they arrive. It is built by
``make_executor`` before any cell runs, so a missing extra or an unreachable cluster is a one-line
error (``UsageError``, exit 2).
"""

from __future__ import annotations

import argparse
from typing import Any

from harness.plan import UsageError

EXECUTORS = ("local", "ray", "slurm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--executor`` and the flags of the ray and slurm executors (``run`` and ``sweep``)."""
    from harness.executors.slurm import add_slurm_arguments

    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where jobs run: local (default, one at a time), ray (tasks on a Ray cluster), "
                             "slurm (jobs on a Slurm cluster via submitit)")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help="join this Ray cluster (default: start a local one for the run); 'auto': the "
                             "cluster this machine belongs to")
    parser.add_argument("--ray-cpus", type=int, metavar="N",
                        help="CPUs (and worker threads) per backend variant's task (default: 1 with GPUs, "
                             "else the smallest node's CPUs)")
    add_slurm_arguments(parser)


def make_executor(args: argparse.Namespace, out_dir, sweep_slurm: dict[str, Any] | None = None):
    """The executor ``args.executor`` names, configured from the flags (and, for slurm, the sweep
    file's ``slurm:`` section, which flags override).

    Raises:
        UsageError: a flag of another executor, a missing extra, an unreachable Ray address or a
            bad Slurm setting.
    """
    name = getattr(args, "executor", "local")
    if name != "ray" and (args.ray_address or args.ray_cpus):
        raise UsageError("--ray-address and --ray-cpus need --executor ray")
    if args.ray_cpus is not None and args.ray_cpus < 1:
        raise UsageError(f"--ray-cpus must be >= 1 (got {args.ray_cpus})")
    if name != "slurm":
        from harness.executors.slurm import check_flags_unused

        check_flags_unused(args)
    if name == "local":
        from harness.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from harness.executors.ray_cluster import RayExecutor

        return RayExecutor(args.ray_address, args.ray_cpus)
    from harness.executors.slurm import SlurmExecutor, slurm_settings

    return SlurmExecutor(out_dir, slurm_settings(args, sweep_slurm or {}))
