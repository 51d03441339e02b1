"""The ``squad-long`` report section: F1 / EM per (prompt length, paragraph depth) per backend
variant, as a table and a heat map (PNG, matplotlib Agg) with its CSV beside it, from records alone.

A cell that failed because its length is beyond the model's context (its error contains the
workload's refusal phrase) is shown as "> ctx", never as a score; other failures as "failed".
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

FIGURE = "squad_long_heatmap"
CSV_FIELDS = ("label", "length_tokens", "depth_pct", "n", "exact_pct", "f1_pct", "f1_ci95_low", "f1_ci95_high",
              "status", "note")


def grid_rows(records: list[dict[str, Any]], refused: str) -> list[dict[str, Any]]:
    """One row per (label, length, depth) from ``squad-long`` records (ok or failed), sorted:
    ``label``, ``length_tokens``, ``depth_pct``, ``n``, ``exact_pct``, ``f1_pct`` (percent, None when
    not measured), ``f1_ci95_low/high`` (bootstrap 95% CI, percent), ``status`` (``ok``,
    ``beyond context`` when the error contains ``refused``, or ``failed``) and ``note`` (the error)."""
    rows = []
    for r in records:
        params, metrics = r.get("params", {}), r.get("metrics", {})
        ci = metrics.get("f1_pct_ci95") or [None, None]
        status = r["status"] if r["status"] == "ok" else "beyond context" if refused in (r.get("error") or "") \
            else "failed"
        rows.append({"label": r["label"], "length_tokens": params.get("length"), "depth_pct": params.get("depth"),
                     "n": metrics.get("total"), "exact_pct": metrics.get("exact_pct"), "f1_pct": metrics.get("f1_pct"),
                     "f1_ci95_low": ci[0], "f1_ci95_high": ci[1], "status": status,
                     "note": "" if r["status"] == "ok" else r.get("error") or ""})
    return sorted(rows, key=lambda row: (row["label"], row["length_tokens"], row["depth_pct"]))


def _show(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["status"] == "beyond context":
        return "> ctx"
    if row["status"] != "ok":
        return "failed"
    return f"{row['f1_pct']:.1f} / {row['exact_pct']:.1f}"


def heatmap(rows: list[dict[str, Any]], path: Path) -> Path:
    """One panel per backend variant: F1 (%) by paragraph depth (x) and prompt length (y), each cell
    annotated with its F1; refused lengths hatched and labelled "> ctx". Writes ``path`` (PNG) and
    ``path`` with ``.csv`` (``CSV_FIELDS``, every row drawn). Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with path.with_suffix(".csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    labels = list(dict.fromkeys(row["label"] for row in rows))
    lengths = sorted({row["length_tokens"] for row in rows})
    depths = sorted({row["depth_pct"] for row in rows})
    fig, axes = plt.subplots(1, len(labels), squeeze=False,
                             figsize=(1.1 * len(depths) * len(labels) + 2.2, 0.55 * len(lengths) + 1.8))
    image = None
    for ax, label in zip(axes[0], labels):
        cells = {(row["length_tokens"], row["depth_pct"]): row for row in rows if row["label"] == label}
        grid = np.full((len(lengths), len(depths)), np.nan)
        for (length, depth), row in cells.items():
            if row["status"] == "ok" and row["f1_pct"] is not None:
                grid[lengths.index(length), depths.index(depth)] = row["f1_pct"]
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto", origin="lower")
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                row = cells.get((length, depth))
                if row is not None and row["status"] == "ok":
                    value = row["f1_pct"]
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=9,
                            color="white" if value < 60 else "black")
                elif row is not None:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", color="grey"))
                    ax.text(j, i, "> ctx" if row["status"] == "beyond context" else "failed", ha="center",
                            va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d}%" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(length) for length in lengths])
        ax.set_xlabel("paragraph depth (% of filler before it)")
        ax.set_title(label, fontsize=10)
    axes[0][0].set_ylabel("prompt length (tokens)")
    fig.colorbar(image, ax=axes[0].tolist(), label="F1 (%)", fraction=0.05, pad=0.02)
    fig.suptitle("squad-long: F1 of the answer by depth and prompt length", fontsize=11, y=1.04)  # above panel titles
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def squad_long_section(records: list[dict[str, Any]], out_dir: Path, refused: str) -> list[str]:
    """Markdown lines of the ``squad-long`` section: the protocol in two lines, per backend variant a
    table of "F1 / EM" (%) with lengths as rows and depths as columns, and the heat map (written to
    ``out_dir``) with its CSV. ``refused``: the phrase of a beyond-context failure. [] without
    records."""
    from reports.markdown import md_table

    rows = grid_rows(records, refused)
    if not rows:
        return []
    ok = [r for r in records if r["status"] == "ok"]
    lines = ["## squad-long: passage retrieval QA at depth", ""]
    if ok:
        first = ok[0]["metrics"]
        n = sorted({r["metrics"].get("total") for r in ok})
        lines += [f"A SQuAD v2.0 paragraph (answerable questions only, n = {', '.join(map(str, n))} per cell, seed "
                  f"{first.get('seed')}) placed at the stated depth inside WikiText-2 test filler; the prompt "
                  f"(`{first.get('prompt_version')}`, chat template: {'yes' if first.get('chat_template') else 'no'}) "
                  f"is exactly the stated length, question last. Cells: F1 / EM (%, official SQuAD "
                  f"normalisation). \"> ctx\": the length plus the answer is beyond the model's context "
                  f"(max_position_embeddings), refused, not clipped.", ""]
    depths = sorted({row["depth_pct"] for row in rows})
    for label in dict.fromkeys(row["label"] for row in rows):
        cells = {(row["length_tokens"], row["depth_pct"]): row for row in rows if row["label"] == label}
        table = [[str(length)] + [_show(cells.get((length, depth))) for depth in depths]
                 for length in sorted({key[0] for key in cells})]
        lines += [f"**{label}**", "", md_table(["length (tokens)"] + [f"depth {d}%" for d in depths], table), ""]
    path = heatmap(rows, Path(out_dir) / f"{FIGURE}.png")
    lines += [f"![squad-long F1 by depth and length]({path.name}) (data: [{path.with_suffix('.csv').name}]"
              f"({path.with_suffix('.csv').name}))", ""]
    return lines
