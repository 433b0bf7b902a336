"""Functional bottleneck adapter: checks, dropout mask, backend dispatch."""

from __future__ import annotations

import torch

from ..config import ACTIVATIONS
from ..kernels.bottleneck_ref import bottleneck_ref
from . import _registry
from ._utils import check_dropout, check_same, check_tensor, fmt_shape, maybe_dropout_mask

_registry.register_reference("bottleneck_adapter", bottleneck_ref)
from . import bottleneck_triton  # noqa: E402, F401  (registers the "triton" kernel; imports no triton until called)


def bottleneck_adapter(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    activation: str = "tanh",
    scaling: float | torch.Tensor = 1.0,
    residual: torch.Tensor | None = None,
    *,
    down_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """residual + scaling * up(act(down(dropout(h)))), computed in fp32 and returned in h's dtype.

    h: (..., d_in); down_weight: (b, d_in); up_weight: (d_out, b); down_bias: (b,) or None; up_bias: (d_out,)
    or None; activation: one of fastadapters.config.ACTIVATIONS; scaling: float or a one-element tensor (a
    learned scalar, gradient flows); residual: (..., d_out) in h's dtype, defaults to h (series adapter; needs
    d_out == d_in); parallel adapters pass the wrapped layer's output. Adapter weights may be in another float
    dtype than h (LLM-Adapters keeps them in fp32) but must share one dtype. Dropout (on the adapter input)
    when dropout_p > 0 and training, seeded like lora_linear. Returns (..., d_out) in h's dtype. A kernel flagged
    `generates_dropout_mask` (the "triton" one) gets (dropout_p, seed) and draws its own mask (Philox: a different
    mask than the reference's for one seed; fastadapters.ops.bottleneck_triton.bottleneck_dropout_mask shows it).
    """
    check_tensor("h", h, min_ndim=1)
    check_tensor("down_weight", down_weight, 2)
    check_tensor("up_weight", up_weight, 2)
    b, d_in = down_weight.shape
    d_out = up_weight.shape[0]
    if b <= 0 or d_in <= 0:
        raise ValueError(f"down_weight has shape {fmt_shape(down_weight.shape)}: (bottleneck_size, d_in) "
                         "must both be at least 1")
    if h.shape[-1] != d_in:
        raise ValueError(
            f"h has shape {fmt_shape(h.shape)} but the adapter expects (..., {d_in}): its last dim must equal "
            f"down_weight.shape[1] (down_weight is {fmt_shape(down_weight.shape)} = (b, d_in))"
        )
    if up_weight.shape[1] != b or d_out <= 0:
        raise ValueError(f"up_weight has shape {fmt_shape(up_weight.shape)} but the adapter expects (d_out, {b})")
    if down_bias is not None:
        check_tensor("down_bias", down_bias)
        if tuple(down_bias.shape) != (b,):
            raise ValueError(f"down_bias has shape {fmt_shape(down_bias.shape)} but the adapter expects ({b},)")
    if up_bias is not None:
        check_tensor("up_bias", up_bias)
        if tuple(up_bias.shape) != (d_out,):
            raise ValueError(f"up_bias has shape {fmt_shape(up_bias.shape)} but the adapter expects ({d_out},)")
    out_shape = (*h.shape[:-1], d_out)
    if residual is None:
        if d_out != d_in:
            raise ValueError(
                f"residual=None adds h, which needs d_out == d_in, but up_weight {fmt_shape(up_weight.shape)} "
                f"gives d_out={d_out} and h has d_in={d_in}: pass residual of shape {fmt_shape(out_shape)}"
            )
    else:
        check_tensor("residual", residual)
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual has shape {fmt_shape(residual.shape)} but the adapter expects "
                             f"{fmt_shape(out_shape)} (h's leading dims, d_out)")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: choose one of {ACTIVATIONS}")
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1 or not scaling.is_floating_point():
            raise ValueError(f"scaling is a tensor of shape {fmt_shape(scaling.shape)} and dtype {scaling.dtype}; "
                             "it must be a one-element floating-point tensor (a learned scalar) or a float")
        if scaling.device != h.device:
            raise ValueError(f"scaling is on {scaling.device} but h is on {h.device}: move them to one device")
    elif isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ValueError(f"scaling={scaling!r} must be a float or a one-element tensor")
    else:
        scaling = float(scaling)
    check_same("h", h, {"residual": residual}, dtype=True)
    check_same("h", h, {"down_weight": down_weight, "up_weight": up_weight, "down_bias": down_bias,
                        "up_bias": up_bias}, dtype=False)
    check_same("down_weight", down_weight, {"up_weight": up_weight, "down_bias": down_bias, "up_bias": up_bias},
               device=False)
    check_dropout(dropout_p, training, seed)

    args = (h, down_weight, up_weight, activation, scaling, residual, down_bias, up_bias)
    backend, fn = _registry.resolve("bottleneck_adapter", *args, None)

    def reference() -> torch.Tensor:
        mask = maybe_dropout_mask(h, dropout_p, training, seed, dtype=torch.promote_types(h.dtype, torch.float32))
        return bottleneck_ref(*args, mask)

    if getattr(fn, "generates_dropout_mask", False):  # draws the mask from a seed inside the kernel (Philox)
        p = float(dropout_p) if training else 0.0
        return _registry.call("bottleneck_adapter", backend, lambda: fn(*args, None, dropout_p=p, seed=seed),
                              reference, str(h.device))
    if backend == "torch":
        return reference()
    mask = maybe_dropout_mask(h, dropout_p, training, seed, dtype=torch.promote_types(h.dtype, torch.float32))
    return _registry.call("bottleneck_adapter", backend, lambda: fn(*args, mask), lambda: bottleneck_ref(*args, mask),
                          str(h.device))
