"""Functional multi-LoRA: many LoRA adapters in one batch, one adapter index per token.

    multi_lora_delta(x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx, out=None)

Backends (fastadapters.use_backend / FASTADAPTERS_BACKEND), all computing the same thing:
  * "torch"  kernels/multi_lora_ref.py: two GEMMs against all adapters at once (no loop, no host sync);
  * "triton" kernels/multi_lora.py: grouped (SGMV-style) shrink + expand, prefill and decode, as the custom op
             torch.ops.fastadapters.multi_lora_sgmv_ (mutates out); CUDA tensors, or CPU tensors under
             TRITON_INTERPRET=1 when "triton" is asked for explicitly (tests);
  * "cuda"   the C++/CUDA extension (csrc/, fastadapters/ext.py, built on first use), registered with the
             dispatcher as torch.ops.fastadapters.multi_lora_bgmv_ (TORCH_LIBRARY): the fused BGMV decode
             kernel on CUDA tensors, its C++ twin on CPU tensors (asked for explicitly: it exists to test the
             binding layer; "auto" keeps the CPU on the reference);
  * "auto"   CUDA tensors: the extension up to CUDA_MAX_TOKENS tokens, else Triton; if the extension cannot be
             built it warns once and Triton runs; CPU tensors: the reference.
The kernels are for inference: when autograd would need them (grad mode on and an input requires grad) they
refuse and "auto" runs the reference, which differentiates.

The op registers its kernels in fastadapters.ops._registry; `python -m fastadapters.ext`
prints which path runs where.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from ..backend import get_backend
from ..kernels.multi_lora_ref import multi_lora_ref
from . import _registry
from ._triton_common import SUPPORTED_DTYPES as KERNEL_DTYPES
from ._triton_common import interpreting
from ._utils import check_tensor, fmt_shape

OP = "multi_lora_delta"
CUDA_MAX_TOKENS = 256  # above this, "auto" sends CUDA tensors to the grouped Triton kernels (prefill)
TRITON_MAX_RANK = 256
TRITON_MAX_ADAPTERS = 1024

_registry.register_reference(OP, multi_lora_ref)


def _interpreter_refusal() -> str | None:
    """Why CPU tensors cannot run the Triton kernels here, or None (TRITON_INTERPRET set before triton's import)."""
    if not interpreting():
        return "x is on the CPU (the Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 and backend 'triton')"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        return ("TRITON_INTERPRET=1 was set after triton was imported, so its interpreter cannot run here: set it "
                "before Python starts")
    return None


def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _triton_refusal(x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx, out) -> str | None:
    if not x.is_cuda:
        if get_backend() != "triton":
            return "x is on the CPU (the Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 and backend 'triton')"
        reason = _interpreter_refusal()
        if reason is not None:
            return reason
    if _needs_grad(x, lora_A_stack, lora_B_stack, out):
        return "the multi-LoRA kernels are inference-only and an input requires grad (the torch path differentiates)"
    if x.dtype not in KERNEL_DTYPES or lora_B_stack.dtype not in KERNEL_DTYPES or out.dtype not in KERNEL_DTYPES:
        return f"dtypes {x.dtype}/{lora_B_stack.dtype}/{out.dtype}: the kernels take float16, bfloat16, float32"
    if lora_A_stack.shape[1] > TRITON_MAX_RANK:
        return f"rank {lora_A_stack.shape[1]} is above the Triton kernels' limit {TRITON_MAX_RANK}"
    if lora_A_stack.shape[0] > TRITON_MAX_ADAPTERS:
        return f"{lora_A_stack.shape[0]} adapters is above the Triton kernels' limit {TRITON_MAX_ADAPTERS}"
    return None


@torch.library.custom_op("fastadapters::multi_lora_sgmv_", mutates_args=("out",))
def multi_lora_sgmv_op(x: torch.Tensor, lora_A_stack: torch.Tensor, lora_B_stack: torch.Tensor,
                       scalings: torch.Tensor, token_adapter_idx: torch.Tensor, out: torch.Tensor) -> None:
    """The Triton grouped (SGMV-style) kernels as a dispatcher op: out (M, N) += the multi-LoRA delta, in place.
    x: (M, K); stacks (n, R, K) / (n, N, R); scalings (n,) fp32; token_adapter_idx (M,). Inference only (no
    autograd formula: the functional API sends differentiable calls to the reference)."""
    from ..kernels.multi_lora_launch import multi_lora_fwd  # imported on first use: importing triton is slow

    multi_lora_fwd(x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx, out)


@multi_lora_sgmv_op.register_fake
def _(x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx, out):
    return None


def _triton_kernel(x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx, out):
    torch.ops.fastadapters.multi_lora_sgmv_(x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx, out)
    return out


def _ext():
    from .. import ext  # not at import: `python -m fastadapters.ext` must find it unimported

    return ext


def _cuda_refusal(x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx, out) -> str | None:
    ext = _ext()
    auto = get_backend() == "auto"
    if _needs_grad(x, lora_A_stack, lora_B_stack, out):
        return "the multi-LoRA kernels are inference-only and an input requires grad (the torch path differentiates)"
    if not (x.dtype == lora_A_stack.dtype == lora_B_stack.dtype == out.dtype):
        return (f"the extension needs one dtype for x, the stacks and out, got {x.dtype}, {lora_A_stack.dtype}, "
                f"{lora_B_stack.dtype}, {out.dtype}")
    if x.is_cuda:
        if x.dtype not in KERNEL_DTYPES:
            return f"dtype {x.dtype}: the CUDA kernel takes float16, bfloat16, float32"
        if auto and x.shape[0] > CUDA_MAX_TOKENS:
            return f"{x.shape[0]} tokens: the BGMV decode kernel serves up to {CUDA_MAX_TOKENS} (prefill: Triton)"
        mod = ext.load()
        if mod is None:
            return f"the C++/CUDA extension is unavailable ({ext.unavailable_reason()})"
        if not mod.has_cuda():
            return "the C++/CUDA extension was built without CUDA code (no toolkit or GPU at build time)"
        return None
    if x.device.type != "cpu":
        return f"tensors on {x.device} are not supported by the extension"
    if auto:
        return "CPU tensors run the torch reference under 'auto' (backend 'cuda' runs the extension's C++ code)"
    if ext.load() is None:
        return f"the C++/CUDA extension is unavailable ({ext.unavailable_reason()})"
    return None


def _cuda_kernel(x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx, out):
    op = _ext().bgmv_op()  # torch.ops.fastadapters.multi_lora_bgmv_: the C++ op through the dispatcher
    target = out if out.is_contiguous() else out.contiguous()
    op(target, x.contiguous(), lora_A_stack.contiguous(), lora_B_stack.contiguous(),
       scalings.to(torch.float32).contiguous(), token_adapter_idx.contiguous())
    if target is not out:
        out.copy_(target)
    return out


_registry.register_kernel(OP, "triton", _triton_kernel, supports=_triton_refusal)
_registry.register_kernel(OP, "cuda", _cuda_kernel, supports=_cuda_refusal)


def _as_scalings(scalings: torch.Tensor | Sequence[float], n: int, device: torch.device) -> torch.Tensor:
    if isinstance(scalings, torch.Tensor):
        if scalings.dim() != 1 or scalings.shape[0] != n:
            raise ValueError(f"scalings has shape {fmt_shape(scalings.shape)} but must be (n,) = ({n},), "
                             "one per adapter")
        if not scalings.is_floating_point():
            raise ValueError(f"scalings has dtype {scalings.dtype} but must be floating point")
        if scalings.device != device:
            raise ValueError(f"scalings is on {scalings.device} but x is on {device}: move them to one device")
        return scalings.to(torch.float32)
    values = list(scalings)
    if len(values) != n or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise ValueError(f"scalings={scalings!r} must hold {n} real numbers, one per stacked adapter")
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


def multi_lora_delta(
    x: torch.Tensor,
    lora_A_stack: torch.Tensor,
    lora_B_stack: torch.Tensor,
    scalings: torch.Tensor | Sequence[float],
    token_adapter_idx: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token LoRA delta: delta[t] = s_i * x[t] A_i^T B_i^T with i = token_adapter_idx[t]; i = -1: zero.

    x: (..., K); lora_A_stack: (n, R, K) and lora_B_stack: (n, N, R), the n adapters zero-padded to the largest
    rank R (A and B share one float dtype; they are used in x's dtype by the reference); scalings: (n,) float
    tensor or n numbers (lora_alpha / r per adapter); token_adapter_idx: integer tensor of shape x.shape[:-1]
    (or flat (M,)), values in [-1, n) (checked when on the CPU; on a GPU an out-of-range value acts as -1, since
    checking would need a host sync). out: (..., N) float or None.

    Returns the delta (..., N) in x's dtype, or, when `out` is given, `out` with the delta added in place
    (one read-modify-write: a layer passes its base output). Runs the backend fastadapters.get_backend() picks.
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("lora_A_stack", lora_A_stack, 3)
    check_tensor("lora_B_stack", lora_B_stack, 3)
    K = x.shape[-1]
    n, R, KA = lora_A_stack.shape
    if KA != K:
        raise ValueError(f"lora_A_stack has shape {fmt_shape(lora_A_stack.shape)} but x {fmt_shape(x.shape)} needs "
                         f"(n, R, {K}): stack each adapter's lora_A (r_i, {K}), zero-padded to the largest rank")
    if lora_B_stack.shape[0] != n or lora_B_stack.shape[2] != R:
        raise ValueError(f"lora_B_stack has shape {fmt_shape(lora_B_stack.shape)} but lora_A_stack "
                         f"{fmt_shape(lora_A_stack.shape)} needs ({n}, N, {R}) (n adapters, rank padded to {R})")
    if lora_A_stack.dtype != lora_B_stack.dtype:
        raise ValueError(f"lora_A_stack has dtype {lora_A_stack.dtype} but lora_B_stack has {lora_B_stack.dtype}: "
                         "stack both in one dtype")
    N = lora_B_stack.shape[1]
    for name, t in (("lora_A_stack", lora_A_stack), ("lora_B_stack", lora_B_stack)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move them to one device")
    lead = tuple(x.shape[:-1])
    M = math.prod(lead)
    idx = token_adapter_idx
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"token_adapter_idx must be a torch.Tensor of integers, got {type(idx).__name__}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_adapter_idx has dtype {idx.dtype} but must be int32 or int64 (-1 = no adapter)")
    if tuple(idx.shape) != lead and tuple(idx.shape) != (M,):
        raise ValueError(f"token_adapter_idx has shape {fmt_shape(idx.shape)} but x {fmt_shape(x.shape)} needs "
                         f"{fmt_shape(lead)} (one adapter index per token)")
    if idx.device != x.device:
        raise ValueError(f"token_adapter_idx is on {idx.device} but x is on {x.device}: move it to x's device")
    if idx.device.type == "cpu" and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= n:
            bad = lo if lo < -1 else hi
            raise ValueError(f"token_adapter_idx holds {bad}, outside [-1, {n}): use -1 for no adapter, else an "
                             f"index into the {n} stacked adapters")
    s = _as_scalings(scalings, n, x.device)
    if out is not None:
        check_tensor("out", out)
        if tuple(out.shape) != (*lead, N):
            raise ValueError(f"out has shape {fmt_shape(out.shape)} but must be {fmt_shape((*lead, N))} (x's leading "
                             f"dims, N = lora_B_stack.shape[1])")
        if out.device != x.device:
            raise ValueError(f"out is on {out.device} but x is on {x.device}: move them to one device")
        try:
            out2 = out.view(M, N)
        except RuntimeError:
            raise ValueError(f"out with strides {out.stride()} cannot be viewed as ({M}, {N}): pass a contiguous "
                             "out, or None and add the returned delta") from None
    else:
        out2 = torch.zeros((M, N), device=x.device, dtype=x.dtype)
    multi_lora_delta_(x.reshape(M, K), lora_A_stack, lora_B_stack, s, idx.reshape(M), out2)
    return out if out is not None else out2.view(*lead, N)


def multi_lora_delta_(x: torch.Tensor, lora_A_stack: torch.Tensor, lora_B_stack: torch.Tensor,
                      scalings: torch.Tensor, token_adapter_idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` += the multi-LoRA delta, in place, WITHOUT argument checks: for callers that built the arguments
    themselves (LoraLayer's mixed batches, once per layer and step, where the checks would cost more than the
    kernel). x: (M, K); stacks (n, R, K) / (n, N, R); scalings: (n,) float32 on x's device; token_adapter_idx:
    (M,) int32/int64; out: (M, N). Returns out."""
    return _registry.dispatch(OP, x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx, out)
