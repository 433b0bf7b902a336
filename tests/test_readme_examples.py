"""The examples of README's "Using fastadapters with Trainer / TRL / accelerate / FSDP" section, run as written on
a tiny Llama (only the MODEL line is replaced, and use_cpu=True added to TRL's configs, whose bf16 default
needs it on a CPU-only machine): Trainer and TRL in-process, the accelerate launch and FSDP ones with
2 CPU processes (gloo)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from fastadapters.demo_pipeline import write_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Using fastadapters with Trainer / TRL / accelerate / FSDP"
MODEL_LINE = 'MODEL = "HuggingFaceTB/SmolLM2-135M"'

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def examples() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the section, in order."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = [f"{a} plus {b} is {a + b}." for a in range(12) for b in range(6)]
    return write_tiny_llama(str(tmp_path_factory.mktemp("readme") / "model"), texts, vocab_size=300)


def _code(i: int, lang: str, tiny: str) -> str:
    got_lang, code = examples()[i]
    assert got_lang == lang
    if lang == "python":
        assert MODEL_LINE in code
        code = code.replace(MODEL_LINE, f"MODEL = {tiny!r}")
    return code


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "FASTADAPTERS_BACKEND": "torch", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def test_the_section_has_the_four_examples():
    assert [lang for lang, _ in examples()] == ["python", "python", "bash", "python"]


def test_trainer_example_and_its_accelerate_launch(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _code(0, "python", tiny)
    exec(compile(code, "README:trainer", "exec"), {"__name__": "__main__"})
    out = tmp_path / "out" / "trainer"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / "checkpoint-4" / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()

    # the DDP launch line's accelerate form, as written (its torchrun form is what `fastadapters train` is
    # tested with in test_train.py, and the FSDP example below); accelerate needs --multi_gpu on a CPU-only machine
    (tmp_path / "train.py").write_text(code.replace('"out/trainer"', '"out/ddp"'))
    torchrun, accelerate = (part.split() for part in _code(2, "bash", tiny).split("# or:"))
    assert torchrun == ["torchrun", "--nproc_per_node", "2", "train.py"]
    assert accelerate == ["accelerate", "launch", "--num_processes", "2", "train.py"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", *accelerate[2:]]
    env = {**_env(), "ACCELERATE_USE_CPU": "1"}  # as the README says for a machine without GPUs
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "ddp" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "ddp" / "checkpoint-4" / "rng_state_1.pth").exists()  # both ranks trained


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
def test_trl_example(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _code(1, "python", tiny)
    assert code.count('report_to="none"') == 2
    code = code.replace('report_to="none"', 'report_to="none", use_cpu=True')  # TRL's bf16 default needs it on CPU
    exec(compile(code, "README:trl", "exec"), {"__name__": "__main__"})
    assert (tmp_path / "out" / "sft" / "checkpoint-4" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "out" / "dpo" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_fsdp_example(tiny, tmp_path):
    (tmp_path / "fsdp.py").write_text(_code(3, "python", tiny))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "fsdp.py"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from fastadapters.checkpoint import load_weights

    saved = load_weights(tmp_path / "out" / "fsdp")
    assert saved and all("lora_" in k for k in saved)
    assert (tmp_path / "out" / "fsdp" / "ckpt" / ".metadata").exists()


@pytest.mark.gpu
def test_trainer_example_under_accelerates_fsdp2_plugin(tiny, tmp_path):
    """accelerate's FSDP plugin (`accelerate launch --use_fsdp --fsdp_version 2`) on the Trainer example. accelerate
    1.15-1.16 enables FSDP only on accelerator process groups (state.py: MULTI_GPU, XPU, ...): on a CPU it runs DDP
    and says nothing, so this runs on a GPU only (one process is enough for the plugin's wrap and its save)."""
    (tmp_path / "train.py").write_text(_code(0, "python", tiny).replace('"out/trainer"', '"out/fsdp"'))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", "1", "train.py"]
    env = {**_env(), "FASTADAPTERS_BACKEND": "auto", "ACCELERATE_USE_FSDP": "true"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from fastadapters.checkpoint import load_weights

    saved = load_weights(tmp_path / "out" / "fsdp")
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:5]
    assert (tmp_path / "out" / "fsdp" / "checkpoint-4").is_dir()
