"""Functional DoRA linear (weight-decomposed LoRA, PEFT 0.21's semantics): checks, dropout, backend dispatch.

    dora_norm(weight, lora_A, lora_B, scaling, weight_sq=None)                 -> (N,)  ||W_i + s (BA)_i||
    dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm, dropout_p=0.0)

DoRA is LoRA with a per-output-column scale c = magnitude / weight_norm on the layer output, so it rides on
`lora_linear`'s backend (fastadapters.use_backend(lora_linear=...)): on the reference ("torch") it runs
`dora_linear_ref`; on a kernel backend it runs fastadapters.ops.dora_triton (the LoRA Triton kernels with c folded
into the epilogue that adds the LoRA term: y = c * (x W^T + s xa B^T) + b in one read + write of y; under "auto"
a kernel that fails to compile or launch falls back to the reference with one warning, as lora_linear does).
The references live in fastadapters.kernels.dora_ref.
"""

from __future__ import annotations

import torch

from ..kernels.dora_ref import dora_linear_ref, dora_norm_ref
from . import _registry
from ._utils import check_dropout, check_same, check_scalar, check_tensor, fmt_shape, maybe_dropout_mask


def _check_lora(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[int, int, int]:
    check_tensor("weight", weight, 2)
    N, K = weight.shape
    check_tensor("lora_A", lora_A, 2)
    if lora_A.shape[1] != K or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A has shape {fmt_shape(lora_A.shape)} but the layer expects (r, {K}) with r >= 1")
    r = lora_A.shape[0]
    check_tensor("lora_B", lora_B, 2)
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(
            f"lora_B has shape {fmt_shape(lora_B.shape)} but the layer expects (N, r) = ({N}, {r}) "
            f"(N from weight, r from lora_A)"
        )
    return N, K, r


def _check_column(name: str, t: object, N: int, device: torch.device) -> None:
    check_tensor(name, t, 1)
    if t.shape[0] != N:
        raise ValueError(f"{name} has shape {fmt_shape(t.shape)} but the layer expects ({N},): one per output feature")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}: move them to one device")


def dora_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    weight_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """||W_i + scaling * (B A)_i|| per output row, without the (N, K) delta (no gradient: DoRA detaches it).

    weight: (N, K); lora_A: (r, K); lora_B: (N, r); weight_sq: (N,) = ||W_i||^2 of this (frozen) weight, to skip
    recomputing it, or None. Returns (N,) float32 (float64 for float64 inputs). Cost: one (N, K) x (K, r) GEMM.
    """
    N, _, _ = _check_lora(weight, lora_A, lora_B)
    scaling = check_scalar("scaling", scaling)
    if weight_sq is not None:
        _check_column("weight_sq", weight_sq, N, weight.device)
    with torch.no_grad():
        return dora_norm_ref(weight, lora_A, lora_B, scaling, weight_sq)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """DoRA linear: y = c * (x W^T + s x A^T B^T) + b with c = magnitude / weight_norm (per output feature).

    x: (..., K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); scaling: float;
    magnitude: (N,) (trainable); weight_norm: (N,) = dora_norm(weight, lora_A, lora_B, scaling), treated as a
    constant (no gradient, as in PEFT and the DoRA paper). x, weight, bias, lora_A and lora_B share x's dtype;
    magnitude and weight_norm may be wider (fp32 masters on a bf16 model): c is computed in their dtype.

    Dropout (dropout_p > 0 and training) follows PEFT: y = x W^T + b + (c - 1) x_d W^T + c s x_d A^T B^T with
    x_d = dropout(x) (a torch-RNG mask; `seed` fixes it). That form needs x_d W^T besides x W^T, so it runs the
    reference on every backend. Returns (..., N) in x's dtype.
    """
    check_tensor("x", x, min_ndim=1)
    N, K, _ = _check_lora(weight, lora_A, lora_B)
    if x.shape[-1] != K:
        raise ValueError(
            f"x has shape {fmt_shape(x.shape)} but the layer expects (..., {K}): its last dim must equal "
            f"weight.shape[1] (weight is {fmt_shape(weight.shape)} = (N, K))"
        )
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias has shape {fmt_shape(bias.shape)} but the layer expects ({N},), or pass None")
    check_same("x", x, {"weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B})
    _check_column("magnitude", magnitude, N, x.device)
    _check_column("weight_norm", weight_norm, N, x.device)
    scaling = check_scalar("scaling", scaling)
    check_dropout(dropout_p, training, seed)

    mask = maybe_dropout_mask(x, dropout_p, training, seed, dtype=torch.promote_types(x.dtype, torch.float32))
    if mask is not None:
        return dora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm, mask)
    backend, _ = _registry.resolve("lora_linear", x, weight, bias, lora_A, lora_B, scaling, None)
    args = (x, weight, bias, lora_A, lora_B, scaling, magnitude, weight_norm)
    if backend == "torch":
        return dora_linear_ref(*args)
    from .dora_triton import dora_linear_triton  # imports no triton until it launches

    c = magnitude / weight_norm.detach().to(magnitude.dtype)  # differentiable in the magnitude
    kernel = lambda: dora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, c)  # noqa: E731
    return _registry.call("lora_linear", backend, kernel, lambda: dora_linear_ref(*args), str(x.device))
