"""Summary rows from records (never re-running anything): one row per backend variant.

Both the console table and the markdown report are drawn from ``summary_rows``, so they agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from reports.roofline import decode_roofline

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
    # resident_bytes: what the load added on the model's device (CPU: host RSS, heap trimmed), MB
    resident_mb: Cellval = field(default_factory=lambda: Cellval(None, digits=0))

    COLUMNS = ("backend", "format", "weight MB", "resident MB", "load s", "TTFT ms", "decode tok/s",
               "prefill tok/s", "peak MB", "PPL")

    def cells(self) -> list[str]:
        return [self.label, self.format] + [v.render() for v in (
            self.weight_mb, self.resident_mb, self.load_s, self.ttft_ms, self.decode_tok_s,
            self.prefill_tok_s, self.peak_mb, self.ppl)]


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


def peak_bytes(metrics: dict[str, Any], info: dict[str, Any] | None = None) -> int | None:
    """The device peak (bytes) of a record: on a CUDA record (``info["device"] == "cuda"``) the CUDA
    allocator peak ``peak_cuda_allocated_bytes``, or None (shown "-") when it is missing or 0 (a
    backend whose memory torch's allocator does not see); never the host RSS, which is the device
    figure only on CPU (``peak_rss_bytes``) and otherwise has its own column (``host_peak_bytes``).

    Args:
        metrics: the record's ``metrics``. info: the record's ``info`` (None: treated as CPU).
    """
    if (info or {}).get("device") == "cuda":
        return metrics.get("peak_cuda_allocated_bytes") or None
    return metrics.get("peak_rss_bytes")


def resident_bytes(load: dict[str, Any], info: dict[str, Any] | None = None) -> int | None:
    """The memory the loaded model holds (bytes) on the device it runs on: on a CUDA record
    (``info["device"] == "cuda"``) what torch's allocator gained over the load
    (``model_resident_cuda_allocated_bytes``), or None (shown "-") when missing or 0; on CPU the
    host RSS the load added (``model_resident_bytes``). The same rule as ``peak_bytes``: a CUDA
    model's host RSS is the libraries and the CUDA context, not the model.

    Args:
        load: the record's ``load``. info: the record's ``info`` (None: treated as CPU).
    """
    if (info or {}).get("device") == "cuda":
        return load.get("model_resident_cuda_allocated_bytes") or None
    return load.get("model_resident_bytes")


def host_peak_bytes(metrics: dict[str, Any]) -> int | None:
    """Peak resident memory of the worker process (``peak_rss_bytes``), on any device."""
    return metrics.get("peak_rss_bytes")


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
        resident = resident_bytes(load, info)
        if resident is not None:
            row.resident_mb = Cellval(resident / MB, digits=0)
        row.load_s = Cellval(load.get("load_s"), digits=2)
        if record["workload"] == "latency" and record["params"] == shape:
            row.ttft_ms = _stat(metrics, "ttft_ms")
            row.decode_tok_s = _stat(metrics, "decode_tok_s")
            row.prefill_tok_s = _stat(metrics, "prefill_tok_s")
            peak = peak_bytes(metrics, info)
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

        peak, host = peak_bytes(m, r.get("info")), host_peak_bytes(m)
        working = m.get("working_peak_rss_bytes")
        kv = m.get("kv_cache_bytes")
        roof = decode_roofline(r)
        rows.append([r["label"], str(p["n_in"]), str(p["n_out"]), str(p["batch"]),
                     med_p90("ttft_ms"), med_p90("tpot_ms", 2), med_p90("itl_ms", 2),
                     med_p90("prefill_tok_s"), med_p90("decode_tok_s"), med_p90("e2e_ms"),
                     f"{peak / MB:.0f}" if peak else "-", f"{host / MB:.0f}" if host else "-",
                     f"{working / MB:.1f}" if working is not None else "-",
                     f"{kv / MB:.2f}" if kv else "-",
                     f"{roof['pct_of_roofline']:.1f}% of {roof['roofline_tok_s']:.1f}" if roof else "-"])
    return rows


# "peak MB": the device peak (peak_bytes: CUDA allocator peak on a CUDA record, "-" if none; process
# RSS on CPU); "host RSS MB": the process's peak RSS on any device; "working MB": host RSS peak - RSS at the
# cell's start; "decode % roofline": decode tok/s as % of the bandwidth roofline's tok/s
# (reports.roofline.decode_roofline)
LATENCY_COLUMNS = ["backend", "n_in", "n_out", "batch", "TTFT ms", "TPOT ms", "ITL ms",
                   "prefill tok/s", "decode tok/s", "e2e ms", "peak MB", "host RSS MB", "working MB", "KV MB",
                   "decode % of roofline tok/s"]


def kv_context_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """KV-cache MB after prefill per backend and batch size (rows) and prompt length (columns),
    then bytes per cached token and the compression against the unquantized reference at the
    longest length. From latency records reporting ``kv_cache_bytes_prefill``; empty when fewer
    than two lengths were run.

    Rows are keyed by (label, batch), so a batch-4 cell never overwrites the batch-1 one. Bytes
    per token divide by the cached positions the backend reports (``kv_cache_tokens_prefill``,
    summed over the batch), else by ``batch x n_in``. The reference is ``kvq:fp16`` if run, else
    ``hf:fp32``, at the same batch size; the header names its KV dtype (``info.kv_cache``: fp32 on
    CPU, where ``kvq:fp16`` keeps the cache in the model dtype).
    """
    cells: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    dtypes: dict[str, str] = {}
    for r in records:
        if r["status"] == "ok" and r["workload"] == "latency" and r["metrics"].get("kv_cache_bytes_prefill"):
            batch = int(r["params"].get("batch", 1))
            cells.setdefault((r["label"], batch), {})[r["params"]["n_in"]] = r["metrics"]
            kv_info = (r.get("info") or {}).get("kv_cache") or {}
            dtype = kv_info.get("full_precision_dtype") or kv_info.get("dtype")
            if dtype:
                dtypes.setdefault(r["label"], str(dtype))
    lengths = sorted({n for by_len in cells.values() for n in by_len})
    if len(lengths) < 2:
        return [], []
    labels = {label for label, _ in cells}
    reference = next((label for label in ("kvq:fp16", "hf:fp32") if label in labels), None)
    ref_name = f"{reference} ({dtypes[reference]} KV)" if reference in dtypes else str(reference)
    header = (["backend", "batch"] + [f"n_in={n}" for n in lengths]
              + ["bytes/token", f"vs {ref_name}, same batch"])
    rows = []
    for (label, batch), by_len in cells.items():
        longest = max(by_len)
        metrics = by_len[longest]
        tokens = metrics.get("kv_cache_tokens_prefill") or batch * longest
        ref = (cells.get((reference, batch)) or {}).get(longest)
        ratio = ref["kv_cache_bytes_prefill"] / metrics["kv_cache_bytes_prefill"] if ref else None
        rows.append([label, str(batch)]
                    + [f"{by_len[n]['kv_cache_bytes_prefill'] / MB:.2f}" if n in by_len else "-" for n in lengths]
                    + [f"{metrics['kv_cache_bytes_prefill'] / tokens:,.0f}", f"{ratio:.2f}x" if ratio else "-"])
    return header, rows
