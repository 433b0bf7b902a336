"""The "triton" backend of `fastadapters.ops.lora_linear`: torch.library custom ops with their autograd formula.

    fastadapters::lora_linear_fwd(x2d, W, b?, A, B, scaling, dropout_p, seed?) -> (y, xa, seed_used)
    fastadapters::lora_linear_bwd(dy2d, x2d, W, A, B, xa, seed_used, scaling, dropout_p, need_*) -> 5 grads

The forward op carries its backward (register_autograd, the wiring every op here uses), and both ops have fake
implementations, so a LoRA layer compiles with fullgraph=True. The dropout mask is drawn inside the kernels from
a Philox seed: when no seed is given the forward op draws one from torch's CPU generator at run time (so a
compiled graph still gets a fresh mask every call) and returns it as a CPU tensor, and the backward op regenerates
the same mask from it (reading a CPU tensor: no device sync). Saved for backward: x (a view of the input),
xa = dropout(x) A^T (M x r, fp32) and the seed.

Importing this module does not import triton: the launchers (fastadapters.kernels.lora_launch) load at the first
call, so TRITON_INTERPRET can still be set before that (tests on CPU). The kernels run CUDA tensors (on the
tensors' own GPU), and CPU tensors only under the interpreter when the backend is asked for explicitly
("triton"; "auto" keeps the reference on CPU).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ._registry import register_kernel
from ._triton_common import SEED_MOD as _SEED_MOD
from ._triton_common import SUPPORTED_DTYPES, device_refusal, mask_refusal
from ._triton_common import draw_seed as _draw_seed

MAX_RANK = 256


def _kernels() -> Any:
    from ..kernels import lora_launch

    return lora_launch


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("fastadapters::lora_linear_fwd", mutates_args=())
def lora_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, dropout_p: float,
                       seed: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (M, K) -> y: (M, N) in x's dtype, xa: (M, r) fp32, seed_used: () int64 on CPU."""
    used = 0 if dropout_p == 0.0 else (_draw_seed() if seed is None else int(seed))
    y, xa = _kernels().lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, used)
    return y, xa, torch.tensor(used, dtype=torch.int64)


@lora_linear_fwd_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M = x.shape[0]
    return (x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_A.shape[0]), dtype=torch.float32),
            torch.empty((), dtype=torch.int64))


@torch.library.custom_op("fastadapters::lora_linear_bwd", mutates_args=())
def lora_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, xa: torch.Tensor, seed: torch.Tensor, scaling: float, dropout_p: float,
                       need_dx: bool, need_dW: bool, need_db: bool, need_dA: bool,
                       need_dB: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, K), dW (N, K), db (N,), dA (r, K), dB (N, r)); an empty (0,) tensor for each not asked for.
    seed: the forward's seed_used, a CPU tensor (reading it does not sync the GPU)."""
    grads = _kernels().lora_linear_bwd(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, int(seed),
                                       need_dx=need_dx, need_dA=need_dA, need_dB=need_dB, need_dW=need_dW,
                                       need_db=need_db)
    dx, dA, dB, dW, db = grads
    return tuple(dy.new_empty((0,)) if g is None else g.contiguous() for g in (dx, dW, db, dA, dB))


@lora_linear_bwd_op.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, need_dW, need_db, need_dA, need_dB):
    def maybe(need: bool, like: torch.Tensor, shape) -> torch.Tensor:
        return like.new_empty(shape) if need else dy.new_empty((0,))

    N = weight.shape[0]
    return (maybe(need_dx, x, x.shape), maybe(need_dW, weight, weight.shape), maybe(need_db, weight, (N,)),
            maybe(need_dA, lora_A, lora_A.shape), maybe(need_dB, lora_B, lora_B.shape))


# ------------------------------------------------------------------------------------------------ autograd
def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, _ = inputs
    _, xa, seed_used = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed_used)
    ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, dy: torch.Tensor | None, _dxa: Any, _dseed: Any) -> tuple[torch.Tensor | None, ...]:
    # xa and seed_used are internal outputs (never differentiated by lora_linear_triton's callers)
    x, weight, lora_A, lora_B, xa, seed_used = ctx.saved_tensors
    need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
    need_db = need_db and ctx.has_bias
    if dy is None:
        return None, None, None, None, None, None, None, None
    dx, dW, db, dA, dB = lora_linear_bwd_op(dy, x, weight, lora_A, lora_B, xa, seed_used, ctx.scaling,
                                            ctx.dropout_p, need_dx, need_dW, need_db, need_dA, need_dB)
    return (dx if need_dx else None, dW if need_dW else None, db if need_db else None, dA if need_dA else None,
            dB if need_dB else None, None, None, None)


lora_linear_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, dropout_mask: torch.Tensor | None = None, *,
                       dropout_p: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """The registered "triton" kernel of lora_linear: y = x W^T + b + s * dropout(x) A^T B^T.

    x: (..., K), any strides; weight: (N, K); bias: (N,) or None; lora_A: (r, K), 1 <= r <= 256; lora_B: (N, r).
    The dropout mask (p = dropout_p, 0 for none) is drawn inside the kernels from `seed` (same seed, same mask;
    None: a fresh seed per call). A precomputed `dropout_mask` is refused: the kernels never read a mask.
    Returns (..., N) in x's dtype.
    """
    if dropout_mask is not None:
        raise ValueError(_MASK_REFUSAL)
    p = float(dropout_p)
    s = None if seed is None else int(seed) % _SEED_MOD
    K, N = x.shape[-1], weight.shape[0]
    y, _, _ = torch.ops.fastadapters.lora_linear_fwd(x.reshape(-1, K), weight, bias, lora_A, lora_B,
                                                     float(scaling), p, s)
    return y.reshape(*x.shape[:-1], N)


# fastadapters.ops.lora_linear passes (dropout_p, seed) instead of a mask to kernels that carry this flag
lora_linear_triton.generates_dropout_mask = True

_MASK_REFUSAL = mask_refusal("fastadapters.ops.lora_linear")


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
             lora_B: torch.Tensor, scaling: float, dropout_mask: torch.Tensor | None = None,
             **_: Any) -> str | None:
    """None when the triton kernel can run these arguments, else why not."""
    if dropout_mask is not None:
        return _MASK_REFUSAL
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported (float16, bfloat16, float32); cast, or use the 'torch' backend"
    r = lora_A.shape[0]
    if not 1 <= r <= MAX_RANK:
        return f"rank r={r} is outside 1..{MAX_RANK}"
    return device_refusal(x, "x", "fastadapters.kernels.lora")  # the module whose INTERPRETED flag counts


if importlib.util.find_spec("triton") is not None:
    register_kernel("lora_linear", "triton", lora_linear_triton, supports=supports)
