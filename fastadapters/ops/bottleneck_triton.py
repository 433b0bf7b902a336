"""The "triton" backend of `fastadapters.ops.bottleneck_adapter`: two torch.library custom ops, the forward one
carrying its autograd formula (register_autograd: one wiring for every op, as prefix attention).

    fastadapters::bottleneck_fwd(h2d, W_d, W_u, b_d?, b_u?, residual2d?, scale?, scaling, activation, dropout_p,
                                 seed?, save) -> (y, pre, a, seed_used)
    fastadapters::bottleneck_bwd(dy2d, h2d, W_d, W_u, b_u?, pre, a, scale?, seed_used, scaling, activation,
                                 dropout_p, add_dy, need_*) -> (dh, dW_d, dW_u, db_d, db_u, dscale)

The ops are opaque to torch.compile (their fake implementations give the shapes), so a bottleneck layer compiles
with fullgraph=True. Both launch on their inputs' GPU (a torch.cuda.device guard in the launchers). Adapter
weights in fp32 on a bf16/fp16 model (the layer's real path) are cast to the activation dtype inside the launchers,
once per call, so every GEMM runs on tensor cores; their gradients come back in fp32 (kernels/bottleneck_launch.py
says why there and not in the layer or the kernel). The dropout mask is drawn inside the kernels from a Philox
seed: when no seed is given the
forward op draws one from torch's CPU generator at run time (so a compiled graph still gets a fresh mask every
call) and returns it, and the backward op regenerates the same mask from it (the LoRA op's convention).
Saved for backward: h (a view of the input), pre = D(h) W_d^T + b_d (M x b, fp32), a = act(pre) (M x b, in the
dot dtype) and the seed; nothing when no input needs a gradient. A residual that is h itself (the series adapter
called as bottleneck_adapter(h, ..., residual=h)) runs as residual=None, so dy is added to dh inside the kernel.

Importing this module does not import triton: the kernels (fastadapters.kernels.bottleneck_launch) load at the first
call, so TRITON_INTERPRET can still be set before that (tests on CPU). The kernels run CUDA tensors, and CPU
tensors only under the interpreter when the backend is asked for explicitly ("triton"; "auto" keeps the reference
on CPU).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ._registry import register_kernel
from ._triton_common import SEED_MOD as _SEED_MOD
from ._triton_common import SUPPORTED_DTYPES, device_refusal, mask_refusal
from ._triton_common import draw_seed as _draw_seed

MAX_BOTTLENECK = 1024


def _kernels() -> Any:
    from ..kernels import bottleneck_launch

    return bottleneck_launch


def _dot_dtype(h_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    # = fastadapters.kernels.bottleneck_launch.dot_dtype, repeated so fake tensors never import triton
    return h_dtype if h_dtype in (torch.bfloat16, torch.float16) else torch.float32


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("fastadapters::bottleneck_fwd", mutates_args=())
def bottleneck_fwd_op(h: torch.Tensor, down_weight: torch.Tensor, up_weight: torch.Tensor,
                      down_bias: torch.Tensor | None, up_bias: torch.Tensor | None, residual: torch.Tensor | None,
                      scale: torch.Tensor | None, scaling: float, activation: str, dropout_p: float,
                      seed: int | None, save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """h: (M, d_in) -> y: (M, d_out) in h's dtype, pre: (M, b) fp32, a: (M, b) in the dot dtype (both (0, b)
    unless save), seed_used: () int64 on CPU."""
    used = 0 if dropout_p == 0.0 else (_draw_seed() if seed is None else int(seed))
    y, pre, a = _kernels().bottleneck_fwd(h, down_weight, up_weight, down_bias, up_bias, residual, scale, scaling,
                                          activation, dropout_p, used, save_pre=save)
    return y, pre, a, torch.tensor(used, dtype=torch.int64)


@bottleneck_fwd_op.register_fake
def _(h, down_weight, up_weight, down_bias, up_bias, residual, scale, scaling, activation, dropout_p, seed, save):
    M, nb = h.shape[0], down_weight.shape[0]
    rows = M if save else 0
    return (h.new_empty((M, up_weight.shape[0])), h.new_empty((rows, nb), dtype=torch.float32),
            h.new_empty((rows, nb), dtype=_dot_dtype(h.dtype, down_weight.dtype)), torch.empty((), dtype=torch.int64))


@torch.library.custom_op("fastadapters::bottleneck_bwd", mutates_args=())
def bottleneck_bwd_op(dy: torch.Tensor, h: torch.Tensor, down_weight: torch.Tensor, up_weight: torch.Tensor,
                      up_bias: torch.Tensor | None, pre: torch.Tensor, a: torch.Tensor, scale: torch.Tensor | None,
                      seed: torch.Tensor, scaling: float, activation: str, dropout_p: float, add_dy: bool,
                      need_dh: bool, need_ddown: bool, need_dup: bool, need_ddown_bias: bool, need_dup_bias: bool,
                      need_dscale: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor]:
    """(dh (M, d_in), d_down (b, d_in), d_up (d_out, b), d_down_bias (b,), d_up_bias (d_out,), d_scale (scale's
    shape)); an empty (0,) tensor for each not asked for. `seed` is the forward's CPU int64 scalar: reading it is
    no device sync."""
    grads = _kernels().bottleneck_bwd(
        dy, h, down_weight, up_weight, up_bias, pre, a, scale, scaling, activation, dropout_p, int(seed.item()),
        add_dy=add_dy, need_dh=need_dh, need_ddown=need_ddown, need_dup=need_dup, need_ddown_bias=need_ddown_bias,
        need_dup_bias=need_dup_bias, need_dscale=need_dscale)
    return tuple(dy.new_empty((0,)) if g is None else g.contiguous() for g in grads)


@bottleneck_bwd_op.register_fake
def _(dy, h, down_weight, up_weight, up_bias, pre, a, scale, seed, scaling, activation, dropout_p, add_dy,
      need_dh, need_ddown, need_dup, need_ddown_bias, need_dup_bias, need_dscale):
    def maybe(need: bool, like: torch.Tensor, shape) -> torch.Tensor:
        return like.new_empty(shape) if need else dy.new_empty((0,))

    nb, d_out = down_weight.shape[0], up_weight.shape[0]
    if scale is not None:
        ds = maybe(need_dscale, scale, scale.shape)
    else:
        ds = dy.new_empty((), dtype=torch.float32) if need_dscale else dy.new_empty((0,))
    return (maybe(need_dh, h, h.shape), maybe(need_ddown, down_weight, down_weight.shape),
            maybe(need_dup, up_weight, up_weight.shape), maybe(need_ddown_bias, down_weight, (nb,)),
            maybe(need_dup_bias, up_weight, (d_out,)), ds)


# ------------------------------------------------------------------------------------------------ autograd
def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    h, down_weight, up_weight, down_bias, up_bias, residual, scale, scaling, activation, dropout_p, seed, save = inputs
    _, pre, a, seed_used = output
    ctx.save_for_backward(h, down_weight, up_weight, up_bias, pre, a, scale, seed_used)
    ctx.scaling, ctx.activation, ctx.dropout_p = scaling, activation, dropout_p
    ctx.has_residual = residual is not None


def _backward(ctx: Any, dy: torch.Tensor, _dpre: Any, _da: Any, _dseed: Any) -> tuple[torch.Tensor | None, ...]:
    h, down_weight, up_weight, up_bias, pre, a, scale, seed_used = ctx.saved_tensors
    need_dh, need_ddown, need_dup, need_db, need_ub, need_res, need_scale = ctx.needs_input_grad[:7]
    need_scale = need_scale and scale is not None
    dh, d_down, d_up, d_db, d_ub, d_scale = torch.ops.fastadapters.bottleneck_bwd(
        dy, h, down_weight, up_weight, up_bias, pre, a, scale, seed_used, ctx.scaling, ctx.activation,
        ctx.dropout_p, not ctx.has_residual, need_dh, need_ddown, need_dup, need_db, need_ub, need_scale)
    return (dh if need_dh else None, d_down if need_ddown else None, d_up if need_dup else None,
            d_db if need_db else None, d_ub if need_ub else None, dy if (need_res and ctx.has_residual) else None,
            d_scale if need_scale else None, None, None, None, None, None)


bottleneck_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def bottleneck_triton(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    activation: str,
    scaling: float | torch.Tensor,
    residual: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """The registered "triton" kernel of bottleneck_adapter: residual + s * up(act(down(dropout(h)))) [+ biases].

    h: (..., d_in), any strides; down_weight: (b, d_in), 1 <= b <= 1024; up_weight: (d_out, b); down_bias: (b,)
    or None; up_bias: (d_out,) or None; scaling: float or a one-element tensor (a learned scalar, its gradient is
    computed); residual: (..., d_out) in h's dtype, or None for h. The dropout mask (p = dropout_p, 0 for none) is
    drawn inside the kernels from `seed` (same seed, same mask; None: a fresh seed per call). A precomputed
    `dropout_mask` is refused: the kernels never read a mask. Returns (..., d_out) in h's dtype.
    """
    if dropout_mask is not None:
        raise ValueError(_MASK_REFUSAL)
    if residual is h:
        residual = None  # same math; dy then joins dh inside the kernel instead of in a separate add
    scale = scaling if isinstance(scaling, torch.Tensor) else None
    s = 1.0 if scale is not None else float(scaling)
    p = float(dropout_p)
    sd = None if seed is None else int(seed) % _SEED_MOD
    inputs = (h, down_weight, up_weight, down_bias, up_bias, residual, scale)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    d_in, d_out = h.shape[-1], up_weight.shape[0]
    r2 = None if residual is None else residual.reshape(-1, d_out)
    y, _, _, _ = torch.ops.fastadapters.bottleneck_fwd(h.reshape(-1, d_in), down_weight, up_weight, down_bias,
                                                       up_bias, r2, scale, s, str(activation), p, sd, save)
    return y.reshape(*h.shape[:-1], d_out)


# fastadapters.ops.bottleneck_adapter passes (dropout_p, seed) instead of a mask to kernels that carry this flag
bottleneck_triton.generates_dropout_mask = True

_MASK_REFUSAL = mask_refusal("fastadapters.ops.bottleneck_adapter")


def supports(h: torch.Tensor, down_weight: torch.Tensor, up_weight: torch.Tensor, activation: str,
             scaling: float | torch.Tensor, residual: torch.Tensor | None = None,
             down_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
             dropout_mask: torch.Tensor | None = None, **_: Any) -> str | None:
    """None when the triton kernels can run these arguments, else why not."""
    if dropout_mask is not None:
        return _MASK_REFUSAL
    if h.dtype not in SUPPORTED_DTYPES:
        return f"h has dtype {h.dtype}, not supported (float16, bfloat16, float32); cast, or use the 'torch' backend"
    if down_weight.dtype not in SUPPORTED_DTYPES:
        return (f"the adapter weights have dtype {down_weight.dtype}, not supported (float16, bfloat16, float32); "
                "cast them, or use the 'torch' backend")
    nb = down_weight.shape[0]
    if not 1 <= nb <= MAX_BOTTLENECK:
        return f"bottleneck size b={nb} is outside 1..{MAX_BOTTLENECK}"
    return device_refusal(h, "h", "fastadapters.kernels.bottleneck")


def bottleneck_dropout_mask(shape: tuple[int, ...], p: float, seed: int,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """The mask the triton kernels apply to an h of `shape` (..., d_in) for dropout p and `seed`, materialised.

    For tests: pass it as the reference's dropout_mask (fastadapters.kernels.bottleneck_ref.bottleneck_ref) to run
    the reference with exactly the kernels' mask. Returns `shape` fp32 holding keep / (1 - p_eff) (p quantised to
    2^-16); p = 0 gives ones. Needs triton (CUDA, or the interpreter on CPU).
    """
    d_in = shape[-1]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return _kernels().bottleneck_dropout_mask((rows, d_in), p, int(seed) % _SEED_MOD, device).reshape(shape)


if importlib.util.find_spec("triton") is not None:
    register_kernel("bottleneck_adapter", "triton", bottleneck_triton, supports=supports)
