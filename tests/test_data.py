"""Prompts (byte-exact with upstream LLM-Adapters), record loading, tokenization as upstream, the validation split,
the padding collator and the arithmetic word-problem generator."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fastadapters.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    load_records,
    make_arithmetic_data,
    save_records,
    tokenize_records,
    train_val_split,
)
from fastadapters.demo_pipeline import build_tiny_tokenizer
from fastadapters.extract import extract_number
from fastadapters.prompts import build_eval_prompt, generate_eval_prompt, generate_prompt

I = " " * 16  # upstream's f-string indentation  # noqa: E741

# Upstream finetune.py's generate_prompt, line by line (note "request. " / "request.  " and the space-only lines).
UPSTREAM_TRAIN_WITH_INPUT = "\n".join([
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request. ", "",
    I + "### Instruction:", I + "INS", I, I + "### Input:", I + "INP", I, I + "### Response:", I + "OUT"])
UPSTREAM_TRAIN_NO_INPUT = "\n".join([
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  ",
    "", I + "### Instruction:", I + "INS", I, I + "### Response:", I + "OUT"])
# Upstream evaluate.py's generate_prompt: empty blank lines, prompt ends with the indent after "### Response:".
UPSTREAM_EVAL_NO_INPUT = "\n".join([
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. ",
    "", I + "### Instruction:", I + "INS", "", I + "### Response:", I])
UPSTREAM_EVAL_WITH_INPUT = "\n".join([
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.", "",
    I + "### Instruction:", I + "INS", "", I + "### Input:", I + "INP", "", I + "### Response:", I])


# ---------------------------------------------------------------- prompts

@pytest.mark.parametrize("record,expected", [
    ({"instruction": "INS", "input": "INP", "output": "OUT"}, UPSTREAM_TRAIN_WITH_INPUT),
    ({"instruction": "INS", "input": "", "output": "OUT"}, UPSTREAM_TRAIN_NO_INPUT),
    ({"instruction": "INS", "output": "OUT"}, UPSTREAM_TRAIN_NO_INPUT),
], ids=["with-input", "empty-input", "no-input-key"])
def test_training_prompt_is_upstreams_byte_for_byte(record, expected):
    assert generate_prompt(record) == expected


def test_eval_prompts_are_upstreams_byte_for_byte():
    assert generate_eval_prompt("INS") == UPSTREAM_EVAL_NO_INPUT
    assert generate_eval_prompt("INS", "INP") == UPSTREAM_EVAL_WITH_INPUT
    assert build_eval_prompt({"instruction": "INS", "input": ""}, "upstream_eval") == UPSTREAM_EVAL_NO_INPUT


def test_finetune_style_eval_prompt_is_the_training_prompt_without_output():
    rec = {"instruction": "INS", "input": "", "output": "OUT", "answer": "1"}
    prompt = build_eval_prompt(rec)
    assert prompt + "OUT" == generate_prompt(rec)
    assert prompt.endswith("### Response:\n" + I)
    with pytest.raises(ValueError, match="prompt style"):
        build_eval_prompt(rec, "chat")
    with pytest.raises(KeyError, match="instruction"):
        generate_prompt({"input": "x"})


# ---------------------------------------------------------------- loading

def test_load_records_json_jsonl_folder(tmp_path):
    recs = [{"instruction": "a", "input": "", "output": "b", "answer": "1"}]
    save_records(recs, tmp_path / "train.json")
    (tmp_path / "x.jsonl").write_text(json.dumps(recs[0]) + "\n\n")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": recs}))
    assert load_records(tmp_path / "train.json") == recs
    assert load_records(tmp_path / "x.jsonl") == recs
    assert load_records(tmp_path / "wrapped.json") == recs
    assert load_records(tmp_path) == recs  # folder with train.json


@pytest.mark.parametrize("content,match", [
    ('[{"question": "q"}]', "no 'instruction'"), ("{bad json", "not valid JSON"), ('{"a": 1}', "list of records"),
], ids=["missing-instruction", "bad-json", "not-a-list"])
def test_load_records_errors(tmp_path, content, match):
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_records(tmp_path / "d.json")


def test_load_records_missing_folder_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.json"):
        load_records(tmp_path)


# ---------------------------------------------------------------- split

def test_train_val_split_matches_datasets_permutation():
    recs = [{"instruction": str(i)} for i in range(50)]
    train, val = train_val_split(recs, 10, seed=42)
    perm = np.random.default_rng(42).permutation(50)  # what datasets' train_test_split(seed=42) draws
    assert [r["instruction"] for r in val] == [str(i) for i in perm[:10]]
    assert [r["instruction"] for r in train] == [str(i) for i in perm[10:]]
    assert train_val_split(recs, 0) == (recs, [])
    with pytest.raises(ValueError, match="val_set_size"):
        train_val_split(recs, 50)


# ---------------------------------------------------------------- tokenization

@pytest.fixture(scope="module")
def tokenizer():
    train, test = make_arithmetic_data(30, 5, seed=3)
    return build_tiny_tokenizer([generate_prompt(r) for r in train + test], vocab_size=300)


def test_tokenize_appends_eos_and_copies_labels(tokenizer):
    rec = make_arithmetic_data(1, 0, seed=1)[0][0]
    (ex,) = tokenize_records(tokenizer, [rec], cutoff_len=512)
    ids = tokenizer(generate_prompt(rec))["input_ids"]
    assert ex["input_ids"] == ids + [tokenizer.eos_token_id]
    assert ex["labels"] == ex["input_ids"] and ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_tokenize_truncates_without_eos(tokenizer):
    rec = make_arithmetic_data(1, 0, seed=1)[0][0]
    (ex,) = tokenize_records(tokenizer, [rec], cutoff_len=10)
    assert len(ex["input_ids"]) == 10 and ex["input_ids"][-1] != tokenizer.eos_token_id


def test_tokenize_train_on_inputs_false_masks_the_prompt(tokenizer):
    rec = make_arithmetic_data(1, 0, seed=1)[0][0]
    (ex,) = tokenize_records(tokenizer, [rec], cutoff_len=512, train_on_inputs=False)
    n_user = len(tokenizer(generate_prompt({**rec, "output": ""}))["input_ids"])
    assert ex["labels"][:n_user] == [IGNORE_INDEX] * n_user
    assert ex["labels"][n_user:] == ex["input_ids"][n_user:]
    assert tokenizer.decode(ex["labels"][n_user:], skip_special_tokens=True).strip() == rec["output"]
    with pytest.raises(ValueError, match="cutoff_len"):
        tokenize_records(tokenizer, [rec], cutoff_len=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_to_multiple_of_8(side):
    batch = CausalLMCollator(pad_token_id=0, padding_side=side)(
        [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]}, {"input_ids": [9] * 9}])
    assert batch["input_ids"].shape == (2, 16)
    row = batch["input_ids"][0].tolist()
    assert row == ([5, 6, 7] + [0] * 13 if side == "right" else [0] * 13 + [5, 6, 7])
    assert batch["attention_mask"][0].sum() == 3 and batch["attention_mask"][1].sum() == 9
    assert (batch["labels"][0] == -100).sum() == 14  # 13 pads + the masked prompt token
    labels1 = batch["labels"][1].tolist()
    assert (labels1[:9] if side == "right" else labels1[7:]) == [9] * 9


# ---------------------------------------------------------------- arithmetic generator

def test_arithmetic_data_is_seeded_held_out_and_correct():
    train, test = make_arithmetic_data(200, 40, seed=7)
    again = make_arithmetic_data(200, 40, seed=7)
    assert (train, test) == again
    assert make_arithmetic_data(200, 40, seed=8) != (train, test)
    assert len(train) == 200 and len(test) == 40
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    for r in train + test:
        assert set(r) == {"instruction", "input", "output", "answer"}
        m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)\. The answer is (\d+)\.", r["output"])
        assert m, r["output"]
        a, op, b, c, ans = m.groups()
        assert eval(f"{a}{op}{b}") == int(c) == int(ans) == int(r["answer"])  # noqa: S307 - digits and an op
        assert extract_number(r["output"]) == float(r["answer"])
    ops = {r["output"].split()[1] for r in train}
    assert ops == {"+", "-", "*"}
