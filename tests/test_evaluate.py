"""`fastadapters evaluate` on a tiny random Llama with a tiny local tokenizer: test-set discovery, batched generation
(left padding + mask + KV cache) equal to one-at-a-time, output files and table, the base model alone, PEFT-written
adapters, and real LLM-Adapters test files (skipped when ../shared/data/llm-adapters is absent)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastadapters.data import iter_texts, make_arithmetic_data, save_records
from fastadapters.demo_pipeline import write_tiny_llama
from fastadapters.evaluate import find_test_sets, generate_batch, load_model_for_eval, main

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "llm-adapters")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    train, test = make_arithmetic_data(20, 6, seed=2)
    for name in ("arith", "SVAMP"):
        save_records(test, root / "sets" / name / "test.json")
    model = write_tiny_llama(str(root / "model"), list(iter_texts(train + test)), vocab_size=300, seed=3)
    return root, model


# ---------------------------------------------------------------- discovery

def test_find_test_sets(setup):
    root, _ = setup
    sets = root / "sets"
    assert find_test_sets(str(sets)) == [("SVAMP", str(sets / "SVAMP" / "test.json")),
                                         ("arith", str(sets / "arith" / "test.json"))]  # known sets first
    assert find_test_sets(str(sets), ["svamp"]) == [("SVAMP", str(sets / "SVAMP" / "test.json"))]
    assert find_test_sets(str(sets / "arith")) == [("arith", str(sets / "arith" / "test.json"))]
    one = str(sets / "arith" / "test.json")
    assert find_test_sets(one, ["gsm8k"]) == [("gsm8k", one)]
    with pytest.raises(SystemExit, match="no test.json for"):
        find_test_sets(str(sets), ["boolq"])
    with pytest.raises(SystemExit, match="no such file"):
        find_test_sets(str(root / "missing"))


# ---------------------------------------------------------------- generation

def test_batched_generation_equals_one_at_a_time(setup):
    """Left padding with an attention mask must not change what a prompt generates (upstream's batched
    commonsense script passed no mask, so batch > 1 scored garbage)."""
    _, path = setup
    model, tok, device = load_model_for_eval(path, device="cpu")
    tok.padding_side = "right"
    prompts = ["Tom has 3 apples.", "There are 12 books in a box and 7 more on the shelf. How many", "5 + 4 ="]
    batched = generate_batch(model, tok, prompts, max_new_tokens=6, device=device)
    alone = [generate_batch(model, tok, [p], max_new_tokens=6, device=device)[0] for p in prompts]
    assert batched == alone
    assert tok.padding_side == "right"  # generate_batch pads left for itself and restores the tokenizer


def test_evaluate_base_model_writes_rows_summary_and_table(setup, tmp_path, capsys):
    root, model = setup
    out = tmp_path / "out"
    assert main(["--base_model", model, "--data_path", str(root / "sets"), "--limit", "3", "--batch_size", "2",
                 "--max_new_tokens", "4", "--output_dir", str(out), "--no_progress", "--num_beams", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter"] is None and summary["num_beams"] == 2
    assert [r["dataset"] for r in summary["results"]] == ["SVAMP", "arith"]
    for r in summary["results"]:
        assert r["n"] == 3 and 0.0 <= r["accuracy"] <= 1.0 and r["examples_per_s"] > 0 and r["task"] == "math"
        rows = [json.loads(x) for x in open(r["predictions_file"])]
        assert [x["index"] for x in rows] == [0, 1, 2]
        assert all(set(x) >= {"prompt", "generation", "prediction", "answer", "correct"} for x in rows)
        assert sum(x["correct"] for x in rows) == r["correct"]
    table = capsys.readouterr().out
    assert "dataset" in table and "accuracy" in table and "examples/s" in table and "SVAMP" in table


def test_evaluate_peft_adapter_checkpoint(setup, tmp_path):
    """An adapter saved by HF PEFT loads through fa.AdapterModel.from_pretrained and generates as PEFT does."""
    peft = pytest.importorskip("peft")
    from fastadapters.train import load_base_model, load_tokenizer

    root, path = setup
    base = load_base_model(path)
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft_adapter")
    tok = load_tokenizer(path)
    records = json.loads((root / "sets" / "arith" / "test.json").read_text())[:2]
    from fastadapters.prompts import build_eval_prompt

    expected = generate_batch(pm.eval(), tok, [build_eval_prompt(r) for r in records], max_new_tokens=5)
    out = tmp_path / "out"
    main(["--base_model", path, "--adapter", str(tmp_path / "peft_adapter"), "--data_path",
          str(root / "sets" / "arith"), "--limit", "2", "--batch_size", "2", "--max_new_tokens", "5",
          "--output_dir", str(out), "--no_progress"])
    rows = [json.loads(x) for x in open(out / "arith.jsonl")]
    assert [r["generation"] for r in rows] == expected


@pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data/llm-adapters is absent")
def test_evaluate_real_test_files(setup, tmp_path):
    _, model = setup
    out = tmp_path / "out"
    main(["--base_model", model, "--data_path", DATA, "--dataset", "aqua", "boolq", "ARC-Easy", "--limit", "2",
          "--batch_size", "2", "--max_new_tokens", "3", "--output_dir", str(out), "--no_progress"])
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["dataset"], r["task"], r["n"]) for r in summary["results"]] == [
        ("AQuA", "choice", 2), ("boolq", "commonsense", 2), ("ARC-Easy", "commonsense", 2)]
    rows = [json.loads(x) for x in open(out / "AQuA.jsonl")]
    assert rows[0]["answer"] == "A" and "Answer Choices" in rows[0]["prompt"]
