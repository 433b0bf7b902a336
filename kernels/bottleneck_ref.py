"""Pure-PyTorch reference for the bottleneck adapter op: the spec a fused `bottleneck` kernel is tested against.

    out = residual + scaling * up(act(down(h * mask)))      (residual defaults to h)

with down(z) = z D^T + d_b and up(z) = z U^T + u_b. As in LLM-Adapters, the adapter runs in fp32 whatever the
input dtype (inputs, weights and scaling are upcast; float64 stays float64) and the sum is cast back to h's
dtype. It is also the CPU path of `fastadapters.ops.bottleneck_adapter`; the functional API validates arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) form
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}


def bottleneck_ref(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    activation: str,
    scaling: float | torch.Tensor,
    residual: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bottleneck adapter: residual + scaling * up(act(down(h * dropout_mask))).

    h: (..., d_in); down_weight: (b, d_in); up_weight: (d_out, b); down_bias: (b,) or None; up_bias: (d_out,) or
    None; activation: a name in ACTIVATION_FNS; scaling: float or a one-element tensor (a learned scalar; its
    gradient flows); residual: (..., d_out), defaults to h (then d_out == d_in); dropout_mask: (..., d_in) holding
    keep/(1-p), or None. Returns (..., d_out) in h's dtype.
    """
    compute = torch.float32
    for t in (h, down_weight, up_weight, down_bias, up_bias):
        if t is not None:
            compute = torch.promote_types(compute, t.dtype)
    z = h.to(compute)
    if dropout_mask is not None:
        z = z * dropout_mask.to(compute)
    z = F.linear(z, down_weight.to(compute), None if down_bias is None else down_bias.to(compute))
    z = ACTIVATION_FNS[activation](z)
    z = F.linear(z, up_weight.to(compute), None if up_bias is None else up_bias.to(compute))
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.to(compute).reshape(())  # a (1,)-shaped learned scalar must not add a dimension
    res = h if residual is None else residual
    return (res.to(compute) + z * scaling).to(h.dtype)
