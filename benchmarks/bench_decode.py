"""Decode: per-token latency of generate() (greedy, batch 1 and 16, 128 new tokens) for each adapter type.

Same Llama-7B-shaped model as bench_model (2 layers by default, random weights, bf16), a 32-token prompt. For one
setup of each adapter type in benchmarks/models.py (LoRA q,v r=16, series, parallel, prefix P=30, prompt P=20):
  fastadapters  our adapter, backend "auto"
  peft          HF PEFT where it has the method, else
  reference     our adapter on backend "torch"
  merged        LoRA only: our adapter folded into the weights (merge_and_unload)
  no_adapter    the bare model: the floor
Per-token time = (time of generate(new tokens) - time of generate(1 token)) / (new - 1): the prefill is left out.
Rows: ms/token (p50/p20/p80), tokens/s (batch / per-token time), peak memory of one generate(), x_floor.

    python -m benchmarks.bench_decode [--preset smoke|quick|full] [--layers N] [--device cpu] [--out DIR]
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from benchmarks import common, models

OP = "decode"
MODE = "generate"
MIN_MS = 1e-6
PRESETS = {
    "smoke": {"size": "tiny", "layers": 2, "batches": (1, 2), "prompt": 8, "new": 4, "bottleneck": 16, "reps": 1},
    "quick": {"size": "llama7b", "layers": 2, "batches": (1, 16), "prompt": 32, "new": 128, "bottleneck": 256,
              "reps": 2},
    "full": {"size": "llama7b", "layers": 2, "batches": (1, 4, 16, 64), "prompt": 128, "new": 128, "bottleneck": 256,
             "reps": 5},
}


def generate_fn(model: nn.Module, ids: torch.Tensor, backend: Callable) -> Callable[[int], Callable[[], None]]:
    """n -> a call of greedy generate() making exactly n new tokens for the prompt `ids` (B, prompt)."""
    mask = torch.ones_like(ids)
    model.eval()

    def make(n: int) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad(), backend():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)

        return call

    return make


def time_decode(rec: common.Recorder, ctx: common.Context, cfg: dict, provider: str, shape: str,
                gen: Callable[[int], Callable[[], None]], batch: int, floor: common.Timing | None) -> common.Timing:
    """Per-token decode time of one model: a warm-up and peak-memory run, then `reps` long and short generate()s."""
    new = cfg["new"]
    peak = common.peak_memory(gen(new), ctx.device)  # on CUDA also the warm-up (None on the CPU: no call)
    full = common.bench(gen(new), ctx.device, reps=cfg["reps"], warmup=0 if ctx.device.type == "cuda" else 1)
    prefill = common.bench(gen(1), ctx.device, reps=cfg["reps"], warmup=1)
    # clamped above 0: on a noisy CPU with few new tokens the difference can vanish (never at 128 on a GPU)
    per_token = full.map(lambda ms: max(ms - prefill.p50, MIN_MS) / (new - 1))
    common.record(rec, provider, MODE, shape, ctx.dtype, per_token, peak=peak, tokens=batch, floor=floor,
                  metric="ms/token")
    return per_token


def bench(rec: common.Recorder, ctx: common.Context, cfg: dict) -> None:
    """no_adapter first at each batch size (the floor), then ours / the peer / merged per adapter type."""
    layers = ctx.layers or cfg["layers"]
    base = models.llama(cfg["size"], layers, ctx.device, ctx.dtype).requires_grad_(False).eval()
    vocab = base.config.vocab_size
    prompts = {B: models.random_ids(B, cfg["prompt"], vocab, ctx.device) for B in cfg["batches"]}

    def shape(adapter: str, B: int) -> str:
        return f"adapter={adapter} layers={layers} prompt={cfg['prompt']} new={cfg['new']} B={B} tokens={B}"

    floors: dict[int, common.Timing] = {}
    for B, ids in prompts.items():
        rec.run(f"{OP} no_adapter B={B}", lambda B=B, ids=ids: floors.__setitem__(B, time_decode(
            rec, ctx, cfg, "no_adapter", shape("none", B), generate_fn(base, ids, contextlib.nullcontext), B, None)))
    for setup in (s for s in models.SETUPS if s.decode):
        variants = [(p, p) for p in models.providers(setup)]
        if setup.name.startswith("lora"):
            variants.append(("merged", "fastadapters"))
        for provider, wrapper in variants:
            def one(setup: models.Setup = setup, provider: str = provider, wrapper: str = wrapper) -> None:
                model, backend = models.wrap(base, setup, wrapper, cfg["bottleneck"])
                if provider == "merged":
                    model, backend = model.merge_and_unload(), contextlib.nullcontext
                for B, ids in prompts.items():
                    rec.run(f"{OP} {provider} {setup.name} B={B}", lambda B=B, ids=ids: time_decode(
                        rec, ctx, cfg, provider, shape(setup.name, B), generate_fn(model, ids, backend), B,
                        floors.get(B)))

            rec.run(f"{OP} {provider} {setup.name}", one)
            common.free_memory(ctx.device)


def run(argv: Sequence[str] | None = None) -> int:
    """The driver (benchmarks/run.py) with this op only; `argv` takes the driver's options."""
    from benchmarks.run import main_for

    return main_for("decode", argv)


if __name__ == "__main__":
    sys.exit(run())
