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
    # "cuda" = the op's C++/CUDA kernel, else its Triton kernel (fastadapters.backend)
    assert lora == {"torch": "torch", "triton": "triton", "cuda": "triton", "auto": "triton"}
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
    monkeypatch.setattr(cli, "COMMANDS", [cli.add_demo, cli.delegate("train", "fake_train", "fine-tune")])
    assert cli.main(["train", "--help"]) == 7
    assert cli.main(["train", "--base_model", "m", "-x", "pos"]) == 7
    assert seen == [["--help"], ["--base_model", "m", "-x", "pos"]]
    with pytest.raises(SystemExit):
        cli.main(["demo", "--no-such-flag"])


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2


def test_demo_command_runs_the_pipeline_in_fast_mode(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--fast", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "none (base model)" in text and "lora adapter saved to" in text
    report = json.loads((out / "demo_report.json").read_text())
    assert report["rows"] and os.path.isdir(out)


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_delegate_their_help(command, capsys):
    try:  # a delegated main may return the exit code or raise SystemExit (argparse's --help)
        rc = cli.main([command, "--help"])
    except SystemExit as e:
        rc = e.code
    assert rc == 0
    assert "--base_model" in capsys.readouterr().out


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
    assert "torch==2.13.0" in read("requirements/constraints.txt")
    # the CPU torch goes in first, and every later install of both sets is held to it by the constraints file
    assert setup.index("-c requirements/constraints.txt torch") < setup.index('-r "$REQS"')
    assert setup.count("-c requirements/constraints.txt") == 2
