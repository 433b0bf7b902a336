"""`fastadapters reproduce` end to end on a tiny slice (tiny random Llama, LLM-Adapters-format records), its
resume-per-row behaviour, and its one-line input errors (raised before any model loads)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from fastadapters import reproduce
from fastadapters.cli import main as cli_main


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _choice(q: str, k: int, n: int = 4) -> dict:
    opts = " ".join(f"Answer{i + 1}: option {q}{i}" for i in range(n))
    fmt = "/".join(f"answer{i + 1}" for i in range(n))
    return {"instruction": f"Please choose the correct answer to the question: {q}?\n\n{opts}\n\nAnswer format: {fmt}",
            "input": "", "output": f"the correct answer is answer{k}", "answer": f"answer{k}"}


def _write(path, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def make_data(root) -> str:
    """A data folder shaped like LLM-Adapters' dataset/ (the four tasks the command trains on), a few records each."""
    for task in ("ARC-Easy", "openbookqa"):
        _write(root / task / "train.json", [_choice(f"{task} train {i}", 1 + i % 4) for i in range(8)])
        _write(root / task / "test.json", [_choice(f"{task} test {i}", 1 + i % 4) for i in range(5)])
    tf = ["true", "false"]
    mk = lambda q, a: {"instruction": f"Please answer the following question with true or false, question: {q}?\n\n"  # noqa: E731
                       "Answer format: true/false", "input": "", "output": f"the correct answer is {a}", "answer": a}
    _write(root / "boolq" / "train.json", [mk(f"is {i} even", tf[i % 2]) for i in range(8)])
    _write(root / "boolq" / "test.json", [mk(f"is {i} odd", tf[i % 2]) for i in range(5)])
    _write(root / "mawps" / "trainset.json", [{"id": i, "original_text": f"Tom has {i} apples and gets 2 more . How "
                                               "many apples ?", "equation": f"X=({i}.0+2.0)", "ans": i + 2.0}
                                              for i in range(8)])
    _write(root / "mawps" / "test.json", [{"instruction": f"Ann has {i} pens and gets 3 more . How many pens ?",
                                           "input": "", "output": "", "answer": str(i + 3.0)} for i in range(5)])
    return str(root)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastadapters.demo_pipeline import write_tiny_llama

    root = tmp_path_factory.mktemp("reproduce")
    data = make_data(root / "data")
    texts = []
    for dirpath, _, files in os.walk(data):
        for f in files:
            texts += [json.dumps(r) for r in json.load(open(os.path.join(dirpath, f)))]
    model = write_tiny_llama(str(root / "tiny-llama"), texts, hidden=32, vocab_size=300)
    return root, data, model


def _argv(data, model, out, *extra):
    return ["reproduce", "--preset", "tiny", "--data_path", data, "--base_model", model, "--out", str(out),
            "--device", "cpu", "--no_progress", *extra]


def test_types_end_to_end_and_resume(setup, monkeypatch, capsys):
    root, data, model = setup
    out = root / "types"
    assert cli_main(_argv(data, model, out)) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    names = [r["row"] for r in rows]
    assert names == ["base", "prefix", "prompt", "lora", "series", "adapterp", "parallel"]
    for r in rows:
        for t in reproduce.TASKS:
            assert 0.0 <= float(r[f"acc_{t}"]) <= 1.0 and r[f"n_{t}"] == "3"
        assert r["torch"] == torch.__version__ and r["date"] and r["machine"]
    for r in rows[1:]:
        assert int(r["trainable_params"]) > 0 and float(r["train_seconds"]) > 0 and float(r["peak_mem_gib"]) > 0
        assert int(r["steps"]) == 2 and float(r["tokens_per_s"]) > 0
        assert (out / "rows" / f"types-{r['row']}" / "adapter" / "adapter_config.json").is_file()
    # each adapter type trains different parameters (the rows are not one setting six times)
    assert len({r["trainable_params"] for r in rows[1:]}) >= 5
    table = (out / "results.md").read_text()
    assert all(f"| {n} |" in table for n in names) and "->" in table
    assert (out / "results.png").stat().st_size > 1000
    train = json.load(open(out / "data" / "train.json"))
    assert len(train) == 16 and {r["task"] for r in train} == set(reproduce.TASKS)
    assert any(r["output"].endswith("The answer is 4.") for r in train if r["task"] == "mawps") or \
        all("The answer is" in r["output"] for r in train if r["task"] == "mawps")

    # a run killed after the 5th row: the rerun trains exactly the rows that are missing
    keep = rows[:5]
    reproduce.write_results(str(out / "results.csv"), keep)
    calls = []
    import fastadapters.train as train_mod

    orig = train_mod.train

    def counting(args, callbacks=()):
        calls.append(args.output_dir)
        return orig(args, callbacks)

    monkeypatch.setattr(train_mod, "train", counting)
    capsys.readouterr()
    assert cli_main(_argv(data, model, out)) == 0
    assert [os.path.basename(os.path.dirname(c)) for c in calls] == ["types-adapterp", "types-parallel"]
    assert "prefix: done already" in capsys.readouterr().out
    again = list(csv.DictReader(open(out / "results.csv")))
    assert [r["row"] for r in again] == names
    assert again[1] == rows[1]  # a finished row is kept as it was


def test_changed_settings_are_refused(setup):
    root, data, model = setup
    out = root / "types-refuse"
    assert cli_main(_argv(data, model, out, "--rows", "lora", "--tasks", "boolq")) == 0
    with pytest.raises(SystemExit, match="from other settings"):
        cli_main(_argv(data, model, out, "--rows", "lora", "--tasks", "boolq", "--max_steps", "3"))


def _no_model(monkeypatch):
    import fastadapters.train as train_mod

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(train_mod, "load_tokenizer", boom)
    monkeypatch.setattr(train_mod, "load_base_model", boom)


@pytest.mark.parametrize("extra, message", [
    (("--data_path", "/nonexistent/llm-adapters"), "no such folder"),
    (("--tasks", "ARC-Easy,gsm9k"), "--tasks"),
    (("--rows", "lora,dora"), "dora"),
    (("--max_steps", "0"), "positive"),
    (("--base_model", "/nonexistent/model"), "no such folder"),
], ids=["data", "task", "row", "steps", "model"])
def test_bad_input_is_one_line_before_loading(setup, monkeypatch, tmp_path, extra, message):
    root, data, model = setup
    _no_model(monkeypatch)
    with pytest.raises(SystemExit, match=message) as e:
        cli_main([*_argv(data, model, tmp_path / "o"), *extra])
    assert "\n" not in str(e.value)


def test_missing_task_file(setup, monkeypatch, tmp_path):
    root, data, model = setup
    _no_model(monkeypatch)
    partial = make_data(tmp_path / "d")
    os.remove(os.path.join(partial, "mawps", "trainset.json"))
    with pytest.raises(SystemExit, match="trainset.json is missing"):
        cli_main(_argv(partial, model, tmp_path / "o"))


def test_mawps_record_and_help():
    r = reproduce._mawps_record({"original_text": "A had 22 . How many ?", "equation": "X=((22.0-14.0)/4.0)",
                                 "ans": 2.0})
    assert r["output"] == "((22.0-14.0)/4.0) = 2. The answer is 2." and r["answer"] == "2"
    from fastadapters.extract import score, task_for

    assert score(task_for("mawps"), r["output"], "2.0")[1]
    text = reproduce.build_parser().format_help()
    assert "lr" in text and "placement" in text and "min" in text


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_real_word_init(setup, kind):
    """Prompt/prefix tuning start from the model's own embeddings / keys and values of INIT_TEXT, not N(0, 1)."""
    import transformers as tf

    import fastadapters as fa

    root, data, model_dir = setup
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cls = fa.PrefixTuningConfig if kind == "prefix" else fa.PromptTuningConfig
    cfg = cls(num_virtual_tokens=5)
    am = fa.get_adapter_model(base, cfg)
    cb = reproduce._real_word_init_callback(tok)
    state = type("S", (), {"global_step": 0})()
    cb.on_train_begin(None, state, None, model=am)
    assert cb.kind == kind
    w = am.prompt_encoder["default"].embedding.weight
    ids = reproduce._init_ids(tok, 5)[0]
    if kind == "prompt":
        torch.testing.assert_close(w, base.get_input_embeddings().weight[ids])
    else:
        attn = am.base_model.model.layers[1].self_attn
        with torch.no_grad(), am.disable_adapter():
            x = am.base_model.model.embed_tokens(ids[None])
            h = am.base_model.model.layers[0](x, position_embeddings=am.base_model.model.rotary_emb(
                x, torch.arange(5)[None]))
            h = h[0] if isinstance(h, tuple) else h
            k1 = attn.k_proj(am.base_model.model.layers[1].input_layernorm(h))[0]
        d = k1.shape[-1]
        layer1_keys = w[:, 2 * 2 * d // 2: 2 * 2 * d // 2 + d]  # row = [k0, v0, k1, v1]: layer 1's keys start at 2d
        torch.testing.assert_close(layer1_keys, k1, atol=1e-5, rtol=1e-4)
    assert w.pow(2).mean().sqrt() < 0.5  # not PEFT's N(0, 1)
