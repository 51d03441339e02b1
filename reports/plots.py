"""The figures of a report: PNG (matplotlib, Agg backend: no display needed), each with its data
as a CSV beside it (the same rows the figure draws), drawn from records alone.

Every figure keeps one colour per backend variant (``backend:variant``) across the whole report,
and one marker per label (in the sliding-window figure: per attention sink), so
a series reads the same in every figure. Error bars are the standard deviation over a cell's
timed repetitions (``metrics.X.std``); perplexity error bars are its standard error. A figure is
drawn only when its data has something to show (e.g. two prompt lengths for a line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from reports.table import MB, headline_latency, peak_bytes

if TYPE_CHECKING:
    import pandas as pd

# 12 markers: with the colour per backend variant, every series looks different
MARKERS = "osD^vP*Xh<>p"
LEGEND = dict(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Styles:
    """Colour per backend variant and marker per option tag, fixed for a whole report."""

    def __init__(self, records: list[dict[str, Any]]):
        from matplotlib import colormaps

        series = sorted({f"{r['backend']}:{r['variant']}" for r in records})
        palette = colormaps["tab10" if len(series) <= 10 else "tab20"].colors
        self.colours = {s: palette[i % len(palette)] for i, s in enumerate(series)}
        self.markers: dict[str, str] = {}

    def colour(self, series: str):
        return self.colours.get(series, "black")

    def marker(self, key: str) -> str:
        """A marker per label, in first-seen order."""
        if key not in self.markers:
            self.markers[key] = MARKERS[len(self.markers) % len(MARKERS)]
        return self.markers[key]

    def line(self, label: str, series: str) -> dict[str, Any]:
        """Plot keywords for one label's line: its variant's colour, its own marker, and a marker
        size that shrinks with each new label, so lines that coincide (equal KV bytes) stay visible."""
        marker = self.marker(label)
        size = 8 - 1.5 * (list(self.markers).index(label) % 4)
        return dict(color=self.colour(series), marker=marker, markersize=size, alpha=0.85)


def _stat(metrics: dict[str, Any], key: str) -> tuple[float | None, float | None]:
    stat = metrics.get(key) or {}
    return stat.get("median"), stat.get("std")


def latency_frame(records: list[dict[str, Any]]) -> "pd.DataFrame":
    """One row per ok latency cell: label, series (backend:variant), tag (swept options), shape
    (n_in, n_out, batch, context = n_in + n_out), sliding_window / attention_sink when the backend
    has them, median and std of TTFT ms, e2e ms, prefill and decode tokens/s, peak MB and KV MB."""
    import pandas as pd

    rows = []
    for r in records:
        if r["status"] != "ok" or r["workload"] != "latency":
            continue
        m, p, options = r["metrics"], r["params"], r.get("options") or {}
        row = {"label": r["label"], "series": f"{r['backend']}:{r['variant']}",
               "tag": r["label"].partition(" ")[2], "n_in": p["n_in"], "n_out": p["n_out"],
               "batch": p.get("batch", 1), "context": p["n_in"] + p["n_out"],
               "sliding_window": options.get("sliding_window"), "attention_sink": options.get("attention_sink")}
        for key in ("ttft_ms", "e2e_ms", "prefill_tok_s", "decode_tok_s"):
            row[key], row[key + "_std"] = _stat(m, key)
        peak = peak_bytes(m, r.get("info"))
        row["peak_mb"] = peak / MB if peak else None
        row["kv_mb"] = m["kv_cache_bytes"] / MB if m.get("kv_cache_bytes") else None
        rows.append(row)
    return pd.DataFrame(rows)


def quality_frame(records: list[dict[str, Any]]) -> "pd.DataFrame":
    """One row per backend variant (label) with a perplexity: ppl and its standard error, weight
    MB, and at the report's headline latency shape decode tokens/s and peak MB (NaN when not run)."""
    import pandas as pd

    ok = [r for r in records if r["status"] == "ok"]
    shape = headline_latency(ok)
    rows: dict[str, dict[str, Any]] = {}
    for r in ok:
        row = rows.setdefault(r["label"], {"label": r["label"], "series": f"{r['backend']}:{r['variant']}"})
        row["weight_mb"] = (r.get("load") or {}).get("weight_bytes", 0) / MB
        if r["workload"] == "wikitext2":
            row["ppl"], row["ppl_se"] = r["metrics"]["ppl"], r["metrics"].get("ppl_se")
            row["ppl_protocol"] = r["metrics"].get("protocol")
        elif r["workload"] == "latency" and r["params"] == shape:
            row["decode_tok_s"], row["decode_tok_s_std"] = _stat(r["metrics"], "decode_tok_s")
            peak = peak_bytes(r["metrics"], r.get("info"))
            row["peak_mb"] = peak / MB if peak else None
            kv, tokens = r["metrics"].get("kv_cache_bytes_prefill"), r["metrics"].get("kv_cache_tokens_prefill")
            row["kv_bytes_per_token"] = kv / tokens if kv and tokens else None
    frame = pd.DataFrame([row for row in rows.values() if row.get("ppl") is not None])
    for column in ("decode_tok_s", "decode_tok_s_std", "peak_mb", "kv_bytes_per_token"):
        if column not in frame:
            frame[column] = float("nan")
    return frame


def _errorbar(ax, x, frame: "pd.DataFrame", key: str, label: str, **style) -> None:
    std = frame[key + "_std"] if key + "_std" in frame else None
    ax.errorbar(x, frame[key], yerr=std, capsize=3, label=label, **style)


def _finish(fig, ax, path: Path, frame: "pd.DataFrame", legend: bool = True) -> Path:
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, labels, **LEGEND)
    fig.savefig(path, bbox_inches="tight")
    _pyplot().close(fig)
    frame.to_csv(path.with_suffix(".csv"), index=False)
    return path


def _by_context(frame: "pd.DataFrame", column: str, ylabel: str, title: str, styles: Styles, path: Path) -> Path | None:
    """``column`` against context tokens at batch 1, a line per label (needs two contexts)."""
    data = frame[(frame["batch"] == 1) & frame[column].notna()] if len(frame) else frame
    if not len(data) or data.groupby("label")["context"].nunique().max() < 2:
        return None
    data = data.sort_values(["label", "context"])[["label", "series", "context", column]]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for label, line in data.groupby("label", sort=False):
        ax.plot(line["context"], line[column], label=label, **styles.line(label, line["series"].iloc[0]))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens (prompt + generated, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _finish(fig, ax, path, data)


def memory_vs_context(frame, styles: Styles, out: Path) -> Path | None:
    """Peak memory MB against context tokens, a line per backend variant (batch 1)."""
    return _by_context(frame, "peak_mb", "peak memory MB (host RSS on CPU, allocator on CUDA)",
                       "Total memory vs context window", styles, out / "memory_vs_context.png")


def kv_vs_context(frame, styles: Styles, out: Path) -> Path | None:
    """KV-cache MB at the end of generation against context tokens (batch 1)."""
    return _by_context(frame, "kv_mb", "KV cache MB (end of generation)", "KV-cache memory vs context",
                       styles, out / "kv_vs_context.png")


def latency_vs_sliding_window(frame, styles: Styles, out: Path) -> Path | None:
    """End-to-end latency (ms, median ± std) against sliding-window size: a panel per prompt
    length, a line per format and attention sink (colour: format, marker: sink); window 0 is
    drawn as "off" (full attention). Needs two window sizes."""
    if not len(frame) or frame["sliding_window"].dropna().nunique() < 2:
        return None
    data = frame[frame["sliding_window"].notna() & (frame["batch"] == 1)]
    data = data.assign(attention_sink=data["attention_sink"].fillna(0).astype(int),
                       sliding_window=data["sliding_window"].astype(int))
    data = data.sort_values(["n_in", "series", "attention_sink", "sliding_window"])[
        ["series", "n_in", "sliding_window", "attention_sink", "e2e_ms", "e2e_ms_std"]]
    windows = sorted(data["sliding_window"].unique())
    position = {w: i for i, w in enumerate(windows)}
    lengths = sorted(data["n_in"].unique())
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.6 * len(lengths) + 1, 3.8), dpi=120, squeeze=False)
    sinks = sorted(data["attention_sink"].unique())
    for ax, n_in in zip(axes[0], lengths):
        for (series, sink), line in data[data["n_in"] == n_in].groupby(["series", "attention_sink"], sort=False):
            _errorbar(ax, [position[w] for w in line["sliding_window"]], line, "e2e_ms", f"{series}, sink={sink}",
                      color=styles.colour(series), marker=MARKERS[sinks.index(sink) % len(MARKERS)], markersize=6)
        ax.set_xticks(range(len(windows)), ["off" if w == 0 else str(w) for w in windows])
        ax.set_title(f"prompt {n_in} tokens", fontsize=10)
        ax.set_xlabel("sliding window (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("end-to-end latency ms (median ± std)")
    fig.suptitle("End-to-end latency vs sliding window")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    axes[0][-1].legend(handles, labels, **LEGEND)
    return _finish(fig, axes[0][-1], out / "latency_vs_sliding_window.png", data, legend=False)


def throughput_vs_batch(frame, styles: Styles, out: Path) -> Path | None:
    """Decode tokens/s against batch size at the prompt length the batch sweep used (the most
    common one among batch > 1 cells): aggregate (left) and per sequence (right), a line per label."""
    if not len(frame) or frame["batch"].nunique() < 2:
        return None
    n_in = frame[frame["batch"] > 1]["n_in"].mode().iloc[0]
    data = frame[frame["n_in"] == n_in].sort_values(["label", "batch"])
    data = data.assign(decode_tok_s_per_seq=data["decode_tok_s"] / data["batch"],
                       decode_tok_s_per_seq_std=data["decode_tok_s_std"] / data["batch"])[
        ["label", "series", "n_in", "batch", "decode_tok_s", "decode_tok_s_std",
         "decode_tok_s_per_seq", "decode_tok_s_per_seq_std"]]
    plt = _pyplot()
    fig, (total, per_seq) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for label, line in data.groupby("label", sort=False):
        style = styles.line(label, line["series"].iloc[0])
        _errorbar(total, line["batch"], line, "decode_tok_s", label, **style)
        _errorbar(per_seq, line["batch"], line, "decode_tok_s_per_seq", label, **style)
    for ax, title in ((total, "aggregate"), (per_seq, "per sequence")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(data["batch"].unique()), [str(b) for b in sorted(data["batch"].unique())])
        ax.set_xlabel("batch (sequences per call)")
        ax.set_ylabel(f"decode tokens/s, {title}")
        ax.set_title(f"{title} (prompt {n_in} tokens)", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("Decode throughput vs batch size")
    return _finish(fig, per_seq, out / "throughput_vs_batch.png", data)


def rates_vs_prompt_length(frame, styles: Styles, out: Path) -> Path | None:
    """TTFT ms (left, log-log) and decode tokens/s (right) against prompt tokens, batch 1, a line
    per label, median ± std over repetitions. Needs two prompt lengths for one label."""
    data = frame[frame["batch"] == 1] if len(frame) else frame
    if not len(data) or data.groupby("label")["n_in"].nunique().max() < 2:
        return None
    data = data.sort_values(["label", "n_in"])[["label", "series", "n_in", "n_out", "ttft_ms",
                                                "ttft_ms_std", "decode_tok_s", "decode_tok_s_std"]]
    plt = _pyplot()
    fig, (ttft, decode) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for label, line in data.groupby("label", sort=False):
        style = styles.line(label, line["series"].iloc[0])
        _errorbar(ttft, line["n_in"], line, "ttft_ms", label, **style)
        _errorbar(decode, line["n_in"], line, "decode_tok_s", label, **style)
    ttft.set_yscale("log")
    _plain_log_ticks(ttft.yaxis)
    ttft.set_ylabel("TTFT ms (median ± std, log scale)")
    decode.set_ylabel("decode tokens/s (median ± std)")
    for ax in (ttft, decode):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens (log scale)")
        ax.grid(alpha=0.3)
    fig.suptitle("TTFT and decode rate vs prompt length (batch 1)")
    return _finish(fig, decode, out / "rates_vs_prompt_length.png", data)


def _broken_scale(ax, values, axis: str) -> None:
    """Log scale when one format is so far off that it would squash the others (a broken format)."""
    values = [v for v in values if v and v > 0]
    if values and max(values) > 5 * min(values):
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        _plain_log_ticks(ax.xaxis if axis == "x" else ax.yaxis)


def _plain_log_ticks(target) -> None:
    """Tick labels of a log axis as plain numbers (100 rather than 10^2); minor ticks labelled at
    2x and 5x only, so neighbours (90, 100) never collide."""
    from matplotlib.ticker import FuncFormatter

    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))


def perplexity_vs_precision(quality, styles: Styles, out: Path) -> Path | None:
    """Perplexity ± standard error per backend variant, rows ordered from the most to the least
    bytes (weight MB, then KV bytes per token), each row naming its weight MB and KV bytes/token:
    the precision ladder. Needs two variants with a perplexity."""
    if len(quality) < 2:
        return None
    data = quality.sort_values(["weight_mb", "kv_bytes_per_token"], ascending=False, na_position="last")
    data = data[["label", "series", "weight_mb", "kv_bytes_per_token", "ppl", "ppl_se"]]
    names = [f"{row.label} ({row.weight_mb:.0f} MB" + (f", KV {row.kv_bytes_per_token:,.0f} B/tok)"
             if row.kv_bytes_per_token == row.kv_bytes_per_token and row.kv_bytes_per_token else ")")
             for row in data.itertuples()]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.35 * len(data)), dpi=120)
    for y, row in enumerate(data.itertuples()):
        ax.errorbar(row.ppl, y, xerr=row.ppl_se, color=styles.colour(row.series), marker="o", capsize=3)
    ax.set_yticks(range(len(data)), names, fontsize=8)
    ax.invert_yaxis()
    _broken_scale(ax, data["ppl"], "x")
    ax.set_xlabel("WikiText-2 perplexity (± standard error)")
    ax.set_title("Perplexity vs precision (most bytes on top)")
    ax.grid(axis="x", alpha=0.3)
    return _finish(fig, ax, out / "perplexity_vs_precision.png", data, legend=False)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speed, perplexity) points no other point beats on both (faster and lower perplexity),
    sorted by speed. Higher speed and lower perplexity are better."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front))


def speed_vs_perplexity(quality, styles: Styles, out: Path) -> Path | None:
    """Decode tokens/s (x) against perplexity (y), one point per backend variant, marker area
    proportional to peak memory MB, the Pareto frontier (faster and better) as a dashed line."""
    data = quality[quality["decode_tok_s"].notna()] if len(quality) else quality
    if not len(data):
        return None
    data = data[["label", "series", "decode_tok_s", "decode_tok_s_std", "ppl", "ppl_se", "peak_mb"]]
    peak = data["peak_mb"].fillna(data["peak_mb"].min() if data["peak_mb"].notna().any() else 1)
    sizes = 40 + 360 * (peak / peak.max())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for (row, size) in zip(data.itertuples(), sizes):
        ax.scatter(row.decode_tok_s, row.ppl, s=size, color=styles.colour(row.series), alpha=0.75,
                   edgecolors="black", linewidths=0.5, label=f"{row.label} ({row.peak_mb:.0f} MB)"
                   if row.peak_mb == row.peak_mb else row.label)
    front = pareto_front(list(zip(data["decode_tok_s"], data["ppl"])))
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", linewidth=1, label="Pareto frontier")
    _broken_scale(ax, data["ppl"], "y")
    ax.legend(markerscale=0.5, **LEGEND)
    ax.set_xlabel("decode tokens/s (median)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("Decode speed vs perplexity (marker area: peak MB)")
    ax.grid(alpha=0.3)
    return _finish(fig, ax, out / "speed_vs_perplexity.png", data.assign(pareto=[
        (s, p) in front for s, p in zip(data["decode_tok_s"], data["ppl"])]), legend=False)


# (the frame it draws from, the function, the title in the report)
FIGURES: tuple[tuple[str, Callable[..., Path | None], str], ...] = (
    ("latency", rates_vs_prompt_length, "TTFT and decode rate vs prompt length"),
    ("latency", memory_vs_context, "Total memory vs context window"),
    ("latency", kv_vs_context, "KV-cache memory vs context"),
    ("latency", latency_vs_sliding_window, "End-to-end latency vs sliding window"),
    ("latency", throughput_vs_batch, "Throughput vs batch size"),
    ("quality", speed_vs_perplexity, "Decode speed vs perplexity"),
    ("quality", perplexity_vs_precision, "Perplexity vs precision"),
)


@dataclass
class Figure:
    """A PNG written for the report and the CSV of exactly the data it draws."""

    png: Path
    csv: Path
    title: str


def plot_all(records: list[dict[str, Any]], out_dir: Path) -> list[Figure]:
    """Every figure the records have data for, into ``out_dir`` (PNG + CSV each)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = {"latency": latency_frame(records), "quality": quality_frame(records)}
    styles = Styles(records)
    made = []
    for frame, draw, title in FIGURES:
        path = draw(frames[frame], styles, out_dir)
        if path is not None:
            made.append(Figure(path, path.with_suffix(".csv"), title))
    return made
