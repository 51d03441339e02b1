"""The package structure the guides promise: no import cycle between top-level packages, and a
workload added without touching ``harness/`` or ``reports/``."""

from __future__ import annotations

import ast
from pathlib import Path

from harness.cli import main
from reports.records import read_records

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("backends", "workloads", "harness", "reports")


def package_imports() -> dict[str, set[str]]:
    """Top-level package -> the other top-level packages its modules import (anywhere in a module,
    function-level imports included)."""
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in PACKAGES and top != package:
                        edges[package].add(top)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the graph as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in edges:
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_top_level_packages_import_each_other_without_a_cycle():
    edges = package_imports()
    assert find_cycle(edges) is None, edges
    assert edges["backends"] == set()  # the engine layer knows nothing above it
    assert edges["reports"] == set()  # reports read records only
    assert "harness" not in edges["workloads"]


def test_a_workload_registered_outside_harness_and_reports_runs_end_to_end(tmp_path, data_dir, monkeypatch):
    from workloads import registry

    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the worker processes import tests.toy_workload
    monkeypatch.setitem(registry.WORKLOADS, "toy", "tests.toy_workload:ToyWorkload")
    code = main(["run", "--model", "tiny-llama", "--backends", "hf:fp32", "--workloads", "toy",
                 "--toy-new-tokens", "2,5", "--out", str(tmp_path)])
    assert code == 0
    records = read_records(tmp_path / "results.csv")
    assert [(r["cell_id"], r["metrics"]["generated_tokens"]) for r in records] == [("toy-2", 2), ("toy-5", 5)]
    assert records == read_records(tmp_path / "results.jsonl")
    report = (tmp_path / "report.md").read_text()
    assert "## toy: greedy tokens from a fixed prompt" in report
    assert "| hf:fp32 | toy-5 | 5 |" in report
