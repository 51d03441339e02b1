"""Token-level perplexity on the WikiText-2 raw test split, sliding-window protocol.

Protocol: the transformers guide "Perplexity of fixed-length models"
(https://huggingface.co/docs/transformers/perplexity). The whole test text is tokenized once
(no special tokens); windows of ``context`` tokens start every ``stride`` tokens; each window
scores only the tokens the previous window did not (its first ``context - stride`` tokens are
context), so every token after the first is scored exactly once, with up to ``context - 1``
tokens of history. ``max_eval_tokens`` keeps a prefix of the token stream (0 = all ~305k tokens).
PPL = exp(mean NLL over all scored tokens), with its standard error (``harness.metrics.perplexity``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backends.base import ScoringWindow
from harness.metrics import perplexity
from workloads.base import Progress, Workload, WorkloadError, WorkloadParams, WorkloadResult
from workloads.data import wikitext2_token_ids


@dataclass
class WikiTextParams(WorkloadParams):
    context: int = 1024
    stride: int = 512
    max_eval_tokens: int = 8192


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


