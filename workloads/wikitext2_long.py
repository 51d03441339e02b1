"""Long-context perplexity (``wikitext2-long``): perplexity of the last ``tail`` tokens of a long
context, scored through the backend's own KV cache settings.

Protocol (one cell = one context ``length``):

- ``segments`` segments of ``length`` tokens from the tokenized WikiText-2 raw test split
  (``workloads.data.wikitext2_token_ids``). Segment ``k`` **ends** at text token ``(k + 1) x
  anchor`` (``--ppl-long-anchor``, default 8192), so the scored tail is the same text at every
  length and only the amount of context before it changes; segments do not overlap while
  ``length <= anchor``. Where the tokenizer adds a BOS token to text
  (``workloads.wikitext2.adds_bos``; ``--ppl-long-bos no``: never), each segment is that BOS
  followed by the ``length - 1`` text tokens before its end, as every segment is an independent
  sequence; otherwise the ``length`` text tokens before its end.
- Only the last ``tail`` tokens of each segment are scored (``ScoringWindow`` with
  ``n_context = length - tail``), through ``Backend.loglikelihood``: what they see of the first
  ``length - tail`` tokens is what the backend's cache keeps (a sliding window / attention sink, a
  quantized KV cache), so a window that drops needed context shows up as a higher tail perplexity.
- PPL = exp(mean NLL) over all scored tail tokens, with its standard error
  (``workloads.metrics.perplexity``).
- A ``length`` beyond the model's ``max_position_embeddings`` is refused (the cell fails with a
  one-line reason); nothing is clipped. The model's context is recorded in ``model_context_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import ScoringWindow
from workloads.base import (BEYOND_CONTEXT, Metric, Progress, Workload, WorkloadError, WorkloadParams, WorkloadResult,
                            param, refuse_beyond_context)
from workloads.data import WIKITEXT2_FILE, wikitext2_token_ids
from workloads.metrics import perplexity
from backends.models import max_context_tokens
from workloads.wikitext2 import adds_bos

REFUSED = BEYOND_CONTEXT  # the phrase that marks a refused length in a failed record


@dataclass
class WikiTextLongParams(WorkloadParams):
    length: int = param(2048, "context length in tokens (each segment's length)", "--ppl-long-lengths",
                        sweep=True, minimum=2, cli_default=[1024, 2048, 4096])
    tail: int = param(512, "scored tokens at the end of each segment", "--ppl-long-tail")
    segments: int = param(1, "non-overlapping segments per length", "--ppl-long-segments")
    anchor: int = param(8192, "segment k ends at text token (k+1) x anchor, so every length scores the same "
                        "tail text; lengths up to anchor", "--ppl-long-anchor")
    bos: str = param("auto", "BOS first in each segment: auto = where the tokenizer adds one to text, no = never",
                     "--ppl-long-bos", choices=("auto", "no"))


def long_segments(token_ids, length: int, tail: int, segments: int, bos: int | None,
                  anchor: int) -> list[ScoringWindow]:
    """``segments`` windows of ``length`` tokens, window ``k`` made of the text tokens just before
    ``token_ids[(k + 1) * anchor]`` (``[bos]`` + ``length - 1`` of them when ``bos`` is given, else
    ``length``), each scoring its last ``tail`` tokens: the same tail text for every ``length``.

    Raises:
        WorkloadError: ``tail`` not in ``1..length - 1``, ``length`` above ``anchor``, or too few
            tokens for the segments.
    """
    if not 1 <= tail < length:
        raise WorkloadError(f"wikitext2-long needs 1 <= tail < length (got tail {tail}, length {length})")
    if length > anchor:
        raise WorkloadError(f"wikitext2-long length {length} exceeds --ppl-long-anchor {anchor}")
    text = length - (bos is not None)
    if len(token_ids) < anchor * segments:
        raise WorkloadError(f"wikitext2-long needs {anchor * segments} tokens for {segments} segments "
                            f"(anchor {anchor}), the split has {len(token_ids)}")
    windows = []
    for k in range(segments):
        end = (k + 1) * anchor
        body = [int(t) for t in token_ids[end - text:end]]
        windows.append(ScoringWindow(tuple(([bos] if bos is not None else []) + body), n_context=length - tail))
    return windows


def check_context(length: int, context: int | None) -> None:
    """Refuse a ``length`` the model was not built for (``workloads.base.refuse_beyond_context``).

    Raises:
        WorkloadError: ``length > context`` (the message contains ``REFUSED``).
    """
    refuse_beyond_context(f"wikitext2-long length {length}", length, context)


class WikiText2LongWorkload(Workload):
    name = "wikitext2-long"
    description = "perplexity of the last tokens of long WikiText-2 contexts, through the backend's KV cache"
    needs_quality = True
    Params = WikiTextLongParams
    data_files = (WIKITEXT2_FILE,)
    metrics = (Metric("ppl", "", "lower", "perplexity of the last `tail` tokens of each segment"),)

    @classmethod
    def check(cls, params: WikiTextLongParams) -> None:
        if not 1 <= params.tail < params.length:
            raise WorkloadError(f"--ppl-long-tail {params.tail} must be smaller than the length {params.length}")
        if params.length > params.anchor:
            raise WorkloadError(f"--ppl-long-lengths {params.length} exceeds --ppl-long-anchor {params.anchor}")

    @classmethod
    def cell_id(cls, params: WikiTextLongParams) -> str:
        return f"wikitext2-long-L{params.length}-t{params.tail}-s{params.segments}-a{params.anchor}"

    def sequence_footprint(self) -> tuple[int, int]:
        """One segment of ``length`` tokens."""
        return self.params.length, 1

    def run(self, backend, tokenizer, progress: Progress) -> WorkloadResult:
        p: WikiTextLongParams = self.params
        self.check(p)
        context = max_context_tokens(getattr(backend, "spec", None))
        check_context(p.length, context)
        bos = tokenizer.bos_token_id if p.bos == "auto" and adds_bos(tokenizer) else None
        windows = long_segments(wikitext2_token_ids(tokenizer), p.length, p.tail, p.segments, bos, p.anchor)
        logprobs = []
        for index, window in enumerate(windows):
            scores = backend.loglikelihood([window])[0]
            if scores.shape != (p.tail,) or not np.all(np.isfinite(scores)):
                raise WorkloadError(f"{backend.label} returned bad scores for segment {index}")
            logprobs.append(scores)
            progress(index + 1, len(windows))
        metrics = perplexity(np.concatenate(logprobs))
        metrics.update(length_tokens=p.length, tail_tokens=p.tail, segments=len(windows),
                       model_context_tokens=context, protocol=(
                           f"{len(windows)} segment(s) of {p.length} tokens ("
                           + ("BOS + " if bos is not None else "no BOS, ")
                           + f"the WikiText-2 test tokens before token (k+1) x {p.anchor}), last {p.tail} "
                           "scored through the cache"))
        return WorkloadResult(metrics, {"segment_mean_nll": [float(-s.mean()) for s in logprobs]})

    @classmethod
    def report_section(cls, records: list[dict[str, Any]], out_dir: Path) -> list[str]:
        """A table backend x context length of the tail perplexity (± its SE), the refused cells
        below it, and where a backend has two lengths the figure ``reports.wikitext2_long.
        tail_ppl_figure`` (PNG + CSV in ``out_dir``)."""
        from reports.markdown import md_table
        from reports.wikitext2_long import tail_ppl_figure

        mine = [r for r in records if r["workload"] == cls.name]
        ok = [r for r in mine if r["status"] == "ok"]
        if not ok:
            return []
        lengths = sorted({r["metrics"]["length_tokens"] for r in ok})
        cells: dict[str, dict[int, str]] = {}
        for r in ok:
            m = r["metrics"]
            cells.setdefault(r["label"], {})[m["length_tokens"]] = f"{m['ppl']:.3f} ± {m['ppl_se']:.3f}"
        refused = [r for r in mine if r["status"] != "ok" and REFUSED in str(r.get("error", ""))]
        tails = sorted({r["metrics"]["tail_tokens"] for r in ok})
        lines = ["## Long-context perplexity (WikiText-2 raw, test)", "",
                 f"Perplexity of the last {', '.join(map(str, tails))} tokens of each context, scored "
                 "through each backend's KV cache settings (sliding window, sink, KV precision; see the "
                 "backend configuration); each record's `metrics.protocol` gives its segments and BOS.", "",
                 md_table(["backend"] + [f"L={n}" for n in lengths],
                          [[label] + [row.get(n, "-") for n in lengths] for label, row in cells.items()])]
        if refused:
            lines += ["", f"Refused ({REFUSED}): " + ", ".join(sorted({f"{r['label']} {r['cell_id']}"
                                                                        for r in refused})) + "."]
        path = tail_ppl_figure(ok, Path(out_dir))
        if path is not None:
            data = path.with_suffix(".csv").name
            lines += ["", f"![tail perplexity vs context length]({path.name}) (data: [{data}]({data}))"]
        return lines
