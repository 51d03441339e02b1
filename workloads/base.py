"""What a workload is: a named measurement that drives any ``Backend`` through its public contract.

A workload knows nothing about a backend's internals (lm-evaluation-harness's task/model split):
it gets a loaded backend and the model's tokenizer and returns metrics and raw samples.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar

from backends.base import Backend

Progress = Callable[[int, int], None]  # (done, total)


class WorkloadError(RuntimeError):
    """The workload cannot run (missing data, a refused combination); the message is one line."""


@dataclass
class WorkloadResult:
    """``metrics``: summary numbers for tables; ``samples``: the raw measurements behind them."""

    metrics: dict[str, Any]
    samples: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkloadParams:
    """Base of each workload's parameters (a dataclass, so records carry them verbatim)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Workload(abc.ABC):
    """A measurement. ``needs_quality``: meaningless on random weights (refused there)."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_quality: ClassVar[bool] = False
    Params: ClassVar[type[WorkloadParams]]

    def __init__(self, params: WorkloadParams):
        self.params = params

    @abc.abstractmethod
    def run(self, backend: Backend, tokenizer, progress: Progress) -> WorkloadResult:
        """Measure ``backend`` (already loaded). Raises ``WorkloadError`` with a one-line reason."""
