"""The markdown report: tables, method notes, environment and plots, ready for a write-up.

Rendered from records alone (``python -m harness report results.jsonl`` re-renders it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reports.plots import plot_all
from reports.squad import squad_section
from reports.table import (LATENCY_COLUMNS, MB, SummaryRow, headline_latency, kv_context_table, latency_rows,
                           summary_rows)

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
  scales. Load s: from checkpoint on disk to a model ready to generate (one-time conversions,
  exports and compilations are listed separately below).
"""


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _first(records: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in records if r.get(key)), None)


def _preparation_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One-time costs each backend reported in its load report: seconds (``*_s``) and sizes
    (``*bytes*``); ``checkpoint_prepare_s`` is the one-time conversion of the checkpoint itself
    (shared by every backend, cached)."""
    seen, rows = set(), []
    for r in records:
        load = r.get("load") or {}
        if r["label"] in seen or not load:
            continue
        seen.add(r["label"])
        parts = []
        for key, value in load.items():
            if key in ("load_s", "weight_bytes") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if "bytes" in key:
                parts.append(f"{key} {value / MB:.1f} MB")
            elif key.endswith("_s"):
                parts.append(f"{key} {value:.2f}")
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
        rows.append([r["label"], str(info.get("device", "-")), str(info.get("threads", "-")),
                     str(info.get("compute_dtype", "-")), str(info.get("attn_implementation", "-")),
                     json.dumps(kv, sort_keys=True) if kv else "-",
                     json.dumps((info.get("quantization") or {}).get("config") or
                                (info.get("quantization") or {}).get("format", "-"))])
    return rows


def render_report(records: list[dict[str, Any]], out_dir: Path, title: str = "quantarena report") -> Path:
    """Write ``report.md`` (and PNG plots beside it) into ``out_dir``; returns the report path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    parts.append(_md_table(list(SummaryRow.COLUMNS), [r.cells() for r in rows]))
    latency = latency_rows(records)
    if latency:
        parts += ["", "## Latency, every shape", "", "median (p90)", "", _md_table(LATENCY_COLUMNS, latency)]
    kv_header, kv_rows = kv_context_table(records)
    if kv_rows:
        parts += ["", "## KV-cache MB vs context length", "",
                  "MB the KV cache holds right after prefill of n_in tokens (payload, scales, residual); "
                  "bytes per cached token and the compression at the longest prompt.", "",
                  _md_table(kv_header, kv_rows)]
    ppl = [r for r in records if r["workload"] == "wikitext2" and r["status"] == "ok"]
    if ppl:
        parts += ["", "## Perplexity (WikiText-2 raw, test)", ""]
        parts.append(_md_table(["backend", "PPL", "SE", "95% CI", "tokens", "protocol"], [
            [r["label"], f"{r['metrics']['ppl']:.3f}", f"{r['metrics']['ppl_se']:.3f}",
             "{:.3f} - {:.3f}".format(*r["metrics"]["ppl_ci95"]), str(r["metrics"]["n_tokens"]),
             r["metrics"]["protocol"]] for r in ppl]))
    header, squad_rows, base, example = squad_section(records)
    if squad_rows:
        first = next(r for r in records if r["workload"] == "squad" and r["status"] == "ok")["metrics"]
        parts += ["", "## SQuAD v2.0 (generative QA)", "",
                  f"Official v2.0 scoring (x100). Prompt `{first['prompt_version']}`, {first['shots']}-shot, "
                  f"seed {first['seed']}, chat template: {'yes' if first['chat_template'] else 'no'}. "
                  f"Agreement: share of questions whose normalised answer equals {base}'s.", "",
                  _md_table(header, squad_rows), "", "<details><summary>Example prompt</summary>", "",
                  "```text", example or "", "```", "", "</details>"]
    prep = _preparation_rows(records)
    if prep:
        parts += ["", "## One-time preparation costs", "", _md_table(["backend", "reported"], prep)]
    info = _info_rows(records)
    if info:
        parts += ["", "## Backend configuration", "",
                  _md_table(["backend", "device", "threads", "compute", "attention", "KV cache", "quantization"], info)]
    failures = [r for r in records if r["status"] != "ok"]
    if failures:
        parts += ["", "## Failures", ""]
        parts += [f"- `{r['label']}` / {r['workload']}: {r['error']}" for r in failures]
    plots = plot_all(rows, records, out_dir)
    if plots:
        parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    parts += ["", "## Method", "", METHOD_NOTES, "## Environment", ""]
    parts += [f"- CPU: {env.get('cpu')} ({env.get('cores_physical')} physical cores), RAM "
              f"{(env.get('ram_bytes') or 0) / 2**30:.1f} GiB",
              f"- GPU: {', '.join(g['name'] + ' (driver ' + g['driver'] + ')' for g in env.get('gpus', [])) or 'none'}",
              f"- Python {env.get('python')}; " + ", ".join(f"{k} {v}" for k, v in (env.get('packages') or {}).items()),
              f"- quantarena commit {env.get('git_commit')}; run {_first(records, 'run_id')}"]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
