"""The "triton" backend of fa.ops.prefix_attention: torch.library custom ops around the launchers in
kernels/prefix_attention_launch.py (kernels: kernels/prefix_attention.py).

    fastadapters::prefix_attention_fwd(q, k, v, prefix_k?, prefix_v?, key_padding_mask?, causal, scale)
        -> (out (B, Hq, Lq, D) in q's dtype, lse (B, Hq, Lq) fp32)
    fastadapters::prefix_attention_bwd(dout, dlse?, q, k, v, prefix_k?, prefix_v?, key_padding_mask?, out, lse,
                                       causal, scale) -> (dq, dk, dv, d(prefix_k), d(prefix_v))

Both have fake (meta) implementations so torch.compile traces through them; the forward op carries its autograd
formula (register_autograd), so gradients reach q, k, v and the prefix (and flow from lse too when it is used).

The launchers run on their inputs' device (their own torch.cuda.device guard) in both directions. The backward
is deterministic when torch.use_deterministic_algorithms(True) is on (or FASTADAPTERS_PREFIX_DETERMINISTIC=1),
else it adds dQ with fp32 atomics (see kernels/prefix_attention.py); the prefix gradients are reduced in a fixed
order either way.

Importing this module registers `prefix_attention_triton` for backend "triton" in fastadapters.ops._registry (when
triton is installed) but does not import triton: the kernels (fastadapters.kernels.prefix_attention_launch) load at the
first call, so TRITON_INTERPRET can still be set before that (tests on CPU). The kernels run CUDA tensors, and CPU
tensors only under the interpreter when the backend is asked for explicitly ("triton"; "auto" keeps the reference
on CPU).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch

from ._registry import register_kernel
from ._triton_common import SUPPORTED_DTYPES, device_refusal

MAX_HEAD_DIM = 256  # kernels.prefix_attention_configs.MAX_HEAD_DIM (not imported here: that would import triton)


def _kernels() -> Any:
    from ..kernels import prefix_attention_launch

    return prefix_attention_launch


@torch.library.custom_op("fastadapters::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D); prefix_k/v: (Hkv, P, D) or None; key_padding_mask: (B, Lk) bool
    or None. Returns out (B, Hq, Lq, D) in q's dtype and lse (B, Hq, Lq) fp32 (natural log, -inf: no key)."""
    return _kernels().prefix_attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)


@prefix_attention_fwd_op.register_fake
def _fwd_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    B, Hq, Lq, D = q.shape
    return q.new_empty((B, Hq, Lq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32)


@torch.library.custom_op("fastadapters::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv, d(prefix_k), d(prefix_v)); the prefix grads are (Hkv, 0, D) when there is no prefix.
    dout: (B, Hq, Lq, D); dlse: (B, Hq, Lq) or None; out, lse: the forward's outputs."""
    return _kernels().prefix_attention_bwd(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse,
                                        causal, scale)


@prefix_attention_bwd_op.register_fake
def _bwd_fake(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale):
    Hkv, D = k.shape[1], k.shape[3]
    P = 0 if prefix_k is None else prefix_k.shape[1]
    dtype = prefix_k.dtype if prefix_k is not None else q.dtype
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty((Hkv, P, D), dtype=dtype), q.new_empty((Hkv, P, D), dtype=dtype))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.set_materialize_grads(False)  # an unused lse sends None, not a tensor of zeros to read


def _backward(ctx, dout, dlse):
    q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse = ctx.saved_tensors
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv, dpk, dpv = prefix_attention_bwd_op(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out,
                                                   lse, ctx.causal, ctx.scale)
    if prefix_k is None:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None


prefix_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def prefix_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fa.ops.prefix_attention on the fused Triton kernels; arguments and results as prefix_attention_ref.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D); prefix_k, prefix_v: (Hkv, P, D) or None; key_padding_mask: (B, Lk)
    bool or None. Returns out (B, Hq, Lq, D) (and lse (B, Hq, Lq) fp32 with return_lse). Differentiable in q, k, v
    and the prefix; the backward is bitwise reproducible under torch.use_deterministic_algorithms(True) (else dQ
    is summed with fp32 atomics; the prefix gradients are reduced in a fixed order either way).
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out, lse = torch.ops.fastadapters.prefix_attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask,
                                                           bool(causal), scale)
    return (out, lse) if return_lse else out


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None,
             prefix_v: torch.Tensor | None, causal: bool = True, scale: float | None = None,
             key_padding_mask: torch.Tensor | None = None, return_lse: bool = False) -> str | None:
    """None when the Triton kernels can run these (already validated) arguments, else why not."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32); cast, or use the 'torch' backend"
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        return f"head_dim {D} is above {MAX_HEAD_DIM}"
    return device_refusal(q, "q", "fastadapters.kernels.prefix_attention")


def register() -> None:
    """Make prefix_attention_triton the "triton" kernel of fa.ops.prefix_attention (done at import when triton is
    installed; idempotent)."""
    register_kernel("prefix_attention", "triton", prefix_attention_triton, supports=supports)


if importlib.util.find_spec("triton") is not None:
    register()
