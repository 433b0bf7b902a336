"""Functional LoRA linear: checks, dropout mask, backend dispatch."""

from __future__ import annotations

import torch

from ..kernels.lora_ref import lora_ref
from . import _registry
from ._utils import check_dropout, check_same, check_scalar, check_tensor, fmt_shape, maybe_dropout_mask

_registry.register_reference("lora_linear", lora_ref)
from . import lora_triton  # noqa: E402, F401  (registers the "triton" kernel; imports no triton until called)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """y = x W^T + b + scaling * dropout(x) A^T B^T.

    x: (..., K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); scaling: float
    (lora_alpha / r, or / sqrt(r) with rsLoRA). Dropout (on the LoRA branch only) is applied when dropout_p > 0
    and training: a Bernoulli keep-mask scaled by 1/(1-p), from torch's RNG, or from a generator seeded with
    `seed` (same seed, same mask). All tensors share x's dtype and device. Returns y: (..., N) in x's dtype.
    Runs the backend of fastadapters.get_backend("lora_linear"). A kernel flagged `generates_dropout_mask` (the
    "triton" one) gets (dropout_p, seed) and draws its own mask (Philox: a different mask than the reference's for
    one seed).
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, 2)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(
            f"x has shape {fmt_shape(x.shape)} but the layer expects (..., {K}): its last dim must equal "
            f"weight.shape[1] (weight is {fmt_shape(weight.shape)} = (N, K))"
        )
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias has shape {fmt_shape(bias.shape)} but the layer expects ({N},), or pass None")
    check_tensor("lora_A", lora_A)
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A has shape {fmt_shape(lora_A.shape)} but the layer expects (r, {K})")
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError(f"lora_A has shape {fmt_shape(lora_A.shape)}: the rank r must be at least 1")
    check_tensor("lora_B", lora_B)
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(
            f"lora_B has shape {fmt_shape(lora_B.shape)} but the layer expects (N, r) = ({N}, {r}) "
            f"(N from weight, r from lora_A)"
        )
    check_same("x", x, {"weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B})
    scaling = check_scalar("scaling", scaling)
    check_dropout(dropout_p, training, seed)

    args = (x, weight, bias, lora_A, lora_B, scaling)
    backend, fn = _registry.resolve("lora_linear", *args, None)

    def reference() -> torch.Tensor:
        mask = maybe_dropout_mask(x, dropout_p, training, seed, dtype=torch.promote_types(x.dtype, torch.float32))
        return lora_ref(*args, mask)

    if getattr(fn, "generates_dropout_mask", False):  # draws the mask from a seed inside the kernel (Philox)
        p = float(dropout_p) if training else 0.0
        return _registry.call("lora_linear", backend, lambda: fn(*args, None, dropout_p=p, seed=seed), reference,
                              str(x.device))
    if backend == "torch":
        return reference()
    mask = maybe_dropout_mask(x, dropout_p, training, seed, dtype=torch.promote_types(x.dtype, torch.float32))
    return _registry.call("lora_linear", backend, lambda: fn(*args, mask), lambda: lora_ref(*args, mask),
                          str(x.device))
