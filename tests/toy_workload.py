"""A toy workload that lives outside ``harness/`` and ``reports/``: registering it is all it takes
for the CLI to grow its flags, the runner to run its cells and the report to show its section."""

from __future__ import annotations

from dataclasses import dataclass

from workloads.base import Metric, Workload, WorkloadParams, WorkloadResult, param


@dataclass
class ToyParams(WorkloadParams):
    new_tokens: int = param(3, "tokens to generate from a fixed prompt", "--toy-new-tokens", sweep=True,
                            cli_default=[2, 3])


class ToyWorkload(Workload):
    name = "toy"
    description = "greedy tokens from a fixed prompt"
    Params = ToyParams
    metrics = (Metric("generated_tokens", "tokens", "higher", "tokens the backend generated"),
               Metric("wall_ms", "ms", "lower", "prompt handed over to last token"))

    @classmethod
    def cell_id(cls, params: ToyParams) -> str:
        return f"toy-{params.new_tokens}"

    def run(self, backend, tokenizer, progress) -> WorkloadResult:
        n = self.params.new_tokens
        out = backend.generate([[1, 2, 3]], n, min_new_tokens=n)
        progress(1, 1)
        return WorkloadResult({"generated_tokens": len(out.token_ids[0]),
                               "wall_ms": (out.step_times_s[-1] - out.start_s) * 1e3})
