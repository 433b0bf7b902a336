"""Pure-PyTorch reference for the LoRA linear op: the spec a fused `lora` kernel is tested against.

    y = x W^T + b + s * (x * mask) A^T B^T

It is also the CPU path of `fastadapters.ops.lora_linear`. No argument checks here: the functional API validates.
Everything is computed in x's dtype, as PEFT's LoRA layer does (so in bf16 the rank-r intermediate x A^T is
rounded to bf16); a fused kernel that keeps it in fp32 is at least as accurate, which the three-way tests allow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_dropout_mask(x: torch.Tensor, dropout_mask: torch.Tensor | None) -> torch.Tensor:
    """x * dropout_mask rounded once to x's dtype (like nn.Dropout); x unchanged when the mask is None.

    x: (..., K); dropout_mask: same shape (or broadcastable), keep/(1-p) values in any float dtype.
    """
    if dropout_mask is None:
        return x
    compute = torch.promote_types(x.dtype, torch.float32)
    return (x.to(compute) * dropout_mask.to(compute)).to(x.dtype)


def lora_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRA linear: y = x W^T + b + scaling * (x * dropout_mask) A^T B^T.

    x: (..., K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); scaling: float;
    dropout_mask: (..., K) (already holding the 1/(1-p) rescale) or None. Returns y: (..., N) in x's dtype.
    """
    base = F.linear(x, weight, bias)
    xd = apply_dropout_mask(x, dropout_mask)
    return base + F.linear(F.linear(xd, lora_A), lora_B) * scaling
