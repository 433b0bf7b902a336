"""Pure-PyTorch reference for DoRA (weight-decomposed LoRA): the column norm and the layer output.

DoRA (Liu et al. 2024, as HF PEFT 0.21 implements it) gives each output feature i a trainable magnitude m_i and
uses the direction of the LoRA-updated weight:

    W' = diag(c) (W + s B A),   c_i = m_i / ||W_i + s (B A)_i||      (the norm is a constant: no gradient)

The norm without the dense (N, K) delta (`dora_norm_ref`):

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T

||W_i||^2 depends on the frozen W only (computed once, passed in as `weight_sq`); W A^T is one shrink-sized GEMM
(N x K x r: one pass over W, writes N x r); A A^T and the two row-wise dots are r x r work. PEFT instead builds
B A (via lora_B(lora_A(eye(K))): 2 N K r + K^2 r FLOPs and three N x K / K x K temporaries) every call.
`dora_norm_dense_ref` is the dense formula, kept for tests and benchmarks.

The layer output (`dora_linear_ref`), PEFT's DoraLinearLayer.forward written out:

    no dropout / eval:  y = base + (c - 1) * (base - b) + c * s * x A^T B^T          base = x W^T + b
                          = c * (x W^T + s x A^T B^T) + b
    dropout (training): y = x W^T + b + (c - 1) * x_d W^T + c * s * x_d A^T B^T       x_d = dropout(x)

(PEFT reuses the base output only when dropout is off or in eval; with dropout it computes x_d W^T again, so the
magnitude rescales the dropped-out input's base term.) No argument checks here: fastadapters.ops.dora validates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora_ref import apply_dropout_mask

_UPCAST_ELEMENTS = 1 << 22  # rows of a low-precision W upcast at once in dora_norm_ref (16 MiB of fp32)


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def dora_weight_sq_ref(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """||W_i||^2 per output row. weight: (N, K) -> (N,) in `dtype` (at least float32; no upcast copy of W)."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=torch.promote_types(dtype, torch.float32)).square()


def dora_norm_ref(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    weight_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """||W_i + scaling * (B A)_i|| per output row, without forming B A.

    weight: (N, K); lora_A: (r, K); lora_B: (N, r); weight_sq: (N,) = ||W_i||^2 (computed here when None).
    Returns (N,) in float32, or float64 when any input is float64. Not differentiable by design (DoRA detaches the
    norm); call it under torch.no_grad() to avoid keeping a graph.
    """
    dtype = _compute_dtype(weight, lora_A, lora_B)
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    if weight_sq is None:
        weight_sq = dora_weight_sq_ref(weight, dtype)
    if weight.dtype == dtype:
        WA = weight @ A.t()  # (N, r): the one pass over W
    else:  # bf16/fp16 W: upcast a block of rows at a time, never a whole fp32 copy of W
        rows = max(1, _UPCAST_ELEMENTS // max(weight.shape[1], 1))
        WA = torch.cat([weight[i : i + rows].to(dtype) @ A.t() for i in range(0, weight.shape[0], rows)])
    G = A @ A.t()  # (r, r)
    cross = (B * WA).sum(dim=1)
    quad = ((B @ G) * B).sum(dim=1)
    sq = weight_sq.to(dtype) + (2.0 * scaling) * cross + (scaling * scaling) * quad
    return sq.clamp_min(0).sqrt()


def dora_norm_dense_ref(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The dense formula ||W_i + scaling * (B A)_i||: forms the (N, K) matrix (tests and benchmarks only).

    weight: (N, K); lora_A: (r, K); lora_B: (N, r) -> (N,) in the promoted dtype (at least float32).
    """
    dtype = _compute_dtype(weight, lora_A, lora_B)
    return torch.linalg.vector_norm(weight.to(dtype) + scaling * (lora_B.to(dtype) @ lora_A.to(dtype)), dim=1)


def dora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA linear layer as PEFT computes it (see the module docstring for both dropout cases).

    x: (..., K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); scaling: float;
    magnitude: (N,) (trainable); weight_norm: (N,) = ||W_i + s (BA)_i|| (detached here); dropout_mask: (..., K)
    holding keep/(1-p), or None. x, weight, bias, lora_A, lora_B share one dtype; magnitude and weight_norm may be
    wider (the column scale is computed in their dtype). Returns (..., N) in x's dtype.
    """
    c = magnitude / weight_norm.detach().to(magnitude.dtype)
    base = F.linear(x, weight, bias)
    if dropout_mask is None:
        base_result = base - bias if bias is not None else base
        lora = F.linear(F.linear(x, lora_A), lora_B)
    else:
        xd = apply_dropout_mask(x, dropout_mask)
        base_result = F.linear(xd, weight)
        lora = F.linear(F.linear(xd, lora_A), lora_B)
    return (base + (c - 1) * base_result + c * lora * scaling).to(x.dtype)
