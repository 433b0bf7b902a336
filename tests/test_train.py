"""`fastadapters train` end to end on a tiny random Llama written to disk with a tiny local tokenizer (no download):
train -> checkpoint -> (simulated kill) -> resume -> evaluate --limit, for LoRA, bottleneck series / parallel,
prefix and prompt tuning; exact resume; DDP with 2 CPU processes (gloo) equal to one process; the arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf

import fastadapters as fa
from fastadapters.checkpoint import load_weights
from fastadapters.data import iter_texts, make_arithmetic_data, save_records
from fastadapters.demo_pipeline import write_tiny_llama
from fastadapters.evaluate import main as evaluate_main
from fastadapters.train import (
    COMPLETE_MARKER,
    build_adapter_config,
    build_parser,
    enable_gradient_checkpointing,
    last_complete_checkpoint,
    load_base_model,
    resolve_resume,
    train,
)

ADAPTERS = {
    "lora": ["--adapter_name", "lora", "--lora_r", "4", "--lora_target_modules", "[q_proj,v_proj]"],
    "bottleneck-series": ["--adapter_name", "bottleneck", "--bottleneck_size", "8"],
    "bottleneck-parallel": ["--adapter_name", "bottleneck", "--bottleneck_size", "8", "--use_parallel_adapter"],
    "prefix": ["--adapter_name", "prefix-tuning", "--num_virtual_tokens", "4"],
    "prompt": ["--adapter_name", "prompt-tuning", "--num_virtual_tokens", "4"],
}


class SimulatedKill(Exception):
    pass


class KillAtStep(tf.TrainerCallback):
    """Raise at the start of optimizer step `step` + 1, after checkpoint-`step` has been written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SimulatedKill


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    train_recs, test_recs = make_arithmetic_data(20, 4, seed=1)
    save_records(train_recs, root / "data" / "train.json")
    save_records(test_recs, root / "data" / "test.json")
    model = write_tiny_llama(str(root / "model"), list(iter_texts(train_recs + test_recs)), vocab_size=300)
    return root, model


def _argv(setup, out, adapter="lora", *extra):
    root, model = setup
    return ["--base_model", model, "--data_path", str(root / "data" / "train.json"), "--output_dir", str(out),
            "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "3", "--save_step", "2",
            "--val_set_size", "4", "--eval_step", "2", "--warmup_steps", "1", "--learning_rate", "1e-2",
            "--cutoff_len", "96", "--progress", "false", "--logging_steps", "1", *ADAPTERS[adapter], *extra]


def _run(argv, callbacks=()):
    return train(build_parser().parse_args(argv), callbacks=callbacks)


# ---------------------------------------------------------------- end to end, every adapter type

@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_train_kill_resume_evaluate(setup, tmp_path, adapter, capsys):
    out = tmp_path / "run"
    with pytest.raises(SimulatedKill):
        _run(_argv(setup, out, adapter), callbacks=[KillAtStep(2)])
    ckpt = out / "checkpoint-2"
    assert {p.name for p in ckpt.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", COMPLETE_MARKER,
                                                "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
    saved = load_weights(ckpt)
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:  # Trainer's file: the adapter state, no base weights
        trainer_keys = list(f.keys())
    assert len(trainer_keys) == len(saved) and not any(k.endswith(("proj.weight", "embed_tokens.weight"))
                                                         for k in trainer_keys)
    n_adapter = sum(p.numel() for p in saved.values())
    assert 0 < n_adapter < 20_000

    summary = _run(_argv(setup, out, adapter, "--resume_from_checkpoint", "last"))
    assert summary["global_step"] == 3
    assert "Resuming from" in capsys.readouterr().out
    with open(out / "adapter_config.json") as f:
        peft_type = json.load(f)["peft_type"]
    expected = {"lora": "LORA", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}.get(adapter, "BOTTLENECK")
    assert peft_type == expected
    final = load_weights(out)
    assert set(final) == set(saved)
    assert any(not torch.equal(final[k], saved[k]) for k in final)  # step 3 changed the adapter

    root, model = setup
    ev = tmp_path / "eval"
    assert evaluate_main(["--base_model", model, "--adapter", str(out), "--data_path", str(root / "data" / "test.json"),
                          "--dataset", "arith", "--limit", "2", "--batch_size", "2", "--max_new_tokens", "4",
                          "--output_dir", str(ev), "--no_progress"]) == 0
    rows = [json.loads(line) for line in (ev / "arith.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]) >= {"prompt", "generation", "prediction", "answer", "correct"}


def test_resume_is_exact_and_loses_no_step(setup, tmp_path, capsys):
    """Killed after checkpoint-2 and resumed == never killed: same data order, same RNG, same weights."""
    extra = ("--max_steps", "4", "--lora_dropout", "0.1", "--wandb_project", "x")
    full = _run(_argv(setup, tmp_path / "full", "lora", *extra))
    with pytest.raises(SimulatedKill):
        _run(_argv(setup, tmp_path / "killed", "lora", *extra), callbacks=[KillAtStep(2)])
    resumed = _run(_argv(setup, tmp_path / "killed", "lora", *extra, "--resume_from_checkpoint", "last"))
    assert full["global_step"] == resumed["global_step"] == 4
    a, b = load_weights(tmp_path / "full"), load_weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = capsys.readouterr().out
    if "wandb" not in sys.modules:
        assert "wandb is not installed" in out
    assert "tokens/s" in out and "peak memory" in out


def test_incomplete_checkpoints_are_skipped_and_adapter_folders_restart(setup, tmp_path, capsys):
    out = tmp_path / "run"  # also: gradient checkpointing works without 8-bit loading
    assert _run(_argv(setup, out, "lora", "--max_steps", "2", "--val_set_size", "0",
                      "--use_gradient_checkpointing"))["global_step"] == 2
    partial = out / "checkpoint-7"  # a save that was cut off: files but no marker
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert resolve_resume("last", str(out)) == (str(out / "checkpoint-2"), None)
    with pytest.raises(SystemExit, match="incomplete"):
        resolve_resume(str(partial), str(out))
    assert resolve_resume(str(out / "checkpoint-2"), "x") == (str(out / "checkpoint-2"), None)
    (out / "checkpoint-2" / COMPLETE_MARKER).unlink()  # whole but unmarked (another tool's): accepted by path
    assert resolve_resume(str(out / "checkpoint-2"), "x") == (str(out / "checkpoint-2"), None)
    assert last_complete_checkpoint(str(out)) is None  # ... but never picked by "last"
    assert resolve_resume(None, "x") == (None, None)
    assert resolve_resume("last", str(tmp_path / "empty")) == (None, None)
    with pytest.raises(SystemExit, match="no such folder"):
        resolve_resume(str(tmp_path / "nope"), "x")
    # a folder holding a final adapter (no trainer state) restarts from its weights at step 0, as upstream
    assert resolve_resume(str(out), str(tmp_path / "elsewhere")) == (None, str(out))
    second = _run(_argv(setup, tmp_path / "second", "lora", "--max_steps", "1", "--val_set_size", "0",
                        "--resume_from_checkpoint", str(out)))
    assert second["global_step"] == 1
    assert "Restarting from adapter weights" in capsys.readouterr().out


def test_enable_gradient_checkpointing(setup):
    model = load_base_model(setup[1])
    enable_gradient_checkpointing(model)
    on = getattr(model, "is_activation_checkpointing", None)
    assert (on if on is not None else model.is_gradient_checkpointing) and model.config.use_cache is False


# ---------------------------------------------------------------- DDP

def test_ddp_two_cpu_processes_match_one_process(setup, tmp_path):
    """torchrun with 2 gloo processes: each takes half of every global batch; the result equals one process."""
    common = ["--max_steps", "2", "--val_set_size", "0", "--lora_dropout", "0", "--batch_size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTADAPTERS_BACKEND": "torch"}
    # both runs in fresh processes started together, so both import the same version of the code
    single = subprocess.run([sys.executable, "-m", "fastadapters.train",
                             *_argv(setup, tmp_path / "single", "lora", *common)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastadapters.train", *_argv(setup, tmp_path / "ddp", "lora", *common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "identical on all 2 ranks" in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "ddp" / "checkpoint-2" / "rng_state_1.pth").exists()  # rank 1 took part
    a, b = load_weights(tmp_path / "single"), load_weights(tmp_path / "ddp")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, f"DDP and single-process adapters differ by {diff}"
    for run in (single, proc):
        assert "done: 2 steps" in run.stdout


# ---------------------------------------------------------------- arguments

UPSTREAM_DEFAULTS = {
    "base_model": "", "data_path": "yahma/alpaca-cleaned", "output_dir": "./lora-alpaca", "adapter_name": "lora",
    "load_8bit": False, "batch_size": 128, "micro_batch_size": 4, "num_epochs": 3, "learning_rate": 3e-4,
    "cutoff_len": 256, "val_set_size": 2000, "use_gradient_checkpointing": False, "eval_step": 200,
    "save_step": 200, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_modules": None,
    "bottleneck_size": 256, "non_linearity": "tanh", "adapter_dropout": 0.0, "use_parallel_adapter": False,
    "use_adapterp": False, "target_modules": None, "scaling": 1.0, "num_virtual_tokens": 30,
    "train_on_inputs": True, "group_by_length": False, "wandb_project": "", "wandb_run_name": "",
    "wandb_watch": "", "wandb_log_model": "", "resume_from_checkpoint": None, "load_4bit": False,
}


@pytest.mark.parametrize("name,default", list(UPSTREAM_DEFAULTS.items()), ids=list(UPSTREAM_DEFAULTS))
def test_upstream_argument_defaults(name, default):
    assert getattr(build_parser().parse_args([]), name) == default


@pytest.mark.parametrize("argv,expected", [
    (["--lora_target_modules", "[q_proj,v_proj]"], ["q_proj", "v_proj"]),
    (["--lora_target_modules", "q_proj", "k_proj"], ["q_proj", "k_proj"]),
    (["--lora_target_modules=q_proj,o_proj"], ["q_proj", "o_proj"]),
    (["--target_modules", "[q_proj]"], ["q_proj"]),
    ([], None),
], ids=["fire-list", "space-list", "comma", "target-modules", "default"])
def test_lora_target_modules_is_an_alias(argv, expected):
    cfg = build_adapter_config(build_parser().parse_args(argv))
    assert isinstance(cfg, fa.LoraConfig) and cfg.target_modules == expected


def test_conflicting_targets_and_bool_flags():
    with pytest.raises(SystemExit, match="disagree"):
        build_adapter_config(build_parser().parse_args(["--lora_target_modules", "q_proj",
                                                        "--target_modules", "v_proj"]))
    args = build_parser().parse_args(["--adapter_name", "bottleneck", "--use_parallel_adapter", "--scaling", "learned",
                                      "--train_on_inputs=False", "--load_8bit", "false"])
    assert args.use_parallel_adapter is True and args.train_on_inputs is False and args.load_8bit is False
    cfg = build_adapter_config(args)
    assert isinstance(cfg, fa.BottleneckConfig) and cfg.use_parallel_adapter and cfg.scaling == "learned"
    assert isinstance(build_adapter_config(build_parser().parse_args(["--adapter_name", "prompt_tuning"])),
                      fa.PromptTuningConfig)
    assert build_adapter_config(build_parser().parse_args(["--adapter_name", "prefix-tuning",
                                                           "--num_virtual_tokens", "7"])).num_virtual_tokens == 7


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is not None,
                    reason="bitsandbytes is installed")
@pytest.mark.parametrize("flag", ["load_8bit", "load_4bit"])
def test_kbit_without_bitsandbytes_says_what_to_install(setup, flag):
    with pytest.raises(SystemExit, match="pip install bitsandbytes"):
        load_base_model(setup[1], **{flag: True})


# ---------------------------------------------------------------- a previous run is never destroyed silently

def _main(argv, capsys):
    from fastadapters.train import main

    code = main(argv)
    return code, capsys.readouterr()


def test_output_dir_with_a_previous_run_refuses_unless_resumed_or_overwritten(setup, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _argv(setup, out, "lora", "--max_steps", "2", "--val_set_size", "0")
    assert _main(argv, capsys)[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert (out / "checkpoint-2").is_dir()

    code, cap = _main(argv, capsys)  # the same command again: refused, nothing touched
    assert code == 2
    err = cap.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "holds a previous run" in err and "checkpoint-2" in err and "adapter_model.safetensors" in err
    assert "--overwrite_output_dir" in err and "--resume_from_checkpoint last" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # resuming the finished run is allowed (nothing left to do: step 2 of 2)
    assert _main([*argv, "--resume_from_checkpoint", "last"], capsys)[0] == 0
    # overwriting replaces it: the old checkpoints are gone, the new run's are there
    code, cap = _main([*argv[:-2], "--val_set_size", "0", "--max_steps", "1", "--save_step", "1",
                       "--overwrite_output_dir"], capsys)
    assert code == 0 and "removed the previous run's" in cap.out
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]


# ---------------------------------------------------------------- input errors: one line, exit 2, no model load

def _bad_inputs(root, model):
    data = str(root / "data" / "train.json")
    (root / "bad").mkdir(exist_ok=True)
    (root / "bad" / "dict.json").write_text('{"instruction": "a single record, not a list"}')
    (root / "bad" / "noinstr.json").write_text('[{"input": "x", "output": "y"}]')
    (root / "bad" / "broken.json").write_text('[{"instruction": ')
    (root / "bad" / "empty").mkdir(exist_ok=True)
    return {
        "missing-data": (["--data_path", str(root / "nope" / "train.json")], "no such file"),
        "json-not-a-list": (["--data_path", str(root / "bad" / "dict.json")], "expected a list of records"),
        "record-without-instruction": (["--data_path", str(root / "bad" / "noinstr.json")], "no 'instruction'"),
        "broken-json": (["--data_path", str(root / "bad" / "broken.json")], "not valid JSON"),
        "rank-0": (["--lora_r", "0"], "--lora_r 0 must be a positive rank"),
        "lora-dropout-1.5": (["--lora_dropout", "1.5"], r"--lora_dropout 1.5 must be in \[0, 1\)"),
        "adapter-dropout-neg": (["--adapter_name", "bottleneck", "--adapter_dropout", "-0.1"], "--adapter_dropout"),
        "val-set-too-big": (["--val_set_size", "500"], "only 20 records"),
        "adapter-type": (["--adapter_name", "loha"], "invalid choice: 'loha'"),
        "base-model-missing-path": (["--base_model", str(root / "no-such-model")], "no such folder"),
        "base-model-relative-path": (["--base_model", "./models/llama-7b-hf"], "no such folder"),
        "base-model-not-a-model": (["--base_model", str(root / "bad" / "empty")], "no config.json"),
        "cutoff-0": (["--cutoff_len", "0"], "--cutoff_len 0"),
        "no-base-model": (["--base_model", ""], "please give --base_model"),
    }, data, model


BAD = ["missing-data", "json-not-a-list", "record-without-instruction", "broken-json", "rank-0", "lora-dropout-1.5",
       "adapter-dropout-neg", "val-set-too-big", "adapter-type", "base-model-missing-path",
       "base-model-relative-path", "base-model-not-a-model", "cutoff-0", "no-base-model"]


@pytest.mark.parametrize("case", BAD)
def test_input_errors_fail_in_one_line_before_the_model_loads(setup, tmp_path, case, capsys, monkeypatch):
    import fastadapters.train as ft

    def no_load(*a, **k):
        raise AssertionError("the model (or tokenizer) was loaded before the input was checked")

    monkeypatch.setattr(ft, "load_base_model", no_load)
    monkeypatch.setattr(ft, "load_tokenizer", no_load)
    cases, data, model = _bad_inputs(*setup)
    extra, match = cases[case]
    argv = _argv(setup, tmp_path / "out", "lora") + extra  # later arguments win
    code, cap = _main(argv, capsys)
    assert code == 2
    err = cap.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fastadapters train: error: ")
    assert __import__("re").search(match, err), err
    assert not (tmp_path / "out").exists()


def test_real_crashes_keep_their_traceback(setup, tmp_path, monkeypatch):
    import fastadapters.train as ft

    def crash(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(ft, "load_base_model", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        ft.main(_argv(setup, tmp_path / "out", "lora"))


def test_default_val_set_size_is_capped_at_a_fifth_with_a_note(setup):
    from fastadapters.train import effective_val_set_size, load_data

    args = build_parser().parse_args(["--data_path", str(setup[0] / "data" / "train.json")])
    assert args.val_set_size == 2000
    train_records, val_records, note = load_data(args)
    assert (len(train_records), len(val_records)) == (16, 4)
    assert "defaults to 2000 but the data has 20 records: holding out 4" in note
    assert effective_val_set_size(args.val_set_size, 50_000) == (2000, None)  # upstream's default where it fits
    assert effective_val_set_size(7, 20) == (7, None)  # explicit sizes are kept
    with pytest.raises(SystemExit, match="only 20 records"):
        effective_val_set_size(20, 20)


# ---------------------------------------------------------------- progress bar

def test_progress_bar_shows_the_last_logged_loss(setup, tmp_path, capsys):
    losses = []

    class Record(tf.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    argv = _argv(setup, tmp_path / "run", "lora", "--val_set_size", "0", "--progress", "true")
    _run(argv, callbacks=[Record()])
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()
    bar = [line for line in final if line.startswith("train")][-1]
    assert len(losses) == 3 and f"loss={losses[-1]:.4f}" in bar, (losses, bar)


@pytest.mark.parametrize("initialized", [True, False])
def test_main_tears_the_process_group_down_on_every_exit(setup, tmp_path, monkeypatch, capsys, initialized):
    """`fastadapters train` ends a torchrun rank's process group itself (also on an input error), never leaving it
    to the interpreter's exit; without one it touches nothing."""
    import torch.distributed as dist

    from fastadapters.train import main

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: initialized)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append(1))
    rc = main(["--base_model", setup[1], "--data_path", str(tmp_path / "missing.json"), "--output_dir",
               str(tmp_path / "out")])
    assert rc == 2 and "missing.json" in capsys.readouterr().err
    assert calls == ([1] if initialized else [])
