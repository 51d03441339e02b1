"""The SQuAD v2.0 section of the report: scores per backend and answer agreement with a baseline."""

from __future__ import annotations

from typing import Any


def baseline_label(labels: list[str]) -> str | None:
    """The row answers are compared with: ``hf:fp32`` if present, else the first ``hf`` row, else
    the first row."""
    if "hf:fp32" in labels:
        return "hf:fp32"
    return next((l for l in labels if l.startswith("hf:")), labels[0] if labels else None)


def agreement(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """Fraction of shared questions whose normalised answers are identical."""
    answers = {row["id"]: row["normalized"] for row in b}
    shared = [row for row in a if row["id"] in answers]
    if not shared:
        return float("nan")
    return sum(row["normalized"] == answers[row["id"]] for row in shared) / len(shared)


def squad_section(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], str | None, str | None]:
    """(header, rows, baseline label, one example prompt) for the ok SQuAD records."""
    squad = [r for r in records if r["workload"] == "squad" and r["status"] == "ok"]
    if not squad:
        return [], [], None, None
    base = baseline_label([r["label"] for r in squad])
    base_rows = next(r for r in squad if r["label"] == base)["samples"]["predictions"]
    header = ["backend", "EM", "F1 (95% CI)", "HasAns EM", "HasAns F1", "NoAns acc.", "n (HasAns/NoAns)",
              f"agreement with {base}"]
    rows = []
    for r in squad:
        m = r["metrics"]
        rows.append([
            r["label"], f"{m['exact_pct']:.1f}", "{:.1f} ({:.1f} - {:.1f})".format(m["f1_pct"], *m["f1_pct_ci95"]),
            f"{m['HasAns_exact_pct']:.1f}", f"{m['HasAns_f1_pct']:.1f}", f"{m['NoAns_accuracy_pct']:.1f}",
            f"{m['total']} ({m['HasAns_total']}/{m['NoAns_total']})",
            f"{agreement(r['samples']['predictions'], base_rows) * 100:.1f}%"])
    return header, rows, base, squad[0]["metrics"].get("prompt_example")
