"""SQuAD v2.0 generative question answering on any backend, through the common ``generate``.

Data: the official JSON format from ``$HARNESS_DATA_DIR/squad_v2/*.json``, or the Hub's
``rajpurkar/squad_v2`` validation split through ``datasets`` (both give the same records).
Sample: ``n`` questions drawn with a seeded generator, stratified so HasAns and NoAns keep their
dataset proportion, identical for every backend. Prompt: ``PROMPT_VERSION`` below, zero-shot by
default, ``shots`` worked examples from other articles; the model's chat template when it has one.
Greedy, at most 32 new tokens, stopping at end of turn or a newline. Scoring: ``squad_scoring``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workloads.base import Metric, Progress, Workload, WorkloadError, WorkloadParams, WorkloadResult, param
from workloads.data import ENV_VAR, SQUAD_GLOB, data_dir
from workloads.squad_scoring import (ABSTAIN_WORD, aggregate, is_empty_output, normalize_answer, prediction_answer,
                                     score_prediction)

PROMPT_VERSION = "squad-v2-prompt-1"
INSTRUCTION = (
    "Answer the question with a short span copied from the context. If the context does not "
    f"contain the answer, reply with the single word \"{ABSTAIN_WORD}\"."
)
QUESTION_TEMPLATE = "Context: {context}\nQuestion: {question}"
ANSWER_PREFIX = "Answer:"
MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class SquadQuestion:
    qid: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]

    @property
    def has_answer(self) -> bool:
        return bool(self.answers)


@dataclass
class SquadParams(WorkloadParams):
    n: int = param(200, "questions, stratified HasAns/NoAns", "--squad-n")
    shots: int = param(0, "worked examples per prompt", "--squad-shots", minimum=0)
    batch_size: int = param(8, "questions per generate call", "--squad-batch")
    seed: int = param(0, "sampling seed", "--squad-seed", minimum=0)


def _field(obj: Any, key: str, where: str, path: Path, kind: type):
    if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], kind):
        raise WorkloadError(f"malformed SQuAD file {path}: {where} lacks field '{key}' ({kind.__name__})")
    return obj[key]


def parse_squad_file(path: Path) -> list[SquadQuestion]:
    """Questions of one official-format SQuAD v2.0 JSON file, in file order.

    Raises:
        WorkloadError: not JSON, or a missing / mistyped field (names the file and the field).
    """
    try:
        root = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkloadError(f"malformed SQuAD file {path}: {type(exc).__name__}") from None
    questions = []
    for a, article in enumerate(_field(root, "data", "the top level", path, list)):
        title = _field(article, "title", f"data[{a}]", path, str)
        for p, paragraph in enumerate(_field(article, "paragraphs", f"data[{a}]", path, list)):
            where = f"data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", where, path, str)
            for q, qa in enumerate(_field(paragraph, "qas", where, path, list)):
                qwhere = f"{where}.qas[{q}]"
                answers = _field(qa, "answers", qwhere, path, list)
                texts = tuple(_field(ans, "text", f"{qwhere}.answers[{i}]", path, str)
                              for i, ans in enumerate(answers))
                if qa.get("is_impossible", False):
                    texts = ()
                questions.append(SquadQuestion(str(_field(qa, "id", qwhere, path, str)), title, context,
                                               _field(qa, "question", qwhere, path, str), texts))
    return questions


def load_squad() -> list[SquadQuestion]:
    """All SQuAD v2.0 dev questions available (local copy first, then the Hub).

    Raises:
        WorkloadError: no local file and no Hub access, or a malformed file.
    """
    local = data_dir()
    if local is not None:
        files = sorted(local.glob(SQUAD_GLOB))
        if not files:
            raise WorkloadError(f"SQuAD v2.0 not found: no {local / SQUAD_GLOB}")
        return [q for f in files for q in parse_squad_file(f)]
    try:
        import datasets

        rows = datasets.load_dataset("rajpurkar/squad_v2", split="validation")
    except Exception as exc:
        raise WorkloadError(f"SQuAD v2.0 unavailable: set {ENV_VAR} to a local copy, or allow Hub "
                            f"access ({type(exc).__name__})") from None
    return [SquadQuestion(r["id"], r["title"], r["context"], r["question"], tuple(r["answers"]["text"]))
            for r in rows]


def stratified_sample(questions: list[SquadQuestion], n: int, seed: int) -> list[SquadQuestion]:
    """``n`` questions, HasAns/NoAns in their dataset proportion (rounded), seeded, in dataset order.

    Raises:
        WorkloadError: ``n`` < 1 or more than the dataset holds.
    """
    if not 0 < n <= len(questions):
        raise WorkloadError(f"--squad-n must be in 1..{len(questions)}, got {n}")
    has = [i for i, q in enumerate(questions) if q.has_answer]
    no = [i for i, q in enumerate(questions) if not q.has_answer]
    n_no = int(round(n * len(no) / len(questions)))
    n_no = min(max(n_no, 1 if no and n > 1 else 0), len(no))
    n_has = min(n - n_no, len(has))
    rng = np.random.default_rng(seed)
    chosen = list(rng.choice(has, n_has, replace=False)) + list(rng.choice(no, n - n_has, replace=False))
    return [questions[i] for i in sorted(int(i) for i in chosen)]


def few_shot_examples(pool: list[SquadQuestion], question: SquadQuestion, k: int, seed: int) -> list[SquadQuestion]:
    """``k`` worked examples from articles other than the question's, alternating answerable and
    unanswerable where possible, chosen by a generator seeded per question (reproducible)."""
    if k == 0:
        return []
    others = [q for q in pool if q.title != question.title]
    rng = np.random.default_rng([seed, int(hashlib.sha256(question.qid.encode()).hexdigest()[:8], 16)])
    has = [others[i] for i in rng.permutation(len(others)) if others[i].has_answer]
    no = [q for q in others if not q.has_answer]
    no = [no[i] for i in rng.permutation(len(no))]
    picked = []
    for i in range(k):
        source = has if (i % 2 == 0 or not no) else no
        picked.append(source.pop(0))
    return picked


def user_message(q: SquadQuestion) -> str:
    return QUESTION_TEMPLATE.format(context=q.context, question=q.question)


def reference_answer(q: SquadQuestion) -> str:
    return q.answers[0] if q.answers else ABSTAIN_WORD


def build_prompt(tokenizer, q: SquadQuestion, shots: list[SquadQuestion]) -> str:
    """The prompt text: the chat template with the instruction as system message and each shot as
    a user/assistant turn, or plain text ``Context/Question/Answer:`` blocks without a template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": INSTRUCTION}]
        for shot in shots:
            messages += [{"role": "user", "content": user_message(shot)},
                         {"role": "assistant", "content": reference_answer(shot)}]
        messages.append({"role": "user", "content": user_message(q)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    blocks = [INSTRUCTION] + [f"{user_message(s)}\n{ANSWER_PREFIX} {reference_answer(s)}" for s in shots]
    return "\n\n".join(blocks + [f"{user_message(q)}\n{ANSWER_PREFIX}"])


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-turn tokens and every vocabulary token that contains a newline."""
    stops = {tid for tid in (tokenizer.eos_token_id,) if tid is not None}
    for special in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            stops.add(tid)
    vocab = tokenizer.get_vocab()
    newline_ids = [tid for tid in vocab.values() if "\n" in tokenizer.decode([tid])]
    return sorted(stops | set(newline_ids))


def clean_output(text: str) -> str:
    """The answer part of a generation: up to the first newline, without an ``Answer:`` prefix."""
    text = text.split("\n", 1)[0].strip()
    if text.lower().startswith(ANSWER_PREFIX.lower()):
        text = text[len(ANSWER_PREFIX):].strip()
    return text


class SquadWorkload(Workload):
    name = "squad"
    description = "SQuAD v2.0 generative QA: EM / F1, HasAns F1, NoAns accuracy"
    needs_quality = True
    Params = SquadParams
    data_files = (SQUAD_GLOB,)
    metrics = (
        Metric("exact_pct", "%", "higher", "exact match (official SQuAD v2.0 normalisation)"),
        Metric("f1_pct", "%", "higher", "token F1"),
        Metric("HasAns_f1_pct", "%", "higher", "F1 on answerable questions"),
        Metric("NoAns_accuracy_pct", "%", "higher",
               f"explicit abstentions (\"{ABSTAIN_WORD}\") on unanswerable questions; an empty output is wrong"),
        Metric("empty_outputs", "outputs", "lower", "outputs with no answer text (e.g. stopped at a leading newline)"),
    )

    @classmethod
    def cell_id(cls, params: SquadParams) -> str:
        return f"squad-n{params.n}-k{params.shots}"

    @classmethod
    def report_section(cls, records: list[dict[str, Any]], out_dir: Path) -> list[str]:
        from reports.markdown import md_table
        from reports.squad import squad_section

        header, rows, base, example = squad_section(records)
        if not rows:
            return []
        ok = [r for r in records if r["workload"] == cls.name and r["status"] == "ok"]
        first = ok[0]["metrics"]
        empty = ", ".join(f"{r['label']} {r['metrics']['empty_outputs']}/{r['metrics']['total']}"
                          if "empty_outputs" in r["metrics"] else f"{r['label']} not recorded" for r in ok)
        return ["## SQuAD v2.0 (generative QA)", "",
                f"Official v2.0 scoring (x100). Prompt `{first['prompt_version']}`, {first['shots']}-shot, "
                f"seed {first['seed']}, chat template: {'yes' if first['chat_template'] else 'no'}. "
                f"Agreement: share of questions whose normalised answer equals {base}'s.", "",
                f"Only the explicit \"{ABSTAIN_WORD}\" counts as an abstention (NoAns credit); an empty "
                f"output (no answer text, e.g. generation stopped at a leading newline) is scored wrong on "
                f"every question. Empty outputs: {empty}.", "",
                md_table(header, rows), "", "<details><summary>Example prompt</summary>", "",
                "```text", example or "", "```", "", "</details>"]

    def sequence_footprint(self) -> tuple[int, int]:
        """An estimate: SQuAD v2.0 dev paragraphs with their question fit in 1024 tokens (the
        longest of the shared part is about 800 with the SmolLM2 tokenizer), one per shot plus
        the question's own, ``batch_size`` at once."""
        return 1024 * (self.params.shots + 1), self.params.batch_size

    def run(self, backend, tokenizer, progress: Progress) -> WorkloadResult:
        p: SquadParams = self.params
        if p.shots < 0 or p.batch_size < 1:
            raise WorkloadError("--squad-shots must be >= 0 and --squad-batch >= 1")
        pool = load_squad()
        sample = stratified_sample(pool, p.n, p.seed)
        prompts = [build_prompt(tokenizer, q, few_shot_examples(pool, q, p.shots, p.seed)) for q in sample]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
        stops = stop_token_ids(tokenizer)
        # batches of similar length waste less compute on padding; results are mapped back by index
        order = sorted(range(len(sample)), key=lambda i: len(ids[i]))
        outputs: dict[int, str] = {}
        for start in range(0, len(order), p.batch_size):
            chunk = order[start:start + p.batch_size]
            out = backend.generate([ids[i] for i in chunk], MAX_NEW_TOKENS, stop_token_ids=stops)
            for i, tokens in zip(chunk, out.token_ids):
                outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)
            progress(min(start + p.batch_size, len(order)), len(order))
        rows = []
        for i, q in enumerate(sample):
            answer = clean_output(outputs[i])
            em, f1 = score_prediction(q.answers, answer)
            empty = is_empty_output(answer)
            # normalized: the answer as scored ("" = the abstention); None = an empty output, which is
            # no answer at all, so it never agrees with an abstention
            rows.append({"id": q.qid, "has_answer": q.has_answer,
                         "prompt_sha256": hashlib.sha256(prompts[i].encode()).hexdigest()[:16],
                         "output": outputs[i], "answer": answer,
                         "normalized": None if empty else normalize_answer(prediction_answer(answer)),
                         "empty": empty, "em": em, "f1": f1})
        metrics = aggregate(rows)
        metrics.update(prompt_version=PROMPT_VERSION, shots=p.shots, seed=p.seed,
                       prompt_example=prompts[0], chat_template=bool(getattr(tokenizer, "chat_template", None)))
        return WorkloadResult(metrics, {"predictions": rows})
