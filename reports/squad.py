"""The SQuAD v2.0 section of the report: scores per backend and answer agreement with a baseline."""

from __future__ import annotations

from typing import Any

from reports.baseline import format_p
from reports.stats import mcnemar_exact, paired_bootstrap_mean


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


def paired_significance(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]]) -> list[str]:
    """Two cells comparing a backend's per-question scores with the baseline's on the questions
    both answered: EM by McNemar's exact test, F1 (points) by a paired bootstrap
    (``reports.stats``)."""
    base = {row["id"]: row for row in base_rows}
    shared = [(row, base[row["id"]]) for row in rows if row["id"] in base]
    if len(shared) < 2:
        return ["-", "-"]
    b, c, p = mcnemar_exact([q["em"] >= 1 for q, _ in shared], [o["em"] >= 1 for _, o in shared])
    f1 = paired_bootstrap_mean([q["f1"] for q, _ in shared], [o["f1"] for _, o in shared])
    return [f"{b} / {c}, p={p:.3g}",  # per-question F1 is a fraction (official scorer): shown in points
            "{:+.1f} ({:+.1f} to {:+.1f}), p={}".format(100 * f1.estimate, *(100 * x for x in f1.ci95), format_p(f1.p_value))]


def squad_section(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], str | None, str | None]:
    """(header, rows, baseline label, one example prompt) for the ok SQuAD records."""
    squad = [r for r in records if r["workload"] == "squad" and r["status"] == "ok"]
    if not squad:
        return [], [], None, None
    base = baseline_label([r["label"] for r in squad])
    base_rows = next(r for r in squad if r["label"] == base)["samples"]["predictions"]
    header = ["backend", "EM", "F1 (95% CI)", "HasAns EM", "HasAns F1", "NoAns acc.", "n (HasAns/NoAns)",
              f"agreement with {base}", f"EM vs {base}: only this / only base right, McNemar p",
              f"F1 change vs {base} (95% CI), p"]
    rows = []
    for r in squad:
        m = r["metrics"]
        rows.append([
            r["label"], f"{m['exact_pct']:.1f}", "{:.1f} ({:.1f} - {:.1f})".format(m["f1_pct"], *m["f1_pct_ci95"]),
            f"{m['HasAns_exact_pct']:.1f}", f"{m['HasAns_f1_pct']:.1f}", f"{m['NoAns_accuracy_pct']:.1f}",
            f"{m['total']} ({m['HasAns_total']}/{m['NoAns_total']})",
            f"{agreement(r['samples']['predictions'], base_rows) * 100:.1f}%",
            *(paired_significance(r["samples"]["predictions"], base_rows) if r["label"] != base else ["-", "-"])])
    return header, rows, base, squad[0]["metrics"].get("prompt_example")
