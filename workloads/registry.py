"""Workload registry: name -> class. ``harness`` expands CLI names through it."""

from __future__ import annotations

from workloads.base import Workload
from workloads.latency import LatencyWorkload
from workloads.squad import SquadWorkload
from workloads.wikitext2 import WikiText2Workload

WORKLOADS: dict[str, type[Workload]] = {
    cls.name: cls for cls in (LatencyWorkload, WikiText2Workload, SquadWorkload)
}
