"""Answer extraction and scoring for the LLM-Adapters evaluation sets.

The rules follow upstream evaluate.py / commonsense_evaluate.py, with one deliberate fix:

- math (gsm8k, SVAMP, MultiArith, AddSub, SingleEq, mawps): remove commas, take the LAST number
  (`-?\\d+\\.?\\d*`); correct when |prediction - answer| <= 0.001. No number predicts +inf (never correct).
- commonsense (boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa): the FIRST
  match of the task's answer words (`true|false`, `solution1|solution2`, `answer1..answer5`, `ending1..ending4`,
  `option1|option2`); correct when equal to the answer. No match predicts "".
- multiple choice (AQuA, mathqa): the option letter as a standalone token. Upstream took the first capital A-E
  anywhere, so the "E" of "Each" or the "A" of "A train" counted; here a letter counts only as
  (1) the first "answer is C" / "answer: (C)" statement, else (2) the first "option C" / "choice C",
  else (3) the first bracketed "(C)", "[C]", "C)" or "C )", else (4) the first "C." that is not part of an
  abbreviation or number, else (5) a generation that is the letter alone. Letters inside words never count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MATH_DATASETS = ("gsm8k", "SVAMP", "MultiArith", "AddSub", "SingleEq", "mawps")
CHOICE_DATASETS = ("AQuA", "mathqa")
COMMONSENSE_WORDS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}
COMMONSENSE_DATASETS = tuple(COMMONSENSE_WORDS)
ALL_DATASETS = MATH_DATASETS + CHOICE_DATASETS + COMMONSENSE_DATASETS
MATH_TOLERANCE = 0.001

_NUMBER = re.compile(r"-?\d+\.?\d*")
_L = "([A-E])"  # the option letter: upper case only, so "a" in "is a number" never counts
_NOT_WORD_AFTER = r"(?![A-Za-z0-9])"
_LETTER_RULES = (
    # (1) "the answer is (C)", "Answer: C", "answer would be C."
    re.compile(r"(?i:\banswer)\s*(?i:is|:|=|would be|will be|should be)?\s*:?\s*(?i:option|choice)?\s*[(\[]?\s*"
               + _L + r"\s*[)\]]?" + _NOT_WORD_AFTER),
    # (2) "option C", "choice (C)"
    re.compile(r"(?i:\b(?:option|choice))\s*[(\[]?\s*" + _L + r"\s*[)\]]?" + _NOT_WORD_AFTER),
    # (3) "(C)", "[C]", "C)", "C )" (mathqa writes its options as "A ) 38 , B ) 27.6")
    re.compile(r"(?<![A-Za-z0-9])(?:[(\[]\s*)?" + _L + r"\s*[)\]]"),
    # (4) "C." that is not inside an abbreviation ("D.C.") or a number
    re.compile(r"(?<![A-Za-z0-9.])" + _L + r"\." + _NOT_WORD_AFTER),
    # (5) the whole generation is the letter
    re.compile(r"^\W*" + _L + r"\W*$"),
)


@dataclass(frozen=True)
class Task:
    """How one dataset is scored: kind is "math", "choice" (option letters) or "commonsense" (answer words)."""

    name: str
    kind: str
    words: tuple[str, ...] = ()


def canonical_name(dataset: str) -> str:
    """The LLM-Adapters spelling of a dataset name, matched case-insensitively ("svamp" -> "SVAMP");
    unknown names are returned unchanged."""
    lowered = {d.lower().replace("_", "-"): d for d in ALL_DATASETS}
    return lowered.get(dataset.lower().replace("_", "-"), dataset)


def task_for(dataset: str, answers: list[str] | None = None) -> Task:
    """The scoring rule of `dataset`. For a name outside LLM-Adapters' sets the kind is inferred from
    `answers` (all numbers -> math, all single letters A-E -> choice, else commonsense with the answer set)."""
    name = canonical_name(dataset)
    if name in MATH_DATASETS:
        return Task(name, "math")
    if name in CHOICE_DATASETS:
        return Task(name, "choice")
    if name in COMMONSENSE_WORDS:
        return Task(name, "commonsense", COMMONSENSE_WORDS[name])
    if not answers:
        raise ValueError(f"unknown dataset {dataset!r}: name one of {list(ALL_DATASETS)}, or give its records so "
                         "the scoring rule can be inferred from their answers")
    if all(_is_number(a) for a in answers):
        return Task(name, "math")
    if all(str(a).strip() in "ABCDE" and len(str(a).strip()) == 1 for a in answers):
        return Task(name, "choice")
    words = tuple(sorted({str(a) for a in answers}, key=lambda w: (-len(w), w)))  # longest first: no prefix wins
    return Task(name, "commonsense", words)


def _is_number(s: object) -> bool:
    try:
        float(str(s).replace(",", ""))
    except ValueError:
        return False
    return True


def extract_number(text: str) -> float:
    """Upstream's math rule: commas removed, the last number in `text`; +inf when there is none."""
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return math.inf
    try:
        return float(found[-1])
    except ValueError:  # cannot happen with this regex, kept for safety
        return math.inf


def extract_letter(text: str) -> str:
    """The option letter A-E stated in `text` as a standalone token (rules in the module docstring); "" if none."""
    text = text.strip()
    for rule in _LETTER_RULES:
        m = rule.search(text)
        if m:
            return m.group(1)
    return ""


def extract_letter_upstream(text: str) -> str:
    """Upstream's AQuA rule, kept for comparison: the first capital A-E anywhere (inside words too)."""
    found = re.findall(r"A|B|C|D|E", text.strip())
    return found[0] if found else ""


def extract_choice(text: str, words: tuple[str, ...] | list[str]) -> str:
    """Upstream's commonsense rule: the first occurrence of any of `words` in `text`; "" if none."""
    if not words:
        raise ValueError("extract_choice needs the task's answer words, e.g. ('true', 'false')")
    found = re.findall("|".join(re.escape(w) for w in words), text.strip())
    return found[0] if found else ""


def extract_answer(task: Task, text: str) -> float | str:
    """The prediction in the generation `text` under `task`'s rule (float for math, str otherwise)."""
    if task.kind == "math":
        return extract_number(text)
    if task.kind == "choice":
        return extract_letter(text)
    return extract_choice(text, task.words)


def is_correct(task: Task, prediction: float | str, answer: object) -> bool:
    """Whether `prediction` matches the record's `answer` (math: |pred - answer| <= 0.001)."""
    if task.kind == "math":
        try:
            label = float(str(answer).replace(",", ""))
        except ValueError as e:
            raise ValueError(f"{task.name}: answer {answer!r} is not a number; math sets need numeric answers") from e
        return isinstance(prediction, float) and math.isfinite(prediction) and abs(label - prediction) <= MATH_TOLERANCE
    return prediction == str(answer).strip()


def score(task: Task, generation: str, answer: object) -> tuple[float | str, bool]:
    """(prediction, correct) for one generation."""
    prediction = extract_answer(task, generation)
    return prediction, is_correct(task, prediction, answer)
