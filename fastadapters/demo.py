"""`fastadapters demo`: LoRA end to end on a tiny random Llama, in seconds on a CPU, with no download.

Builds a small Llama from a config, injects a LoRA adapter with `fastadapters.get_adapter_model`, trains it
with AdamW to continue a fixed cyclic token pattern, saves the adapter (PEFT layout), reloads it onto a fresh
copy of the base model and checks the logits match, then merges it into the base weights and checks again.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

VOCAB = 128
PATTERN = (5, 17, 9, 30, 22, 41, 13, 36, 60, 7, 51, 26)  # the sequence the adapter learns to continue
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DemoResult:
    """What the demo measured (also printed)."""

    steps: int
    first_loss: float
    last_loss: float
    accuracy_before: float
    accuracy_after: float
    trainable_params: int
    total_params: int
    out_dir: str
    files: list[str]
    reload_max_diff: float
    merge_max_diff: float
    seconds: float


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, device: str | torch.device = "cpu") -> nn.Module:
    """A randomly initialised LlamaForCausalLM (vocab 128), the same weights for the same seed."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden // 4, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.1)  # 0.1, not 0.02: room for confident logits
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device).eval()


def pattern_batch(batch: int, length: int, generator: torch.Generator, device: str | torch.device) -> torch.Tensor:
    """input_ids (batch, length): PATTERN repeated, each row starting at a random offset."""
    pat = torch.tensor(PATTERN)
    starts = torch.randint(0, len(PATTERN), (batch, 1), generator=generator)
    idx = (starts + torch.arange(length)) % len(PATTERN)
    return pat[idx].to(device)


@torch.no_grad()
def next_token_accuracy(model: nn.Module, ids: torch.Tensor) -> float:
    """Fraction of positions whose greedy next token is the pattern's next token. ids: (B, L)."""
    logits = model(input_ids=ids).logits
    return (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def run_demo(out_dir: str | os.PathLike = "out/demo", *, fast: bool = False, steps: int | None = None,
             lr: float = 1e-2, seed: int = 0, device: str = "auto", progress: bool = True) -> DemoResult:
    """Train, save, reload and merge a LoRA adapter on a tiny Llama; print each step and return the numbers.

    out_dir: where adapter_config.json + adapter_model.safetensors go; fast: fewer steps and a smaller batch
    (for tests); steps: override the number of AdamW steps (default 30, 12 with fast).
    """
    from tqdm.auto import tqdm

    import fastadapters as fa

    t0 = time.perf_counter()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    threads = torch.get_num_threads()
    if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a model this small gains nothing from threads and loses a lot on a busy CPU
    try:
        steps = steps if steps is not None else (12 if fast else 30)
        batch, length = (8, 24) if fast else (16, 32)
        gen = torch.Generator().manual_seed(seed)
        eval_ids = pattern_batch(32, length, torch.Generator().manual_seed(seed + 1), dev)

        base = tiny_llama(seed, device=dev)
        print(f"fastadapters demo: LoRA on a tiny random Llama (hidden 64, 2 layers, vocab {VOCAB}) on {dev}")
        acc_before = next_token_accuracy(base, eval_ids)

        cfg = fa.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS)
        model = fa.get_adapter_model(base, cfg)
        model.print_trainable_parameters()
        trainable, total = model.get_nb_trainable_parameters()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        losses: list[float] = []
        model.train()
        bar = tqdm(range(steps), desc="training", disable=not progress, mininterval=0.2)
        for _ in bar:
            ids = pattern_batch(batch, length, gen, dev)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        model.eval()
        acc_after = next_token_accuracy(model, eval_ids)
        print(f"loss: first {losses[0]:.4f} -> last {losses[-1]:.4f} after {steps} AdamW steps")
        print(f"next-token accuracy on the pattern: {acc_before:.0%} before -> {acc_after:.0%} after")

        out = Path(out_dir)
        model.save_pretrained(out)
        files = sorted(p.name for p in out.iterdir() if p.is_file())
        print(f"saved the adapter to {out} ({', '.join(files)})")

        want = _logits(model, eval_ids)
        reloaded = fa.AdapterModel.from_pretrained(tiny_llama(seed, device=dev), out).eval()
        reload_diff = (_logits(reloaded, eval_ids) - want).abs().max().item()
        print(f"reloaded onto a fresh base model: max |logits difference| = {reload_diff:.3g}")
        merged = reloaded.merge_and_unload()
        merge_diff = (_logits(merged, eval_ids) - want).abs().max().item()
        print(f"merged into the base weights (plain transformers model): max |logits difference| = {merge_diff:.3g}")
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    print(f"done in {seconds:.1f} s")
    return DemoResult(steps=steps, first_loss=losses[0], last_loss=losses[-1], accuracy_before=acc_before,
                      accuracy_after=acc_after, trainable_params=trainable, total_params=total, out_dir=str(out),
                      files=files, reload_max_diff=reload_diff, merge_max_diff=merge_diff, seconds=seconds)


def result_dict(r: DemoResult) -> dict[str, Any]:
    return asdict(r)
