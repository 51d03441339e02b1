"""Every row relative to the run's baseline: the numbers a write-up quotes ("INT8: 1.7x decode,
50 % less memory, +3 % perplexity (95 % CI ...), p = ...").

Drawn from records alone. The baseline is the label the run compared against (``--baseline``,
recorded in ``metrics.agreement.baseline``), else ``hf:fp16`` on CUDA / ``hf:fp32`` on CPU when
present; without one, no relative columns. Speed ratios compare the report's headline latency
shape (``reports.table.headline_latency``) of both rows; perplexity change is paired over the
same scored tokens (``reports.stats.paired_bootstrap_ppl`` on 128-token blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reports.roofline import decode_roofline
from reports.stats import BOOTSTRAP_SAMPLES, PairedResult, paired_bootstrap_ppl
from reports.table import headline_latency, resident_bytes


def baseline_label(records: list[dict[str, Any]], requested: str | None = None) -> str | None:
    """The label rows are compared with: ``requested`` if it has ok records; else the baseline the
    run recorded (``metrics.agreement.baseline``); else ``hf:fp16`` when any row ran on CUDA,
    ``hf:fp32`` otherwise, if present. None when there is no such row."""
    labels = {r["label"] for r in records if r["status"] == "ok"}
    if requested is not None:
        return requested if requested in labels else None
    recorded = next((((r.get("metrics") or {}).get("agreement") or {}).get("baseline") for r in records
                     if ((r.get("metrics") or {}).get("agreement") or {}).get("baseline")), None)
    if recorded in labels:
        return recorded
    cuda = any(str((r.get("info") or {}).get("device", "")).startswith("cuda") for r in records)
    default = "hf:fp16" if cuda else "hf:fp32"
    return default if default in labels else None


@dataclass
class RelativeRow:
    """One backend variant against the baseline. Ratios are ``x`` (>1: faster), savings are percent
    of the baseline's bytes (>0: smaller), ``ppl_change`` a fraction (0.03 = +3 %)."""

    label: str
    decode_x: float | None = None
    prefill_x: float | None = None
    ttft_x: float | None = None
    weight_saving_pct: float | None = None
    resident_saving_pct: float | None = None
    ppl_change: PairedResult | None = None
    agreement: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    roofline_pct: float | None = None


def _median(record: dict[str, Any] | None, key: str) -> float | None:
    if record is None:
        return None
    return ((record.get("metrics") or {}).get(key) or {}).get("median")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _saving(q: float | None, base: float | None) -> float | None:
    return 100.0 * (1.0 - q / base) if q is not None and base else None


def _blocks(record: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-block NLL sums and token counts of a wikitext2 record (the last block holds the rest)."""
    samples = record.get("samples") or {}
    sums, size = samples.get(key), samples.get("nll_block_tokens")
    n = (record.get("metrics") or {}).get("n_tokens")
    if not sums or not size or not n:
        return None
    tokens = np.full(len(sums), float(size))
    if n % size:
        tokens[-1] = n % size
    return np.asarray(sums, dtype=np.float64), tokens


def ppl_change(record: dict[str, Any], base: dict[str, Any]) -> PairedResult | None:
    """PPL(q)/PPL(base) - 1 with a paired block bootstrap, over the tokens both scored: the
    baseline's block sums recorded beside q's (``samples.base_nll_block_sums``: the same tokens,
    checked when they were stored), else the baseline record's own when its protocol and token
    count are the same. None without block data or with fewer than 2 blocks."""
    mine = _blocks(record, "nll_block_sums")
    theirs = _blocks(record, "base_nll_block_sums")
    if theirs is None and record["metrics"].get("protocol") == base["metrics"].get("protocol") \
            and record["metrics"].get("n_tokens") == base["metrics"].get("n_tokens"):
        theirs = _blocks(base, "nll_block_sums")
    if mine is None or theirs is None or len(mine[0]) != len(theirs[0]) or len(mine[0]) < 2:
        return None
    return paired_bootstrap_ppl(mine[0], theirs[0], mine[1])


def relative_rows(records: list[dict[str, Any]], baseline: str) -> list[RelativeRow]:
    """A ``RelativeRow`` per label with ok records (the baseline's own row included: 1.00x, 0 %)."""
    ok = [r for r in records if r["status"] == "ok"]
    shape = headline_latency(ok)
    by_label: dict[str, dict[str, dict[str, Any]]] = {}
    for r in ok:
        if r["workload"] == "latency" and r["params"] != shape:
            by_label.setdefault(r["label"], {})
            continue  # ratios compare the headline shape only
        by_label.setdefault(r["label"], {}).setdefault(r["workload"], r)
    base = by_label.get(baseline, {})
    rows = []
    for label, mine in by_label.items():
        row = RelativeRow(label)
        lat, base_lat = mine.get("latency"), base.get("latency")
        row.decode_x = _ratio(_median(lat, "decode_tok_s"), _median(base_lat, "decode_tok_s"))
        row.prefill_x = _ratio(_median(lat, "prefill_tok_s"), _median(base_lat, "prefill_tok_s"))
        row.ttft_x = _ratio(_median(base_lat, "ttft_ms"), _median(lat, "ttft_ms"))
        any_mine = next(iter(mine.values()), None) or next(r for r in ok if r["label"] == label)
        any_base = next(iter(base.values()), None) or next((r for r in ok if r["label"] == baseline), None)
        load, base_load = any_mine.get("load") or {}, (any_base or {}).get("load") or {}
        row.weight_saving_pct = _saving(load.get("weight_bytes"), base_load.get("weight_bytes"))
        row.resident_saving_pct = _saving(resident_bytes(load, any_mine.get("info")),
                                          resident_bytes(base_load, (any_base or {}).get("info")))
        if lat is not None:
            roofline = decode_roofline(lat)
            row.roofline_pct = roofline["pct_of_roofline"] if roofline else None
            row.generation = lat["metrics"].get("generation_agreement") or {}
        ppl, base_ppl = mine.get("wikitext2"), base.get("wikitext2")
        if ppl is not None:
            row.agreement = {k: v for k, v in (ppl["metrics"].get("agreement") or {}).items() if k.startswith(("kld", "top1", "rms"))}
            if base_ppl is not None:
                row.ppl_change = ppl_change(ppl, base_ppl) if label != baseline else PairedResult(0.0, (0.0, 0.0), 1.0, 0)
        rows.append(row)
    return rows


def format_p(p: float) -> str:
    """A p-value for a table; the smallest a 2,000-resample bootstrap can give, 1/2001, reads as
    "< 0.001" rather than a falsely exact 0.0005."""
    return "< 0.001" if p <= 1.0 / (BOOTSTRAP_SAMPLES + 1) else f"{p:.3g}"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) + suffix


RELATIVE_COLUMNS = ["backend", "decode x", "prefill x", "TTFT x", "weights saved", "model memory saved",
                    "PPL change (95% CI)", "p", "KLD mean ± SE", "KLD p99", "top-1 %", "same greedy tokens %",
                    "FDT", "decode % of roofline"]


def relative_cells(row: RelativeRow) -> list[str]:
    """The markdown cells of ``RELATIVE_COLUMNS`` for one row."""
    change = row.ppl_change
    if change is None:
        ppl, p = "-", "-"
    elif change.n == 0:
        ppl, p = "baseline", "-"
    else:
        ppl = "{:+.2f}% ({:+.2f} to {:+.2f})".format(100 * change.estimate, *(100 * c for c in change.ci95))
        p = format_p(change.p_value)
    a, g = row.agreement, row.generation
    kld = "-" if a.get("kld_mean") is None else (
        f"{a['kld_mean']:.4f}" + (f" ± {a['kld_mean_se']:.4f}" if a.get("kld_mean_se") is not None else ""))
    return [row.label, _fmt(row.decode_x, ".2f", "x"), _fmt(row.prefill_x, ".2f", "x"), _fmt(row.ttft_x, ".2f", "x"),
            _fmt(row.weight_saving_pct, ".1f", "%"), _fmt(row.resident_saving_pct, ".1f", "%"), ppl, p, kld,
            _fmt(a.get("kld_p99"), ".4f"), _fmt(a.get("top1_pct"), ".2f"), _fmt(g.get("identical_pct"), ".1f"),
            _fmt(g.get("fdt_mean"), ".1f"), _fmt(row.roofline_pct, ".1f", "%")]
