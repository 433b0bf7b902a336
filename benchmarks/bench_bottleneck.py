"""Bottleneck adapter (series, with the residual): out = h + s * up(silu(down(h))), d = 4096, b = 256.

Providers, each in fwd / bwd / fwd+bwd:
  floor      not run but computed: max(bytes / copy bandwidth, FLOPs / matmul rate), with both ceilings
             measured by the driver at start (a large device-to-device copy, an 8192^3 matmul: rows of op
             "ceiling")
  reference  fa.ops.bottleneck_adapter on the "torch" backend
  fused      the "triton" backend ("cuda" too where registered; skipped with a note while no kernel is registered
             or it refuses the inputs)

Napkin math (e = bytes per element, M tokens):
  fwd      bytes 2*M*d*e (read h, write out) + 2*d*b*e (weights); FLOPs 2 GEMMs = 4*M*d*b
  bwd      bytes 3*M*d*e (read dy and h, write dh; the (M, b) intermediates are small) + 4*d*b*e (read the
           weights, write their grads); FLOPs 8*M*d*b (dy W_up, dW_up, dz W_down, dW_down)
  fwd+bwd  the sum: bytes 5*M*d*e + 6*d*b*e, FLOPs 12*M*d*b
At d=4096, b=256 both bounds are within 2x of each other, so a fused kernel should reach the floor and the
reference (several kernels, fp32 intermediates of shape (M, d)) should not.

    python -m benchmarks.bench_bottleneck [--preset smoke|quick|full] [--device cpu] [--out DIR]   (the driver)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

import fastadapters as fa
from benchmarks import common

OP = "bottleneck_adapter"
MODES = common.MODES
ACTIVATION = "silu"
PRESETS = {
    "smoke": {"Ms": (64,), "d": 128, "b": 16},
    "quick": {"Ms": (4096,), "d": 4096, "b": 256},
    "full": {"Ms": (4096, 16384), "d": 4096, "b": 256},
}


def floor_model(M: int, d: int, b: int, elem: int) -> tuple[dict[str, float], dict[str, float]]:
    """(bytes, FLOPs) per mode that any implementation must move / compute (see the module docstring)."""
    fwd_bytes, bwd_bytes = 2.0 * M * d * elem + 2.0 * d * b * elem, 3.0 * M * d * elem + 4.0 * d * b * elem
    nbytes = {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}
    flops = {"fwd": 4.0 * M * d * b, "bwd": 8.0 * M * d * b, "fwd+bwd": 12.0 * M * d * b}
    return nbytes, flops


def bench_shape(rec: common.Recorder, ctx: common.Context, M: int, d: int, b: int) -> None:
    """The computed floor, the reference and the fused kernels that accept the inputs, at one M."""
    device, dtype = ctx.device, ctx.dtype
    torch.manual_seed(0)
    shape = f"M={M} d={d} b={b} act={ACTIVATION}"
    h = torch.randn(M, d, device=device, dtype=dtype, requires_grad=True)
    down = (torch.randn(b, d, device=device, dtype=dtype) * d**-0.5).requires_grad_()
    up = (torch.randn(d, b, device=device, dtype=dtype) * b**-0.5).requires_grad_()
    nbytes, flops = floor_model(M, d, b, torch.empty((), dtype=dtype).element_size())

    floor: dict[str, common.Timing] = {}
    if ctx.copy_bytes_per_s and ctx.matmul_flops_per_s:
        for mode in MODES:
            ms = max(nbytes[mode] / ctx.copy_bytes_per_s, flops[mode] / ctx.matmul_flops_per_s) * 1e3
            floor[mode] = common.Timing(ms, ms, ms)
            rec.add_timing("floor", mode, shape, dtype, floor[mode], flops=flops[mode], nbytes=nbytes[mode])
    else:
        rec.note("floor: not computed, the ceilings were not measured")

    def op(backend: str) -> torch.Tensor:
        with fa.use_backend(backend):
            return fa.ops.bottleneck_adapter(h, down, up, activation=ACTIVATION, scaling=1.0, residual=h)

    common.measure(rec, "reference", shape, dtype, lambda: op("torch"), [h, down, up], MODES, ctx.budget,
                   flops=flops, nbytes=nbytes, floor=floor)
    for provider, backend in common.fused_providers(rec, op):
        common.measure(rec, provider, shape, dtype, lambda b=backend: op(b), [h, down, up], MODES, ctx.budget,
                       flops=flops, nbytes=nbytes, floor=floor)


def bench(rec: common.Recorder, ctx: common.Context, cfg: dict) -> None:
    """Every provider at each M of the preset `cfg` (see PRESETS)."""
    for M in cfg["Ms"]:
        bench_shape(rec, ctx, M, cfg["d"], cfg["b"])


def run(argv: Sequence[str] | None = None) -> int:
    """The driver (benchmarks/run.py) with this op only; `argv` takes the driver's options."""
    from benchmarks.run import main_for

    return main_for("bottleneck", argv)


if __name__ == "__main__":
    sys.exit(run())
