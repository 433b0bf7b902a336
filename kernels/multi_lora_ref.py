"""Pure-PyTorch reference for the multi-LoRA op (many adapters in one batch, one adapter index per token).

    out[m] (+)= s[i] * (x[m] A_i^T) B_i^T      with i = token_adapter_idx[m];  i = -1: nothing is added

A_i = lora_A_stack[i] (R, K) and B_i = lora_B_stack[i] (N, R) are the adapters stacked and zero-padded to the
largest rank R (padding adds exact zeros). It is the spec the Triton (kernels/multi_lora.py) and C++/CUDA
(csrc/) implementations are tested against, and the CPU path of `fastadapters.ops.multi_lora_delta`.

Formulation: one GEMM against all adapters at once, h = x [A_0; ...; A_{n-1}]^T (M, n*R), then every rank
column of an adapter other than the token's own is zeroed (and the token's columns scaled by s_i), and one
GEMM back: delta = h [B_0, ..., B_{n-1}]^T. No Python loop over adapters, no host sync, so it can be
captured in a CUDA graph; it costs n times the FLOPs of one adapter (fine for the few adapters of a test or
a CPU run; the kernels do only each token's own adapter). The zeroed columns contribute exact zeros, so each
row equals that token's single-adapter LoRA up to the summation order of the GEMMs.

Precision: computed in x's dtype like PEFT's LoRA branch (the rank-R intermediate is rounded to it); the
kernels keep it in fp32, which the three-way tests allow. No argument checks here: the functional API validates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_lora_ref(
    x: torch.Tensor,
    lora_A_stack: torch.Tensor,
    lora_B_stack: torch.Tensor,
    scalings: torch.Tensor,
    token_adapter_idx: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token LoRA delta: delta[m] = s[i] * x[m] A_i^T B_i^T, i = token_adapter_idx[m] (-1: zero row).

    x: (M, K); lora_A_stack: (n, R, K); lora_B_stack: (n, N, R); scalings: (n,) float; token_adapter_idx: (M,)
    integer in [-1, n) (any other value counts as -1). A/B are cast to x's dtype. Returns delta (M, N) in x's
    dtype, or, when `out` (M, N) is given, `out` with the delta added in place (in out's dtype).
    """
    M, K = x.shape
    n, R, _ = lora_A_stack.shape
    N = lora_B_stack.shape[1]
    dt = x.dtype
    if n == 0 or R == 0 or M == 0:
        delta = torch.zeros((M, N), device=x.device, dtype=dt)
        return delta if out is None else out
    idx = token_adapter_idx.to(device=x.device, dtype=torch.long)
    valid = (idx >= 0) & (idx < n)
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    # (M, n*R): column c belongs to adapter c // R; keep only the token's own adapter, times its scaling
    h = F.linear(x, lora_A_stack.to(dt).reshape(n * R, K))
    owner = torch.arange(n * R, device=x.device) // max(R, 1)
    keep = (owner[None, :] == safe[:, None]) & valid[:, None]
    scale = scalings.to(device=x.device, dtype=dt)[safe][:, None]
    h = torch.where(keep, h * scale, torch.zeros((), device=x.device, dtype=dt))
    b_cat = lora_B_stack.to(dt).permute(1, 0, 2).reshape(N, n * R)  # (N, n*R), column c = adapter c // R
    delta = F.linear(h, b_cat)
    if out is None:
        return delta
    return out.add_(delta)


def multi_lora_loop_ref(
    x: torch.Tensor,
    lora_A_stack: torch.Tensor,
    lora_B_stack: torch.Tensor,
    scalings: torch.Tensor,
    token_adapter_idx: torch.Tensor,
) -> torch.Tensor:
    """The same delta computed the obvious way, token by token, in float64 (tests only: slow, independent).

    Shapes as `multi_lora_ref`; returns (M, N) float64.
    """
    M = x.shape[0]
    N = lora_B_stack.shape[1]
    n = lora_A_stack.shape[0]
    out = torch.zeros(M, N, dtype=torch.float64, device=x.device)
    for m, i in enumerate(token_adapter_idx.tolist()):
        if 0 <= i < n:
            h = lora_A_stack[i].double() @ x[m].double()
            out[m] = float(scalings[i]) * (lora_B_stack[i].double() @ h)
    return out
