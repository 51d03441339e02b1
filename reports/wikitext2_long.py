"""The ``wikitext2-long`` report figure: tail perplexity against context length, one line per
backend variant (label), with its CSV (``workloads.wikitext2_long`` builds the table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIGURE = "wikitext2_long_ppl_vs_length"
CSV_FIELDS = ("label", "series", "length_tokens", "tail_tokens", "ppl", "ppl_se")


def tail_ppl_figure(records: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """Tail PPL (± its SE) against context length (log2 axis; PPL on a log axis when it spans more
    than 4x), a line per label, from the ok
    ``wikitext2-long`` records. Writes ``<out_dir>/wikitext2_long_ppl_vs_length.png`` and the same
    name with ``.csv`` (``CSV_FIELDS``, one row per point drawn). Returns the PNG path, or None when
    no label has two lengths (nothing to draw)."""
    import pandas as pd

    from reports.plots import Styles, _finish, _pyplot

    rows = [{"label": r["label"], "series": f"{r['backend']}:{r['variant']}",
             "length_tokens": r["metrics"]["length_tokens"], "tail_tokens": r["metrics"]["tail_tokens"],
             "ppl": r["metrics"]["ppl"], "ppl_se": r["metrics"]["ppl_se"]} for r in records]
    frame = pd.DataFrame(rows, columns=list(CSV_FIELDS)).sort_values(["label", "length_tokens"])
    if not len(frame) or frame.groupby("label")["length_tokens"].nunique().max() < 2:
        return None
    styles = Styles(records)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for label, line in frame.groupby("label", sort=False):
        ax.errorbar(line["length_tokens"], line["ppl"], yerr=line["ppl_se"], capsize=3, label=label,
                    **styles.line(label, line["series"].iloc[0]))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens, log scale)")
    tail = f"PPL of the last {', '.join(map(str, sorted(frame['tail_tokens'].unique())))} tokens"
    if frame["ppl"].max() > 4 * frame["ppl"].min():  # a broken variant would flatten all the others
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        tail += " (log scale)"
    ax.set_ylabel(tail)
    ax.set_title("wikitext2-long: tail perplexity vs context length")
    ax.grid(alpha=0.3)
    return _finish(fig, ax, Path(out_dir) / f"{FIGURE}.png", frame)
