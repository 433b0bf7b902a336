"""The Alpaca-style prompts of LLM-Adapters, byte for byte.

Upstream (AGI-Edgerunners/LLM-Adapters) builds its prompts with indented triple-quoted f-strings, so the text
carries 16-space indents, lines holding only spaces, and trailing spaces after "request.". Adapters only see
the same tokens here and there when every one of those characters is reproduced, so the templates below spell
them out with explicit escapes instead of relying on source indentation.

- `generate_prompt(record)`: finetune.py's training prompt (instruction [+ input] + output). With
  `output=""` it is the prompt a model trained here answers best, and the default of `fastadapters evaluate`.
- `generate_eval_prompt(instruction, input)`: the prompt of upstream evaluate.py / commonsense_evaluate.py,
  which differs from the training prompt in whitespace only (blank lines are empty, one trailing space fewer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_IND = " " * 16  # upstream's f-string indentation

# finetune.py generate_prompt: note the trailing space(s) after "request." and the 16-space "blank" lines.
TRAIN_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n{_IND}\n"
    f"{_IND}### Input:\n{_IND}{{input}}\n{_IND}\n"
    f"{_IND}### Response:\n{_IND}{{output}}"
)
TRAIN_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.  \n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n{_IND}\n"
    f"{_IND}### Response:\n{_IND}{{output}}"
)

# evaluate.py / commonsense_evaluate.py generate_prompt: blank lines are empty.
EVAL_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n\n"
    f"{_IND}### Input:\n{_IND}{{input}}\n\n"
    f"{_IND}### Response:\n{_IND}"
)
EVAL_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request. \n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n\n"
    f"{_IND}### Response:\n{_IND}"
)

RESPONSE_MARKER = "### Response:"
PROMPT_STYLES = ("finetune", "upstream_eval")


def generate_prompt(data_point: Mapping[str, Any]) -> str:
    """The training prompt of LLM-Adapters' finetune.py for one record.

    `data_point` has "instruction", optional "input" (empty or missing means none) and "output" (missing means
    ""). Returns the full text the model is trained on; with output "" it is the prompt the model answers.
    """
    instruction = data_point.get("instruction")
    if instruction is None:
        raise KeyError(f"record has no 'instruction' field (keys: {sorted(data_point)}); LLM-Adapters records are "
                       "{'instruction': ..., 'input': ..., 'output': ...}")
    output = data_point.get("output") or ""
    if data_point.get("input"):
        return TRAIN_PROMPT_WITH_INPUT.format(instruction=instruction, input=data_point["input"], output=output)
    return TRAIN_PROMPT_NO_INPUT.format(instruction=instruction, output=output)


def generate_eval_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002 - upstream's name
    """The prompt of LLM-Adapters' evaluate.py / commonsense_evaluate.py (ends after "### Response:\\n" + indent)."""
    if input:
        return EVAL_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return EVAL_PROMPT_NO_INPUT.format(instruction=instruction)


def build_eval_prompt(record: Mapping[str, Any], style: str = "finetune") -> str:
    """The prompt a model answers for `record` in `style`: "finetune" (the training prompt with an empty
    output, what models trained by `fastadapters train` or finetune.py saw) or "upstream_eval" (upstream
    evaluate.py's text, to reproduce its numbers exactly)."""
    if style == "finetune":
        return generate_prompt({**record, "output": ""})
    if style == "upstream_eval":
        return generate_eval_prompt(record["instruction"], record.get("input"))
    raise ValueError(f"unknown prompt style {style!r}: choose one of {PROMPT_STYLES}")
