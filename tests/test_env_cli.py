"""`python -m fastadapters.env` and the `fastadapters` command (demo end to end).

The module entry point `python -m fastadapters.env` runs as a subprocess in
tests/test_benchmarks_cpu.py::test_gpu_check_smoke_writes_summary_csv_and_junit (its env.txt)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from fastadapters import cli
from fastadapters import env as fa_env
from fastadapters.ops import _registry


def test_env_report_lists_versions_gpu_and_backends(capsys):
    assert fa_env.main([]) == 0
    out = capsys.readouterr().out
    import peft
    import safetensors
    import transformers
    import triton

    for name, version in [("torch", torch.__version__), ("triton", triton.__version__),
                          ("transformers", transformers.__version__), ("peft", peft.__version__),
                          ("safetensors", safetensors.__version__)]:
        assert f"{name:<13} {version}" in out, f"{name} {version} missing from:\n{out}"
    assert f"python        {sys.version.split()[0]}" in out
    cuda_line = next(ln for ln in out.splitlines() if ln.startswith("CUDA"))
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in cuda_line and "sm_" in cuda_line
    else:
        assert "not available" in cuda_line
    assert "TRITON_INTERPRET" in out
    for op in fa_env.OPS:
        assert f"  {op}" in out
    assert out.count("torch   -> torch") == len(fa_env.OPS)
    ext_line = next(ln for ln in out.splitlines() if ln.startswith("C++/CUDA extension"))
    assert any(w in ext_line for w in ("built, CPU code only", "built, with CUDA kernels", "not loaded", "disabled"))


@pytest.mark.parametrize("value", ["1", ""], ids=["interpret-set", "interpret-unset"])
def test_env_reports_triton_interpret(monkeypatch, value):
    if value:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    text = fa_env.format_report(fa_env.collect())
    line = next(ln for ln in text.splitlines() if ln.startswith("TRITON_INTERPRET"))
    assert line.endswith("set (1)" if value else "not set")


def test_env_reads_the_op_registry(monkeypatch):
    """A registered kernel shows up for its backend and for auto; one that refuses the inputs falls back."""
    def fake(*args, **kwargs):
        raise AssertionError("env must only resolve, never run a kernel")

    monkeypatch.setitem(_registry._KERNELS["lora_linear"], "triton", _registry.Kernel(fake, None))
    monkeypatch.setitem(_registry._KERNELS["bottleneck_adapter"], "triton",
                        _registry.Kernel(fake, lambda *a, **k: "needs a GPU"))
    monkeypatch.delitem(_registry._KERNELS["lora_linear"], "cuda", raising=False)
    monkeypatch.delitem(_registry._KERNELS["bottleneck_adapter"], "cuda", raising=False)

    lora = fa_env.resolved_backends("lora_linear")
    assert lora == {"torch": "torch", "triton": "triton", "cuda": "none (no kernel registered)", "auto": "triton"}
    assert fa_env.registered_backends("lora_linear") == ["torch", "triton"]
    bott = fa_env.resolved_backends("bottleneck_adapter")
    assert bott["triton"] == "none (kernel refuses these inputs: needs a GPU)"
    assert bott["auto"] == "torch"


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_cli_env_prints_the_report(capsys):
    assert cli.main(["env"]) == 0
    assert f"torch         {torch.__version__}" in capsys.readouterr().out


def test_delegated_command_gets_every_argument(monkeypatch):
    """How `train` / `evaluate` slot in: their module's own parser sees all arguments, --help included."""
    import types

    seen: list[list[str]] = []
    fake = types.ModuleType("fake_train")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fake_train", fake)
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, cli.delegate("train", "fake_train", "fine-tune")])
    assert cli.main(["train", "--help"]) == 7
    assert cli.main(["train", "--base_model", "m", "-x", "pos"]) == 7
    assert seen == [["--help"], ["--base_model", "m", "-x", "pos"]]
    with pytest.raises(SystemExit):
        cli.main(["demo", "--no-such-flag"])


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2


def test_demo_fast_trains_saves_reloads_and_merges(tmp_path, capsys):
    out, report = tmp_path / "demo", tmp_path / "demo.json"
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--fast", "--out", str(out), "--no-progress", "--json", str(report)]) == 0
    assert torch.get_num_threads() == threads, "the demo must restore torch's thread count"
    text = capsys.readouterr().out
    r = json.loads(report.read_text())

    assert r["steps"] == 12
    assert r["last_loss"] < 0.5 * r["first_loss"], r
    assert r["accuracy_after"] >= 0.9 > r["accuracy_before"], r
    # r=8 on q,k,v,o,gate,up,down of 2 layers (hidden 64, 2 kv heads of 16, intermediate 128)
    assert r["trainable_params"] == 2 * 8 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert r["reload_max_diff"] < 1e-5, r
    assert r["merge_max_diff"] < 1e-3, r
    for phrase in ("trainable params: 16,384", "loss: first", "saved the adapter to", "reloaded onto",
                   "merged into the base weights"):
        assert phrase in text


def test_demo_rejects_zero_steps(tmp_path):
    with pytest.raises(SystemExit, match="at least 1 training step"):
        cli.main(["demo", "--steps", "0", "--out", str(tmp_path)])


def test_fresh_machine_scripts_are_wired():
    """CI runs .ci/run -> scripts/test.sh -> setup_env.sh, which pins the CPU torch before anything else."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def read(rel: str) -> str:
        with open(os.path.join(repo, rel)) as f:
            return f.read()

    assert os.access(os.path.join(repo, ".ci", "run"), os.X_OK)
    assert "\nbash scripts/test.sh\n" in read(".ci/run")
    for script in ("scripts/test.sh", "scripts/demo.sh"):
        assert "bash scripts/setup_env.sh" in read(script), script
    assert "pytest" in read("scripts/test.sh") and "fastadapters.cli demo" in read("scripts/demo.sh")
    setup = read("scripts/setup_env.sh")
    assert setup.index("torch==2.13.0") < setup.index("-r requirements/test.txt")
