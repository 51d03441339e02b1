"""Token-level perplexity on the WikiText-2 raw test split, by one of two protocols.

Protocol: the transformers guide "Perplexity of fixed-length models"
(https://huggingface.co/docs/transformers/perplexity). The whole test text is tokenized once, with
one BOS token in front where the tokenizer adds one to text (as the guide's ``tokenizer(text)`` call
does; ``--ppl-bos no``: none); windows of ``context`` tokens start every ``stride`` tokens; each window
scores only the tokens the previous window did not (its first ``context - stride`` tokens are
context), so every token after the first is scored exactly once, with up to ``context - 1``
tokens of history. ``max_eval_tokens`` keeps a prefix of the text's tokens (0 = all ~305k tokens).
PPL = exp(mean NLL over all scored tokens), with its standard error (``workloads.metrics.perplexity``).

``--ppl-protocol llamacpp`` is llama.cpp's ``llama-perplexity`` instead (``llamacpp_chunks``):
non-overlapping chunks, BOS first where the tokenizer adds one, the second half of each scored.

With a baseline in the run (``Workload.comparison``), the baseline's cell stores its distributions
and every other backend's cell adds ``metrics.agreement`` (KL divergence, top-1 agreement, RMS Δp,
ln PPL ratio; ``workloads.agreement``) over the same scored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import ScoringWindow
from workloads.agreement import (TOPK, BLOCK_TOKENS, BaselineStore, agreement_summary, block_sums,
                                  store_path)
from workloads.base import Metric, Progress, Workload, WorkloadError, WorkloadParams, WorkloadResult, param
from workloads.data import WIKITEXT2_FILE, wikitext2_token_ids
from workloads.metrics import perplexity


@dataclass
class WikiTextParams(WorkloadParams):
    context: int = param(1024, "window tokens", "--ppl-context")
    stride: int = param(512, "stride tokens", "--ppl-stride")
    max_eval_tokens: int = param(8192, "score this many leading tokens; 0 = the whole split",
                                 "--max-eval-tokens", minimum=0)
    protocol: str = param("hf-sliding", "perplexity protocol: the transformers guide's sliding window, or "
                          "llama.cpp's llama-perplexity chunks", "--ppl-protocol",
                          choices=("hf-sliding", "llamacpp"))
    bos: str = param("auto", "BOS token first: auto = where the tokenizer adds one to text (hf-sliding: one "
                     "BOS before the text; llamacpp: each chunk's first token), no = never", "--ppl-bos",
                     choices=("auto", "no"))
    kld_topk: int = param(TOPK, "tokens per position in the baseline's store: KL divergence over them plus one "
                          "rest bucket (a lower bound; larger k: closer to the exact KLD, 6k + 8 bytes a token)",
                          "--kld-topk")


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


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of text by default (as llama.cpp's
    ``llama_vocab_get_add_bos`` tells llama-perplexity)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def llamacpp_chunks(token_ids, context: int, bos: int | None) -> list[ScoringWindow]:
    """llama.cpp's ``llama-perplexity`` protocol (tools/perplexity/perplexity.cpp): non-overlapping
    chunks of ``context`` tokens (a trailing partial chunk is dropped), each chunk's first token
    replaced by ``bos`` when the tokenizer adds one, and only the tokens after position
    ``context // 2`` scored (positions ``context//2 + 1 .. context - 1``; llama.cpp's ``first``).

    Raises:
        WorkloadError: fewer than ``context`` tokens, or ``context`` < 4.
    """
    if context < 4 or len(token_ids) < context:
        raise WorkloadError(f"llama.cpp perplexity needs context >= 4 and at least {context} tokens "
                            f"(got {len(token_ids)})")
    windows = []
    for start in range(0, len(token_ids) - context + 1, context):
        chunk = list(token_ids[start:start + context])
        if bos is not None:
            chunk[0] = bos
        windows.append(ScoringWindow(tuple(chunk), n_context=context // 2 + 1))
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
        if params.protocol == "hf-sliding" and params.stride > params.context:
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

    def sequence_footprint(self) -> tuple[int, int]:
        """One window of ``context`` tokens."""
        return self.params.context, 1

    def run(self, backend, tokenizer, progress: Progress) -> WorkloadResult:
        p: WikiTextParams = self.params
        ids = wikitext2_token_ids(tokenizer)
        if p.max_eval_tokens:
            ids = ids[: p.max_eval_tokens]
        bos = tokenizer.bos_token_id if p.bos == "auto" and adds_bos(tokenizer) else None
        if p.protocol == "llamacpp":
            windows = llamacpp_chunks(ids, p.context, bos)
            protocol = (f"llama.cpp perplexity: {len(windows)} chunks of {p.context} tokens, "
                        + ("first token replaced by BOS" if bos is not None else self._no_bos())
                        + f", last {windows[0].n_scored} of each scored")
        else:
            windows = sliding_windows(([bos] if bos is not None else []) + list(ids), p.context, p.stride)
            protocol = (f"sliding window, context {p.context}, stride {p.stride}, {len(ids)} tokens, "
                        + ("BOS first" if bos is not None else self._no_bos()))
        targets = [np.asarray(w.token_ids[w.first_scored:]) for w in windows]
        writer, store, agreement = self._baseline(backend, targets)
        logprobs: list[np.ndarray] = []
        kld: list[np.ndarray] = []
        same_top: list[np.ndarray] = []
        for index, window in enumerate(windows):
            reference = store.window(index)[0] if store is not None else None
            score = backend.score_window(window, keep_topk=p.kld_topk if writer is not None else 0,
                                         reference=reference)
            scores = score.logprobs
            if scores.shape != (window.n_scored,) or not np.all(np.isfinite(scores)):
                raise WorkloadError(f"{backend.label} returned bad scores for window {index}")
            logprobs.append(scores)
            if writer is not None:
                writer.add(targets[index], scores, score.topk)
            if reference is not None:
                kld.append(score.kld)
                same_top.append(score.same_top)
            progress(index + 1, len(windows))
        flat = np.concatenate(logprobs)
        metrics = perplexity(flat)
        metrics.update(n_windows=len(windows), protocol=protocol)
        samples = {"window_mean_nll": [float(-w.mean()) for w in logprobs],
                   "nll_block_tokens": BLOCK_TOKENS, "nll_block_sums": block_sums(-flat)}
        if writer is not None:
            path = store_path(self.comparison.directory, backend.spec.name, self.comparison.baseline,
                              p.to_dict())
            size = writer.save(path, {"baseline": backend.label, "protocol": protocol, "topk": p.kld_topk,
                                        "params": p.to_dict(), "model": backend.spec.name})
            agreement.update(store=str(path.relative_to(self.comparison.directory)), store_bytes=size, topk=p.kld_topk)
        if store is not None:
            agreement.update(agreement_summary(np.concatenate(kld), np.concatenate(same_top), flat, store.logprobs),
                             topk=store.meta.get("topk"))
            samples["base_nll_block_sums"] = block_sums(-store.logprobs)
        if agreement:
            metrics["agreement"] = agreement
        return WorkloadResult(metrics, samples)

    def _no_bos(self) -> str:
        return "no BOS (--ppl-bos no)" if self.params.bos == "no" else "no BOS (the tokenizer adds none)"

    def _baseline(self, backend, targets: list[np.ndarray]):
        """(a ``BaselineStore`` to fill when this is the baseline, the baseline's store to compare
        with, the start of ``metrics.agreement``: the baseline's label or a note saying why there
        is no comparison)."""
        comparison = self.comparison
        if comparison is None:
            return None, None, {}
        if comparison.baseline is None:
            return None, None, {"note": comparison.note or "no baseline in this run"}
        agreement: dict = {"baseline": comparison.baseline}
        if comparison.is_baseline:
            return BaselineStore(), None, agreement
        path = store_path(comparison.directory, backend.spec.name, comparison.baseline, self.params.to_dict())
        try:
            store = BaselineStore.load(path)
        except FileNotFoundError:
            agreement["note"] = (f"no baseline distributions at {path.name}: the baseline's wikitext2 cell "
                                 "failed or did not run")
            return None, None, agreement
        if store.n_windows != len(targets) or not np.array_equal(store.targets, np.concatenate(targets)):
            agreement["note"] = f"the baseline's store {path.name} holds other tokens than this cell scores"
            return None, None, agreement
        return None, store, agreement
