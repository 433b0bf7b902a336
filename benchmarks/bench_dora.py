"""DoRA linear layer (LoraConfig(use_dora=True)), one projection of a 7B-class model (K = N = 4096, r = 16).

Providers, side by side in one run, each in fwd / bwd / fwd+bwd, training semantics (the adapter changes every
step, so every call recomputes the DoRA norm; ||W||^2 of the frozen W stays cached, as in training):
  floor           the frozen nn.Linear alone
  lora_reference  our plain LoRA layer on the "torch" backend    (what DoRA adds is measured against these two)
  lora_fused      our plain LoRA layer on the "triton" backend   (GPU; skipped with a note elsewhere)
  reference       our DoRA layer on the "torch" backend (norm: ||W||^2 + 2s B.(W A^T) + s^2 B (A A^T) B^T)
  fused           our DoRA layer on the "triton" backend (LoRA kernels, the column scale in the LoRA-term epilogue)
  peft            HF PEFT 0.21's DoRA Linear (no cache: builds lora_B(lora_A(eye(K))) and W + s B A every call)
Inference (fwd under no_grad, eval mode, weights unchanged between calls):
  reference_cached / fused_cached  our layer with its norm cache (the norm is computed once)
  peft_cache                       PEFT with peft.tuners.lora.dora.ENABLE_DORA_CACHING = True

Napkin math (bf16, M tokens): base GEMM 2*M*K*N FLOPs; LoRA 2*M*r*(K+N); the DoRA norm 2*N*K*r (W A^T, one pass
over W: 2*N*K bytes) + O(N r^2) -- at M = 4096 the same ~0.8 % as the LoRA term, at M = 256 ~12 % of the base
GEMM: the row norm's pass over W is a fixed per-step cost. PEFT's norm costs 2*K*K*r + 2*K*N*r FLOPs plus three
K x N / K x K temporaries (written and read) per call. The column scale rides in the epilogue that adds the LoRA
term (no extra pass over y in the forward); the backward adds two elementwise passes over (M, N) (dy * c and the
magnitude's reduction).
Target on a GPU (issue 16): fused <= 1.10x lora_fused, and >= 2x faster than peft in fwd+bwd.
Dropout: p = 0 only (with dropout in training PEFT's DoRA needs x_d W^T besides x W^T: not the fused form).

    python -m benchmarks.bench_dora [--preset smoke|quick|full] [--device cpu] [--out DIR]   (the driver, this op)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn as nn

import fastadapters as fa
from benchmarks import common
from fastadapters.tuners.lora import LoraLayer

OP = "dora_linear"
MODES = common.MODES
PRESETS = {
    "smoke": {"Ms": (64,), "K": 128, "N": 128, "r": 8},
    "quick": {"Ms": (4096,), "K": 4096, "N": 4096, "r": 16},
    "full": {"Ms": (256, 4096, 16384), "K": 4096, "N": 4096, "r": 16},
}


def dora_flops(M: int, K: int, N: int, r: int) -> dict[str, float]:
    """FLOPs per mode: LoRA's (see bench_lora.lora_flops) plus the norm's W A^T (2 N K r) in the forward."""
    base, adapter, norm = 2.0 * M * K * N, 2.0 * M * r * (K + N), 2.0 * N * K * r
    return {"fwd": base + adapter + norm, "bwd": base + 2 * adapter, "fwd+bwd": 2 * base + 3 * adapter + norm}


def our_layer(linear: nn.Linear, A: torch.Tensor, B: torch.Tensor, r: int, alpha: float, use_dora: bool) -> LoraLayer:
    """Our LoraLayer around `linear` with adapter "default" holding copies of A (r, K), B (N, r), all in A's dtype."""
    layer = LoraLayer(linear)
    layer.update_layer("default", fa.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_dora=use_dora), "proj")
    layer.adapter_names.append("default")
    layer.set_active(["default"])
    layer.to(device=A.device, dtype=A.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        if use_dora:  # a trained-looking magnitude: the norm of the current weights
            layer.lora_magnitude_vector["default"].weight.copy_(layer.dora_weight_norm("default"))
    return layer


def peft_layer(linear: nn.Linear, A: torch.Tensor, B: torch.Tensor, r: int, alpha: float) -> nn.Module:
    """HF PEFT's DoRA Linear around `linear`, holding copies of A and B."""
    import peft
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_dora=True)
    layer = PeftLoraLinear(linear, "default", config=cfg, r=r, lora_alpha=alpha)
    layer.to(device=A.device, dtype=A.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    linear.weight.requires_grad_(False)
    return layer


def trainable(layer: nn.Module) -> list[torch.Tensor]:
    return [p for p in layer.parameters() if p.requires_grad]


def fused_providers(rec: common.Recorder, call) -> list[tuple[str, str]]:
    """common.fused_providers for DoRA: it rides on lora_linear's kernels (the registry has no dora_linear op)."""
    op, rec.op = rec.op, "lora_linear"
    try:
        return common.fused_providers(rec, call)
    finally:
        rec.op = op


def bench_shape(rec: common.Recorder, ctx: common.Context, M: int, K: int, N: int, r: int) -> None:
    device, dtype, budget = ctx.device, ctx.dtype, ctx.budget
    alpha = 2.0 * r
    torch.manual_seed(0)
    linear = nn.Linear(K, N, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    A = torch.randn(r, K, device=device, dtype=dtype) * K**-0.5
    B = torch.randn(N, r, device=device, dtype=dtype) * r**-0.5
    flops = dora_flops(M, K, N, r)
    base = 2.0 * M * K * N
    shape = f"M={M} K={K} N={N} r={r}"

    floor = common.measure(rec, "floor", shape, dtype, lambda: linear(x), [x], MODES, budget,
                           flops={"fwd": base, "bwd": base, "fwd+bwd": 2 * base})
    lora = our_layer(linear, A, B, r, alpha, use_dora=False).train()
    dora = our_layer(linear, A, B, r, alpha, use_dora=True).train()

    def run_layer(layer: LoraLayer, backend: str, fresh_norm: bool = True) -> torch.Tensor:
        if fresh_norm:  # training: A and B change every step, so the norm is recomputed (||W||^2 stays cached)
            layer._dora_norms.clear()
        with fa.use_backend(backend):
            return layer(x)

    providers = [("lora_reference", lora, "torch"), ("reference", dora, "torch")]
    for name, backend in fused_providers(rec, lambda b: run_layer(lora, b)):
        suffix = "" if name == "fused" else f"_{name}"
        providers += [(f"lora_fused{suffix}", lora, backend), (f"fused{suffix}", dora, backend)]
    for name, layer, backend in providers:
        common.measure(rec, name, shape, dtype, lambda layer=layer, b=backend: run_layer(layer, b),
                       [x, *trainable(layer)], MODES, budget, flops=flops, floor=floor)
    try:
        peft_dora = peft_layer(linear, A, B, r, alpha).train()
    except Exception as e:  # peft missing or changed: the other providers still count
        rec.note(f"peft: skipped ({type(e).__name__}: {e})")
        peft_dora = None
    if peft_dora is not None:
        common.measure(rec, "peft", shape, dtype, lambda: peft_dora(x), [x, *trainable(peft_dora)], MODES, budget,
                       flops=flops, floor=floor)

    # inference: eval mode, no grad, weights fixed between calls
    infer = {"fwd": floor.get("fwd")} if floor else None
    cached = [("reference_cached", "torch")] + [(n.replace("fused", "fused_cached"), b) for n, b in
                                                fused_providers(rec, lambda b: run_layer(dora, b))]
    dora.eval()
    for name, backend in cached:
        def fwd(b: str = backend) -> torch.Tensor:
            with torch.no_grad():
                return run_layer(dora, b, fresh_norm=False)

        common.measure(rec, name, shape, dtype, fwd, [], ("fwd",), budget, floor=infer)
    if peft_dora is not None:
        from peft.tuners.lora import dora as peft_dora_mod

        peft_dora.eval()
        old = peft_dora_mod.ENABLE_DORA_CACHING
        peft_dora_mod.ENABLE_DORA_CACHING = True
        try:
            def peft_fwd() -> torch.Tensor:
                with torch.no_grad():
                    return peft_dora(x)

            common.measure(rec, "peft_cache", shape, dtype, peft_fwd, [], ("fwd",), budget, floor=infer)
        finally:
            peft_dora_mod.ENABLE_DORA_CACHING = old


def bench(rec: common.Recorder, ctx: common.Context, cfg: dict) -> None:
    """Every provider at each M of the preset `cfg` (see PRESETS)."""
    for M in cfg["Ms"]:
        bench_shape(rec, ctx, M, cfg["K"], cfg["N"], cfg["r"])


def run(argv: Sequence[str] | None = None) -> int:
    """The driver (benchmarks/run.py) with this op only; `argv` takes the driver's options."""
    from benchmarks.run import main_for

    return main_for("dora", argv)


if __name__ == "__main__":
    sys.exit(run())
