"""The latency workload: identical token-exact prompts for every backend, timed per token.

Protocol (llama-bench / optimum-benchmark style): prompts are cut from the WikiText-2 test text at
exactly ``n_in`` tokens (token ids are handed to backends directly, so no re-tokenization can
change the count); every generation is greedy with ``min_new_tokens = max_new_tokens = n_out``, so
every backend produces the same number of tokens. ``warmup`` untimed runs, then ``repetitions``
timed ones; each metric is summarised over repetitions (``workloads.metrics.summarize``).
``samples.token_ids`` keeps the generated tokens of the first timed repetition (``[batch][n_out]``),
from which the runner adds ``metrics.generation_agreement`` with the baseline's
(``workloads.agreement.generation_agreement``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.memory import PeakMemorySampler
from workloads.base import Metric, Progress, Workload, WorkloadError, WorkloadParams, WorkloadResult, param
from workloads.data import WIKITEXT2_FILE, wikitext2_token_ids
from workloads.metrics import generation_timings, inter_token_latencies_ms, summarize

TIMING_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms", "prefill_tok_s", "decode_tok_s")


@dataclass
class LatencyParams(WorkloadParams):
    """``n_in`` prompt tokens, ``n_out`` generated tokens, ``batch`` sequences per call."""

    n_in: int = param(128, "prompt tokens; a list sweeps the context length", "--input-lens",
                      "--context-lengths", sweep=True, cli_default=[128, 512])
    n_out: int = param(64, "new tokens", "--output-len")
    batch: int = param(1, "sequences per call", "--batch-sizes", sweep=True)
    # one full-length untimed run, as llama-bench's single warm-up: a second one changed no
    # backend's timed runs beyond this machine's drift (docs/metrics.md, "Warm-up")
    warmup: int = param(1, "untimed runs per cell", "--warmup", minimum=0)
    repetitions: int = param(5, "timed runs per cell", "--repetitions")


def build_prompts(corpus_ids, n_in: int, batch: int) -> list[list[int]]:
    """``batch`` prompts of exactly ``n_in`` tokens, consecutive slices of ``corpus_ids`` starting
    at token ``n_in`` (deterministic, and different lengths start at the same place).

    Raises:
        WorkloadError: the corpus is shorter than the prompts need.
    """
    start = n_in
    needed = start + n_in * batch
    if len(corpus_ids) < needed:
        raise WorkloadError(f"prompt text too short: {len(corpus_ids)} tokens < {needed} needed")
    return [list(corpus_ids[start + i * n_in : start + (i + 1) * n_in]) for i in range(batch)]


class LatencyWorkload(Workload):
    name = "latency"
    description = "TTFT, TPOT, ITL, prefill/decode tokens/s, end-to-end latency, peak memory"
    Params = LatencyParams
    data_files = (WIKITEXT2_FILE,)
    metrics = (
        Metric("ttft_ms", "ms", "lower", "time to first token"),
        Metric("tpot_ms", "ms", "lower", "time per output token after the first"),
        Metric("itl_ms", "ms", "lower", "inter-token latency"),
        Metric("e2e_ms", "ms", "lower", "end-to-end latency of one generation"),
        Metric("prefill_tok_s", "tok/s", "higher", "batch x n_in / TTFT"),
        Metric("decode_tok_s", "tok/s", "higher", "batch x (n_out - 1) / (e2e - TTFT)"),
        Metric("peak_rss_bytes", "bytes", "lower", "peak resident memory of the worker process"),
        Metric("working_peak_rss_bytes", "bytes", "lower",
               "inference working memory: peak RSS during the cell minus RSS at its start"),
        Metric("kv_cache_bytes", "bytes", "lower", "KV cache at the end of generation"),
    )

    @classmethod
    def cell_id(cls, params: LatencyParams) -> str:
        return f"latency-in{params.n_in}-out{params.n_out}-b{params.batch}"

    @classmethod
    def report_section(cls, records: list[dict[str, Any]], out_dir: Path) -> list[str]:
        """Every latency shape, and KV-cache MB against context length."""
        from reports.markdown import md_table
        from reports.table import LATENCY_COLUMNS, kv_context_table, latency_rows

        parts: list[str] = []
        rows = latency_rows(records)
        if rows:
            parts += ["## Latency, every shape", "",
                      "median (p90). working MB: peak RSS during the cell minus RSS at its start. Decode "
                      "% of roofline: decode tok/s over B x bandwidth / (weight bytes + KV bytes at the "
                      "mean decode position) (docs/metrics.md).", "", md_table(LATENCY_COLUMNS, rows)]
        kv_header, kv_rows = kv_context_table(records)
        if kv_rows:
            parts += ["", "## KV-cache MB vs context length", "",
                      "MB the KV cache holds right after prefill of n_in tokens (payload, scales, residual); "
                      "bytes per cached token and the compression at the longest prompt.", "",
                      md_table(kv_header, kv_rows)]
        return parts

    def sequence_footprint(self) -> tuple[int, int]:
        """Prompt plus new tokens, ``batch`` sequences."""
        return self.params.n_in + self.params.n_out, self.params.batch

    def run(self, backend, tokenizer, progress: Progress) -> WorkloadResult:
        p: LatencyParams = self.params
        if min(p.n_in, p.n_out, p.batch, p.repetitions) < 1 or p.warmup < 0:
            raise WorkloadError("latency needs n_in, n_out, batch, repetitions >= 1 and warmup >= 0")
        prompts = build_prompts(wikitext2_token_ids(tokenizer), p.n_in, p.batch)
        total = p.warmup + p.repetitions
        runs, itl, extras = [], [], []
        with PeakMemorySampler() as sampler:
            for index in range(total):
                out = backend.generate(prompts, p.n_out, min_new_tokens=p.n_out)
                progress(index + 1, total)
                if index < p.warmup:
                    continue
                lengths = {len(t) for t in out.token_ids}
                if lengths != {p.n_out} or out.n_steps != p.n_out:
                    raise WorkloadError(
                        f"{backend.label} produced {sorted(lengths)} tokens / {out.n_steps} steps, "
                        f"not exactly {p.n_out}"
                    )
                runs.append(generation_timings(out.start_s, out.step_times_s, p.n_in, p.batch))
                itl.extend(inter_token_latencies_ms(out.step_times_s))
                extras.append({"steps_ms": [(t - out.start_s) * 1e3 for t in out.step_times_s], **out.extra})
                if len(runs) == 1:  # the greedy tokens, for agreement with the baseline's (same prompts)
                    token_ids = [list(map(int, row)) for row in out.token_ids]
        metrics = {key: summarize([r[key] for r in runs]) for key in TIMING_KEYS}
        metrics["itl_ms"] = summarize(itl)
        memory = {**sampler.result(), **backend.memory()}
        metrics.update({f"{key}_bytes": value for key, value in memory.items()})
        kv = [e["kv_cache_bytes"] for e in extras if "kv_cache_bytes" in e]
        if kv:
            metrics["kv_cache_bytes"] = max(kv)
            for key in ("kv_cache_bytes_prefill", "kv_cache_tokens_prefill", "kv_cache_bytes_fp16_analytic",
                        "kv_cache_tokens", "kv_cache_reserved_bytes"):
                if key in extras[-1]:
                    metrics[key] = extras[-1][key]
        return WorkloadResult(metrics, {"runs": runs, "generations": extras, "token_ids": token_ids})
