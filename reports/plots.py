"""Plots for the markdown report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reports.table import SummaryRow


def quality_speed_plot(rows: list[SummaryRow], path: Path) -> Path | None:
    """Decode tokens/s (x) against perplexity (y), one labelled point per backend variant; the
    trade-off a reader chooses on. Returns None when no row has both numbers."""
    points = [(r.label, r.decode_tok_s.value, r.ppl.value) for r in rows
              if r.decode_tok_s.value is not None and r.ppl.value is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, speed, ppl in points:
        ax.scatter(speed, ppl)
        ax.annotate(label, (speed, ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("decode tokens/s (median)")
    ax.set_ylabel("WikiText-2 perplexity")
    ppls = [p for _, _, p in points]
    if max(ppls) > 5 * min(ppls):  # a broken format would squash every other point to the floor
        ax.set_yscale("log")
    ax.set_title("Quality vs decode speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_plot(values: dict[str, float], ylabel: str, title: str, path: Path) -> Path | None:
    """A bar per backend variant (e.g. TTFT or peak memory)."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.bar(list(values), list(values.values()))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
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
    for label, points in sorted(series.items()):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("KV cache MB")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
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
