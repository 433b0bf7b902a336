"""`fastadapters evaluate`: LLM-Adapters' evaluate.py and commonsense_evaluate.py, batched and fixed.

    fastadapters evaluate --base_model MODEL [--adapter ADAPTER_DIR] --data_path ../dataset [--dataset gsm8k AQuA]

- datasets: gsm8k, SVAMP, AQuA, MultiArith, AddSub, SingleEq, mawps, mathqa; boolq, piqa, social_i_qa, hellaswag,
  winogrande, ARC-Easy, ARC-Challenge, openbookqa (or any folder of LLM-Adapters records: the scoring rule is then
  inferred from the answers). `--data_path` is a test.json, a folder holding test.json, or a folder of such
  folders (upstream's `dataset/`).
- generation is batched with an attention mask, left padding and the KV cache (upstream: one example at a time,
  cache off; its batched commonsense script passed no mask); greedy by default, `--num_beams 4` is upstream's.
- answers are extracted as upstream does, except the option letters of AQuA / mathqa (see fastadapters.extract).
- writes `{output_dir}/{dataset}.jsonl` (prompt, generation, prediction, answer, correct per example) and
  `{output_dir}/summary.json`, and prints a table (dataset, n, accuracy, examples/s).
- works on the base model alone, or with an adapter folder written by fastadapters or by HF PEFT.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .extract import ALL_DATASETS, Task, canonical_name, score, task_for
from .prompts import PROMPT_STYLES, build_eval_prompt

DEFAULT_MAX_NEW_TOKENS = {"math": 256, "choice": 256, "commonsense": 32}  # upstream's values


# ---------------------------------------------------------------- data discovery

def find_test_sets(data_path: str, datasets: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(dataset name, test.json path) pairs under `data_path`, filtered by `datasets` (case-insensitive).

    `data_path` may be a .json/.jsonl file (named after its folder, or the single `datasets` entry), a folder
    with test.json, or a folder of dataset folders each holding test.json.
    """
    wanted = [canonical_name(d) for d in datasets] if datasets else None
    if os.path.isfile(data_path):
        if wanted and len(wanted) > 1:
            raise SystemExit(f"--data_path {data_path} is one file but --dataset names {wanted}; name one dataset")
        name = wanted[0] if wanted else canonical_name(os.path.basename(os.path.dirname(os.path.abspath(data_path))))
        return [(name, data_path)]
    if not os.path.isdir(data_path):
        raise SystemExit(f"--data_path {data_path}: no such file or folder; point it at a test.json or at "
                         "LLM-Adapters' dataset/ folder")
    if os.path.isfile(os.path.join(data_path, "test.json")):
        own = canonical_name(os.path.basename(os.path.abspath(data_path)))
        name = wanted[0] if wanted and len(wanted) == 1 else own
        return [(name, os.path.join(data_path, "test.json"))]
    found = {canonical_name(d): os.path.join(data_path, d, "test.json") for d in sorted(os.listdir(data_path))
             if os.path.isfile(os.path.join(data_path, d, "test.json"))}
    if wanted:
        missing = [w for w in wanted if w not in found]
        if missing:
            raise SystemExit(f"no test.json for {missing} under {data_path} (found: {sorted(found)})")
        return [(w, found[w]) for w in wanted]
    if not found:
        raise SystemExit(f"{data_path} holds no test.json, directly or in sub-folders")
    known = [d for d in ALL_DATASETS if d in found]  # upstream's order first
    return [(d, found[d]) for d in known + [d for d in found if d not in known]]


def load_test_records(path: str) -> list[dict[str, Any]]:
    """Records of a test file; each needs "instruction" and "answer"."""
    from .data import load_records

    records = load_records(path, split="test")
    for i, r in enumerate(records):
        if "answer" not in r:
            raise SystemExit(f"{path}: record {i} has no 'answer' (keys {sorted(r)}); evaluation needs one")
    return records


# ---------------------------------------------------------------- generation + scoring

@torch.inference_mode()
def generate_batch(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, num_beams: int = 1,
                   device: torch.device | str | None = None) -> list[str]:
    """Greedy (or beam) continuations of `prompts`, batched with left padding, attention mask and KV cache.

    Returns the decoded new text of each prompt (special tokens dropped, stripped)."""
    import transformers as tf

    device = device or next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc["attention_mask"].to(device)
    config = tf.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 use_cache=True)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    new = out[:, input_ids.shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def evaluate_records(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], task: Task, *,
                     batch_size: int = 8, max_new_tokens: int | None = None, num_beams: int = 1,
                     prompt_style: str = "finetune", progress: bool = True, device: Any = None
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate for every record and score it under `task`.

    Returns (rows, summary): rows in record order with prompt, generation, prediction, answer, correct;
    summary with n, correct, accuracy, seconds, examples_per_s. Prompts are batched longest first.
    """
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task.kind]
    prompts = [build_eval_prompt(r, prompt_style) for r in records]
    order = sorted(range(len(records)), key=lambda i: -len(prompts[i]))
    rows: list[dict[str, Any] | None] = [None] * len(records)
    correct = 0
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    bar = tqdm(total=len(records), desc=f"eval {task.name}", unit="ex", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            gens = generate_batch(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                                  num_beams=num_beams, device=device)
            for i, g in zip(idx, gens, strict=True):
                pred, ok = score(task, g, records[i]["answer"])
                correct += ok
                if isinstance(pred, float) and not math.isfinite(pred):
                    pred = None
                rows[i] = {"dataset": task.name, "index": i, "prompt": prompts[i], "generation": g,
                           "prediction": pred, "answer": records[i]["answer"], "correct": bool(ok)}
            done = start + len(idx)
            bar.set_postfix(acc=f"{correct / done:.3f}", refresh=False)
            bar.update(len(idx))  # after the postfix, so each redraw (and the last) shows the accuracy so far
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - t0
    n = len(records)
    summary = {"dataset": task.name, "task": task.kind, "n": n, "correct": correct,
               "accuracy": correct / n if n else 0.0, "seconds": seconds,
               "examples_per_s": n / seconds if seconds > 0 else 0.0}
    return [r for r in rows if r is not None], summary


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: dataset, n, accuracy, examples/s."""
    lines = [f"{'dataset':<16}{'n':>7}{'accuracy':>11}{'examples/s':>13}"]
    for s in summaries:
        lines.append(f"{s['dataset']:<16}{s['n']:>7}{s['accuracy']:>11.4f}{s['examples_per_s']:>13.2f}")
    return "\n".join(lines)


def write_jsonl(rows: Sequence[dict[str, Any]], path: str) -> None:
    """One JSON object per line, written atomically."""
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


# ---------------------------------------------------------------- model loading

def load_model_for_eval(base_model: str, adapter: str | None = None, *, load_8bit: bool = False,
                        load_4bit: bool = False, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any, Any]:
    """(model, tokenizer, device): the base model, wrapped with the adapter in `adapter` if given (fastadapters'
    or PEFT's checkpoint), in eval mode on `device`."""
    from .model import AdapterModel
    from .train import load_base_model, load_tokenizer, resolve_dtype

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = resolve_dtype(dtype, use_cpu=device == "cpu")
    kbit = load_8bit or load_4bit
    model = load_base_model(base_model, load_8bit=load_8bit, load_4bit=load_4bit, dtype=torch_dtype,
                            device_map={"": device} if kbit else None)
    tokenizer = load_tokenizer(base_model, padding_side="left")
    if adapter:
        if not os.path.isdir(adapter):
            raise SystemExit(f"--adapter {adapter}: no such folder (give the output_dir of `fastadapters train`, "
                             "a checkpoint-N folder, or a PEFT adapter folder)")
        model = AdapterModel.from_pretrained(model, adapter)
    if not kbit:
        model = model.to(device)
    model.eval()
    return model, tokenizer, torch.device(device)


# ---------------------------------------------------------------- the command

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `fastadapters evaluate`."""
    p = argparse.ArgumentParser(prog="fastadapters evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Evaluate a model (optionally with an adapter) on LLM-Adapters' math "
                                            "and commonsense test sets.")
    p.add_argument("--base_model", required=True, help="model folder or Hugging Face id (a .gguf file works too)")
    p.add_argument("--adapter", "--lora_weights", dest="adapter", default=None,
                   help="adapter folder (fastadapters or PEFT); omit to evaluate the base model alone")
    p.add_argument("--data_path", default="dataset", help="a test.json, a folder with one, or a folder of them")
    p.add_argument("--dataset", nargs="+", default=None, help=f"which sets (default: all found); known: "
                   f"{', '.join(ALL_DATASETS)}")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records of each set")
    p.add_argument("--num_beams", type=int, default=1, help="1 = greedy; upstream's scripts used 4")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: 256 for math / multiple choice, 32 for commonsense (upstream's)")
    p.add_argument("--prompt_style", default="finetune", choices=PROMPT_STYLES,
                   help="finetune: the training prompt with an empty response (what trained adapters saw); "
                        "upstream_eval: upstream evaluate.py's text, whitespace and all")
    p.add_argument("--output_dir", default="experiment", help="where the .jsonl files and summary.json go")
    p.add_argument("--load_8bit", action="store_true")
    p.add_argument("--load_4bit", action="store_true")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as described by parsed `args`; returns the summary written to summary.json."""
    from .checkpoint import atomic_write_bytes

    if args.limit is not None and args.limit <= 0:
        raise SystemExit(f"--limit {args.limit}: give a positive number of records")
    if args.num_beams <= 0 or args.batch_size <= 0:
        raise SystemExit("--num_beams and --batch_size must be positive")
    sets = find_test_sets(args.data_path, args.dataset)
    model, tokenizer, device = load_model_for_eval(args.base_model, args.adapter, load_8bit=args.load_8bit,
                                                   load_4bit=args.load_4bit, dtype=args.dtype, device=args.device)
    os.makedirs(args.output_dir, exist_ok=True)
    results = []
    for name, path in sets:
        records = load_test_records(path)
        task = task_for(name, [r["answer"] for r in records])
        if args.limit:
            records = records[:args.limit]
        rows, summary = evaluate_records(model, tokenizer, records, task, batch_size=args.batch_size,
                                         max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                         prompt_style=args.prompt_style, progress=not args.no_progress,
                                         device=device)
        out = os.path.join(args.output_dir, f"{name}.jsonl")
        write_jsonl(rows, out)
        summary.update(data_file=path, predictions_file=out)
        results.append(summary)
    report = {"base_model": args.base_model, "adapter": args.adapter, "num_beams": args.num_beams,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "limit": args.limit,
              "prompt_style": args.prompt_style, "results": results}
    atomic_write_bytes(os.path.join(args.output_dir, "summary.json"), json.dumps(report, indent=2).encode())
    print(format_table(results))
    print(f"per-example predictions and summary.json in {args.output_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fastadapters evaluate` / `python -m fastadapters.evaluate`; returns the exit code."""
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
