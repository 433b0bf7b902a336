"""Model level: one optimizer step (forward, backward, AdamW on the adapter parameters) of Llama-7B-shaped layers.

Two decoder layers by default (hidden 4096, intermediate 11008, 32 heads, with the embedding and the lm_head;
`--layers N` to change), random weights from a config, bf16, 4096 tokens per step (batch 1 x 4096). For each
adapter of benchmarks/models.py SETUPS (LoRA q,v r=16; LoRA q,k,v,up,down r=32 dropout 0.05; series and parallel
bottleneck 256; prefix tuning P=10 and 30; prompt tuning P=20):
  fastadapters  our adapter on backend "auto" (the fused kernels where registered, else the reference)
  peft          HF PEFT where it has the method (LoRA, prefix, prompt)
  reference     our adapter on backend "torch", where PEFT has no such method (bottleneck adapters)
  floor         the adapters-disabled model: forward + backward to the input embeddings, no weight grads
Rows: ms per step (p50/p20/p80), tokens/s, peak memory above the weights and optimizer state, x_floor.

    python -m benchmarks.bench_model [--preset smoke|quick|full] [--layers N] [--device cpu] [--out DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from benchmarks import common, models

OP = "model_step"
MODE = "train_step"
PRESETS = {
    "smoke": {"size": "tiny", "layers": 2, "batch": 2, "seqs": (16,), "bottleneck": 16, "reps": 1, "warmup": 1},
    "quick": {"size": "llama7b", "layers": 2, "batch": 1, "seqs": (4096,), "bottleneck": 256, "reps": 5,
              "warmup": 2},
    "full": {"size": "llama7b", "layers": 2, "batch": 1, "seqs": (2048, 4096, 8192), "bottleneck": 256, "reps": 10,
             "warmup": 3},
}


def step_fn(model: nn.Module, ids: torch.Tensor, backend: Callable) -> tuple[Callable[[], None], list]:
    """One training step of an adapter model: zero grads, loss(ids -> ids), backward, AdamW on what trains."""
    params = models.trainable(model)
    if not params:
        raise RuntimeError(f"{type(model).__name__} has no trainable parameter: the adapter was not injected")
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with backend():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        opt.step()

    return step, params


def floor_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """The adapters-disabled step: forward + backward down to the input embeddings (frozen weights, no optimizer)."""
    embed = model.get_input_embeddings()
    model.train()

    def step() -> None:
        x = embed(ids).detach().requires_grad_()
        model(inputs_embeds=x, labels=ids).loss.backward()

    return step


def time_step(rec: common.Recorder, ctx: common.Context, cfg: dict, provider: str, shape: str, fn: Callable,
              grads: Sequence[torch.Tensor], tokens: int, floor: common.Timing | None) -> common.Timing:
    """Warm up (the first AdamW step allocates its state), measure peak memory of one step, then time `reps`."""
    t = common.bench(fn, ctx.device, reps=cfg["reps"], warmup=cfg["warmup"], grad_to_none=grads)
    common.record(rec, provider, MODE, shape, ctx.dtype, t, peak=common.peak_memory(fn, ctx.device, grads),
                  tokens=tokens, floor=floor)
    return t


def bench_seq(rec: common.Recorder, ctx: common.Context, cfg: dict, base: nn.Module, layers: int, L: int) -> None:
    """The floor, then every setup with ours and its peer, at sequence length L."""
    B = cfg["batch"]
    ids = models.random_ids(B, L, base.config.vocab_size, ctx.device)
    geometry = f"layers={layers} hidden={base.config.hidden_size} B={B} L={L} tokens={B * L}"
    floors: list[common.Timing] = []
    rec.run(f"{OP} floor {geometry}", lambda: floors.append(
        time_step(rec, ctx, cfg, "floor", f"adapter=none {geometry}", floor_fn(base, ids), [], B * L, None)))
    floor = floors[0] if floors else None
    for setup in models.SETUPS:
        for provider in models.providers(setup):
            def one(setup: models.Setup = setup, provider: str = provider) -> None:
                model, backend = models.wrap(base, setup, provider, cfg["bottleneck"])
                fn, params = step_fn(model, ids, backend)
                time_step(rec, ctx, cfg, provider, f"adapter={setup.name} {geometry}", fn, params, B * L, floor)

            rec.run(f"{OP} {provider} {setup.name} {geometry}", one)
            common.free_memory(ctx.device)


def bench(rec: common.Recorder, ctx: common.Context, cfg: dict) -> None:
    """Every provider at each sequence length of the preset `cfg` (see PRESETS), on one random base model."""
    layers = ctx.layers or cfg["layers"]
    base = models.llama(cfg["size"], layers, ctx.device, ctx.dtype).requires_grad_(False)
    for L in cfg["seqs"]:
        bench_seq(rec, ctx, cfg, base, layers, L)


def run(argv: Sequence[str] | None = None) -> int:
    """The driver (benchmarks/run.py) with this op only; `argv` takes the driver's options."""
    from benchmarks.run import main_for

    return main_for("model", argv)


if __name__ == "__main__":
    sys.exit(run())
