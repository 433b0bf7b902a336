"""Answer extraction: upstream's math and commonsense rules, the standalone-letter rule for AQuA / mathqa, and real
LLM-Adapters records from ../shared/data/llm-adapters (skipped when that folder is absent)."""

from __future__ import annotations

import json
import math
import os
import re

import pytest

from fastadapters.extract import (
    COMMONSENSE_WORDS,
    MATH_DATASETS,
    Task,
    canonical_name,
    extract_choice,
    extract_letter,
    extract_letter_upstream,
    extract_number,
    is_correct,
    score,
    task_for,
)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "llm-adapters")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data/llm-adapters is absent")


def _records(name: str) -> list[dict]:
    with open(os.path.join(DATA, name, "test.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- math

@pytest.mark.parametrize("text,expected", [
    ("The answer is 576.", 576.0),
    ("1,234 apples", 1234.0),                      # commas removed first
    ("first 3 then 4 then -7.5", -7.5),           # the LAST number, sign and decimals kept
    ("so 12 + 5 = 17. The answer is 17", 17.0),
    ("no number here", math.inf),
    ("", math.inf),
], ids=["sentence", "commas", "last-negative-decimal", "equation", "none", "empty"])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize("prediction,answer,ok", [
    (576.0, "576.0", True), (576.0005, "576", True), (576.002, "576", False), (math.inf, "5", False),
    (1234.0, "1,234", True),
], ids=["equal", "within-0.001", "outside-0.001", "no-number", "answer-with-comma"])
def test_math_tolerance(prediction, answer, ok):
    assert is_correct(Task("gsm8k", "math"), prediction, answer) is ok


def test_math_answer_must_be_numeric():
    with pytest.raises(ValueError, match="not a number"):
        is_correct(Task("gsm8k", "math"), 1.0, "seven")


# ---------------------------------------------------------------- option letters

@pytest.mark.parametrize("text,expected", [
    ("The answer is (C).", "C"),
    ("Answer: D", "D"),
    ("the answer would be B.", "B"),
    ("C.", "C"),
    ("(E)", "E"),
    ("E", "E"),
    ("[B] is right", "B"),
    ("I pick option D because", "D"),
    ("A ) 38 , B ) 27.675", "A"),                              # mathqa's option format
    ("A train leaves at noon. Each car... so (B)", "B"),      # article "A" and "E" of "Each" do not count
    ("Each Bus Carries Dogs", ""),                            # capitals inside words never count
    ("the answer is a number", ""),                           # lower-case a is a word, not option A
    ("Washington D.C. is far", ""),                           # abbreviation, not "D."
    ("(A) is wrong. The answer is (D).", "D"),               # the stated answer beats an earlier mention
    ("", ""),
], ids=["answer-is-paren", "answer-colon", "answer-would-be", "letter-dot", "paren", "alone", "bracket",
        "option", "mathqa-format", "article-A", "inside-words", "lowercase-a", "abbreviation", "stated-wins",
        "empty"])
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


@pytest.mark.parametrize("text,upstream", [
    ("Each train... so (B)", "E"), ("A man buys. The answer is (C).", "A"), ("Rationale: Bob. (D)", "B"),
], ids=["each", "article", "name"])
def test_upstream_letter_rule_takes_letters_inside_words(text, upstream):
    assert extract_letter_upstream(text) == upstream
    assert extract_letter(text) != upstream


# ---------------------------------------------------------------- commonsense words

@pytest.mark.parametrize("dataset,text,expected", [
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "true, or rather false", "true"),           # the FIRST match, as upstream
    ("piqa", "solution2 is better", "solution2"),
    ("social_i_qa", "I think answer3", "answer3"),
    ("hellaswag", "ending4", "ending4"),
    ("winogrande", "option1 fits", "option1"),
    ("ARC-Easy", "nothing useful", ""),
], ids=["boolq", "boolq-first", "piqa", "siqa", "hellaswag", "winogrande", "no-match"])
def test_extract_choice(dataset, text, expected):
    assert extract_choice(text, COMMONSENSE_WORDS[dataset]) == expected
    assert score(task_for(dataset), text, expected or "answer1")[0] == expected


def test_extract_choice_needs_words():
    with pytest.raises(ValueError, match="answer words"):
        extract_choice("x", ())


# ---------------------------------------------------------------- tasks

@pytest.mark.parametrize("name,kind", [
    ("gsm8k", "math"), ("svamp", "math"), ("MAWPS", "math"), ("aqua", "choice"), ("MathQA", "choice"),
    ("boolq", "commonsense"), ("arc-easy", "commonsense"), ("ARC_Challenge", "commonsense"),
    ("social_i_qa", "commonsense"),
], ids=lambda v: str(v))
def test_task_for_known(name, kind):
    task = task_for(name)
    assert task.kind == kind
    assert task.name == canonical_name(name)


def test_task_for_infers_unknown_sets():
    assert task_for("mine", ["3", "4.5"]).kind == "math"
    assert task_for("mine", ["A", "C"]).kind == "choice"
    t = task_for("mine", ["yes", "no"])
    assert t.kind == "commonsense" and set(t.words) == {"yes", "no"}
    with pytest.raises(ValueError, match="unknown dataset"):
        task_for("mine")


# ---------------------------------------------------------------- real records

@needs_data
def test_real_aqua_letters_follow_the_stated_answer():
    stated = 0
    upstream_right = 0
    for r in _records("AQuA"):
        m = re.search(r"answer is \(?([A-E])\)?", r["output"])
        if not m:
            continue
        stated += 1
        assert extract_letter(r["output"]) == m.group(1), r["output"]
        upstream_right += extract_letter_upstream(r["output"]) == m.group(1)
    assert stated > 200
    assert upstream_right < stated - 20  # upstream's rule misreads dozens of real rationales


@needs_data
def test_real_aqua_scoring_uses_answer_not_output():
    r = _records("AQuA")[0]  # its rationale ends "(D)" while the answer is A
    pred, ok = score(task_for("AQuA"), r["output"], r["answer"])
    assert (pred, ok) == ("D", False)


@needs_data
@pytest.mark.parametrize("dataset", [d for d in MATH_DATASETS if d != "mawps"])
def test_real_math_outputs_extract_their_stated_answer(dataset):
    checked = 0
    for r in _records(dataset):
        m = re.search(r"The answer is (-?[\d,]+\.?\d*)\.?\s*$", r["output"])
        if m:
            checked += 1
            assert extract_number(r["output"]) == float(m.group(1).replace(",", "").rstrip("."))
    assert checked > 100


@needs_data
def test_real_math_records_score_as_upstream():
    gsm = _records("gsm8k")[0]
    assert score(task_for("gsm8k"), gsm["output"], gsm["answer"]) == (576.0, True)
    svamp = _records("SVAMP")[0]  # a wrong machine rationale: ends in 32, the answer is 8
    assert score(task_for("SVAMP"), svamp["output"], svamp["answer"]) == (32.0, False)


@needs_data
@pytest.mark.parametrize("dataset", ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge",
                                     "openbookqa"])
def test_real_commonsense_outputs_score_correct(dataset):
    task = task_for(dataset)
    records = _records(dataset)
    assert all(score(task, r["output"], r["answer"]) == (r["answer"], True) for r in records)
    # and a wrong word is wrong
    other = next(w for w in task.words if w != records[0]["answer"])
    assert score(task, f"the correct answer is {other}", records[0]["answer"])[1] is False
