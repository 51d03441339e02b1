"""Summary rows from records (never re-running anything): one row per backend variant.

Both the console table and the markdown report are drawn from ``summary_rows``, so they agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MB = 1024 * 1024


@dataclass
class Cellval:
    """A number with its spread, rendered ``value ± spread``."""

    value: float | None
    spread: float | None = None
    digits: int = 1

    def render(self) -> str:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return "-"
        text = f"{self.value:.{self.digits}f}"
        if self.spread:
            text += f" ± {self.spread:.{self.digits}f}"
        return text


@dataclass
class SummaryRow:
    label: str
    format: str
    weight_mb: Cellval
    load_s: Cellval
    ttft_ms: Cellval
    decode_tok_s: Cellval
    prefill_tok_s: Cellval
    peak_mb: Cellval
    ppl: Cellval
    errors: list[str] = field(default_factory=list)

    COLUMNS = ("backend", "format", "weight MB", "load s", "TTFT ms", "decode tok/s",
               "prefill tok/s", "peak MB", "PPL")

    def cells(self) -> list[str]:
        return [self.label, self.format] + [v.render() for v in (
            self.weight_mb, self.load_s, self.ttft_ms, self.decode_tok_s, self.prefill_tok_s,
            self.peak_mb, self.ppl)]


def _stat(metrics: dict[str, Any], key: str) -> Cellval:
    stat = metrics.get(key) or {}
    return Cellval(stat.get("median"), stat.get("std"))


def headline_latency(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latency shape the summary shows: the largest prompt, then the longest output, batch 1
    first (the common single-stream case)."""
    shapes = [r["params"] for r in records if r["workload"] == "latency"]
    if not shapes:
        return None
    return max(shapes, key=lambda p: (-p.get("batch", 1), p["n_in"], p["n_out"]))


def peak_bytes(metrics: dict[str, Any]) -> int | None:
    """The peak that matters on the device used: CUDA allocator peak on GPU, process RSS on CPU."""
    return metrics.get("peak_cuda_allocated_bytes") or metrics.get("peak_rss_bytes")


def summary_rows(records: list[dict[str, Any]]) -> list[SummaryRow]:
    shape = headline_latency([r for r in records if r["status"] == "ok"])
    rows: dict[str, SummaryRow] = {}
    for record in records:
        label = record["label"]
        row = rows.get(label)
        if row is None:
            row = rows[label] = SummaryRow(label, "-", *(Cellval(None) for _ in range(7)))
        if record["status"] != "ok":
            row.errors.append(f"{record['workload']}: {record['error']}")
            continue
        info, load, metrics = record.get("info") or {}, record.get("load") or {}, record["metrics"]
        row.format = str((info.get("quantization") or {}).get("format", row.format))
        row.weight_mb = Cellval(load.get("weight_bytes", 0) / MB)
        row.load_s = Cellval(load.get("load_s"), digits=2)
        if record["workload"] == "latency" and record["params"] == shape:
            row.ttft_ms = _stat(metrics, "ttft_ms")
            row.decode_tok_s = _stat(metrics, "decode_tok_s")
            row.prefill_tok_s = _stat(metrics, "prefill_tok_s")
            peak = peak_bytes(metrics)
            row.peak_mb = Cellval(peak / MB if peak else None, digits=0)
        elif record["workload"] == "wikitext2":
            row.ppl = Cellval(metrics["ppl"], metrics.get("ppl_se"), digits=3)
    return list(rows.values())


def latency_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """Every latency cell: backend, n_in, n_out, batch, then median (p90) of each timing."""
    rows = []
    for r in records:
        if r["workload"] != "latency" or r["status"] != "ok":
            continue
        m, p = r["metrics"], r["params"]

        def med_p90(key: str, digits: int = 1) -> str:
            s = m.get(key) or {}
            if s.get("median") is None:
                return "-"
            return f"{s['median']:.{digits}f} ({s['p90']:.{digits}f})"

        peak = peak_bytes(m)
        kv = m.get("kv_cache_bytes")
        rows.append([r["label"], str(p["n_in"]), str(p["n_out"]), str(p["batch"]),
                     med_p90("ttft_ms"), med_p90("tpot_ms", 2), med_p90("itl_ms", 2),
                     med_p90("prefill_tok_s"), med_p90("decode_tok_s"), med_p90("e2e_ms"),
                     f"{peak / MB:.0f}" if peak else "-", f"{kv / MB:.2f}" if kv else "-"])
    return rows


LATENCY_COLUMNS = ["backend", "n_in", "n_out", "batch", "TTFT ms", "TPOT ms", "ITL ms",
                   "prefill tok/s", "decode tok/s", "e2e ms", "peak MB", "KV MB"]


def kv_context_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """KV-cache MB after prefill per backend (rows) and prompt length (columns), then bytes per
    cached token and the compression against the unquantized reference (``kvq:fp16`` if run, else
    ``hf:fp32``) at the longest length. From latency records reporting ``kv_cache_bytes_prefill``;
    empty when fewer than two lengths were run."""
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        if r["status"] == "ok" and r["workload"] == "latency" and r["metrics"].get("kv_cache_bytes_prefill"):
            cells.setdefault(r["label"], {})[r["params"]["n_in"]] = r["metrics"]
    lengths = sorted({n for by_len in cells.values() for n in by_len})
    if len(lengths) < 2:
        return [], []
    reference = next((label for label in ("kvq:fp16", "hf:fp32") if label in cells), None)
    header = ["backend"] + [f"n_in={n}" for n in lengths] + ["bytes/token", f"vs {reference}"]
    rows = []
    for label, by_len in cells.items():
        longest = max(by_len)
        metrics = by_len[longest]
        tokens = metrics.get("kv_cache_tokens_prefill") or longest
        ref = (cells.get(reference) or {}).get(longest)
        ratio = ref["kv_cache_bytes_prefill"] / metrics["kv_cache_bytes_prefill"] if ref else None
        rows.append([label] + [f"{by_len[n]['kv_cache_bytes_prefill'] / MB:.2f}" if n in by_len else "-"
                               for n in lengths]
                    + [f"{metrics['kv_cache_bytes_prefill'] / tokens:,.0f}", f"{ratio:.2f}x" if ratio else "-"])
    return header, rows
