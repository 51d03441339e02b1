"""SQuAD v2.0 scoring, exactly as the official evaluation script (``evaluate-v2.0.py``,
https://rajpurkar.github.io/SQuAD-explorer/) does it, plus bootstrap confidence intervals.

- ``normalize_answer``: lowercase, strip punctuation, drop the articles a/an/the, collapse
  whitespace.
- EM and token-F1 are the max over the gold answers; an unanswerable question's only gold answer
  is the empty string, so it scores 1 exactly when the prediction normalises to empty.
- A prediction of "unanswerable" (any case, any surrounding punctuation) counts as the empty
  answer (our prompt asks for that word instead of an empty string).
- Deviation from the official script: only that explicit abstention counts as "no answer". An
  output that normalises to empty (nothing generated before the first newline, or only
  punctuation / articles) is not an abstention: it scores 0 on every question, NoAns included,
  and is counted (``empty_outputs``). In the official script, written for extractive systems, an
  empty prediction is how a system abstains; a generative model that stops at a leading newline
  has not abstained, and crediting it would reward broken generation on NoAns.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np

ABSTAIN_WORD = "unanswerable"
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Official SQuAD normalisation: lower, remove punctuation, articles and extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def is_abstention(text: str) -> bool:
    """The output is the explicit abstention the prompt asks for ("unanswerable", any case and
    surrounding punctuation)."""
    return normalize_answer(text) == ABSTAIN_WORD


def is_empty_output(text: str) -> bool:
    """The output normalises to nothing (no answer text at all); never an abstention."""
    return normalize_answer(text) == ""


def prediction_answer(text: str) -> str:
    """The answer a model's output stands for: "unanswerable" -> "", otherwise the text itself."""
    return "" if is_abstention(text) else text


def get_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def compute_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def compute_f1(gold: str, pred: str) -> float:
    """Token-overlap F1; if either side is empty, F1 is 1 when both are empty, else 0."""
    gold_toks, pred_toks = get_tokens(gold), get_tokens(pred)
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: Sequence[str]) -> list[str]:
    """The official rule: gold answers that normalise to non-empty; none -> ``[""]``."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def score_prediction(answers: Sequence[str], output_text: str) -> tuple[int, float]:
    """(EM, F1) of one model output against one question's answers (max over golds).

    An empty output (``is_empty_output``) scores (0, 0.0) whatever the question: only the explicit
    abstention earns credit on an unanswerable question (see the module docstring)."""
    if is_empty_output(output_text):
        return 0, 0.0
    pred = prediction_answer(output_text)
    golds = gold_answers(answers)
    return max(compute_exact(g, pred) for g in golds), max(compute_f1(g, pred) for g in golds)


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95% CI of the mean (x100, as SQuAD reports percentages)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)
    return [float(np.percentile(means, 2.5) * 100), float(np.percentile(means, 97.5) * 100)]


def aggregate(rows: Sequence[dict]) -> dict:
    """Overall EM/F1, HasAns EM/F1, NoAns accuracy (x100) with counts and bootstrap 95% CIs, and
    ``empty_outputs``: how many outputs were empty (scored wrong, never as abstentions).

    ``rows``: dicts with ``em``, ``f1``, ``has_answer`` and (optional, default false) ``empty``.
    """
    has = [r for r in rows if r["has_answer"]]
    no = [r for r in rows if not r["has_answer"]]

    def mean(values):
        return float(np.mean(values) * 100) if values else float("nan")

    return {
        "exact_pct": mean([r["em"] for r in rows]),
        "f1_pct": mean([r["f1"] for r in rows]),
        "exact_pct_ci95": bootstrap_ci([r["em"] for r in rows]),
        "f1_pct_ci95": bootstrap_ci([r["f1"] for r in rows]),
        "total": len(rows),
        "HasAns_exact_pct": mean([r["em"] for r in has]),
        "HasAns_f1_pct": mean([r["f1"] for r in has]),
        "HasAns_f1_pct_ci95": bootstrap_ci([r["f1"] for r in has]),
        "HasAns_total": len(has),
        "NoAns_accuracy_pct": mean([r["em"] for r in no]),
        "NoAns_accuracy_pct_ci95": bootstrap_ci([r["em"] for r in no]),
        "NoAns_total": len(no),
        "empty_outputs": sum(bool(r.get("empty")) for r in rows),
    }
