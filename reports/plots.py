"""Plots for the markdown report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reports.table import SummaryRow

# 12 markers against matplotlib's 10 default colours: every series up to 60 looks different
MARKERS = "osD^vP*Xh<>p"


def quality_speed_plot(rows: list[SummaryRow], path: Path) -> Path | None:
    """Decode tokens/s (x) against perplexity (y), one point per backend variant, named in a legend
    beside the axes (labels written next to close points overlap); the trade-off a reader chooses
    on. Returns None when no row has both numbers."""
    points = [(r.label, r.decode_tok_s.value, r.ppl.value) for r in rows
              if r.decode_tok_s.value is not None and r.ppl.value is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for index, (label, speed, ppl) in enumerate(points):
        ax.scatter(speed, ppl, marker=MARKERS[index % len(MARKERS)], label=label)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    ax.set_xlabel("decode tokens/s (median)")
    ax.set_ylabel("WikiText-2 perplexity")
    ppls = [p for _, _, p in points]
    if max(ppls) > 5 * min(ppls):  # a broken format would squash every other point to the floor
        ax.set_yscale("log")
    ax.set_title("Quality vs decode speed")
    ax.grid(alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def bar_plot(values: dict[str, float], ylabel: str, title: str, path: Path) -> Path | None:
    """A horizontal bar per backend variant (e.g. TTFT or peak memory): row labels (long for swept
    options) read left of their bars, the value axis is labelled ``ylabel``."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.3 * len(values)), dpi=120)
    ax.barh(list(values), list(values.values()))
    ax.invert_yaxis()  # first row on top, as in the tables
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def kv_context_plot(series: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """KV-cache MB against context length, a line per backend variant."""
    if not any(len(points) > 1 for points in series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for index, (label, points) in enumerate(sorted(series.items())):
        points = sorted(points)  # colours repeat after 10 series; colour + marker stays unique up to 60
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=MARKERS[index % len(MARKERS)], label=label)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("KV cache MB")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_all(rows: list[SummaryRow], records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    kv: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["status"] == "ok" and r["workload"] == "latency" and r["metrics"].get("kv_cache_bytes"):
            kv.setdefault(r["label"], []).append((r["params"]["n_in"] + r["params"]["n_out"],
                                                 r["metrics"]["kv_cache_bytes"] / 2**20))
    made = [
        quality_speed_plot(rows, out_dir / "quality_vs_speed.png"),
        bar_plot({r.label: r.ttft_ms.value for r in rows}, "TTFT ms (median)", "Time to first token",
                 out_dir / "ttft.png"),
        bar_plot({r.label: r.peak_mb.value for r in rows}, "peak MB", "Peak memory", out_dir / "peak_memory.png"),
        kv_context_plot(kv, out_dir / "kv_vs_context.png"),
    ]
    return [p for p in made if p is not None]
