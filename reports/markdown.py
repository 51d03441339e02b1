"""The markdown report: tables, method notes, environment and plots, ready for a write-up.

Rendered from records alone (``python -m harness report results.jsonl`` re-renders it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typing import Callable, Sequence

from reports.baseline import RELATIVE_COLUMNS, baseline_label, relative_cells, relative_rows
from reports.plots import plot_all
from reports.sanity import FLAG, mark, sanity_flags
from reports.table import MB, SummaryRow, headline_latency, summary_rows

# A workload's report section: (records, output folder) -> markdown lines (empty: no section).
Section = Callable[[list[dict[str, Any]], Path], list[str]]

METHOD_NOTES = """\
- Latency: identical token-exact prompts cut from the WikiText-2 test text; greedy decoding with
  exactly `n_out` new tokens for every backend; warm-up runs are discarded. TTFT = first token -
  start; TPOT = (e2e - TTFT)/(n_out - 1); ITL = gaps between consecutive tokens; prefill tok/s =
  batch x n_in / TTFT; decode tok/s = batch x (n_out - 1)/(e2e - TTFT). Values are medians over
  repetitions with their standard deviation (±) or p90 (in parentheses). Exact definitions and
  sources: `docs/metrics.md`.
- Peak memory: process RSS sampled every 5 ms on CPU (the whole process: Python, libraries, and
  memory the allocator kept from loading, e.g. the full-precision weights a quantizing loader
  read first); `torch.cuda.max_memory_allocated` on CUDA.
- Perplexity: token-level, exp(mean NLL) over every scored token, sliding-window protocol of the
  transformers "Perplexity of fixed-length models" guide; ± is the standard error (delta method).
- Weight MB: parameters and buffers as stored, quantized tensors at their packed size with their
  scales. Load s: from the prepared checkpoint on disk to the first generated token (weights
  resident), timed the same way for every backend; one-time conversions, exports and
  compilations are listed separately below.
"""


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def without_empty_columns(header: list[str], rows: list[list[str]], keep: int = 1) -> tuple[list[str], list[list[str]]]:
    """``header`` and ``rows`` less the columns (after the first ``keep``) that no row fills (every
    cell "-" or empty): a quality-only study's summary shows no empty speed columns."""
    used = [i for i in range(len(header))
            if i < keep or any(row[i] not in ("-", "") for row in rows)]
    return [header[i] for i in used], [[row[i] for i in used] for row in rows]


def _first(records: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in records if r.get(key)), None)


def _preparation_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One-time costs each backend variant reported (``load.prepare``): seconds and sizes, and
    whether its artifact cache was hit; ``checkpoint_s`` is the shared checkpoint conversion;
    ``*peak*_bytes`` the memory a preparation step added at its peak; and the peak RSS while
    loading (``load.load_peak_rss_bytes``)."""
    seen, rows = set(), []
    for r in records:
        prepare = (r.get("load") or {}).get("prepare") or {}
        if r["label"] in seen or not prepare:
            continue
        seen.add(r["label"])
        parts = []
        for key, value in prepare.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if "bytes" in key:
                parts.append(f"{key} {value / MB:.1f} MB")
            elif key.endswith("_s"):
                parts.append(f"{key} {value:.2f}")
        if prepare.get("cache_hit") is not None:
            parts.append("cache hit" if prepare["cache_hit"] else "built now")
        load_peak = (r.get("load") or {}).get("load_peak_rss_bytes")
        if isinstance(load_peak, (int, float)):  # quantize-on-load engines (bnb) prepare here
            parts.append(f"peak RSS while loading {load_peak / MB:.1f} MB")
        if parts:
            rows.append([r["label"], ", ".join(parts)])
    return rows


def _info_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    seen, rows = set(), []
    for r in records:
        info = r.get("info") or {}
        if r["label"] in seen or not info:
            continue
        seen.add(r["label"])
        kv = info.get("kv_cache") or {}
        quant = info.get("quantization") or {}
        # which weight matrices are quantized / kept (backends' weight_groups), so weight MB
        # compares like with like (e.g. embedding and lm_head quantized by mlc, fp32 in bnb)
        groups = ("; ".join(f"{key}: {', '.join(quant[key]) or 'none'}" for key in ("quantized", "kept")
                            if isinstance(quant.get(key), list)) or "-")
        rows.append([r["label"], str(info.get("device", "-")), str(info.get("threads", "-")),
                     str(info.get("compute_dtype", "-")), str(info.get("attn_implementation", "-")),
                     json.dumps(kv, sort_keys=True) if kv else "-",
                     json.dumps(quant.get("config") or quant.get("format", "-")), groups])
    return rows


def _relative_section(records: list[dict[str, Any]], baseline: str | None, flags: dict[str, list[str]]) -> list[str]:
    """The table the summary leads with: every row against the baseline (``reports.baseline``)."""
    if baseline is None:
        return ["No baseline row in these results (`--baseline LABEL`; default `hf:fp32` on CPU, "
                "`hf:fp16` on CUDA), so no relative columns.", ""]
    rows = relative_rows(records, baseline)
    cells = []
    for row in rows:
        line = relative_cells(row)
        if row.label in flags:
            line[0] += f" {FLAG}"
        cells.append(line)
    return [f"Relative to the baseline **`{baseline}`**: speed ratios at the headline shape (x > 1: faster), "
            "bytes saved (weights as stored; model-resident memory on the model's device), perplexity change paired over the "
            "same scored tokens with a block-bootstrap 95% CI and p-value, KL divergence and top-1 agreement "
            "with the baseline's distributions, greedy-token agreement and first divergent token (FDT) on the "
            "latency prompts, decode rate as % of the memory-bandwidth roofline (`docs/metrics.md`); "
            "columns no row has are left out.", "",
            md_table(*without_empty_columns(RELATIVE_COLUMNS, cells)), ""]


def render_report(records: list[dict[str, Any]], out_dir: Path, title: str = "quantarena report",
                  sections: Sequence[Section] = (), baseline: str | None = None) -> Path:
    """Write ``report.md`` (and PNG figures with their CSVs beside it) into ``out_dir``; returns
    the report path.

    Args:
        records: schema-2 records (``reports.records``).
        sections: each workload's ``report_section``, rendered in order after the summary.
        baseline: the label rows are compared with (default: ``reports.baseline.baseline_label``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline = baseline_label(records, baseline)
    flags = sanity_flags(records, baseline)
    relative = _relative_section(records, baseline, flags)
    records = mark(records, flags)  # every table and figure below shows the flag beside the label
    rows: list[SummaryRow] = summary_rows(records)
    model = _first(records, "model") or {}
    env = _first(records, "env") or {}
    shape = headline_latency([r for r in records if r["status"] == "ok"])
    parts = [f"# {title}", ""]
    parts.append(f"Model: **{model.get('name', '?')}** ({model.get('source', '?')}"
                 + (f", upstream `{model['hub_id']}`" if model.get("hub_id") else "") + ")")
    for note in model.get("notes", []):
        parts.append(f"\n> Note: {note}.")
    parts += ["", "## Summary", ""]
    if shape:
        parts.append(f"Latency columns at n_in={shape['n_in']}, n_out={shape['n_out']}, "
                     f"batch={shape['batch']}; median ± standard deviation over repetitions.\n")
    parts += relative + ["Absolute values:", ""]
    parts.append(md_table(*without_empty_columns(list(SummaryRow.COLUMNS), [r.cells() for r in rows])))
    if flags:
        parts += ["", f"### Sanity flags ({FLAG})", "", "Thresholds: `docs/metrics.md`, \"Sanity flags\".", ""]
        parts += [f"- `{label}`: " + "; ".join(reasons) for label, reasons in flags.items()]
    for section in sections:
        lines = section(records, out_dir)
        if lines:
            parts += [""] + lines
    prep = _preparation_rows(records)
    if prep:
        parts += ["", "## One-time preparation costs", "", md_table(["backend", "reported"], prep)]
    info = _info_rows(records)
    if info:
        parts += ["", "## Backend configuration", "",
                  md_table(["backend", "device", "threads", "compute", "attention", "KV cache", "quantization",
                            "weights quantized / kept"], info)]
    failures = [r for r in records if r["status"] != "ok"]
    if failures:
        parts += ["", "## Failures", ""]
        parts += [f"- `{r['label']}` / {r['workload']}: {r['error']}" for r in failures]
    figures = plot_all(records, out_dir)
    if figures:
        parts += ["", "## Figures", ""]
        for figure in figures:
            parts += [f"### {figure.title}", "", f"![{figure.title}]({figure.png.name})", "",
                      f"Data: [{figure.csv.name}]({figure.csv.name})", ""]
    parts += ["", "## Method", "", METHOD_NOTES, "## Environment", ""]
    parts += [f"- CPU: {env.get('cpu')} ({env.get('cores_physical')} physical cores), RAM "
              f"{(env.get('ram_bytes') or 0) / 2**30:.1f} GiB",
              f"- GPU: {', '.join(g['name'] + ' (driver ' + g['driver'] + ')' for g in env.get('gpus', [])) or 'none'}",
              f"- Python {env.get('python')}; " + ", ".join(f"{k} {v}" for k, v in (env.get('packages') or {}).items()),
              f"- quantarena commit {env.get('git_commit')}; run {_first(records, 'run_id')}"]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
