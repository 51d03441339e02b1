"""Two results files side by side: per-cell ratios of every metric, with the noise band of the
repetitions, and the changes beyond it flagged (llama.cpp's ``compare-llama-bench.py`` is the model).

Cells are matched by backend label, workload and parameters (not by ``cell_key``, which also holds
library versions: comparing before and after an upgrade is the point). A metric with statistics
(``{median, std, mean, n}``) is compared on its median; its noise band is the relative standard
error of both sides combined, ``sqrt((std_a/mean_a)^2/n_a + (std_b/mean_b)^2/n_b)``; a
perplexity uses its ``ppl_se``. A change is flagged when it exceeds twice that band (about a 95%
two-sided z-interval); a metric without a spread is never flagged, only shown. The band is the
noise between repetitions inside each run: drift of a shared machine between two runs is not in
it, so compare runs taken back to back, and read small flagged changes with that in mind.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from reports.markdown import md_table

SPREADS = {"ppl": "ppl_se"}  # scalar metrics whose standard error sits beside them


def _match_key(record: dict[str, Any]) -> tuple[str, str, str]:
    return record["label"], record["workload"], json.dumps(record.get("params") or {}, sort_keys=True)


def _value_and_noise(metrics: dict[str, Any], name: str) -> tuple[float | None, float | None]:
    """(value, relative standard error or None) of one metric."""
    value = metrics.get(name)
    if isinstance(value, dict):
        median, std, mean, n = (value.get(k) for k in ("median", "std", "mean", "n"))
        if median is None:
            return None, None
        if std is None or not mean or not n or n < 2:
            return float(median), None
        return float(median), abs(std / mean) / math.sqrt(n)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, None
    spread = metrics.get(SPREADS.get(name, ""))
    return float(value), (abs(spread / value) if isinstance(spread, (int, float)) and value else None)


def compare_rows(a: list[dict[str, Any]], b: list[dict[str, Any]], better: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per (matched ok cell, metric present on both sides).

    Args:
        a, b: the reference records and the new ones (schema 2).
        better: metric name -> ``"higher"`` or ``"lower"`` (the workloads' declarations); metrics
            not named are shown without a verdict.

    Returns:
        dicts with ``label``, ``cell``, ``metric``, ``a``, ``b``, ``ratio`` (b / a), ``noise``
        (relative, both sides) and ``verdict`` (``better``, ``worse``, ``changed``, ``within noise``
        or ``-`` without a spread).
    """
    reference = {_match_key(r): r for r in a if r["status"] == "ok"}
    rows = []
    for record in b:
        base = reference.get(_match_key(record))
        if record["status"] != "ok" or base is None:
            continue
        for name in record["metrics"]:
            new, noise_b = _value_and_noise(record["metrics"], name)
            old, noise_a = _value_and_noise(base["metrics"], name)
            if new is None or old is None or name in SPREADS.values() or name.endswith("_se"):
                continue
            ratio = new / old if old else math.nan
            noise = math.hypot(noise_a, noise_b) if noise_a is not None and noise_b is not None else None
            if noise is None or math.isnan(ratio):
                verdict = "-"
            elif abs(ratio - 1) <= 2 * noise:
                verdict = "within noise"
            elif name in better:
                up = ratio > 1
                verdict = "better" if up == (better[name] == "higher") else "worse"
            else:
                verdict = "changed"
            rows.append({"label": record["label"], "cell": record["cell_id"], "metric": name, "a": old, "b": new,
                         "ratio": ratio, "noise": noise, "verdict": verdict})
    return rows


def render_comparison(a: list[dict[str, Any]], b: list[dict[str, Any]], better: Mapping[str, str],
                      names: tuple[str, str] = ("A", "B")) -> str:
    """Markdown: the flagged changes first, then every compared metric."""
    rows = compare_rows(a, b, better)

    def cells(row: dict[str, Any]) -> list[str]:
        noise = f"±{2 * row['noise'] * 100:.1f}%" if row["noise"] is not None else "-"
        return [row["label"], row["cell"], row["metric"], f"{row['a']:.4g}", f"{row['b']:.4g}",
                f"{row['ratio']:.3f}", noise, row["verdict"]]

    header = ["backend", "cell", "metric", names[0], names[1], f"{names[1]} / {names[0]}", "noise band (2 SE)",
              "verdict"]
    flagged = [r for r in rows if r["verdict"] in ("better", "worse", "changed")]
    lines = [f"# quantarena: {names[1]} against {names[0]}", "",
             f"{len(rows)} metrics of {len({(r['label'], r['cell']) for r in rows})} matched cells; "
             f"{len(flagged)} changed beyond twice their standard error.", ""]
    if flagged:
        lines += ["## Changes beyond the noise", "", md_table(header, [cells(r) for r in flagged]), ""]
    lines += ["## Every compared metric", "", md_table(header, [cells(r) for r in rows])]
    return "\n".join(lines) + "\n"
