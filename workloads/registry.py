"""Workload registry: name -> ``"module:Class"``, imported lazily.

Cells carry the import path, so a workload registered at run time (a plugin, or a test's toy
workload) runs in the worker processes too. Adding a workload: one module, one line here.
"""

from __future__ import annotations

import importlib

from workloads.base import Workload

WORKLOADS: dict[str, str] = {
    "latency": "workloads.latency:LatencyWorkload",
    "wikitext2": "workloads.wikitext2:WikiText2Workload",
    "squad": "workloads.squad:SquadWorkload",
    "squad-long": "workloads.squad_long:SquadLongWorkload",
    "wikitext2-long": "workloads.wikitext2_long:WikiText2LongWorkload",
}
DEFAULT_WORKLOADS = ("latency", "wikitext2")


def load_workload(path: str) -> type[Workload]:
    """Import ``"module:Class"``.

    Raises:
        ImportError, AttributeError: the module or class does not exist.
    """
    module_name, class_name = path.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def workload_class(name: str) -> type[Workload]:
    """The workload class registered as ``name``. Raises ``KeyError`` for an unknown name."""
    return load_workload(WORKLOADS[name])
