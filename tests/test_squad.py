"""SQuAD v2.0: the scorer pinned against hand-worked cases, data loading errors, sampling, prompts."""

import json

import pytest

from backends.base import backend_class
from backends.models import load_tokenizer
from workloads.base import WorkloadError
from workloads.squad import (SquadParams, SquadQuestion, SquadWorkload, build_prompt, clean_output,
                             few_shot_examples, load_squad, parse_squad_file, stratified_sample)
from workloads.squad_scoring import (aggregate, compute_exact, compute_f1, is_empty_output, normalize_answer,
                                     score_prediction)


@pytest.mark.parametrize("raw,normalized", [
    ("The Eiffel Tower", "eiffel tower"),          # lowercase + article
    ("an apple, a pear!", "apple pear"),           # articles a/an + punctuation
    ("  Paris ,  France. ", "paris france"),       # whitespace collapsed
    ("theatre", "theatre"),                        # 'the' only as a word
    ("U.S.A.", "usa"),                             # punctuation inside tokens
])
def test_normalization_rules(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_and_f1_hand_worked():
    assert compute_exact("the Normans", "Normans") == 1
    # gold "in the 10th century" -> [in, 10th, century]; pred "10th century" -> 2 common
    # precision 2/2, recall 2/3 -> F1 = 0.8
    assert compute_f1("in the 10th century", "10th century") == pytest.approx(0.8)
    assert compute_f1("Normandy", "France") == 0.0


def test_max_over_multiple_gold_answers():
    em, f1 = score_prediction(["Denmark, Iceland and Norway", "Norway"], "Norway")
    assert (em, f1) == (1, 1.0)
    em, f1 = score_prediction(["10th and 11th centuries", "in the 10th and 11th centuries"], "11th centuries")
    assert em == 0 and f1 == pytest.approx(2 * (1 * 0.5) / 1.5)


def test_unanswerable_questions():
    assert score_prediction([], "unanswerable") == (1, 1.0)         # abstained correctly
    assert score_prediction([], "Unanswerable.") == (1, 1.0)        # any case, punctuation
    assert score_prediction([], "Paris") == (0, 0.0)                # answered an unanswerable one
    assert score_prediction([], "") == (0, 0.0)                     # empty output: not an abstention
    assert score_prediction(["Paris"], "unanswerable") == (0, 0.0)  # abstained on an answerable one


def test_empty_prediction_on_answerable():
    assert score_prediction(["Paris"], "") == (0, 0.0)
    assert score_prediction(["Paris"], "   ") == (0, 0.0)


def test_gold_that_normalizes_to_empty_counts_as_no_answer():
    assert score_prediction(["the", "."], "unanswerable") == (1, 1.0)
    assert score_prediction(["the", "."], "") == (0, 0.0)


def test_empty_output_is_not_an_abstention_only_the_explicit_word_is():
    """Generation that stops at a leading newline yields an empty answer: wrong on NoAns too."""
    stopped_at_newline = clean_output("\n")
    assert stopped_at_newline == "" and is_empty_output(stopped_at_newline)
    assert score_prediction([], stopped_at_newline) == (0, 0.0)
    assert score_prediction([], "The.") == (0, 0.0)      # normalises to empty: no answer text
    assert score_prediction([], "Unanswerable") == (1, 1.0) and not is_empty_output("Unanswerable")


def test_aggregate_counts_empty_outputs_and_gives_them_no_noans_credit():
    outputs = [(["Paris"], "Paris"), (["Paris"], ""), ([], "unanswerable"), ([], ""), ([], "\n")]
    rows = []
    for answers, text in outputs:
        answer = clean_output(text)
        em, f1 = score_prediction(answers, answer)
        rows.append({"em": em, "f1": f1, "has_answer": bool(answers), "empty": is_empty_output(answer)})
    m = aggregate(rows)
    assert m["empty_outputs"] == 3
    assert m["NoAns_accuracy_pct"] == pytest.approx(100 / 3)  # only the explicit abstention
    assert m["HasAns_exact_pct"] == 50.0


def test_report_section_says_how_many_outputs_were_empty(tmp_path):
    def record(label, empty, predictions):
        metrics = {"exact_pct": 50.0, "f1_pct": 50.0, "f1_pct_ci95": [40.0, 60.0], "HasAns_exact_pct": 50.0,
                   "HasAns_f1_pct": 50.0, "NoAns_accuracy_pct": 50.0, "total": 4, "HasAns_total": 2,
                   "NoAns_total": 2, "prompt_version": "p", "shots": 0, "seed": 0, "chat_template": True,
                   "prompt_example": "x"}
        if empty is not None:
            metrics["empty_outputs"] = empty
        return {"label": label, "workload": "squad", "status": "ok", "metrics": metrics,
                "samples": {"predictions": predictions}}

    base = [{"id": "a", "normalized": "", "empty": False, "em": 1, "f1": 1.0},  # the abstention
            {"id": "b", "normalized": "paris", "empty": False, "em": 1, "f1": 1.0}]
    other = [{"id": "a", "normalized": None, "empty": True, "em": 0, "f1": 0.0},  # an empty output
             {"id": "b", "normalized": "paris", "empty": False, "em": 1, "f1": 1.0}]
    text = "\n".join(SquadWorkload.report_section(
        [record("hf:fp32", 0, base), record("bnb:nf4", 3, other), record("old:row", None, base)], tmp_path))
    assert "Empty outputs: hf:fp32 0/4, bnb:nf4 3/4, old:row not recorded." in text
    assert "| bnb:nf4 |" in text and "50.0%" in text  # an empty output does not agree with an abstention


def test_aggregate_splits_hasans_noans():
    rows = [{"em": 1, "f1": 1.0, "has_answer": True}, {"em": 0, "f1": 0.5, "has_answer": True},
            {"em": 1, "f1": 1.0, "has_answer": False}, {"em": 0, "f1": 0.0, "has_answer": False}]
    m = aggregate(rows)
    assert m["exact_pct"] == 50.0 and m["f1_pct"] == pytest.approx(62.5)
    assert m["HasAns_exact_pct"] == 50.0 and m["HasAns_f1_pct"] == pytest.approx(75.0)
    assert m["NoAns_accuracy_pct"] == 50.0
    assert (m["total"], m["HasAns_total"], m["NoAns_total"]) == (4, 2, 2)
    assert m["f1_pct_ci95"][0] <= m["f1_pct"] <= m["f1_pct_ci95"][1]


def _write(tmp_path, obj):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


@pytest.mark.parametrize("obj,field", [
    ("{not json", "JSONDecodeError"),
    ({"version": "v2.0"}, "'data'"),
    ({"data": [{"paragraphs": []}]}, "'title'"),
    ({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}, "'context'"),
    ({"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q"}]}]}]}, "'answers'"),
])
def test_malformed_file_names_file_and_field(tmp_path, obj, field):
    path = _write(tmp_path, obj)
    with pytest.raises(WorkloadError) as err:
        parse_squad_file(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_real_data_loads_and_sample_is_stratified(data_dir, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    questions = load_squad()
    assert len(questions) == 6078
    assert sum(not q.has_answer for q in questions) == 3168
    sample = stratified_sample(questions, 200, seed=0)
    assert sample == stratified_sample(questions, 200, seed=0)  # identical for every backend
    assert sum(not q.has_answer for q in sample) == round(200 * 3168 / 6078)
    assert len({q.qid for q in sample}) == 200
    with pytest.raises(WorkloadError):
        stratified_sample(questions, 7000, seed=0)


def test_shots_come_from_other_articles_and_prompt_uses_chat_template(tiny_model):
    pool = [SquadQuestion(str(i), f"article{i % 3}", f"context {i}", f"question {i}",
                          ("ans",) if i % 2 else ()) for i in range(30)]
    question = pool[0]
    shots = few_shot_examples(pool, question, 3, seed=0)
    assert len(shots) == 3 and all(s.title != question.title for s in shots)
    tokenizer = load_tokenizer(tiny_model)
    prompt = build_prompt(tokenizer, question, shots)
    assert "<|im_start|>system" in prompt and prompt.rstrip().endswith("assistant")
    assert prompt.count("Question:") == 4 and "unanswerable" in prompt


def test_clean_output():
    assert clean_output(" Answer: Paris\nmore text") == "Paris"
    assert clean_output("Normandy") == "Normandy"


def test_workload_runs_on_tiny_model(tiny_model, data_dir, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    backend = backend_class("hf")("fp32")
    backend.load(tiny_model)
    result = SquadWorkload(SquadParams(n=6, batch_size=4)).run(backend, load_tokenizer(tiny_model), lambda d, t: None)
    preds = result.samples["predictions"]
    assert len(preds) == 6 and result.metrics["total"] == 6
    assert result.metrics["HasAns_total"] + result.metrics["NoAns_total"] == 6
    for row in preds:
        assert 0 <= row["f1"] <= 1 and row["em"] in (0, 1) and "\n" not in row["answer"]
    assert result.metrics["empty_outputs"] == sum(row["empty"] for row in preds)
    assert all(row["em"] == 0 for row in preds if row["empty"])
