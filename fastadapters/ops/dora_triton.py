"""The kernel path of `fastadapters.ops.dora.dora_linear`: DoRA on the LoRA Triton kernels, the column scale folded
into the epilogue that adds the LoRA term.

    fastadapters::dora_linear_fwd(x2d, W, b?, A, B, scaling, col) -> (y, xa)
        xa = x A^T (fp32, the LoRA shrink kernel);  y = col * (x W^T + s xa B^T) + b, by KL's launcher
        kernels/lora_launch.py::lora_linear_fwd(..., col_scale=col): default path cuBLAS z = x W^T, then ONE
        epilogue kernel (`_lora_linear_kernel` with HAS_MAIN=False, ACCUMULATE, HAS_COL_SCALE, HAS_BIAS) reads z
        once and writes y in place; FASTADAPTERS_LORA_GEMM=fused: the fused GEMM with the same epilogue.
    backward (register_autograd): dz = dy * col, then LoRA's backward op (fastadapters::lora_linear_bwd) on dz;
        db = sum_m dy; dcol = sum_m dy * z with z = (y - b) / col recovered from the saved output (so nothing
        M x N beyond y is saved; where col == 0 the column's z is unrecoverable and dcol is 0 there).

The column scale col = magnitude / weight_norm (N,) fp32 is computed by the caller with autograd, so the
magnitude's gradient is dcol / weight_norm. No dropout here: with dropout in training PEFT's DoRA needs
x_d W^T besides x W^T (fastadapters.ops.dora runs the reference for it). Importing this module imports no triton.
A magnitude entry exactly 0 gets a zero gradient here (its column's z cannot be recovered from y = b); the
reference would give it sum_m dy z / norm. Trained magnitudes are row norms (> 0), so this is documented, not fixed.
"""

from __future__ import annotations

from typing import Any

import torch


def _launch() -> Any:
    from ..kernels import lora_launch

    return lora_launch


@torch.library.custom_op("fastadapters::dora_linear_fwd", mutates_args=())
def dora_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K) -> y: (M, N) in x's dtype, xa: (M, r) fp32. col: (N,) fp32."""
    return _launch().lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, 0.0, 0, col_scale=col)


@dora_linear_fwd_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, col):
    M = x.shape[0]
    return x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_A.shape[0]), dtype=torch.float32)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, lora_A, lora_B, scaling, col = inputs
    y, xa = output
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, xa, y, col)
    ctx.scaling = scaling


def _backward(ctx: Any, dy: torch.Tensor, _dxa: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, bias, lora_A, lora_B, xa, y, col = ctx.saved_tensors
    need_dx, need_dW, need_db, need_dA, need_dB, _, need_dcol = ctx.needs_input_grad
    dyf = dy.float()
    dz = (dyf * col).to(dy.dtype)
    dx = dW = db = dA = dB = dcol = None
    if need_dx or need_dW or need_dA or need_dB:
        seed = torch.zeros((), dtype=torch.int64)
        g = torch.ops.fastadapters.lora_linear_bwd(dz, x, weight, lora_A, lora_B, xa, seed, ctx.scaling, 0.0,
                                                   need_dx, need_dW, False, need_dA, need_dB)
        dx, dW, _, dA, dB = (t if need else None for t, need in zip(g, (need_dx, need_dW, False, need_dA, need_dB),
                                                                    strict=True))
    if need_db:
        db = dy.sum(0).to(bias.dtype)
    if need_dcol:
        z = y.float() - bias.float() if bias is not None else y.float()
        z = torch.where(col != 0, z / torch.where(col != 0, col, 1.0), 0.0)
        dcol = (dyf * z).sum(0)
    return dx, dW, db, dA, dB, None, dcol


dora_linear_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def dora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, col: torch.Tensor) -> torch.Tensor:
    """y = col * (x W^T + s x A^T B^T) + b on the Triton kernels. x: (..., K); col: (N,) (any float dtype,
    differentiable); the rest as fastadapters.ops.lora_linear. Returns (..., N) in x's dtype."""
    K, N = x.shape[-1], weight.shape[0]
    y, _ = torch.ops.fastadapters.dora_linear_fwd(x.reshape(-1, K), weight, bias, lora_A, lora_B, float(scaling),
                                                  col.float().contiguous())
    return y.reshape(*x.shape[:-1], N)
