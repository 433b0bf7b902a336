"""Bottleneck adapter (series, with the residual): out = h + s * up(silu(down(h))), d = 4096, b = 256.

Providers:
  floor      not run but computed: max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), with both ceilings
             measured by this script (a large device-to-device copy, an 8192^3 matmul; about 4.3 TB/s and
             790 TFLOP/s on an H200)
  reference  fa.ops.bottleneck_adapter on the "torch" backend
  fused      the "triton" backend (skipped with a note while no kernel is registered)

Napkin math (e = bytes per element, M tokens):
  fwd      bytes 2*M*d*e (read h, write out) + 2*d*b*e (weights); FLOPs 2 GEMMs = 4*M*d*b
  fwd+bwd  bytes 5*M*d*e (fwd, then read dy and h, write dh; the (M, b) intermediates are small);
           FLOPs 12*M*d*b (fwd + dy W_up, dW_up, dz W_down, dW_down)
At d=4096, b=256 both bounds are within 2x of each other, so a fused kernel should reach the floor and the
reference (several kernels, fp32 intermediates of shape (M, d)) should not.

    python -m benchmarks.bench_bottleneck [--quick] [--smoke --device cpu] [--out DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

import fastadapters as fa
from benchmarks import common

OP = "bottleneck_adapter"
MODES = ("fwd", "fwd+bwd")
ACTIVATION = "silu"


def presets(args) -> dict:
    if args.smoke:
        return {"Ms": (64,), "d": 128, "b": 16, "copy_bytes": 16 * common.MiB, "mm": 256}
    if args.quick:
        return {"Ms": (4096,), "d": 4096, "b": 256, "copy_bytes": 1024 * common.MiB, "mm": 8192}
    return {"Ms": (4096, 16384), "d": 4096, "b": 256, "copy_bytes": 2048 * common.MiB, "mm": 8192}


def floor_model(M: int, d: int, b: int, elem: int) -> tuple[dict[str, float], dict[str, float]]:
    """(bytes, FLOPs) per mode that any implementation must move / compute (see the module docstring)."""
    nbytes = {"fwd": 2.0 * M * d * elem + 2.0 * d * b * elem, "fwd+bwd": 5.0 * M * d * elem + 6.0 * d * b * elem}
    flops = {"fwd": 4.0 * M * d * b, "fwd+bwd": 12.0 * M * d * b}
    return nbytes, flops


def _time_copy(nbytes: int, dev: torch.device, budget: dict[str, float]) -> common.Timing:
    src = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return common.bench(lambda: dst.copy_(src), dev, **budget)


def _time_matmul(n: int, dtype: torch.dtype, dev: torch.device, budget: dict[str, float]) -> common.Timing:
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    return common.bench(lambda: a @ b, dev, **budget)


def measure_ceilings(rec: common.Recorder, dtype: torch.dtype, copy_bytes: int, n: int,
                     budget: dict[str, float]) -> tuple[float, float]:
    """Measured (bytes/s of a device copy, FLOP/s of an n^3 matmul in `dtype`); also recorded as rows."""
    dev = rec.device
    moved = 2.0 * copy_bytes
    t = _time_copy(copy_bytes, dev, budget)
    rec.add_timing("ceiling_copy", "fwd", f"bytes={copy_bytes}", torch.float32, t, nbytes=moved)
    bw = moved / (t.p50 * 1e-3)
    t = _time_matmul(n, dtype, dev, budget)
    rec.add_timing("ceiling_matmul", "fwd", f"{n}x{n}x{n}", dtype, t, flops=2.0 * n**3)
    rate = 2.0 * n**3 / (t.p50 * 1e-3)
    print(f"ceilings: copy {bw / 1e9:.4g} GB/s, {dtype} matmul {rate / 1e12:.4g} TFLOP/s", flush=True)
    return bw, rate


def bench_shape(rec: common.Recorder, M: int, d: int, b: int, dtype: torch.dtype, budget: dict[str, float],
                has_fused: bool, bw: float, rate: float) -> None:
    """The computed floor, the reference and (if registered) the fused kernel at one M."""
    device = rec.device
    torch.manual_seed(0)
    shape = f"M={M} d={d} b={b} act={ACTIVATION}"
    h = torch.randn(M, d, device=device, dtype=dtype, requires_grad=True)
    down = (torch.randn(b, d, device=device, dtype=dtype) * d**-0.5).requires_grad_()
    up = (torch.randn(d, b, device=device, dtype=dtype) * b**-0.5).requires_grad_()
    nbytes, flops = floor_model(M, d, b, torch.empty((), dtype=dtype).element_size())

    floor: dict[str, common.Timing] = {}
    for mode in MODES:
        ms = max(nbytes[mode] / bw, flops[mode] / rate) * 1e3
        floor[mode] = common.Timing(ms, ms, ms)
        rec.add_timing("floor", mode, shape, dtype, floor[mode], flops=flops[mode], nbytes=nbytes[mode])

    def op(backend: str) -> torch.Tensor:
        with fa.use_backend(backend):
            return fa.ops.bottleneck_adapter(h, down, up, activation=ACTIVATION, scaling=1.0, residual=h)

    common.measure(rec, "reference", shape, dtype, lambda: op("torch"), [h, down, up], MODES, budget,
                   flops=flops, nbytes=nbytes, floor=floor)
    if has_fused:
        try:
            op("triton")
        except fa.ops.KernelUnavailableError as e:
            rec.note(f"fused (triton) {shape}: skipped ({e})")
        else:
            common.measure(rec, "fused", shape, dtype, lambda: op("triton"), [h, down, up], MODES, budget,
                           flops=flops, nbytes=nbytes, floor=floor)


def run(argv: Sequence[str] | None = None) -> int:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    device, dtype, budget = common.setup(args)
    cfg = presets(args)
    rec = common.Recorder(OP, device)
    has_fused = common.backend_available(OP, "triton")
    if not has_fused:
        rec.note("fused (triton): skipped, no triton kernel is registered for bottleneck_adapter yet")
    ceilings: list[float] = []
    if rec.run("ceilings", lambda: ceilings.extend(measure_ceilings(rec, dtype, cfg["copy_bytes"], cfg["mm"],
                                                                    budget))):
        for M in cfg["Ms"]:
            bench_shape(rec, M, cfg["d"], cfg["b"], dtype, budget, has_fused, *ceilings)
    return rec.finish(args.out)


if __name__ == "__main__":
    sys.exit(run())
