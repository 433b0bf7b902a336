"""Data for the LLM-Adapters pipeline: JSON records, upstream's tokenization, the validation split, a padding
collator, and the seeded arithmetic word-problem generator of `fastadapters demo`.

Records have LLM-Adapters' keys: {"instruction": str, "input": str, "output": str, "answer": str} ("input" and
"answer" optional for training).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .prompts import generate_prompt

IGNORE_INDEX = -100


# ---------------------------------------------------------------- loading

def load_records(path: str | os.PathLike, split: str = "train") -> list[dict[str, Any]]:
    """Records of an LLM-Adapters data file.

    `path` is a .json file (a list of records, or {"data": [...]}), a .jsonl file (one record a line), or a
    folder holding `{split}.json`. Any other string is tried as a Hugging Face dataset name when the `datasets`
    package is installed (as upstream finetune.py does). Every record must have an "instruction".
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (f"{split}.json", f"{split}.jsonl"):
            if os.path.isfile(os.path.join(path, name)):
                return load_records(os.path.join(path, name), split)
        raise FileNotFoundError(f"{path} is a folder without {split}.json: point --data_path at a .json file")
    if os.path.isfile(path):
        records = _read_json_records(path)
    else:
        records = _load_hub_dataset(path, split)
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "instruction" not in r:
            keys = sorted(r) if isinstance(r, dict) else type(r).__name__
            raise ValueError(f"{path}: record {i} has no 'instruction' (it has {keys}); LLM-Adapters records are "
                             '{"instruction": ..., "input": ..., "output": ..., "answer": ...}')
    return records


def _read_json_records(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); use a JSON list of records or a .jsonl file") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected a list of records")
    return data


def _load_hub_dataset(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"{name!r} is not a file or folder; to load a Hugging Face dataset by name install "
                                "`datasets` (pip install datasets), or pass a local .json file") from None
    return [dict(r) for r in datasets.load_dataset(name, split=split)]


def save_records(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write `records` as an LLM-Adapters JSON list (atomically)."""
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(list(records), indent=1, ensure_ascii=False).encode("utf-8"))


# ---------------------------------------------------------------- splits

def train_val_split(records: Sequence[dict[str, Any]], val_set_size: int, seed: int = 42
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle with `seed` and hold out `val_set_size` records, as upstream's
    `train_test_split(test_size=val_set_size, shuffle=True, seed=42)` does (same permutation: numpy's
    default_rng(seed)). Returns (train, val); val is empty when val_set_size is 0."""
    n = len(records)
    if val_set_size <= 0:
        return list(records), []
    if val_set_size >= n:
        raise ValueError(f"val_set_size={val_set_size} but the data has only {n} records: pass a smaller "
                         "--val_set_size (or 0 for no validation)")
    perm = np.random.default_rng(seed).permutation(n)
    val = [records[i] for i in perm[:val_set_size]]
    train = [records[i] for i in perm[val_set_size:]]
    return train, val


# ---------------------------------------------------------------- tokenization

def _finish(ids: list[int], eos_id: int | None, cutoff_len: int, add_eos_token: bool) -> list[int]:
    """Upstream's rule: append EOS when the text was not cut and does not already end in EOS."""
    if add_eos_token and eos_id is not None and ids and ids[-1] != eos_id and len(ids) < cutoff_len:
        ids = ids + [eos_id]
    return ids


def tokenize_records(tokenizer: Any, records: Sequence[dict[str, Any]], cutoff_len: int = 256,
                     train_on_inputs: bool = True, add_eos_token: bool = True, chunk: int = 1000
                     ) -> list[dict[str, list[int]]]:
    """Tokenize records as upstream finetune.py's generate_and_tokenize_prompt does.

    Each example is `generate_prompt(record)` truncated to `cutoff_len` tokens, EOS appended when it fits;
    labels copy input_ids, and with train_on_inputs=False the prompt part (the prompt with an empty output,
    tokenized without EOS) is masked to -100. Returns dicts of input_ids / attention_mask / labels, each (L,).
    """
    if cutoff_len <= 0:
        raise ValueError(f"cutoff_len={cutoff_len} must be a positive number of tokens (upstream uses 256)")
    out: list[dict[str, list[int]]] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        full = tokenizer([generate_prompt(r) for r in part], truncation=True, max_length=cutoff_len,
                         padding=False)["input_ids"]
        user = None
        if not train_on_inputs:
            user = tokenizer([generate_prompt({**r, "output": ""}) for r in part], truncation=True,
                             max_length=cutoff_len, padding=False)["input_ids"]
        for i, ids in enumerate(full):
            ids = _finish(list(ids), eos, cutoff_len, add_eos_token)
            labels = list(ids)
            if user is not None:
                n_user = len(user[i])
                labels = [IGNORE_INDEX] * min(n_user, len(ids)) + labels[n_user:]
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of tokenized examples (dicts of int lists) as a map-style dataset."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


class CausalLMCollator:
    """Pad a list of examples into a batch: input_ids with `pad_token_id`, attention_mask with 0, labels with
    -100, to a multiple of `pad_to_multiple_of` (upstream: 8). Right padding by default, so position ids of
    real tokens do not depend on the batch. Returns tensors of shape (B, L)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: use 'left' or 'right'")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for e in examples:
            n = length - len(e["input_ids"])
            labels = e.get("labels", e["input_ids"])
            for key, seq, fill in (("input_ids", e["input_ids"], self.pad_token_id),
                                   ("attention_mask", e.get("attention_mask", [1] * len(e["input_ids"])), 0),
                                   ("labels", labels, IGNORE_INDEX)):
                seq = list(seq)
                batch[key].append(seq + [fill] * n if self.padding_side == "right" else [fill] * n + seq)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ---------------------------------------------------------------- arithmetic word problems (the demo's data)

_NAMES = ("Tom", "Anna", "Ben", "Lucy", "Sam", "Maria", "Leo", "Emma", "Omar", "Mia", "Jack", "Nina")
_ITEMS = ("apples", "books", "marbles", "cookies", "pencils", "stickers", "cards", "shells", "coins", "balloons")
# (operation, question template); {n} name, {x} items, {a} {b} numbers.
_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("+", "{n} has {a} {x}. {n} gets {b} more {x}. How many {x} does {n} have now?"),
    ("+", "There are {a} {x} in a box. {n} puts {b} more {x} in the box. How many {x} are in the box now?"),
    ("+", "{n} collected {a} {x} on Monday and {b} {x} on Tuesday. How many {x} did {n} collect in total?"),
    ("-", "{n} had {a} {x}. {n} gave {b} {x} to a friend. How many {x} does {n} have left?"),
    ("-", "A shop had {a} {x}. It sold {b} of them. How many {x} are left in the shop?"),
    ("-", "{n} needs {a} {x} and already has {b}. How many more {x} does {n} need?"),
    ("*", "{n} buys {a} bags with {b} {x} in each bag. How many {x} does {n} buy?"),
    ("*", "There are {a} boxes and each box holds {b} {x}. How many {x} are there in all?"),
)


def _operands(op: str, rng: random.Random) -> tuple[int, int, int]:
    if op == "+":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return a, b, a + b
    if op == "-":
        a = rng.randint(5, 50)
        b = rng.randint(1, a - 1)
        return a, b, a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return a, b, a * b


def arithmetic_problem(rng: random.Random) -> dict[str, str]:
    """One random word problem as an LLM-Adapters record; output is "a op b = c. The answer is c." """
    op, template = rng.choice(_TEMPLATES)
    a, b, c = _operands(op, rng)
    question = template.format(n=rng.choice(_NAMES), x=rng.choice(_ITEMS), a=a, b=b)
    return {"instruction": question, "input": "", "output": f"{a} {op} {b} = {c}. The answer is {c}.",
            "answer": str(c)}


def make_arithmetic_data(n_train: int, n_test: int, seed: int = 0
                         ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A seeded train set and a held-out test set of arithmetic word problems (no question in both).

    Addition and subtraction up to 50, multiplication of one-digit numbers, across 8 templates. The same seed
    gives the same records on every machine (Python's `random.Random`).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train={n_train}, n_test={n_test} must be >= 0")
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    attempts = 0
    while len(records) < n_train + n_test:
        attempts += 1
        if attempts > 50 * (n_train + n_test) + 1000:
            raise ValueError(f"cannot draw {n_train + n_test} distinct problems; ask for fewer")
        r = arithmetic_problem(rng)
        if r["instruction"] in seen:
            continue
        seen.add(r["instruction"])
        records.append(r)
    return records[n_test:], records[:n_test]


def iter_texts(records: Iterable[dict[str, Any]]) -> Iterable[str]:
    """Every training text of `records` (the full prompts), e.g. to build a tokenizer vocabulary."""
    for r in records:
        yield generate_prompt(r)
