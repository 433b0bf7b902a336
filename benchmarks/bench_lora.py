"""LoRA linear layer: y = x W^T + s * dropout(x) A^T B^T, one projection of a 7B-class model (K = N = 4096, r = 16).

Providers, side by side in one run, each in fwd / bwd / fwd+bwd:
  floor      the frozen nn.Linear alone (fwd; input grad): what any LoRA layer costs at least
  reference  fa.ops.lora_linear on the "torch" backend
  peft       HF PEFT's lora.Linear wrapping the same nn.Linear (the peer)
  fused      fa.ops.lora_linear on the "triton" backend ("cuda" too where one is registered; skipped with a note
             while no kernel is registered or it refuses the inputs)

Napkin math (bf16, M tokens): base GEMM 2*M*K*N FLOPs; the adapter adds 2*M*r*(K+N), i.e. 2*r/K ~ 0.8 %
for r=16, so a good fused layer sits within a few % of the floor. fwd+bwd with W frozen: 2 GEMMs on W
(y, dx) plus 3x the adapter's FLOPs (fwd, dx, dA/dB). The reference and PEFT also read/write the
dropout(x) and x A^T intermediates (M*K + M*r elements) and run dropout as its own kernel.

    python -m benchmarks.bench_lora [--preset smoke|quick|full] [--device cpu] [--out DIR]   (the driver, this op)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn as nn

import fastadapters as fa
from benchmarks import common

OP = "lora_linear"
MODES = common.MODES
PRESETS = {
    "smoke": {"Ms": (64,), "K": 128, "N": 128, "r": 8, "ps": (0.05, 0.0)},
    "quick": {"Ms": (4096,), "K": 4096, "N": 4096, "r": 16, "ps": (0.05, 0.0)},
    "full": {"Ms": (256, 4096, 16384), "K": 4096, "N": 4096, "r": 16, "ps": (0.05, 0.0)},
}


def lora_flops(M: int, K: int, N: int, r: int) -> dict[str, float]:
    """FLOPs per mode: fwd = base + adapter; bwd = base (dx) + 2x adapter (dx, dA, dB; W frozen); fwd+bwd = sum."""
    base, adapter = 2.0 * M * K * N, 2.0 * M * r * (K + N)
    return {"fwd": base + adapter, "bwd": base + 2 * adapter, "fwd+bwd": 2 * base + 3 * adapter}


def peft_layer(linear: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, r: int, alpha: float, p: float):
    """HF PEFT's LoRA Linear around `linear`, holding copies of lora_A (r, K) and lora_B (N, r)."""
    import peft
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p)
    layer = PeftLoraLinear(linear, "default", config=cfg, r=r, lora_alpha=alpha)
    layer.to(device=lora_A.device, dtype=lora_A.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    linear.weight.requires_grad_(False)
    return layer.train()


def bench_shape(rec: common.Recorder, ctx: common.Context, M: int, K: int, N: int, r: int,
                ps: Sequence[float]) -> None:
    """All providers at one M (the floor once, the rest per dropout probability)."""
    device, dtype, budget = ctx.device, ctx.dtype, ctx.budget
    alpha = 2.0 * r
    scaling = alpha / r
    torch.manual_seed(0)
    linear = nn.Linear(K, N, bias=False, device=device, dtype=dtype).requires_grad_(False)
    W = linear.weight
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    lora_A = (torch.randn(r, K, device=device, dtype=dtype) * K**-0.5).requires_grad_()
    lora_B = (torch.randn(N, r, device=device, dtype=dtype) * r**-0.5).requires_grad_()
    flops = lora_flops(M, K, N, r)
    base = 2.0 * M * K * N

    floor = common.measure(rec, "floor", f"M={M} K={K} N={N}", dtype, lambda: linear(x), [x], MODES, budget,
                           flops={"fwd": base, "bwd": base, "fwd+bwd": 2 * base})
    for p in ps:
        shape = f"M={M} K={K} N={N} r={r} p={p}"

        def op(backend: str, p: float = p) -> torch.Tensor:
            with fa.use_backend(backend):
                return fa.ops.lora_linear(x, W, None, lora_A, lora_B, scaling, dropout_p=p)

        common.measure(rec, "reference", shape, dtype, lambda op=op: op("torch"), [x, lora_A, lora_B], MODES,
                       budget, flops=flops, floor=floor)
        try:
            layer = peft_layer(linear, lora_A.detach(), lora_B.detach(), r, alpha, p)
        except Exception as e:  # peft missing or changed: the other providers still count
            rec.note(f"peft: skipped ({type(e).__name__}: {e})")
        else:
            grads = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            common.measure(rec, "peft", shape, dtype, lambda layer=layer: layer(x), grads, MODES, budget,
                           flops=flops, floor=floor)
        for provider, backend in common.fused_providers(rec, op):
            common.measure(rec, provider, shape, dtype, lambda op=op, b=backend: op(b), [x, lora_A, lora_B], MODES,
                           budget, flops=flops, floor=floor)


def bench(rec: common.Recorder, ctx: common.Context, cfg: dict) -> None:
    """Every provider at each M of the preset `cfg` (see PRESETS)."""
    for M in cfg["Ms"]:
        bench_shape(rec, ctx, M, cfg["K"], cfg["N"], cfg["r"], cfg["ps"])


def run(argv: Sequence[str] | None = None) -> int:
    """The driver (benchmarks/run.py) with this op only; `argv` takes the driver's options."""
    from benchmarks.run import main_for

    return main_for("lora", argv)


if __name__ == "__main__":
    sys.exit(run())
