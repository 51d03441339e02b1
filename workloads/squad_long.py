"""Passage retrieval QA at depth (``squad-long``): a SQuAD v2.0 paragraph hidden in WikiText-2 filler.

Protocol (the "needle in a haystack" test of Kamradt 2023 and RULER, Hsieh et al. 2024,
arXiv:2404.06654, with a SQuAD paragraph as the needle and its question as the probe):

- Questions: ``n`` answerable SQuAD v2.0 dev questions (retrieval is the point, so no NoAns),
  drawn with ``seed`` from those whose paragraph is at most ``max_paragraph`` tokens; the same
  questions in every (length, depth) cell.
- Prompt: ``workloads.squad.build_prompt`` (same instruction, chat template, question at the end)
  with the context replaced by the haystack, built at token level by ``build_haystack``: filler is
  consecutive WikiText-2 test tokens from a seeded per-question start (snapped to the token after
  a newline; the same filler at every depth of one length), and the paragraph's tokens
  (``"\\n" + paragraph + "\\n"``) are inserted whole after ``round(depth% x filler tokens)`` filler
  tokens. The prompt is exactly ``length`` tokens; filler fills what the template, paragraph and
  question leave.
- One cell = one (length, depth); every prompt of a cell has the same length, so batches carry no
  padding. A length whose prompt plus the ``MAX_NEW_TOKENS`` answer exceeds the model's
  ``max_position_embeddings`` is refused (the cell fails with that one-line reason in its record);
  nothing is clipped.
- Generation and scoring as ``squad``: greedy, at most 32 new tokens, stopping at end of turn or a
  newline; EM / F1 by the official SQuAD v2.0 normalisation (``squad_scoring.score_prediction``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backends.models import max_context_tokens
from workloads.base import (BEYOND_CONTEXT, Metric, Progress, Workload, WorkloadError, WorkloadParams, WorkloadResult,
                            param, refuse_beyond_context)
from workloads.data import SQUAD_GLOB, WIKITEXT2_FILE, wikitext2_token_ids
from workloads.squad import (MAX_NEW_TOKENS, PROMPT_VERSION, SquadQuestion, build_prompt, clean_output, load_squad,
                             stop_token_ids)
from workloads.squad_scoring import aggregate, is_empty_output, score_prediction

CONTEXT_SLOT = "\x00HAYSTACK\x00"  # stands for the context in the rendered prompt, split out again
REFUSED = BEYOND_CONTEXT  # the phrase that marks a refused length in a failed record


@dataclass
class SquadLongParams(WorkloadParams):
    """One cell: prompt ``length`` (tokens) x paragraph ``depth`` (percent of the filler before it);
    ``--long-lengths`` and ``--long-depths`` are sweeps, so the grid is their cross product."""

    length: int = param(1024, "total prompt tokens (filler fills what the paragraph and question leave)",
                        "--long-lengths", sweep=True, cli_default=[1024, 2048, 4096])
    depth: int = param(50, "where the paragraph starts, in percent of the filler tokens (0 = first, 100 = "
                       "just before the question)", "--long-depths", sweep=True, minimum=0,
                       cli_default=[0, 25, 50, 75, 100])
    n: int = param(8, "answerable questions per (length, depth) cell", "--long-n")
    max_paragraph: int = param(256, "draw questions only from paragraphs of at most this many tokens",
                               "--long-max-paragraph")
    batch_size: int = param(8, "questions per generate call", "--long-batch")
    seed: int = param(0, "question and filler seed", "--long-seed", minimum=0)


@dataclass(frozen=True)
class Haystack:
    """One prompt as token ids.

    Attributes:
        token_ids: the whole prompt (template prefix, haystack, question suffix), ``int`` ids.
        paragraph_start: index in ``token_ids`` of the paragraph's first token.
        paragraph_len: tokens of the paragraph segment (contiguous from ``paragraph_start``).
        filler_before, filler_after: filler tokens before and after the paragraph.
    """

    token_ids: tuple[int, ...]
    paragraph_start: int
    paragraph_len: int
    filler_before: int
    filler_after: int

    @property
    def filler_tokens(self) -> int:
        return self.filler_before + self.filler_after

    @property
    def depth_pct(self) -> float:
        """Where the paragraph actually starts, in percent of the filler (100 with no filler)."""
        return 100.0 * self.filler_before / self.filler_tokens if self.filler_tokens else 100.0


def build_haystack(prefix: Sequence[int], paragraph: Sequence[int], suffix: Sequence[int], filler: Sequence[int],
                   length: int, depth_pct: float) -> Haystack:
    """``prefix + filler[:k] + paragraph + filler[k:m] + suffix``, exactly ``length`` tokens, with
    ``m = length - len(prefix) - len(paragraph) - len(suffix)`` filler tokens and
    ``k = round(depth_pct / 100 * m)`` (Python's round: half to even), so the paragraph starts within
    half a filler token of the stated depth and is never cut.

    Args:
        prefix, paragraph, suffix: token ids (the prompt before the context, the paragraph segment,
            the prompt after the context).
        filler: consecutive filler token ids, at least ``m`` of them (the first ``m`` are used).
        length: total tokens of the prompt.
        depth_pct: 0..100.

    Raises:
        WorkloadError: depth outside 0..100, a length too short for the paragraph and question, or
            too little filler.
    """
    if not 0 <= depth_pct <= 100:
        raise WorkloadError(f"squad-long depth must be in 0..100 percent, got {depth_pct}")
    room = length - len(prefix) - len(paragraph) - len(suffix)
    if room < 0:
        raise WorkloadError(f"squad-long length {length} is too short: the paragraph and question alone take "
                            f"{length - room} tokens")
    if len(filler) < room:
        raise WorkloadError(f"squad-long needs {room} filler tokens, got {len(filler)}")
    before = round(depth_pct / 100 * room)
    ids = (*prefix, *filler[:before], *paragraph, *filler[before:room], *suffix)
    return Haystack(tuple(int(i) for i in ids), len(prefix) + before, len(paragraph), before, room - before)


def check_context(length: int, context: int | None) -> None:
    """Refuse a prompt of ``length`` tokens whose ``MAX_NEW_TOKENS`` answer would not fit in ``context``.

    Raises:
        WorkloadError: ``length + MAX_NEW_TOKENS > context`` (the message contains ``REFUSED``).
    """
    refuse_beyond_context(f"squad-long length {length} (+{MAX_NEW_TOKENS} answer tokens)", length + MAX_NEW_TOKENS,
                          context)


def prompt_parts(tokenizer, q: SquadQuestion) -> tuple[list[int], list[int], list[int]]:
    """Token ids of (the prompt before the context, the paragraph segment ``"\\n" + context + "\\n"``,
    the prompt after the context: question, end of turn, assistant header), from ``build_prompt``
    (0-shot) so the model is asked exactly as in ``squad``. Each part is tokenized on its own,
    without special tokens added (the template's own are in the text)."""
    text = build_prompt(tokenizer, SquadQuestion(q.qid, q.title, CONTEXT_SLOT, q.question, q.answers), [])
    before, after = text.split(CONTEXT_SLOT)

    def ids(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    return ids(before), ids(f"\n{q.context}\n"), ids(after)


def sample_questions(questions: Sequence[SquadQuestion], tokenizer, n: int, max_paragraph: int,
                     seed: int) -> list[SquadQuestion]:
    """``n`` answerable questions whose paragraph has at most ``max_paragraph`` tokens, seeded, in
    dataset order.

    Raises:
        WorkloadError: fewer than ``n`` such questions.
    """
    lengths: dict[str, int] = {}
    pool = []
    for q in questions:
        if not q.has_answer:
            continue
        if q.context not in lengths:
            lengths[q.context] = len(tokenizer(q.context, add_special_tokens=False)["input_ids"])
        if lengths[q.context] <= max_paragraph:
            pool.append(q)
    if n > len(pool):
        raise WorkloadError(f"--long-n {n} exceeds the {len(pool)} answerable questions with paragraphs of at most "
                            f"{max_paragraph} tokens")
    chosen = np.random.default_rng(seed).choice(len(pool), n, replace=False)
    return [pool[i] for i in sorted(int(i) for i in chosen)]


def filler_start(wiki: Sequence[int], tokenizer, qid: str, seed: int, need: int) -> int:
    """A seeded start (per question, the same at every depth and length) in ``wiki`` for ``need``
    consecutive filler tokens, moved forward to just after a token containing a newline, so the
    filler begins at a line start.

    Raises:
        WorkloadError: the text holds fewer than ``need`` tokens.
    """
    if need >= len(wiki):
        raise WorkloadError(f"squad-long needs {need} filler tokens; WikiText-2 test has {len(wiki)}")
    rng = np.random.default_rng([seed, int(hashlib.sha256(qid.encode()).hexdigest()[:8], 16)])
    start = int(rng.integers(0, len(wiki) - need))
    for i in range(start, len(wiki) - need):
        if "\n" in tokenizer.decode([wiki[i]]):
            return i + 1
    return start


class SquadLongWorkload(Workload):
    """Passage retrieval QA at one (length, depth): the protocol is the module docstring's.

    Raises (from ``run``):
        WorkloadError: a length beyond the model's context or too short for a paragraph and its
            question, too few questions, or missing data (one line each).
    """

    name = "squad-long"
    description = "passage retrieval QA: a SQuAD paragraph at a set depth in WikiText-2 filler; EM / F1"
    needs_quality = True
    Params = SquadLongParams
    data_files = (SQUAD_GLOB, WIKITEXT2_FILE)
    metrics = (
        Metric("exact_pct", "%", "higher", "exact match (official SQuAD normalisation), answerable questions"),
        Metric("f1_pct", "%", "higher", "token F1 (official SQuAD normalisation)"),
        Metric("empty_outputs", "outputs", "lower", "outputs with no answer text"),
    )

    @classmethod
    def check(cls, params: SquadLongParams) -> None:
        if not 0 <= params.depth <= 100:
            raise WorkloadError(f"--long-depths values must be in 0..100 percent, got {params.depth}")

    @classmethod
    def cell_id(cls, params: SquadLongParams) -> str:
        return f"squad-long-L{params.length}-d{params.depth}-n{params.n}"

    def sequence_footprint(self) -> tuple[int, int]:
        """``length`` prompt tokens and a short answer, ``batch_size`` questions at once."""
        return self.params.length + 64, self.params.batch_size

    def run(self, backend, tokenizer, progress: Progress) -> WorkloadResult:
        p: SquadLongParams = self.params
        self.check(p)
        context = max_context_tokens(getattr(backend, "spec", None))
        check_context(p.length, context)
        sample = sample_questions(load_squad(), tokenizer, p.n, p.max_paragraph, p.seed)
        wiki = wikitext2_token_ids(tokenizer)
        stacks = []
        for q in sample:
            prefix, paragraph, suffix = prompt_parts(tokenizer, q)
            room = max(p.length - len(prefix) - len(paragraph) - len(suffix), 0)
            start = filler_start(wiki, tokenizer, q.qid, p.seed, room)
            stacks.append(build_haystack(prefix, paragraph, suffix, wiki[start:start + room], p.length, p.depth))
        stops = stop_token_ids(tokenizer)
        outputs: list[str] = []
        for begin in range(0, len(stacks), p.batch_size):
            chunk = stacks[begin:begin + p.batch_size]
            out = backend.generate([list(s.token_ids) for s in chunk], MAX_NEW_TOKENS, stop_token_ids=stops)
            outputs += [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out.token_ids]
            progress(len(outputs), len(stacks))
        rows = []
        for q, stack, output in zip(sample, stacks, outputs):
            answer = clean_output(output)
            em, f1 = score_prediction(q.answers, answer)
            rows.append({"id": q.qid, "has_answer": True, "output": output, "answer": answer,
                         "empty": is_empty_output(answer), "em": em, "f1": f1,
                         "paragraph_start": stack.paragraph_start, "paragraph_tokens": stack.paragraph_len,
                         "filler_tokens": stack.filler_tokens, "depth_actual_pct": stack.depth_pct})
        agg = aggregate(rows)
        metrics = {key: agg[key] for key in ("exact_pct", "f1_pct", "exact_pct_ci95", "f1_pct_ci95", "total",
                                             "empty_outputs")}
        metrics.update(length_tokens=p.length, depth_pct=p.depth, model_context_tokens=context,
                       depth_actual_pct_mean=float(np.mean([s.depth_pct for s in stacks])),
                       filler_tokens_mean=float(np.mean([s.filler_tokens for s in stacks])),
                       prompt_version=PROMPT_VERSION, seed=p.seed,
                       chat_template=bool(getattr(tokenizer, "chat_template", None)))
        return WorkloadResult(metrics, {"predictions": rows})

    @classmethod
    def report_section(cls, records: list[dict[str, Any]], out_dir: Path) -> list[str]:
        from reports.squad_long import squad_long_section

        return squad_long_section([r for r in records if r["workload"] == cls.name], out_dir, REFUSED)
