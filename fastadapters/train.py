"""`fastadapters train`: LLM-Adapters' finetune.py on fastadapters, with its faults fixed.

Same arguments, names and defaults as upstream finetune.py (`--base_model`, `--data_path`, `--adapter_name`
lora | bottleneck | prefix-tuning | prompt-tuning, `--batch_size 128`, `--micro_batch_size 4`, ...), the same
training prompt and tokenization, transformers' Trainer underneath. Differences from upstream:

- `--lora_target_modules` works (an alias of `--target_modules`; upstream ignored it);
- `--use_gradient_checkpointing` works without 8-bit loading; `--load_4bit` exists; both k-bit modes go
  through bitsandbytes, or stop with a message saying what to install;
- prompt tuning can be chosen; wandb is used only when it is installed;
- checkpoints hold the adapter only (adapter_config.json + adapter_model.safetensors, PEFT's layout) next to
  the optimizer/scheduler/RNG state; a checkpoint counts once its marker file is written, so
  `--resume_from_checkpoint last` after a kill continues from the last complete one with the same data order;
- a progress bar with loss and tokens/s, and a final line with time, tokens/s and peak memory.

Multi-GPU: `torchrun --nproc_per_node N -m fastadapters.train ...` (DDP; gradient accumulation is divided by the
world size, as upstream does). Run `python -m fastadapters.train --help` for every option.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

ADAPTER_NAMES = ("lora", "bottleneck", "prefix-tuning", "prompt-tuning")
COMPLETE_MARKER = "fastadapters_checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"
DEFAULT_VAL_SET_SIZE = 2000  # upstream's; without an explicit --val_set_size it is capped at a fifth of the data


class InputError(SystemExit):
    """A bad argument or input file. `fastadapters train` prints it as one line and exits with code 2 (before the
    model loads); `str(error)` is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _DefaultInt(int):
    """An int default that remembers it was not given on the command line (compares equal to the plain int)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2, as argparse), pointing at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- argument parsing

def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off", "none", ""):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean: use true or false")


_REGEX_CHARS = set("*|()^$?+\\{}")


def _module_list(values: Sequence[str] | str | None) -> list[str] | str | None:
    """Accept fire's '[q_proj,v_proj]', 'q_proj,v_proj' and 'q_proj v_proj' spellings; a single value with
    regex characters (e.g. '.*layers\\.(2[0-9])\\..*_proj') is kept as a regex string (PEFT: full match)."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    if len(values) == 1 and not values[0].strip().startswith("[") and _REGEX_CHARS & set(values[0]):
        return values[0].strip()
    names: list[str] = []
    for v in values:
        for part in v.strip().strip("[]()").split(","):
            part = part.strip().strip("'\"").strip()
            if part:
                names.append(part)
    return names or None


def _scaling(value: str) -> float | str:
    if value == "learned":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scaling {value!r}: give a number or 'learned'") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `fastadapters train` (upstream finetune.py's names and defaults)."""
    p = _Parser(
        prog="fastadapters train", description="Fine-tune a causal LM with an adapter on LLM-Adapters JSON data "
        "(same arguments as LLM-Adapters' finetune.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag = dict(type=_bool, nargs="?", const=True, metavar="BOOL")
    g = p.add_argument_group("model / data")
    g.add_argument("--base_model", default="", help="model folder or Hugging Face id (required); a .gguf file "
                   "is read through transformers' gguf_file")
    g.add_argument("--data_path", default="yahma/alpaca-cleaned",
                   help="LLM-Adapters .json/.jsonl file, a folder with train.json, or a dataset name "
                        "(needs `datasets`)")
    g.add_argument("--output_dir", default="./lora-alpaca")
    g.add_argument("--adapter_name", default="lora", type=lambda s: s.lower().replace("_", "-"),
                   choices=ADAPTER_NAMES)
    g.add_argument("--load_8bit", default=False, help="load the base model in 8 bit (bitsandbytes)", **flag)
    g.add_argument("--load_4bit", default=False, help="load the base model in 4 bit NF4 (bitsandbytes)", **flag)
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=int, default=128, help="examples per optimizer step, all processes")
    g.add_argument("--micro_batch_size", type=int, default=4, help="examples per forward pass and process")
    g.add_argument("--num_epochs", type=float, default=3)
    g.add_argument("--learning_rate", type=float, default=3e-4)
    g.add_argument("--cutoff_len", type=int, default=256)
    g.add_argument("--val_set_size", type=int, default=_DefaultInt(DEFAULT_VAL_SET_SIZE),
                   help="validation records held out; the default is capped at a fifth of the data")
    g.add_argument("--use_gradient_checkpointing", default=False, **flag)
    g.add_argument("--eval_step", type=int, default=200)
    g.add_argument("--save_step", type=int, default=200)
    g = p.add_argument_group("lora")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--use_dora", default=False, **flag, help="DoRA (weight-decomposed LoRA, PEFT's use_dora)")
    g.add_argument("--lora_target_modules", nargs="+", default=None,
                   help="alias of --target_modules for LoRA (default: the model family's, q_proj v_proj for Llama)")
    g = p.add_argument_group("bottleneck")
    g.add_argument("--bottleneck_size", type=int, default=256)
    g.add_argument("--non_linearity", default="tanh")
    g.add_argument("--adapter_dropout", type=float, default=0.0)
    g.add_argument("--use_parallel_adapter", default=False, **flag)
    g.add_argument("--use_adapterp", default=False, **flag)
    g.add_argument("--target_modules", nargs="+", default=None, help="modules to adapt (LoRA and bottleneck)")
    g.add_argument("--scaling", type=_scaling, default=1.0, help="bottleneck output scale: a number or 'learned'")
    g = p.add_argument_group("prefix / prompt tuning")
    g.add_argument("--num_virtual_tokens", type=int, default=30)
    g = p.add_argument_group("llm")
    g.add_argument("--train_on_inputs", default=True, help="if false, mask the prompt out of the loss", **flag)
    g.add_argument("--group_by_length", default=False, **flag)
    g = p.add_argument_group("wandb (used only when wandb is installed)")
    g.add_argument("--wandb_project", default="")
    g.add_argument("--wandb_run_name", default="")
    g.add_argument("--wandb_watch", default="")
    g.add_argument("--wandb_log_model", default="")
    g = p.add_argument_group("resuming")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-N folder, 'last' (the newest complete one in output_dir), or an adapter "
                        "folder (weights only, training restarts at step 0 as upstream)")
    g.add_argument("--overwrite_output_dir", default=False,
                   help="replace a previous run in --output_dir (its checkpoints and adapter); without it, "
                        "training into a folder that holds a run stops", **flag)
    g = p.add_argument_group("fastadapters additions")
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    g.add_argument("--warmup_steps", type=int, default=100)
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--save_total_limit", type=int, default=3)
    g.add_argument("--seed", type=int, default=42, help="data split, shuffling and init")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="base model dtype; auto: bfloat16 (or float16) on GPU, float32 on CPU")
    g.add_argument("--use_cpu", default=False, help="train on the CPU even when a GPU is present", **flag)
    g.add_argument("--progress", default=True, help="show the progress bar", **flag)
    return p


# ---------------------------------------------------------------- model / tokenizer loading

def resolve_dtype(dtype: str, use_cpu: bool = False) -> torch.dtype:
    """torch dtype for a --dtype choice; "auto" is bfloat16 (float16 without bf16 support) on GPU, else float32."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.cuda.is_available() and not use_cpu:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _require_bitsandbytes(what: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InputError(f"{what} needs bitsandbytes, which is not installed: `pip install bitsandbytes` (needs a "
                         "CUDA GPU), or drop the flag to train in 16/32 bit") from None
    if not torch.cuda.is_available():
        raise InputError(f"{what} with bitsandbytes needs a CUDA GPU; none is visible. Drop the flag on CPU.")


def _split_gguf(path: str) -> tuple[str, dict[str, Any]]:
    if path.endswith(".gguf") and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    return path, {}


def load_base_model(base_model: str, *, load_8bit: bool = False, load_4bit: bool = False,
                    dtype: torch.dtype = torch.float32, device_map: Any = None) -> torch.nn.Module:
    """AutoModelForCausalLM.from_pretrained with LLM-Adapters' options; k-bit loading via bitsandbytes."""
    import transformers as tf

    if not base_model:
        raise InputError("please give --base_model, e.g. --base_model HuggingFaceTB/SmolLM2-135M or a local folder")
    if load_8bit and load_4bit:
        raise InputError("--load_8bit and --load_4bit are exclusive: pick one")
    path, extra = _split_gguf(base_model)
    kwargs: dict[str, Any] = dict(dtype=dtype, **extra)
    if load_8bit or load_4bit:
        _require_bitsandbytes("--load_8bit" if load_8bit else "--load_4bit")
        kwargs["quantization_config"] = tf.BitsAndBytesConfig(
            load_in_8bit=load_8bit, load_in_4bit=load_4bit, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
        kwargs["device_map"] = device_map or {"": int(os.environ.get("LOCAL_RANK") or 0)}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    return tf.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_tokenizer(base_model: str, padding_side: str = "left") -> Any:
    """The model's tokenizer with a pad token (its own, else unk, else eos) and `padding_side`."""
    import transformers as tf

    path, extra = _split_gguf(base_model)
    tok = tf.AutoTokenizer.from_pretrained(path, **extra)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if tok.pad_token_id is None:
        raise InputError(f"the tokenizer of {base_model} has no pad, unk or eos token; add one to it")
    tok.padding_side = padding_side
    return tok


def _prepare_kbit(model: torch.nn.Module) -> None:
    """Make a k-bit model trainable under adapters: freeze it, keep norms/embeddings in float32 (as PEFT's
    prepare_model_for_kbit_training does)."""
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and p.ndim == 1:
            p.data = p.data.float()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing on the transformers model (non-reentrant, so frozen inputs need no grad)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(f"{type(model).__name__} does not support gradient checkpointing; drop "
                         "--use_gradient_checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def build_adapter_config(args: argparse.Namespace) -> Any:
    """The fastadapters config of `--adapter_name` from the parsed arguments."""
    import fastadapters as fa

    lora_targets = _module_list(args.lora_target_modules)
    targets = _module_list(args.target_modules)
    if args.adapter_name == "lora":
        if lora_targets and targets and lora_targets != targets:
            raise InputError(f"--lora_target_modules {lora_targets} and --target_modules {targets} disagree; "
                             "give one of them (they are aliases for LoRA)")
        return fa.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=lora_targets or targets, bias="none", use_dora=args.use_dora)
    if lora_targets:
        raise InputError(f"--lora_target_modules applies to LoRA only; for {args.adapter_name} use --target_modules")
    if args.use_dora:
        raise InputError(f"--use_dora applies to LoRA only (--adapter_name lora), not {args.adapter_name}")
    if args.adapter_name == "bottleneck":
        return fa.BottleneckConfig(bottleneck_size=args.bottleneck_size, non_linearity=args.non_linearity,
                                   adapter_dropout=args.adapter_dropout, use_parallel_adapter=args.use_parallel_adapter,
                                   use_adapterp=args.use_adapterp, scaling=args.scaling, target_modules=targets)
    if targets:
        raise InputError(f"--target_modules does not apply to {args.adapter_name}")
    if args.adapter_name == "prefix-tuning":
        return fa.PrefixTuningConfig(num_virtual_tokens=args.num_virtual_tokens)
    return fa.PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens)


# ---------------------------------------------------------------- checking the input before the model loads

def _looks_like_path(name: str) -> bool:
    """A --base_model that is meant as a local path (a Hugging Face id is `name` or `org/name`)."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith((".gguf", ".safetensors", ".bin", ".json")))


def check_base_model(base_model: str) -> None:
    """Fail fast on a --base_model that cannot be a model: empty, or a path that does not exist / is no model."""
    if not base_model:
        raise InputError("please give --base_model, e.g. --base_model HuggingFaceTB/SmolLM2-135M or a local folder")
    path = os.path.expanduser(base_model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise InputError(f"--base_model {base_model} is a file; give a model folder (with config.json) or a "
                             ".gguf file")
        return
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"--base_model {base_model} has no config.json: not a transformers model folder")
        return
    if _looks_like_path(base_model):
        raise InputError(f"--base_model {base_model}: no such folder; give an existing model folder or a Hugging "
                         "Face model id such as HuggingFaceTB/SmolLM2-135M")


def check_args(args: argparse.Namespace) -> None:
    """Every check on the numbers and flags of `args` that needs no file: raises InputError (one line)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise InputError(message)

    need(args.micro_batch_size > 0 and args.batch_size > 0,
         f"--batch_size {args.batch_size} and --micro_batch_size {args.micro_batch_size} must be > 0")
    need(args.cutoff_len > 0, f"--cutoff_len {args.cutoff_len} must be a positive number of tokens (upstream: 256)")
    need(args.learning_rate > 0, f"--learning_rate {args.learning_rate} must be > 0")
    need(args.max_steps > 0 or args.num_epochs > 0,
         f"--num_epochs {args.num_epochs} must be > 0 (or give --max_steps)")
    need(args.val_set_size >= 0, f"--val_set_size {args.val_set_size} must be >= 0 (0: no validation)")
    need(args.eval_step > 0 and args.save_step > 0,
         f"--eval_step {args.eval_step} and --save_step {args.save_step} must be > 0")
    need(args.save_total_limit is None or args.save_total_limit > 0,
         f"--save_total_limit {args.save_total_limit} must be > 0")
    if args.adapter_name == "lora":
        need(args.lora_r > 0, f"--lora_r {args.lora_r} must be a positive rank (e.g. 8)")
        need(args.lora_alpha > 0, f"--lora_alpha {args.lora_alpha} must be > 0 (e.g. 2 * lora_r)")
        need(0 <= args.lora_dropout < 1, f"--lora_dropout {args.lora_dropout} must be in [0, 1)")
    elif args.adapter_name == "bottleneck":
        need(args.bottleneck_size > 0, f"--bottleneck_size {args.bottleneck_size} must be > 0")
        need(0 <= args.adapter_dropout < 1, f"--adapter_dropout {args.adapter_dropout} must be in [0, 1)")
        need(not (args.use_parallel_adapter and args.use_adapterp),
             "--use_parallel_adapter and --use_adapterp are exclusive: pick one")
    else:
        need(args.num_virtual_tokens > 0, f"--num_virtual_tokens {args.num_virtual_tokens} must be > 0")
    need(not (args.load_8bit and args.load_4bit), "--load_8bit and --load_4bit are exclusive: pick one")


def previous_run(output_dir: str) -> list[str]:
    """What in `output_dir` belongs to an earlier training run: checkpoint-N folders, adapter / trainer files."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir), key=lambda n: (_checkpoint_step(n) is None, _checkpoint_step(n) or 0, n))
    run_files = {"adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", TRAINER_STATE,
                 "model.safetensors", "training_args.bin"}
    return [n for n in names if _checkpoint_step(n) is not None or n in run_files]


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool, resume_requested: bool = False) -> None:
    """Refuse to train into a folder that holds another run, unless resuming it or told to overwrite it
    (as transformers' example scripts do)."""
    found = previous_run(output_dir)
    if found and not overwrite and not resuming:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        if resume_requested:
            raise InputError(f"--output_dir {output_dir} holds a previous run ({shown}) with no complete checkpoint "
                             "to resume; replace it with --overwrite_output_dir or pick another --output_dir")
        raise InputError(f"--output_dir {output_dir} holds a previous run ({shown}); continue it with "
                         "--resume_from_checkpoint last, replace it with --overwrite_output_dir, or pick another "
                         "--output_dir")


def clear_previous_run(output_dir: str) -> list[str]:
    """Delete what previous_run(output_dir) lists (for --overwrite_output_dir); returns the names removed."""
    import shutil

    found = previous_run(output_dir)
    for name in found:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return found


def effective_val_set_size(val_set_size: int, n_records: int) -> tuple[int, str | None]:
    """(records to hold out, a note or None). An explicit size must leave training data; upstream's default 2000
    is capped at a fifth of the data (so `--val_set_size` can be left out on small datasets)."""
    if isinstance(val_set_size, _DefaultInt):
        cap = n_records // 5
        if val_set_size > cap:
            return cap, (f"--val_set_size defaults to {int(val_set_size)} but the data has {n_records} records: "
                         f"holding out {cap} (a fifth); pass --val_set_size to choose")
        return int(val_set_size), None
    if val_set_size >= n_records:
        raise InputError(f"--val_set_size {val_set_size} but the data has only {n_records} records: pass a smaller "
                         "--val_set_size (0: no validation)")
    return int(val_set_size), None


def load_data(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """(train records, validation records, note) of --data_path; a missing file or a bad shape is an InputError."""
    from .data import load_records, train_val_split

    path = os.path.expanduser(str(args.data_path))
    if not os.path.exists(path) and (_looks_like_path(path) or path.endswith(".jsonl") or "/" not in path):
        raise InputError(f"--data_path {args.data_path}: no such file or folder; give an LLM-Adapters .json/.jsonl "
                         "file, a folder with train.json, or a Hugging Face dataset name (org/name)")
    try:
        records = load_records(path)
    except (OSError, ValueError) as e:
        raise InputError(f"--data_path {args.data_path}: {e}") from None
    if not records:
        raise InputError(f"--data_path {args.data_path} holds no records")
    val_size, note = effective_val_set_size(args.val_set_size, len(records))
    train_records, val_records = train_val_split(records, val_size, seed=args.seed)
    return train_records, val_records, note


# ---------------------------------------------------------------- checkpoints

def is_complete_checkpoint(path: str) -> bool:
    """Whether `path` is a checkpoint-N folder whose save finished (its marker file exists)."""
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def _checkpoint_step(name: str) -> int | None:
    if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
        return int(name[len("checkpoint-"):])
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N under `output_dir` whose save finished, or None."""
    if not os.path.isdir(output_dir):
        return None
    found = [(step, os.path.join(output_dir, n)) for n in os.listdir(output_dir)
             if (step := _checkpoint_step(n)) is not None and os.path.isdir(os.path.join(output_dir, n))]
    for _, path in sorted(found, reverse=True):
        if is_complete_checkpoint(path):
            return path
    return None


def _resume_requested(resume: str | None) -> bool:
    return resume is not None and str(resume).strip().lower() not in ("", "none", "false", "0", "no")


def resolve_resume(resume: str | None, output_dir: str) -> tuple[str | None, str | None]:
    """(trainer checkpoint to resume, adapter folder to load weights from) for --resume_from_checkpoint."""
    if not _resume_requested(resume):
        return None, None
    if str(resume).strip().lower() in ("true", "last", "latest", "1", "yes"):
        last = last_complete_checkpoint(output_dir)
        if last is None:
            print(f"[fastadapters] no complete checkpoint in {output_dir}: starting from step 0")
        return last, None
    path = os.fspath(resume)
    if not os.path.isdir(path):
        raise InputError(f"--resume_from_checkpoint {path}: no such folder; give a checkpoint-N folder, 'last', "
                         "or an adapter folder")
    if os.path.isfile(os.path.join(path, TRAINER_STATE)):
        if not is_complete_checkpoint(path):
            if not _looks_whole(path):
                last = last_complete_checkpoint(os.path.dirname(os.path.abspath(path)))
                raise InputError(f"{path} is incomplete (the run stopped while saving it); resume from "
                                 f"{last or 'scratch'} instead, or pass --resume_from_checkpoint last")
            print(f"[fastadapters] {path} has no completion marker (not written by fastadapters train?); its files "
                  "look whole, resuming from it")
        return path, None
    if any(os.path.isfile(os.path.join(path, f)) for f in ("adapter_model.safetensors", "adapter_model.bin")):
        return None, path
    last = last_complete_checkpoint(path)
    if last is not None:
        return last, None
    raise InputError(f"{path} holds neither a training checkpoint (trainer_state.json) nor an adapter "
                     "(adapter_model.safetensors)")


def _looks_whole(path: str) -> bool:
    """A checkpoint without our marker (another tool's): trainer state readable, adapter and optimizer present."""
    try:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    weights = any(os.path.isfile(os.path.join(path, f))
                  for f in ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors"))
    return isinstance(state, dict) and "global_step" in state and weights and \
        os.path.isfile(os.path.join(path, "optimizer.pt"))


def load_adapter_weights(model: Any, path: str, adapter_name: str = "default") -> None:
    """Copy the adapter weights saved in `path` into `model`'s existing adapter `adapter_name`."""
    from .checkpoint import load_weights

    am = _unwrap(model)
    am._method(adapter_name).load_state_dict(am, adapter_name, load_weights(path))


def _unwrap(model: Any) -> Any:
    from .model import AdapterModel

    while not isinstance(model, AdapterModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, AdapterModel):
        raise TypeError(f"expected a fastadapters AdapterModel, got {type(model).__name__}")
    return model


def _adapter_checksum(model: Any) -> float:
    return float(sum(p.detach().double().sum().item() + p.detach().double().abs().sum().item()
                     for p in _unwrap(model).adapter_parameters()))


# ---------------------------------------------------------------- Trainer pieces

def _trainer_classes() -> tuple[type, type, type]:
    """(AdapterTrainer, ProgressBarCallback, CheckpointMarkerCallback); built lazily so importing this
    module stays cheap. The trainer is fastadapters.hf.AdapterTrainer: only public Trainer API."""
    import transformers as tf
    from tqdm.auto import tqdm

    from .hf import AdapterTrainer

    class ProgressBarCallback(tf.TrainerCallback):
        """tqdm bar over optimizer steps with the last logged loss and tokens/s."""

        def __init__(self, enabled: bool = True) -> None:
            self.enabled = enabled
            self.bar: Any = None
            self.loss: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's callback signature
            self.t0, self.tok0, self.step0 = time.perf_counter(), state.num_input_tokens_seen, state.global_step
            if state.is_world_process_zero and self.enabled:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                                dynamic_ncols=True)

        def _show(self, state: Any, refresh: bool) -> None:
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            post = {"tok/s": f"{(state.num_input_tokens_seen - self.tok0) / elapsed:,.0f}"}
            if self.loss is not None:
                post = {"loss": f"{self.loss:.4f}", **post}
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(state.global_step - self.bar.n)  # draws the new postfix with the new count
            if refresh:
                self.bar.refresh()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self._show(state, refresh=False)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            logs = logs or {}
            if "loss" in logs:
                self.loss = float(logs["loss"])
                if self.bar is not None:  # the loss logged at this step, shown now, not one interval later
                    self._show(state, refresh=True)
            if "eval_loss" in logs and state.is_world_process_zero:
                msg = f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}"
                (self.bar.write if self.bar is not None else print)(msg)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    class CheckpointMarkerCallback(tf.TrainerCallback):
        """Marks checkpoint-N complete once every process has finished writing it (and unmarks a checkpoint-N
        that is about to be written again)."""

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if control.should_save and state.is_world_process_zero:
                marker = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", COMPLETE_MARKER)
                if os.path.exists(marker):
                    os.remove(marker)  # being rewritten: not complete until the new marker lands

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            import torch.distributed as dist

            from .checkpoint import atomic_write_bytes

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if state.is_world_process_zero:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                if os.path.isdir(folder):
                    body = {"global_step": state.global_step, "time": time.time()}
                    atomic_write_bytes(os.path.join(folder, COMPLETE_MARKER), json.dumps(body).encode())

    return AdapterTrainer, ProgressBarCallback, CheckpointMarkerCallback


def _add_trainer_weights(model: Any, checkpoint: str, main: bool) -> None:
    """A checkpoint-N written before fastadapters used Trainer's own resume path holds the adapter in PEFT's layout
    only; Trainer reads model.safetensors (the AdapterModel's state). Write it from the adapter files once."""
    target = os.path.join(checkpoint, "model.safetensors")
    if os.path.isfile(target) or not main:
        return
    from safetensors.torch import save_file

    load_adapter_weights(model, checkpoint)
    save_file({k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}, target,
              metadata={"format": "pt"})
    print(f"[fastadapters] {checkpoint}: wrote model.safetensors (the adapter state) for Trainer's resume")


def _peak_memory() -> str:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU, max allocated)"
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return f"{kib / 2**20:.2f} GiB (peak process RSS)"
    except (ImportError, OSError):
        return "n/a"


# ---------------------------------------------------------------- the command

def train(args: argparse.Namespace, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run finetuning as described by parsed `args`; returns a summary (steps, seconds, tokens, tokens/s,
    output_dir). `callbacks` are extra transformers TrainerCallbacks."""
    import transformers as tf

    from .data import CausalLMCollator, TokenizedDataset, tokenize_records
    from .model import get_adapter_model

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    ddp = world_size != 1
    rank = int(os.environ.get("RANK", 0))
    say = print if rank == 0 else (lambda *a, **k: None)

    # every input check first: a bad argument or file costs no model load (minutes on a 7B model)
    check_base_model(args.base_model)
    check_args(args)
    config = build_adapter_config(args)
    resume_checkpoint, resume_weights = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    check_output_dir(args.output_dir, getattr(args, "overwrite_output_dir", False), resume_checkpoint is not None,
                     resume_requested=_resume_requested(args.resume_from_checkpoint) and resume_weights is None)
    train_records, val_records, split_note = load_data(args)
    if not train_records:
        raise InputError(f"--data_path {args.data_path} leaves no training records after the validation split")
    grad_accum = max(1, args.batch_size // args.micro_batch_size)
    if ddp:
        grad_accum = max(1, grad_accum // world_size)
    say("Finetuning model with params:\n" + "\n".join(f"{k}: {v}" for k, v in vars(args).items()))
    if split_note:
        say(f"[fastadapters] {split_note}")
    if getattr(args, "overwrite_output_dir", False) and resume_checkpoint is None and rank == 0:
        removed = clear_previous_run(args.output_dir)
        if removed:
            say(f"[fastadapters] --overwrite_output_dir: removed the previous run's {', '.join(removed)}")

    # wandb: on only when asked for (argument or WANDB_PROJECT) and installed
    use_wandb = bool(args.wandb_project) or bool(os.environ.get("WANDB_PROJECT"))
    if use_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            say("[fastadapters] wandb is not installed: logging to wandb is off (pip install wandb to turn it on)")
            use_wandb = False
    for key, value in (("WANDB_PROJECT", args.wandb_project), ("WANDB_WATCH", args.wandb_watch),
                       ("WANDB_LOG_MODEL", args.wandb_log_model)):
        if value:
            os.environ[key] = value

    use_cpu = args.use_cpu or not torch.cuda.is_available()
    dtype = resolve_dtype(args.dtype, use_cpu)
    kbit = args.load_8bit or args.load_4bit
    if kbit:
        _require_bitsandbytes("--load_8bit" if args.load_8bit else "--load_4bit")
    tokenizer = load_tokenizer(args.base_model)
    tok_kw = dict(cutoff_len=args.cutoff_len, train_on_inputs=args.train_on_inputs)
    train_data = TokenizedDataset(tokenize_records(tokenizer, train_records, **tok_kw))
    val_data = TokenizedDataset(tokenize_records(tokenizer, val_records, **tok_kw)) if val_records else None

    model = load_base_model(args.base_model, load_8bit=args.load_8bit, load_4bit=args.load_4bit, dtype=dtype)
    if kbit:
        _prepare_kbit(model)
    if args.use_gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.config.use_cache = False

    tf.set_seed(args.seed)  # the adapter's initial weights depend on --seed only
    model = get_adapter_model(model, config)
    for p in model.adapter_parameters():  # AMP needs float32 master weights for what trains
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()

    if resume_weights:
        say(f"Restarting from adapter weights in {resume_weights} (training state starts at step 0)")
        load_adapter_weights(model, resume_weights)
    if rank == 0:
        model.print_trainable_parameters()

    half: dict[str, bool] = {}
    if not use_cpu and dtype != torch.float32:
        half = {"bf16": True} if dtype == torch.bfloat16 else {"fp16": True}
    has_val = val_data is not None
    targs = tf.TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size, gradient_accumulation_steps=grad_accum,
        warmup_steps=args.warmup_steps, num_train_epochs=args.num_epochs, max_steps=args.max_steps,
        learning_rate=args.learning_rate, logging_steps=args.logging_steps, optim="adamw_torch",
        eval_strategy="steps" if has_val else "no", eval_steps=args.eval_step if has_val else None,
        save_strategy="steps", save_steps=args.save_step, save_total_limit=args.save_total_limit,
        load_best_model_at_end=has_val, metric_for_best_model="loss" if has_val else None,
        ddp_find_unused_parameters=False if ddp else None,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        report_to=["wandb"] if use_wandb else "none", run_name=args.wandb_run_name or None if use_wandb else None,
        prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, seed=args.seed, use_cpu=use_cpu,
        dataloader_pin_memory=not use_cpu, **half)
    AdapterTrainer, ProgressBarCallback, CheckpointMarkerCallback = _trainer_classes()
    trainer = AdapterTrainer(
        model=model, args=targs, train_dataset=train_data, eval_dataset=val_data,
        data_collator=CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=8),
        callbacks=[ProgressBarCallback(args.progress), CheckpointMarkerCallback(), *callbacks])
    trainer.remove_callback(tf.trainer_callback.PrinterCallback)

    t0 = time.perf_counter()
    tokens0 = 0
    if resume_checkpoint:
        say(f"Resuming from {resume_checkpoint}")
        _add_trainer_weights(model, resume_checkpoint, rank == 0)
        with open(os.path.join(resume_checkpoint, TRAINER_STATE)) as f:
            tokens0 = int(json.load(f).get("num_input_tokens_seen", 0) or 0)
    out = trainer.train(resume_from_checkpoint=resume_checkpoint)
    seconds = time.perf_counter() - t0
    trainer.save_model(args.output_dir)

    tokens = int(trainer.state.num_input_tokens_seen) - tokens0
    summary = {"global_step": trainer.state.global_step, "train_loss": out.training_loss, "seconds": seconds,
               "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9), "output_dir": args.output_dir,
               "world_size": world_size}
    if ddp:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            sums = [None] * world_size
            dist.all_gather_object(sums, _adapter_checksum(model))
            same = all(abs(s - sums[0]) <= 1e-6 * max(1.0, abs(sums[0])) for s in sums)
            summary["ranks_in_sync"] = same
            say(f"[fastadapters] adapter weights {'identical' if same else 'DIFFER'} on all {world_size} ranks")
    say(f"done: {summary['global_step']} steps in {seconds:.1f} s | {tokens:,} tokens, "
        f"{summary['tokens_per_s']:,.0f} tokens/s | peak memory {_peak_memory()} | adapter saved to {args.output_dir}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fastadapters train` / `python -m fastadapters.train`; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, already printed in one line)
        return int(e.code or 0)
    try:
        train(args)
    except InputError as e:  # bad input: one line, no traceback; real crashes keep theirs
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Tear the torchrun process group down before the interpreter does (torch.distributed's documented way to
    end): left to the interpreter's exit, gloo's threads go with static destruction, the likely cause of a rank
    that died with SIGABRT ("terminate called without an active exception") after a finished run in CI."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
