"""The default executor: every job on this machine, one after another (never two at once: they
would contend for the same cores and memory bandwidth)."""

from __future__ import annotations

from harness.plan import Job


class LocalExecutor:
    """Runs each job's worker here, in order (``Runner.run_job`` with the local launch)."""

    name = "local"

    def run(self, runner, jobs: list[Job]) -> None:
        for job in jobs:
            runner.run_job(job)

    def describe(self) -> str:
        return "local: one job at a time on this machine"
