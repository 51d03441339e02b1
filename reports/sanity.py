"""Sanity flags: a row whose numbers say something is broken is marked in every table, with the
reason, so a broken format cannot be reported as "quality maintained".

Thresholds (documented in docs/metrics.md, "Sanity flags"):

- perplexity more than ``PPL_RATIO`` x the baseline's, or above ``PPL_ABSOLUTE`` whatever the
  baseline (a trained model's WikiText-2 perplexity is tens; 16,813 has been published as
  "maintained");
- mean KL divergence from the baseline above ``KLD_MEAN`` nats, or top-1 agreement below
  ``TOP1_PCT`` percent (llama.cpp's 2-bit formats on 7B models stay near 0.1-0.3 nats and 80-90 %);
- greedy generation degenerate: one token is more than ``REPEAT_SHARE`` of a sequence's tokens
  (with at least ``REPEAT_MIN_TOKENS`` generated; not on random-weight models, which loop by design);
- a speed figure is an outlier against its own repetitions: a timed run's TTFT or decode rate
  more than ``SPREAD`` away from the median of the runs (relative) and more than
  ``SPREAD_MIN_S`` away in time (TTFT, or the decode time behind the rate: millisecond jitter
  on a tiny model is not a finding), with at least 3 runs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

PPL_RATIO = 1.5
PPL_ABSOLUTE = 1000.0
KLD_MEAN = 1.0
TOP1_PCT = 50.0
REPEAT_SHARE = 0.5
REPEAT_MIN_TOKENS = 8
SPREAD = 0.5
SPREAD_MIN_S = 0.050
FLAG = "⚠"


def _ppl(record: dict[str, Any], base_ppl: float | None) -> list[str]:
    ppl = record["metrics"].get("ppl")
    if ppl is None:
        return []
    if ppl > PPL_ABSOLUTE:
        return [f"perplexity {ppl:,.1f} > {PPL_ABSOLUTE:,.0f}"]
    if base_ppl and ppl > PPL_RATIO * base_ppl:
        return [f"perplexity {ppl:.2f} is {ppl / base_ppl:.1f}x the baseline's {base_ppl:.2f}"]
    return []


def _agreement(record: dict[str, Any]) -> list[str]:
    a = record["metrics"].get("agreement") or {}
    flags = []
    if a.get("kld_mean") is not None and a["kld_mean"] > KLD_MEAN:
        flags.append(f"mean KLD {a['kld_mean']:.2f} nats > {KLD_MEAN}")
    if a.get("top1_pct") is not None and a["top1_pct"] < TOP1_PCT:
        flags.append(f"top-1 agreement {a['top1_pct']:.1f}% < {TOP1_PCT:.0f}%")
    return flags


def degenerate(tokens: list[int]) -> str | None:
    """Why a generated sequence is degenerate (one token is most of it), or None."""
    if len(tokens) < REPEAT_MIN_TOKENS:
        return None
    token, count = Counter(tokens).most_common(1)[0]
    if count > REPEAT_SHARE * len(tokens):
        return f"generation degenerate: token {token} is {count} of {len(tokens)} tokens"
    return None


def _generation(record: dict[str, Any]) -> list[str]:
    if (record.get("model") or {}).get("source") == "random":
        return []  # random weights generate noise or loops by design: nothing to flag
    sequences = (record.get("samples") or {}).get("token_ids") or []
    reasons = {reason for reason in map(degenerate, sequences) if reason}
    return sorted(reasons)[:1]


def _seconds(key: str, value: float, params: dict[str, Any]) -> float:
    """The run's time behind a speed figure: TTFT itself, or the decode time behind a decode rate."""
    if key == "ttft_ms":
        return value / 1e3
    return params.get("batch", 1) * (params["n_out"] - 1) / value if value else 0.0


def _spread(record: dict[str, Any]) -> list[str]:
    runs = (record.get("samples") or {}).get("runs") or []
    if len(runs) < 3:
        return []
    flags, params = [], record["params"]
    for key, name in (("ttft_ms", "TTFT"), ("decode_tok_s", "decode tok/s")):
        values = sorted(run[key] for run in runs if run.get(key) is not None)
        if len(values) < 3:
            continue
        median = float(np.median(values))
        worst = max(values, key=lambda v: abs(v - median))
        late = abs(_seconds(key, worst, params) - _seconds(key, median, params))
        if median and abs(worst - median) > SPREAD * median and late > SPREAD_MIN_S:
            flags.append(f"{name} outlier: a run at {worst:.1f} vs median {median:.1f} "
                         f"(n_in={params['n_in']}, batch={params.get('batch', 1)})")
    return flags


def sanity_flags(records: list[dict[str, Any]], baseline: str | None) -> dict[str, list[str]]:
    """Reasons per label (labels without a problem are absent), from the ok records."""
    base_ppl = next((r["metrics"].get("ppl") for r in records if r["status"] == "ok"
                     and r["label"] == baseline and r["workload"] == "wikitext2"), None)
    flags: dict[str, list[str]] = {}
    for r in records:
        if r["status"] != "ok":
            continue
        found: list[str] = []
        if r["workload"] == "wikitext2":
            found += _ppl(r, None if r["label"] == baseline else base_ppl) + _agreement(r)
        elif r["workload"] == "latency":
            found += _generation(r) + _spread(r)
        for reason in found:
            if reason not in flags.setdefault(r["label"], []):
                flags[r["label"]].append(reason)
    return {label: reasons for label, reasons in flags.items() if reasons}


def mark(records: list[dict[str, Any]], flags: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Copies of ``records`` whose flagged labels end in ``⚠``: every table and figure drawn from
    them shows the flag."""
    return [{**r, "label": f"{r['label']} {FLAG}"} if r["label"] in flags else r for r in records]
