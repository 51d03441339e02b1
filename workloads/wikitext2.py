"""Token-level perplexity on the WikiText-2 raw test split, sliding-window protocol.

Protocol: the transformers guide "Perplexity of fixed-length models"
(https://huggingface.co/docs/transformers/perplexity). The whole test text is tokenized once
(no special tokens); windows of ``context`` tokens start every ``stride`` tokens; each window
scores only the tokens the previous window did not (its first ``context - stride`` tokens are
context), so every token after the first is scored exactly once, with up to ``context - 1``
tokens of history. ``max_eval_tokens`` keeps a prefix of the token stream (0 = all ~305k tokens).
PPL = exp(mean NLL over all scored tokens), with its standard error (``workloads.metrics.perplexity``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import ScoringWindow
from workloads.base import Metric, Progress, Workload, WorkloadError, WorkloadParams, WorkloadResult, param
from workloads.data import WIKITEXT2_FILE, wikitext2_token_ids
from workloads.metrics import perplexity


@dataclass
class WikiTextParams(WorkloadParams):
    context: int = param(1024, "window tokens", "--ppl-context")
    stride: int = param(512, "stride tokens", "--ppl-stride")
    max_eval_tokens: int = param(8192, "score this many leading tokens; 0 = the whole split",
                                 "--max-eval-tokens", minimum=0)


def sliding_windows(token_ids, context: int, stride: int) -> list[ScoringWindow]:
    """The guide's windows over ``token_ids``: ``[begin, min(begin + context, n))`` every ``stride``
    tokens, each scoring the tokens after the previous window's end.

    Raises:
        WorkloadError: ``stride`` not in ``1..context`` or fewer than two tokens.
    """
    if not 0 < stride <= context:
        raise WorkloadError(f"perplexity needs 0 < stride <= context (got {stride}, {context})")
    if len(token_ids) < 2:
        raise WorkloadError("perplexity needs at least two tokens")
    windows, previous_end = [], 0
    for begin in range(0, len(token_ids), stride):
        end = min(begin + context, len(token_ids))
        window = tuple(token_ids[begin:end])
        windows.append(ScoringWindow(window, n_context=len(window) - (end - previous_end)))
        previous_end = end
        if end == len(token_ids):
            break
    return windows


class WikiText2Workload(Workload):
    name = "wikitext2"
    description = "token-level perplexity on WikiText-2 (sliding window)"
    needs_quality = True
    Params = WikiTextParams
    data_files = (WIKITEXT2_FILE,)
    metrics = (Metric("ppl", "", "lower", "token-level perplexity, exp(mean NLL)"),)

    @classmethod
    def check(cls, params: WikiTextParams) -> None:
        if params.stride > params.context:
            raise WorkloadError(f"--ppl-stride {params.stride} must be <= --ppl-context {params.context}")

    @classmethod
    def report_section(cls, records: list[dict[str, Any]], out_dir: Path) -> list[str]:
        from reports.markdown import md_table

        ppl = [r for r in records if r["workload"] == cls.name and r["status"] == "ok"]
        if not ppl:
            return []
        return ["## Perplexity (WikiText-2 raw, test)", "", md_table(
            ["backend", "PPL", "SE", "95% CI", "tokens", "protocol"],
            [[r["label"], f"{r['metrics']['ppl']:.3f}", f"{r['metrics']['ppl_se']:.3f}",
              "{:.3f} - {:.3f}".format(*r["metrics"]["ppl_ci95"]), str(r["metrics"]["n_tokens"]),
              r["metrics"]["protocol"]] for r in ppl])]

    def run(self, backend, tokenizer, progress: Progress) -> WorkloadResult:
        p: WikiTextParams = self.params
        ids = wikitext2_token_ids(tokenizer)
        if p.max_eval_tokens:
            ids = ids[: p.max_eval_tokens]
        windows = sliding_windows(ids, p.context, p.stride)
        logprobs: list[np.ndarray] = []
        for index, window in enumerate(windows):
            (scores,) = backend.loglikelihood([window])
            if scores.shape != (window.n_scored,) or not np.all(np.isfinite(scores)):
                raise WorkloadError(f"{backend.label} returned bad scores for window {index}")
            logprobs.append(scores)
            progress(index + 1, len(windows))
        flat = np.concatenate(logprobs)
        metrics = perplexity(flat)
        metrics.update(n_windows=len(windows), protocol=f"sliding window, context {p.context}, "
                       f"stride {p.stride}, {len(ids)} tokens")
        samples = {"window_mean_nll": [float(-w.mean()) for w in logprobs]}
        return WorkloadResult(metrics, samples)


