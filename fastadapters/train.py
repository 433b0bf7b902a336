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
    p = argparse.ArgumentParser(
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
    g.add_argument("--val_set_size", type=int, default=2000)
    g.add_argument("--use_gradient_checkpointing", default=False, **flag)
    g.add_argument("--eval_step", type=int, default=200)
    g.add_argument("--save_step", type=int, default=200)
    g = p.add_argument_group("lora")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.05)
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
        raise SystemExit(f"{what} needs bitsandbytes, which is not installed: `pip install bitsandbytes` (needs a "
                         "CUDA GPU), or drop the flag to train in 16/32 bit") from None
    if not torch.cuda.is_available():
        raise SystemExit(f"{what} with bitsandbytes needs a CUDA GPU; none is visible. Drop the flag on CPU.")


def _split_gguf(path: str) -> tuple[str, dict[str, Any]]:
    if path.endswith(".gguf") and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    return path, {}


def load_base_model(base_model: str, *, load_8bit: bool = False, load_4bit: bool = False,
                    dtype: torch.dtype = torch.float32, device_map: Any = None) -> torch.nn.Module:
    """AutoModelForCausalLM.from_pretrained with LLM-Adapters' options; k-bit loading via bitsandbytes."""
    import transformers as tf

    if not base_model:
        raise SystemExit("please give --base_model, e.g. --base_model HuggingFaceTB/SmolLM2-135M or a local folder")
    if load_8bit and load_4bit:
        raise SystemExit("--load_8bit and --load_4bit are exclusive: pick one")
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
        raise SystemExit(f"the tokenizer of {base_model} has no pad, unk or eos token; add one to it")
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
        raise SystemExit(f"{type(model).__name__} does not support gradient checkpointing; drop "
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
            raise SystemExit(f"--lora_target_modules {lora_targets} and --target_modules {targets} disagree; "
                             "give one of them (they are aliases for LoRA)")
        return fa.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=lora_targets or targets, bias="none")
    if lora_targets:
        raise SystemExit(f"--lora_target_modules applies to LoRA only; for {args.adapter_name} use --target_modules")
    if args.adapter_name == "bottleneck":
        return fa.BottleneckConfig(bottleneck_size=args.bottleneck_size, non_linearity=args.non_linearity,
                                   adapter_dropout=args.adapter_dropout, use_parallel_adapter=args.use_parallel_adapter,
                                   use_adapterp=args.use_adapterp, scaling=args.scaling, target_modules=targets)
    if targets:
        raise SystemExit(f"--target_modules does not apply to {args.adapter_name}")
    if args.adapter_name == "prefix-tuning":
        return fa.PrefixTuningConfig(num_virtual_tokens=args.num_virtual_tokens)
    return fa.PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens)


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


def resolve_resume(resume: str | None, output_dir: str) -> tuple[str | None, str | None]:
    """(trainer checkpoint to resume, adapter folder to load weights from) for --resume_from_checkpoint."""
    if resume is None or str(resume).strip().lower() in ("", "none", "false", "0", "no"):
        return None, None
    if str(resume).strip().lower() in ("true", "last", "latest", "1", "yes"):
        last = last_complete_checkpoint(output_dir)
        if last is None:
            print(f"[fastadapters] no complete checkpoint in {output_dir}: starting from step 0")
        return last, None
    path = os.fspath(resume)
    if not os.path.isdir(path):
        raise SystemExit(f"--resume_from_checkpoint {path}: no such folder; give a checkpoint-N folder, 'last', "
                         "or an adapter folder")
    if os.path.isfile(os.path.join(path, TRAINER_STATE)):
        if not is_complete_checkpoint(path):
            if not _looks_whole(path):
                last = last_complete_checkpoint(os.path.dirname(os.path.abspath(path)))
                raise SystemExit(f"{path} is incomplete (the run stopped while saving it); resume from "
                                 f"{last or 'scratch'} instead, or pass --resume_from_checkpoint last")
            print(f"[fastadapters] {path} has no completion marker (not written by fastadapters train?); its files "
                  "look whole, resuming from it")
        return path, None
    if any(os.path.isfile(os.path.join(path, f)) for f in ("adapter_model.safetensors", "adapter_model.bin")):
        return None, path
    last = last_complete_checkpoint(path)
    if last is not None:
        return last, None
    raise SystemExit(f"{path} holds neither a training checkpoint (trainer_state.json) nor an adapter "
                     "(adapter_model.safetensors)")


def _looks_whole(path: str) -> bool:
    """A checkpoint without our marker (another tool's): trainer state readable, adapter and optimizer present."""
    try:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    weights = any(os.path.isfile(os.path.join(path, f)) for f in ("adapter_model.safetensors", "adapter_model.bin"))
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
    module stays cheap."""
    import transformers as tf
    from tqdm.auto import tqdm

    class AdapterTrainer(tf.Trainer):
        """Trainer that saves and loads the adapter only, in fastadapters' (PEFT's) layout."""

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            _unwrap(self.model).save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            marker = os.path.join(folder, COMPLETE_MARKER)
            if self.args.should_save and os.path.exists(marker):
                os.remove(marker)  # being rewritten: not complete until the new marker lands
            super()._save_checkpoint(model, trial)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            load_adapter_weights(model if model is not None else self.model, resume_from_checkpoint)

        def _load_best_model(self) -> None:
            best = self.state.best_model_checkpoint
            if best and os.path.isdir(best):
                print(f"[fastadapters] loading the best checkpoint {best} (eval loss {self.state.best_metric:.4f})")
                load_adapter_weights(self.model, best)

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

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is None:
                return
            self.bar.update(state.global_step - self.bar.n)
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            post = {"tok/s": f"{(state.num_input_tokens_seen - self.tok0) / elapsed:,.0f}"}
            if self.loss is not None:
                post = {"loss": f"{self.loss:.4f}", **post}
            self.bar.set_postfix(post, refresh=False)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            logs = logs or {}
            if "loss" in logs:
                self.loss = float(logs["loss"])
            if "eval_loss" in logs and state.is_world_process_zero:
                msg = f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}"
                (self.bar.write if self.bar is not None else print)(msg)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    class CheckpointMarkerCallback(tf.TrainerCallback):
        """Marks checkpoint-N complete once every process has finished writing it."""

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

    from .data import CausalLMCollator, TokenizedDataset, load_records, tokenize_records, train_val_split
    from .model import get_adapter_model

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    ddp = world_size != 1
    rank = int(os.environ.get("RANK", 0))
    say = print if rank == 0 else (lambda *a, **k: None)
    if not args.base_model:
        raise SystemExit("please give --base_model, e.g. --base_model HuggingFaceTB/SmolLM2-135M or a local folder")
    if args.micro_batch_size <= 0 or args.batch_size <= 0:
        raise SystemExit(f"--batch_size {args.batch_size} and --micro_batch_size {args.micro_batch_size} must be > 0")
    grad_accum = max(1, args.batch_size // args.micro_batch_size)
    if ddp:
        grad_accum = max(1, grad_accum // world_size)
    say("Finetuning model with params:\n" + "\n".join(f"{k}: {v}" for k, v in vars(args).items()))

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
    model = load_base_model(args.base_model, load_8bit=args.load_8bit, load_4bit=args.load_4bit, dtype=dtype)
    tokenizer = load_tokenizer(args.base_model)
    if kbit:
        _prepare_kbit(model)
    if args.use_gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.config.use_cache = False

    config = build_adapter_config(args)
    tf.set_seed(args.seed)  # the adapter's initial weights depend on --seed only
    model = get_adapter_model(model, config)
    for p in model.adapter_parameters():  # AMP needs float32 master weights for what trains
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if kbit:
        model._hf_peft_config_loaded = True  # tells Trainer that adapters sit on the quantized model

    resume_checkpoint, resume_weights = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if resume_weights:
        say(f"Restarting from adapter weights in {resume_weights} (training state starts at step 0)")
        load_adapter_weights(model, resume_weights)
    if rank == 0:
        model.print_trainable_parameters()

    records = load_records(args.data_path)
    train_records, val_records = train_val_split(records, args.val_set_size, seed=args.seed)
    tok_kw = dict(cutoff_len=args.cutoff_len, train_on_inputs=args.train_on_inputs)
    train_data = TokenizedDataset(tokenize_records(tokenizer, train_records, **tok_kw))
    val_data = TokenizedDataset(tokenize_records(tokenizer, val_records, **tok_kw)) if val_records else None
    if len(train_data) == 0:
        raise SystemExit(f"{args.data_path} gives no training records after the validation split")

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
        remove_unused_columns=False, label_names=["labels"], prediction_loss_only=True,
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
    args = build_parser().parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
