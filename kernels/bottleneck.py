"""Fused Triton kernels for the bottleneck adapter:  y = r + s * (act(D(h) W_d^T + b_d) W_u^T + b_u).

h: (M, d_in) adapter input; W_d = down_weight (b, d_in); W_u = up_weight (d_out, b); b_d (b,), b_u (d_out,)
optional biases; act one of tanh/relu/gelu/gelu_tanh/silu/sigmoid; s a float or a learned scalar; r the
residual (M, d_out), h itself when absent (series adapter, d_out == d_in); D the dropout keep mask / (1 - p).
b (the bottleneck) is padded to B = max(16, next_pow2(b)) in registers only; memory holds (M, b).

Design
------
Forward, one launch (`_bottleneck_fwd_kernel`), one program per BLOCK_M rows:
  phase 1  pre = D(h) W_d^T + b_d      K-loop over d_in; the (BLOCK_M, B) fp32 accumulator never leaves the SM
  phase 2  y = r + s (act(pre) W_u^T + b_u)   N-loop over d_out, act(pre) held on chip as the dot operand,
           the residual tile read and y written in the epilogue of each N step.
  h is read once (the residual re-read when r = h mostly hits L2: the program read those rows just before),
  y written once. When a gradient will be needed it also writes pre (fp32) and a = act(pre) (dot dtype), M x b.
Backward, two launches:
  `_bottleneck_bwd_dx_kernel` (same shape as the forward, one program per BLOCK_M rows)
     phase 1  t = dy W_u            K-loop over d_out, (BLOCK_M, B) fp32 on chip
              g = s t act'(pre) from the saved pre; per-tile partial sums for the learned scalar (sum a t, a
              loaded) and the down bias (sum_m g); g written (M x b, dot dtype) for the weight kernel
     phase 2  dh = D(g W_d) [+ dy when r = h]   N-loop over d_in
  `_bottleneck_bwd_w_kernel` both weight gradients in one launch, split over M (deterministic partial sums):
     programs [0, n_up)  dW_u tiles = dy^T a   (+ colsum(dy) for b_u and the learned scalar)
     programs [n_up, ..)  dW_d^T tiles = D(h)^T g
  then tiny torch ops reduce the partials and apply s and the dropout rescale.
  Save or recompute pre? Recomputing it in the backward costs a third GEMM over h, 2 M d b FLOPs, and a read of h
  in the dx pass; saving costs 4 M b bytes written + read. At d = 4096, b = 256 (bf16, H200 4.3 TB/s,
  790 TFLOP/s): recompute 2*M*4096*256 / 790e12 + 2*M*4096 / 4.3e12 = M * 4.6 ps, save 8*M*256 / 4.3e12 =
  M * 0.48 ps: saving is ~10x cheaper, and pre (M x b fp32) is 1/8 of h's bytes: it is saved. a is saved too
  (2 M b more bytes): the dx epilogue computing act(pre) as well as act'(pre) next to t spilled on sm_90.
Large b: the fused mode keeps (BLOCK_M, B) tiles in registers; past B = 256 (and for unaligned shapes past 64)
  the row kernels switch to a chunked mode (BLOCK_J < B): phase 1 runs per BLOCK_J columns of b and parks
  act(pre) (forward) or g (dx) in memory, in this program's rows (L2-resident, a barrier between the phases),
  and phase 2 reduces over b in BLOCK_J steps. h / dy tiles are re-read per chunk from L2: correct, not tuned.
Register budget (sm_90, measured by the AOT test): a CTA of 8 warps holds 64K registers; the dx epilogue keeps
  three (BLOCK_M, B) fp32 tiles (t, pre, g), so BLOCK_M * B <= 16K: BLOCK_M = 64 at b = 256 (128 spills), which
  doubles the L2 traffic of the weights (below). 4-warp variants of the same tiles spill. Shapes whose sizes or
  strides are not multiples of 16 get no vector loads or cp.async pipelining, every element carrying its own
  address: they use smaller tiles (separate lists).

Napkin math (M = 16384, d_in = d_out = 4096, b = 256, bf16; e = 2 bytes)
  fwd      FLOPs 4 M d b = 68.7 G -> 87 us at 790 TFLOP/s; HBM: h 134 MB + y 134 MB (+ pre, a 25 MB when
           training) -> 62 (68) us at 4.3 TB/s. Floor 87 us: FLOP-bound. L2: each program re-reads both weights
           (2 d b e = 4 MB): M / BLOCK_M * 4 MB = 1 GB at BLOCK_M = 64 (~0.1 ms at ~10 TB/s of L2, overlapped
           with the math: the risk to the 1.25x goal, to be measured).
  bwd dx   FLOPs 4 M d b -> 87 us; HBM dy 134 + dh 134 + pre 17 + a, g 17 MB -> 70 us.
  bwd w    FLOPs 4 M d b -> 87 us; HBM dy 134 + h 134 MB (+ a, g from L2) -> 62 us.
  fwd+bwd  12 M d b FLOPs (no recompute): 261 us floor, the same as the benchmark's model; bytes 6 M d e (dy read
           twice: the dW_u reduction over M cannot share the dx pass without M x b atomics per tile).
  memory   saved for backward beyond the caller's h: pre + a, 6 M b = 24 MiB (torch's reference keeps an fp32
           copy of h, 4 M d = 256 MiB, plus two M x b fp32 tensors); backward scratch g (2 M b = 8 MiB) and the
           split partials (split * 2 d b * 4 bytes, split <= 3 here: 24 MiB).

Dropout on the adapter input: keep(m, k) from Philox4x32-10 keyed by the seed, counter m * ceil(d_in/8) + k // 8,
one 16-bit lane of the four 32-bit outputs per element (8 decisions per Philox call), keep iff u16 >= round(p 2^16),
rescale 1 / (1 - p_eff). The same helper as the LoRA kernels (kernels/_common.py), so the same seed and shape give
the same mask in both ops. The mask is regenerated from the seed wherever it is needed (forward phase 1, dx phase 2,
dW_d) and never stored; `bottleneck_dropout_mask` materialises it for tests. Kept values stay exact in the dot
dtype: the 1/(1-p) rescale is applied to the fp32 accumulators, not to h.

Precision: fp32 accumulation and activation. Dot operands are in the weights' dtype when h and the weights share a
16-bit dtype (act(pre) and g are rounded to it as dot operands, as any bf16 GEMM rounds its inputs); otherwise
(fp32 weights on a bf16 model, as the bottleneck layers keep them) dots run on fp32 operands, "ieee" unless torch
allows TF32 (torch.get_float32_matmul_precision() != "highest"), as torch's own fp32 matmul does. The learned
scalar's gradient sums a * t with the saved a in the dot dtype: ~1e-3 relative in bf16 (exact-ish in fp32).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, Launch, LaunchRecorder, dropout_threshold, launch_dropout_mask
from ._common import dropout_keep as _dropout_keep

MAX_BOTTLENECK = 1024
ACTIVATIONS = ("tanh", "relu", "gelu", "gelu_tanh", "silu", "sigmoid")


# ------------------------------------------------------------------------------------------------ helpers
@triton.jit
def _tanh(z):
    # 1 - 2 / (e^{2z} + 1): no NaN at either end (e^{2z} = inf gives 1, 0 gives -1); absolute error ~1 ulp of 1.
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _act(z, ACTIVATION: tl.constexpr):
    """act(z) in fp32."""
    if ACTIVATION == "tanh":
        a = _tanh(z)
    elif ACTIVATION == "relu":
        a = tl.maximum(z, 0.0)
    elif ACTIVATION == "gelu":
        a = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        a = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == "silu":
        a = z * tl.sigmoid(z)
    else:
        tl.static_assert(ACTIVATION == "sigmoid")
        a = tl.sigmoid(z)
    return a


@triton.jit
def _act_grad(z, ACTIVATION: tl.constexpr):
    """act'(z) in fp32; relu'(0) = 0 as in torch."""
    if ACTIVATION == "tanh":
        t = _tanh(z)
        da = 1.0 - t * t
    elif ACTIVATION == "relu":
        da = tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == "gelu":
        da = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACTIVATION == "gelu_tanh":
        u = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        da = 0.5 * (1.0 + u) + 0.5 * z * (1.0 - u * u) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACTIVATION == "silu":
        sg = tl.sigmoid(z)
        da = sg * (1.0 + z * (1.0 - sg))
    else:
        tl.static_assert(ACTIVATION == "sigmoid")
        sg = tl.sigmoid(z)
        da = sg * (1.0 - sg)
    return da


@triton.jit
def _rows_times_w(
    p_x,  # (M, K) rows, row stride s_xm, unit column stride
    p_w,  # (K, J) view: element (k, j) at k * s_wk + j * s_wj
    o_m, m_m, o_j, m_j, K, s_xm, s_wk, s_wj, seed, drop_thr,
    BLOCK_K: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """(len(o_m), len(o_j)) fp32 = D?(x[o_m, :K]) @ w[:K, o_j]: the K-loop every row kernel phase runs.
    D zeroes the dropped elements of x (mask in (m, k) coordinates with row length K); no rescale here."""
    BM: tl.constexpr = o_m.shape[0]
    BJ: tl.constexpr = o_j.shape[0]
    b_acc = tl.zeros((BM, BJ), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = tl.load(p_x + o_m[:, None] * s_xm + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        if HAS_DROPOUT:
            b_x = tl.where(_dropout_keep(seed, o_m, k0, K, drop_thr, BLOCK_K), b_x, 0.0)
        b_w = tl.load(p_w + o_k[:, None] * s_wk + o_j[None, :] * s_wj, mask=m_k[:, None] & m_j[None, :], other=0.0)
        b_acc = tl.dot(b_x.to(DOT_DTYPE), b_w.to(DOT_DTYPE), b_acc, input_precision=DOT_PREC)
    return b_acc


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_pre_act(
    b_acc,  # (BM, BJ) fp32: D(h) W_d^T without the rescale
    p_db,   # (NB,) down_bias
    p_pre,  # (M, NB) fp32 out
    o_m, m_m, o_j, m_j, NB, drop_scale,
    ACTIVATION: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SAVE_PRE: tl.constexpr,
):
    """pre = acc / (1 - p) + b_d (stored when SAVE_PRE); returns act(pre) in fp32. Padded columns j >= NB hold
    act(0), finite; they meet zero rows of W_u^T."""
    if HAS_DROPOUT:
        b_acc = b_acc * drop_scale
    if HAS_DOWN_BIAS:
        b_acc += tl.load(p_db + o_j, mask=m_j, other=0.0).to(tl.float32)[None, :]
    if SAVE_PRE:
        tl.store(p_pre + o_m[:, None] * NB + o_j[None, :], b_acc, mask=m_m[:, None] & m_j[None, :])
    return _act(b_acc, ACTIVATION)


@triton.jit
def _fwd_out(
    b_o,    # (BM, BN) fp32: a W_u^T
    p_ub,   # (D_OUT,) up_bias
    p_res,  # (M, D_OUT) residual, row stride s_rm
    p_y,    # (M, D_OUT) out, row stride s_ym
    o_m, m_m, o_n, m_n, s_rm, s_ym, b_s,
    HAS_UP_BIAS: tl.constexpr,
):
    """y = res + s (o + b_u) for one (BM, BN) tile."""
    if HAS_UP_BIAS:
        b_o += tl.load(p_ub + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    m_mn = m_m[:, None] & m_n[None, :]
    b_r = tl.load(p_res + o_m[:, None] * s_rm + o_n[None, :], mask=m_mn, other=0.0).to(tl.float32)
    b_y = b_r + b_o * b_s
    tl.store(p_y + o_m[:, None] * s_ym + o_n[None, :], b_y.to(p_y.dtype.element_ty), mask=m_mn)


@triton.jit(do_not_specialize=["seed"])
def _bottleneck_fwd_kernel(
    p_h,      # (M, D_IN) adapter input, row stride s_hm
    p_down,   # (NB, D_IN) down_weight, contiguous
    p_up,     # (D_OUT, NB) up_weight, contiguous
    p_db,     # (NB,) down_bias, read when HAS_DOWN_BIAS
    p_ub,     # (D_OUT,) up_bias, read when HAS_UP_BIAS
    p_res,    # (M, D_OUT) residual (h itself for a series adapter), row stride s_rm
    p_scale,  # (1,) learned scaling, read when LEARNED_SCALE
    p_y,      # (M, D_OUT) out, row stride s_ym, h's dtype
    p_pre,    # (M, NB) fp32 out: pre-activation, written when SAVE_PRE
    p_a,      # (M, NB) DOT_DTYPE out: act(pre), written when SAVE_PRE and always when chunked (BLOCK_J < B)
    M, D_IN, D_OUT, NB,
    s_hm, s_rm, s_ym,
    scaling, seed, drop_thr, drop_scale,
    B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    LEARNED_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, SAVE_PRE: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """y[rows] = res + s * (act(D(h) W_d^T + b_d) W_u^T + b_u) for one block of BLOCK_M rows.

    BLOCK_J == B (fused): act(pre) stays in registers as the phase-2 dot operand. BLOCK_J < B (chunked, large b):
    phase 1 runs per BLOCK_J columns and parks act(pre) in p_a (this program's rows, L2-resident), phase 2
    reduces over b in BLOCK_J steps reading it back.
    """
    DOT_DTYPE: tl.constexpr = tl.float32 if DOT_FP32 else p_down.dtype.element_ty
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    if LEARNED_SCALE:
        b_s = tl.load(p_scale).to(tl.float32)
    else:
        b_s = scaling

    if BLOCK_J == B:
        o_j = tl.arange(0, B)
        m_j = o_j < NB
        # phase 1: pre = D(h) W_d^T (+ b_d), K-loop over d_in; W_d^T element (k, j) at j * D_IN + k
        b_acc = _rows_times_w(p_h, p_down, o_m, m_m, o_j, m_j, D_IN, s_hm, 1, D_IN, seed, drop_thr,
                              BLOCK_K, HAS_DROPOUT, DOT_DTYPE, DOT_PREC)
        b_a = _fwd_pre_act(b_acc, p_db, p_pre, o_m, m_m, o_j, m_j, NB, drop_scale,
                           ACTIVATION, HAS_DOWN_BIAS, HAS_DROPOUT, SAVE_PRE).to(DOT_DTYPE)
        if SAVE_PRE:
            tl.store(p_a + o_m[:, None] * NB + o_j[None, :], b_a, mask=m_m[:, None] & m_j[None, :])
        # phase 2: y = res + s (a W_u^T + b_u), N-loop over d_out
        for n0 in range(0, D_OUT, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < D_OUT
            b_u = tl.load(p_up + o_n[None, :] * NB + o_j[:, None], mask=m_j[:, None] & m_n[None, :], other=0.0)
            b_o = tl.dot(b_a, b_u.to(DOT_DTYPE), input_precision=DOT_PREC)
            _fwd_out(b_o, p_ub, p_res, p_y, o_m, m_m, o_n, m_n, s_rm, s_ym, b_s, HAS_UP_BIAS)
    else:
        for j0 in range(0, NB, BLOCK_J):
            o_j = j0 + tl.arange(0, BLOCK_J)
            m_j = o_j < NB
            b_acc = _rows_times_w(p_h, p_down, o_m, m_m, o_j, m_j, D_IN, s_hm, 1, D_IN, seed, drop_thr,
                                  BLOCK_K, HAS_DROPOUT, DOT_DTYPE, DOT_PREC)
            b_a = _fwd_pre_act(b_acc, p_db, p_pre, o_m, m_m, o_j, m_j, NB, drop_scale,
                               ACTIVATION, HAS_DOWN_BIAS, HAS_DROPOUT, SAVE_PRE)
            tl.store(p_a + o_m[:, None] * NB + o_j[None, :], b_a.to(DOT_DTYPE), mask=m_m[:, None] & m_j[None, :])
        tl.debug_barrier()  # this program's act(pre) rows, written by all its threads, are read back below
        for n0 in range(0, D_OUT, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < D_OUT
            # a W_u^T: reduction over b; W_u^T element (j, n) at n * NB + j
            b_o = _rows_times_w(p_a, p_up, o_m, m_m, o_n, m_n, NB, NB, 1, NB, seed, drop_thr,
                                BLOCK_J, False, DOT_DTYPE, DOT_PREC)
            _fwd_out(b_o, p_ub, p_res, p_y, o_m, m_m, o_n, m_n, s_rm, s_ym, b_s, HAS_UP_BIAS)


# ------------------------------------------------------------------------------------------------ backward
# Backward derivation. Forward, with D(x) = x * keep / (1 - p) and everything in fp32:
#     x   = D(h)                    (M, d_in)   the dropped input, never stored
#     pre = x W_d^T + b_d           (M, b)      saved (fp32)
#     a   = act(pre)                (M, b)
#     o   = a W_u^T + b_u           (M, d_out)
#     y   = r + s o                 (M, d_out)  r = residual, or h
# Given dy = dL/dy (M, d_out):
#     do     = s dy                                   (M, d_out)
#     t      = dy W_u                                 (M, b)      reduction over d_out    [dx kernel, phase 1]
#     g      = dL/dpre = s t * act'(pre)              (M, b)                              [dx kernel, epilogue]
#     dL/dh  = D(g W_d) (+ dy when r = h)             (M, d_in)   D is linear: mask and rescale the product
#                                                                                         [dx kernel, phase 2]
#     dL/dW_u = do^T a = s dy^T a                     (d_out, b)  reduction over M        [w kernel, up tiles]
#     dL/dW_d = g^T x = (1/(1-p)) g^T (keep * h)      (b, d_in)   reduction over M        [w kernel, down tiles]
#     dL/db_u = s sum_m dy                            (d_out,)    colsum(dy) in the up tiles
#     dL/db_d = sum_m g                               (b,)        per-tile sums in the dx kernel
#     dL/ds   = sum(dy * o) = sum(a * (dy W_u)) + colsum(dy) . b_u = sum(a * t) + colsum(dy) . b_u
#               (so no (M, d_out) product is ever formed: per-tile sums of a * t in the dx kernel)
#     dL/dr   = dy                                    returned as is (no kernel)
# FLOPs: t and g W_d (dx kernel) and the two weight products: 8 M d b, none recomputed (pre is saved).
@triton.jit
def _dx_grad_pre(
    b_t,    # (BM, BJ) fp32: dy W_u
    p_pre,  # (M, NB) fp32 saved pre-activation
    p_a,    # (M, NB) saved act(pre), DOT_DTYPE, read when SCALE_GRAD
    p_g,    # (M, NB) out: g, DOT_DTYPE
    p_dbp,  # (n_tiles, NB) fp32 out: per-tile sum_m g
    i_m, o_m, m_m, o_j, m_j, NB, b_s,
    ACTIVATION: tl.constexpr, SCALE_GRAD: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, STORE_G: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """g = s t act'(pre) for one (BM, BJ) tile, its store and partial sums; returns (g in DOT_DTYPE, sum(a t)).
    Register budget: t, the pre tile and g are the only (BM, BJ) fp32 values; act(pre) comes saved from the
    forward (computing it here as well spilled at BLOCK_M x B = 64 x 256 on sm_90)."""
    m_mj = m_m[:, None] & m_j[None, :]
    b_ds = 0.0
    if SCALE_GRAD:
        b_a = tl.load(p_a + o_m[:, None] * NB + o_j[None, :], mask=m_mj, other=0.0).to(tl.float32)
        b_ds = tl.sum(tl.sum(b_a * b_t, axis=1), axis=0)  # t = 0 on padded rows and columns
    b_pre = tl.load(p_pre + o_m[:, None] * NB + o_j[None, :], mask=m_mj, other=0.0)
    b_g = b_t * _act_grad(b_pre, ACTIVATION) * b_s
    if HAS_DOWN_BIAS:
        tl.store(p_dbp + i_m * NB + o_j, tl.sum(b_g, axis=0), mask=m_j)
    b_g = b_g.to(DOT_DTYPE)
    if STORE_G:
        tl.store(p_g + o_m[:, None] * NB + o_j[None, :], b_g, mask=m_mj)
    return b_g, b_ds


@triton.jit
def _dx_out(
    b_x,   # (BM, BN) fp32: g W_d
    p_dy,  # (M, D_OUT) upstream gradient, row stride s_dym (added when ADD_DY: D_OUT == D_IN)
    p_dh,  # (M, D_IN) out, contiguous
    o_m, m_m, n0, o_n, m_n, D_IN, s_dym, seed, drop_thr, drop_scale,
    HAS_DROPOUT: tl.constexpr, ADD_DY: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dh = D(x) [+ dy] for one (BM, BN) tile."""
    if HAS_DROPOUT:
        b_x = tl.where(_dropout_keep(seed, o_m, n0, D_IN, drop_thr, BLOCK_N), b_x * drop_scale, 0.0)
    m_mn = m_m[:, None] & m_n[None, :]
    if ADD_DY:
        b_x += tl.load(p_dy + o_m[:, None] * s_dym + o_n[None, :], mask=m_mn, other=0.0).to(tl.float32)
    tl.store(p_dh + o_m[:, None] * D_IN + o_n[None, :], b_x.to(p_dh.dtype.element_ty), mask=m_mn)


@triton.jit(do_not_specialize=["seed"])
def _bottleneck_bwd_dx_kernel(
    p_dy,     # (M, D_OUT) upstream gradient, row stride s_dym
    p_up,     # (D_OUT, NB) up_weight, contiguous
    p_down,   # (NB, D_IN) down_weight, contiguous
    p_pre,    # (M, NB) fp32 pre-activation saved by the forward
    p_scale,  # (1,) learned scaling, read when LEARNED_SCALE
    p_dh,     # (M, D_IN) out: input gradient, contiguous, written when COMPUTE_DH
    p_a,      # (M, NB) act(pre) in DOT_DTYPE saved by the forward, read when SCALE_GRAD
    p_g,      # (M, NB) out: g in DOT_DTYPE, written when STORE_G (the host sets it when chunked with COMPUTE_DH:
              #   phase 2 reads g back)
    p_dbp,    # (n_tiles, NB) fp32 out: per-tile sum_m g, written when HAS_DOWN_BIAS
    p_dsp,    # (n_tiles,) fp32 out: per-tile sum(a * t), written when SCALE_GRAD
    M, D_IN, D_OUT, NB,
    s_dym,
    scaling, seed, drop_thr, drop_scale,
    B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    ACTIVATION: tl.constexpr, LEARNED_SCALE: tl.constexpr, SCALE_GRAD: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ADD_DY: tl.constexpr, COMPUTE_DH: tl.constexpr, STORE_G: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """t = dy W_u, g = s t act'(pre), dh = D(g W_d) [+ dy] for one block of BLOCK_M rows (see the derivation).
    BLOCK_J == B: g stays in registers for phase 2; BLOCK_J < B: per-chunk phase 1, g read back from p_g."""
    DOT_DTYPE: tl.constexpr = tl.float32 if DOT_FP32 else p_down.dtype.element_ty
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    if LEARNED_SCALE:
        b_s = tl.load(p_scale).to(tl.float32)
    else:
        b_s = scaling

    if BLOCK_J == B:
        o_j = tl.arange(0, B)
        m_j = o_j < NB
        # phase 1: t = dy W_u, K-loop over d_out; W_u element (n, j) at n * NB + j
        b_t = _rows_times_w(p_dy, p_up, o_m, m_m, o_j, m_j, D_OUT, s_dym, NB, 1, seed, drop_thr,
                            BLOCK_K, False, DOT_DTYPE, DOT_PREC)
        b_g, b_ds = _dx_grad_pre(b_t, p_pre, p_a, p_g, p_dbp, i_m, o_m, m_m, o_j, m_j, NB, b_s,
                                 ACTIVATION, SCALE_GRAD, HAS_DOWN_BIAS, STORE_G, DOT_DTYPE)
        if SCALE_GRAD:
            tl.store(p_dsp + i_m, b_ds)
        # phase 2: dh = D(g W_d) [+ dy], N-loop over d_in; W_d element (j, n) at j * D_IN + n
        if COMPUTE_DH:
            for n0 in range(0, D_IN, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_n = o_n < D_IN
                b_w = tl.load(p_down + o_j[:, None] * D_IN + o_n[None, :], mask=m_j[:, None] & m_n[None, :],
                              other=0.0)
                b_x = tl.dot(b_g, b_w.to(DOT_DTYPE), input_precision=DOT_PREC)
                _dx_out(b_x, p_dy, p_dh, o_m, m_m, n0, o_n, m_n, D_IN, s_dym, seed, drop_thr, drop_scale,
                        HAS_DROPOUT, ADD_DY, BLOCK_N)
    else:
        b_ds = 0.0
        for j0 in range(0, NB, BLOCK_J):
            o_j = j0 + tl.arange(0, BLOCK_J)
            m_j = o_j < NB
            b_t = _rows_times_w(p_dy, p_up, o_m, m_m, o_j, m_j, D_OUT, s_dym, NB, 1, seed, drop_thr,
                                BLOCK_K, False, DOT_DTYPE, DOT_PREC)
            b_g, b_ds_j = _dx_grad_pre(b_t, p_pre, p_a, p_g, p_dbp, i_m, o_m, m_m, o_j, m_j, NB, b_s,
                                       ACTIVATION, SCALE_GRAD, HAS_DOWN_BIAS, STORE_G, DOT_DTYPE)
            b_ds += b_ds_j
        if SCALE_GRAD:
            tl.store(p_dsp + i_m, b_ds)
        if COMPUTE_DH:
            tl.debug_barrier()  # this program's g rows, written by all its threads, are read back below
            for n0 in range(0, D_IN, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_n = o_n < D_IN
                b_x = _rows_times_w(p_g, p_down, o_m, m_m, o_n, m_n, NB, NB, D_IN, 1, seed, drop_thr,
                                    BLOCK_J, False, DOT_DTYPE, DOT_PREC)
                _dx_out(b_x, p_dy, p_dh, o_m, m_m, n0, o_n, m_n, D_IN, s_dym, seed, drop_thr, drop_scale,
                        HAS_DROPOUT, ADD_DY, BLOCK_N)


@triton.jit
def _wgrad_tile(
    p_x,     # (M, X_COLS) dy or h, row stride s_xm
    p_y,     # (M, NB) a or g, contiguous
    p_out,   # fp32 out: this split's slab; element (n, j) at n * s_on + j * s_oj
    p_csum,  # (X_COLS,) fp32 out: this split's colsum of x, written when COLSUM
    i_tile, j_tiles, X_COLS, NB, s_xm, s_on, s_oj, m_lo, m_hi, seed, drop_thr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, COLSUM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """out[n, j] = sum_{m in [m_lo, m_hi)} D?(x)[m, n] y[m, j] for one (BLOCK_N, BLOCK_J) tile."""
    i_n = i_tile // j_tiles
    i_j = i_tile % j_tiles
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_j = i_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_n = o_n < X_COLS
    m_j = o_j < NB
    b_acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    b_cs = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < m_hi
        b_x = tl.load(p_x + o_m[:, None] * s_xm + o_n[None, :], mask=m_m[:, None] & m_n[None, :], other=0.0)
        if HAS_DROPOUT:
            b_x = tl.where(_dropout_keep(seed, o_m, i_n * BLOCK_N, X_COLS, drop_thr, BLOCK_N), b_x, 0.0)
        if COLSUM:
            b_cs += tl.sum(b_x.to(tl.float32), axis=0)
        b_y = tl.load(p_y + o_m[:, None] * NB + o_j[None, :], mask=m_m[:, None] & m_j[None, :], other=0.0)
        b_acc = tl.dot(tl.trans(b_x.to(DOT_DTYPE)), b_y.to(DOT_DTYPE), b_acc, input_precision=DOT_PREC)
    tl.store(p_out + o_n[:, None] * s_on + o_j[None, :] * s_oj, b_acc, mask=m_n[:, None] & m_j[None, :])
    if COLSUM:
        if i_j == 0:
            tl.store(p_csum + o_n, b_cs, mask=m_n)


@triton.jit(do_not_specialize=["seed"])
def _bottleneck_bwd_w_kernel(
    p_dy,   # (M, D_OUT) upstream gradient, row stride s_dym
    p_a,    # (M, NB) act(pre) in DOT_DTYPE from the dx kernel
    p_h,    # (M, D_IN) adapter input, row stride s_hm
    p_g,    # (M, NB) g in DOT_DTYPE from the dx kernel
    p_dup,  # (SPLIT, D_OUT, NB) fp32 out: partial dy^T a
    p_ddn,  # (SPLIT, NB, D_IN) fp32 out: partial g^T (keep * h)
    p_dyc,  # (SPLIT, D_OUT) fp32 out: partial colsum(dy), written when UP_COLSUM
    M, D_IN, D_OUT, NB,
    s_dym, s_hm, m_per_split, n_up_tiles, j_tiles,
    seed, drop_thr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    UP_COLSUM: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (n_up_tiles + n_down_tiles, SPLIT): program (t, s) reduces rows [s m_per_split, (s+1) m_per_split)
    into one (BLOCK_N, BLOCK_J) tile of dW_u (t < n_up_tiles) or of dW_d^T. The host sums the SPLIT slabs.
    a and g are in the dot dtype: fp32, or h's 16-bit dtype."""
    DOT_DTYPE: tl.constexpr = tl.float32 if DOT_FP32 else p_h.dtype.element_ty
    i_t = tl.program_id(0)
    i_s = tl.program_id(1).to(tl.int64)
    m_lo = i_s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    if i_t < n_up_tiles:
        _wgrad_tile(p_dy, p_a, p_dup + i_s * D_OUT * NB, p_dyc + i_s * D_OUT,
                    i_t, j_tiles, D_OUT, NB, s_dym, NB, 1, m_lo, m_hi, seed, drop_thr,
                    BLOCK_M, BLOCK_N, BLOCK_J, False, UP_COLSUM, DOT_DTYPE, DOT_PREC)
    else:
        _wgrad_tile(p_h, p_g, p_ddn + i_s * NB * D_IN, p_dyc,
                    i_t - n_up_tiles, j_tiles, D_IN, NB, s_hm, 1, D_IN, m_lo, m_hi, seed, drop_thr,
                    BLOCK_M, BLOCK_N, BLOCK_J, HAS_DROPOUT, False, DOT_DTYPE, DOT_PREC)


# ================================================================================================ configs
@dataclass(frozen=True)
class RowConfig:
    """Tile of the row kernels (`_bottleneck_fwd_kernel`, `_bottleneck_bwd_dx_kernel`): BLOCK_M rows, a K step of
    the phase-1 reduction, an N step of the phase-2 output loop, and block_j: None for the fused mode (the whole
    padded bottleneck B on chip, BLOCK_J = B) or a chunk of b (chunked mode, large b)."""

    block_m: int
    block_k: int
    block_n: int
    num_warps: int
    num_stages: int
    block_j: int | None = None

    def bj(self, B: int) -> int:
        """BLOCK_J for padded bottleneck B."""
        return B if self.block_j is None else min(self.block_j, B)


@dataclass(frozen=True)
class WgradConfig:
    """Tile of `_bottleneck_bwd_w_kernel`: (BLOCK_N, BLOCK_J) output tile, BLOCK_M rows per reduction step."""

    block_m: int
    block_n: int
    block_j: int
    num_warps: int
    num_stages: int


# Config lists for sm_90, checked by tests/test_sm90_bottleneck.py (AOT compile: no spills, shared <= 227 KiB).
# Keyed by kernel and padded bottleneck B. Fused mode (block_j None) keeps (BLOCK_M, B) fp32 tiles in registers:
# the dx epilogue holds three (t, the pre tile, g), so BLOCK_M * B <= 16K at 8 warps; chunked mode (block_j set)
# bounds them by BLOCK_M * block_j. 4-warp variants of these tiles spill. The first entry is the default (and the
# only one with FASTADAPTERS_TRITON_AUTOTUNE=0); the others are benchmarked once per shape on the GPU.
_R = RowConfig
_FWD_16BIT: dict[int, tuple[RowConfig, ...]] = {
    16: (_R(128, 64, 128, 8, 3),),
    32: (_R(128, 64, 128, 8, 3),),
    64: (_R(128, 64, 128, 8, 3),),
    128: (_R(128, 64, 128, 8, 3), _R(64, 64, 128, 8, 3)),
    256: (_R(64, 64, 128, 8, 2), _R(64, 64, 64, 8, 3)),
    512: (_R(64, 64, 128, 8, 3, 128), _R(128, 64, 128, 8, 3, 64)),
    1024: (_R(64, 64, 128, 8, 3, 128), _R(128, 64, 128, 8, 3, 64)),
}
_DX_16BIT: dict[int, tuple[RowConfig, ...]] = {
    16: (_R(128, 64, 64, 8, 3),),
    32: (_R(128, 64, 64, 8, 3),),
    64: (_R(128, 64, 64, 8, 3),),
    128: (_R(64, 64, 128, 8, 3), _R(128, 64, 64, 8, 3)),
    256: (_R(64, 64, 128, 8, 2), _R(64, 64, 64, 8, 3)),
    512: (_R(64, 64, 128, 8, 3, 128), _R(128, 64, 64, 8, 3, 64)),
    1024: (_R(64, 64, 128, 8, 3, 128), _R(128, 64, 64, 8, 3, 64)),
}
# fp32 dot operands (fp32 inputs, or a 16-bit h with the fp32 weights the bottleneck layers keep): "ieee" lowers
# tl.dot to FMAs (its register use is erratic: a fused 64 x 128 dx tile spills thousands of times), "tf32" to mma.
# One list for both, sized for "ieee"; twice the bytes per element of the 16-bit tiles.
_ROW_FP32: dict[int, tuple[RowConfig, ...]] = {
    16: (_R(32, 32, 64, 8, 2),),
    32: (_R(32, 32, 64, 8, 2),),
    64: (_R(32, 32, 64, 8, 2),),
    128: (_R(32, 32, 64, 8, 2),),
    256: (_R(32, 32, 64, 8, 2, 64),),
    512: (_R(32, 32, 64, 8, 2, 64),),
    1024: (_R(32, 32, 64, 8, 2, 64),),
}
# Unaligned shapes (a size, row stride or pointer not a multiple of 16: no vector loads, no cp.async): every
# element carries its own address, so tiles are small and the fused mode stops at B = 64. Correct, not tuned:
# real models have aligned shapes.
_ROW_UNALIGNED_16BIT: dict[int, tuple[RowConfig, ...]] = {
    16: (_R(64, 32, 64, 8, 2),),
    32: (_R(64, 32, 64, 8, 2),),
    64: (_R(64, 32, 64, 8, 2),),
    128: (_R(64, 32, 64, 8, 2, 32),),
    256: (_R(64, 32, 64, 8, 2, 32),),
    512: (_R(64, 32, 64, 8, 2, 32),),
    1024: (_R(64, 32, 64, 8, 2, 32),),
}
_ROW_UNALIGNED_FP32: dict[int, tuple[RowConfig, ...]] = {
    16: (_R(32, 32, 64, 8, 2),),
    32: (_R(32, 32, 64, 8, 2),),
    64: (_R(32, 32, 64, 8, 2),),
    128: (_R(32, 32, 64, 8, 2, 32),),
    256: (_R(32, 32, 64, 8, 2, 32),),
    512: (_R(32, 32, 64, 8, 2, 32),),
    1024: (_R(32, 32, 64, 8, 2, 32),),
}
# ... except that with "tf32" the chunked 32x32x64 forward lands on ptxas' 128-register choice with a spill, while
# with "ieee" 32x32x32 does: each precision gets the tile that compiles clean.
_ROW_UNALIGNED_TF32: dict[int, tuple[RowConfig, ...]] = {
    **_ROW_UNALIGNED_FP32,
    **{B: (_R(32, 32, 32, 8, 2, 32),) for B in (128, 256, 512, 1024)},
}
_WGRAD_16BIT = (WgradConfig(64, 128, 128, 8, 3), WgradConfig(64, 128, 256, 8, 3))
_WGRAD_FP32 = (WgradConfig(32, 64, 64, 8, 2),)
_WGRAD_UNALIGNED = (WgradConfig(32, 64, 64, 8, 2),)
# Small tiles for the interpreter: several programs, loop iterations and ragged edges even at M=37, d=72.
INTERPRETER_ROW = RowConfig(16, 32, 32, 4, 1)
INTERPRETER_WGRAD = WgradConfig(16, 32, 16, 4, 1)


def bottleneck_pad(b: int) -> int:
    """The bottleneck padded for tl.dot: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(b))


def row_configs(kind: str, B: int, dot_dtype: torch.dtype, aligned: bool = True,
                prec: str | None = None) -> list[RowConfig]:
    """The configs of row kernel `kind` ("fwd" or "dx") the dispatch may pick for padded bottleneck B, dot dtype,
    alignment and fp32 dot precision ("ieee" / "tf32"; None: torch's current setting). These are the lists the
    AOT test compiles for sm_90; on a GPU with less shared memory per block, a config that does not fit is skipped
    at its first launch (see `_pick`)."""
    if not aligned:
        if dot_dtype != torch.float32:
            return list(_ROW_UNALIGNED_16BIT[B])
        tf32 = (prec or _dot_precision()) == "tf32"
        return list((_ROW_UNALIGNED_TF32 if tf32 else _ROW_UNALIGNED_FP32)[B])
    if dot_dtype == torch.float32:
        return list(_ROW_FP32[B])
    return list((_FWD_16BIT if kind == "fwd" else _DX_16BIT)[B])


def _wgrad_table(dot_dtype: torch.dtype, aligned: bool) -> tuple[WgradConfig, ...]:
    return _WGRAD_UNALIGNED if not aligned else _WGRAD_FP32 if dot_dtype == torch.float32 else _WGRAD_16BIT


def _cap_j(c: WgradConfig, B: int) -> WgradConfig:
    return WgradConfig(c.block_m, c.block_n, min(c.block_j, B), c.num_warps, c.num_stages)


def wgrad_configs(B: int, dot_dtype: torch.dtype, aligned: bool = True) -> list[WgradConfig]:
    """The weight-gradient configs the dispatch may pick (BLOCK_J capped at B)."""
    out: list[WgradConfig] = []
    for c in _wgrad_table(dot_dtype, aligned):
        c = _cap_j(c, B)
        if c not in out:
            out.append(c)
    return out


def dot_dtype(h_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The tl.dot operand dtype: the shared 16-bit dtype of h and the weights, else float32."""
    if h_dtype == w_dtype and h_dtype in (torch.bfloat16, torch.float16):
        return h_dtype
    return torch.float32


def _dot_precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# -- config overrides (tests pass fixed configs; never autotune inside a test)
@dataclass(frozen=True)
class _Overrides:
    fwd: RowConfig | None = None
    dx: RowConfig | None = None
    wgrad: WgradConfig | None = None
    split: int | None = None


_overrides = _Overrides()


@contextlib.contextmanager
def use_configs(*, row: RowConfig | None = None, fwd: RowConfig | None = None, dx: RowConfig | None = None,
                wgrad: WgradConfig | None = None, split: int | None = None) -> Iterator[None]:
    """Inside the block the launchers use these fixed configs (None: the normal choice). row: both row kernels
    (fwd and dx); fwd / dx: one of them; split: the number of partial reductions over M of the wgrad kernel."""
    global _overrides
    old = _overrides
    _overrides = _Overrides(fwd or row, dx or row, wgrad, split)
    try:
        yield
    finally:
        _overrides = old


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132 if device.type == "meta" else 4  # meta: the launch recording stands for an H100/H200


_tuned: dict[tuple, object] = {}


def _pick(kind: str, key: tuple, device: torch.device, candidates: list, launch):
    """Override, interpreter tile, cached tuning result, or benchmark the candidates once for this key
    (FASTADAPTERS_TRITON_AUTOTUNE=0: the first one that launches). kind: "fwd", "dx" or "wgrad". Recording
    launches (meta tensors) takes the first candidate."""
    override = getattr(_overrides, kind)
    if override is not None:
        return override
    if device.type == "meta":
        return candidates[0]
    if INTERPRETED or device.type != "cuda":
        return INTERPRETER_WGRAD if kind == "wgrad" else INTERPRETER_ROW
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    tune = len(candidates) > 1 and os.environ.get("FASTADAPTERS_TRITON_AUTOTUNE", "1") != "0"
    best = None
    for c in candidates:  # a config that needs more shared memory than this GPU has fails at launch: skip it
        try:
            t = triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=20) if tune else (launch(c) or 0.0)
        except triton.runtime.errors.OutOfResources:
            continue
        if best is None or t < best[0]:
            best = (t, c)
        if not tune:
            break
    if best is None:
        raise RuntimeError(f"no {kind} kernel config fits this GPU ({torch.cuda.get_device_name(device)}): "
                           f"tried {candidates}; use the 'torch' backend")
    _tuned[key] = best[1]
    return best[1]


# -- launch recording (the sm_90 AOT test compiles exactly what the launchers launch)
_recorder = LaunchRecorder()
_launch = _recorder.launch


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Record the launches instead of running them: run the launchers on "meta" tensors inside the block to list
    every (kernel, arguments, config) a call dispatches to (tests/test_sm90_bottleneck.py)."""
    with _recorder.record() as records:
        yield records


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """2-D with unit inner stride (the kernels take a row stride only)."""
    if t.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but the launcher takes 2-D tensors: reshape to (-1, d)")
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


# ================================================================================================ launchers
def _aligned(tensors: list[torch.Tensor | None], ints: list[int]) -> bool:
    """Would the launch see every pointer 16-byte aligned and every size / row stride a multiple of 16 (Triton's
    specialisation, hence vector loads and cp.async pipelining)? Picks the aligned or the unaligned config list."""
    return (all(t is None or t.data_ptr() % 16 == 0 for t in tensors) and all(int(n) % 16 == 0 for n in ints))


def bottleneck_fwd(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: torch.Tensor | None,
    scaling: float,
    activation: str,
    dropout_p: float = 0.0,
    seed: int = 0,
    save_pre: bool = True,
    config: RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: (y, pre, a) with y = res + s * (a W_u^T + b_u), a = act(pre), pre = D(h) W_d^T + b_d.

    h: (M, d_in), unit inner stride or copied to it; down_weight: (b, d_in); up_weight: (d_out, b); down_bias:
    (b,) or None; up_bias: (d_out,) or None; residual: (M, d_out) in h's dtype, or None for h (d_out == d_in);
    scale: one-element learned scalar (any float dtype; used instead of `scaling`) or None. Returns y: (M, d_out)
    in h's dtype, pre: (M, b) fp32 and a: (M, b) in the dot dtype (both (0, b) unless save_pre). The dropout mask
    comes from `seed` (dropout_p = 0: none).
    """
    h = _rows("h", h)
    M, d_in = h.shape
    nb = down_weight.shape[0]
    d_out = up_weight.shape[0]
    if nb > MAX_BOTTLENECK:
        raise ValueError(f"bottleneck size {nb} is above the kernels' limit {MAX_BOTTLENECK}: use the 'torch' backend")
    res = h if residual is None else _rows("residual", residual)
    down_weight, up_weight = down_weight.contiguous(), up_weight.contiguous()
    B = bottleneck_pad(nb)
    dt = dot_dtype(h.dtype, down_weight.dtype)
    dev = h.device
    y = torch.empty((M, d_out), device=dev, dtype=h.dtype)
    pre = torch.empty((M if save_pre else 0, nb), device=dev, dtype=torch.float32)
    a = torch.empty((M if save_pre else 0, nb), device=dev, dtype=dt)
    if M == 0:
        return y, pre, a
    dropout = dropout_p > 0.0
    thr, rescale = dropout_threshold(dropout_p) if dropout else (0, 1.0)
    aligned = _aligned([h, down_weight, up_weight, down_bias, up_bias, res, y],
                       [d_in, d_out, nb, h.stride(0), res.stride(0)])
    candidates = row_configs("fwd", B, dt, aligned)
    scratch: dict[int, torch.Tensor] = {}

    def launch(cfg: RowConfig) -> None:
        p_a = a
        if cfg.bj(B) < B and not save_pre:  # chunked mode parks act(pre) in memory between its phases
            p_a = scratch.get(0)
            if p_a is None:
                p_a = scratch[0] = torch.empty((M, nb), device=dev, dtype=dt)
        kwargs = dict(
            p_h=h, p_down=down_weight, p_up=up_weight,
            p_db=down_bias if down_bias is not None else down_weight,
            p_ub=up_bias if up_bias is not None else up_weight,
            p_res=res, p_scale=scale if scale is not None else y, p_y=y, p_pre=pre if save_pre else y,
            p_a=p_a if p_a.numel() else y,
            M=M, D_IN=d_in, D_OUT=d_out, NB=nb, s_hm=h.stride(0), s_rm=res.stride(0), s_ym=y.stride(0),
            scaling=float(scaling), seed=int(seed), drop_thr=int(thr), drop_scale=float(rescale),
            B=B, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, BLOCK_J=cfg.bj(B),
            ACTIVATION=activation, HAS_DOWN_BIAS=down_bias is not None, HAS_UP_BIAS=up_bias is not None,
            LEARNED_SCALE=scale is not None, HAS_DROPOUT=dropout, SAVE_PRE=bool(save_pre),
            DOT_FP32=dt == torch.float32, DOT_PREC=_dot_precision(),
        )
        _launch(_bottleneck_fwd_kernel, (triton.cdiv(M, cfg.block_m),), kwargs, cfg.num_warps, cfg.num_stages)

    if config is None:
        key = ("fwd", triton.next_power_of_2(M), d_in, d_out, B, h.dtype, dt, aligned, dev)
        config = _pick("fwd", key, dev, candidates, launch)
    launch(config)
    return y, pre, a


def bottleneck_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    pre: torch.Tensor,
    a: torch.Tensor,
    scale: torch.Tensor | None,
    scaling: float,
    activation: str,
    dropout_p: float = 0.0,
    seed: int = 0,
    *,
    add_dy: bool,
    need_dh: bool = True,
    need_ddown: bool = True,
    need_dup: bool = True,
    need_ddown_bias: bool = False,
    need_dup_bias: bool = False,
    need_dscale: bool = False,
    row_config: RowConfig | None = None,
    wgrad_config: WgradConfig | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Backward of `bottleneck_fwd`: (dh, d_down, d_up, d_down_bias, d_up_bias, d_scale), None where not asked for.

    dy: (M, d_out); h: (M, d_in) as in forward; pre: (M, b) fp32 and a: (M, b) from forward; same scale/scaling,
    activation, dropout_p and seed as forward; add_dy: the residual was h (dh gets dy added). Gradients come in the
    dtype of their input: dh like h, weights and biases like the weights, d_scale like `scale` (its shape); with
    scale None the d_scale slot is the gradient of the float scaling, a float32 () tensor (for tests).
    """
    dy = _rows("dy", dy)
    h = _rows("h", h)
    M, d_in = h.shape
    nb = down_weight.shape[0]
    d_out = up_weight.shape[0]
    dev = h.device
    wdtype = down_weight.dtype
    down_weight, up_weight = down_weight.contiguous(), up_weight.contiguous()
    B = bottleneck_pad(nb)
    dt = dot_dtype(h.dtype, wdtype)
    prec = _dot_precision()
    dropout = dropout_p > 0.0
    thr, rescale = dropout_threshold(dropout_p) if dropout else (0, 1.0)
    learned = scale is not None
    s = scale.reshape(()).float() if learned else float(scaling)
    need_colsum = need_dup_bias or (need_dscale and up_bias is not None)

    if M == 0:
        def zeros(*shape: int, dtype: torch.dtype = wdtype) -> torch.Tensor:
            return torch.zeros(shape, device=dev, dtype=dtype)

        return (torch.empty((0, d_in), device=dev, dtype=h.dtype) if need_dh else None,
                zeros(nb, d_in) if need_ddown else None, zeros(d_out, nb) if need_dup else None,
                zeros(nb) if need_ddown_bias else None, zeros(d_out) if need_dup_bias else None,
                (torch.zeros_like(scale) if learned else zeros(dtype=torch.float32)) if need_dscale else None)

    state: dict[str, torch.Tensor | None] = {"dbp": None, "dsp": None, "dup": None, "ddn": None, "csum": None}
    g = None
    # -- dx kernel: t = dy W_u, g, dh and the per-tile partial sums
    if need_dh or need_ddown or need_ddown_bias or need_dscale:
        aligned = _aligned([dy, h, down_weight, up_weight, pre, a], [d_in, d_out, nb, dy.stride(0)])
        candidates = row_configs("dx", B, dt, aligned)
        dh = torch.empty((M, d_in), device=dev, dtype=h.dtype) if need_dh else None
        g_buf: dict[int, torch.Tensor] = {}

        def launch_dx(cfg: RowConfig) -> None:
            chunked = cfg.bj(B) < B
            store_g = need_ddown or (chunked and need_dh)
            n_tiles = triton.cdiv(M, cfg.block_m)
            if store_g and 0 not in g_buf:
                g_buf[0] = torch.empty((M, nb), device=dev, dtype=dt)
            dbp = torch.empty((n_tiles, nb), device=dev, dtype=torch.float32) if need_ddown_bias else None
            dsp = torch.empty((n_tiles,), device=dev, dtype=torch.float32) if need_dscale else None
            state.update(dbp=dbp, dsp=dsp)
            dummy = pre
            kwargs = dict(
                p_dy=dy, p_up=up_weight, p_down=down_weight, p_pre=pre, p_scale=scale if learned else dummy,
                p_dh=dh if need_dh else dummy, p_a=a, p_g=g_buf[0] if store_g else dummy,
                p_dbp=dbp if dbp is not None else dummy, p_dsp=dsp if dsp is not None else dummy,
                M=M, D_IN=d_in, D_OUT=d_out, NB=nb, s_dym=dy.stride(0),
                scaling=float(scaling), seed=int(seed), drop_thr=int(thr), drop_scale=float(rescale),
                B=B, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, BLOCK_J=cfg.bj(B),
                ACTIVATION=activation, LEARNED_SCALE=learned, SCALE_GRAD=need_dscale, HAS_DOWN_BIAS=need_ddown_bias,
                HAS_DROPOUT=dropout, ADD_DY=bool(add_dy), COMPUTE_DH=need_dh, STORE_G=store_g,
                DOT_FP32=dt == torch.float32, DOT_PREC=prec,
            )
            _launch(_bottleneck_bwd_dx_kernel, (n_tiles,), kwargs, cfg.num_warps, cfg.num_stages)

        cfg = row_config
        if cfg is None:
            key = ("dx", triton.next_power_of_2(M), d_in, d_out, B, h.dtype, dt, aligned, need_dh, dev)
            cfg = _pick("dx", key, dev, candidates, launch_dx)
        launch_dx(cfg)
        g = g_buf.get(0)
    else:
        dh = None

    # -- weight kernel: dW_u^T = dy^T a (+ colsum dy), dW_d^T = D(h)^T g, split over M
    if need_dup or need_ddown or need_colsum:
        do_up = need_dup or need_colsum
        aligned = _aligned([dy, h, a, g], [d_in, d_out, nb, dy.stride(0), h.stride(0)])
        candidates = wgrad_configs(B, dt, aligned)

        def launch_w(c: WgradConfig) -> None:
            j_tiles = triton.cdiv(nb, c.block_j)
            n_up = triton.cdiv(d_out, c.block_n) * j_tiles if do_up else 0
            n_dn = triton.cdiv(d_in, c.block_n) * j_tiles if need_ddown else 0
            split = _overrides.split or max(1, min(triton.cdiv(2 * _num_sms(dev), n_up + n_dn),
                                                   triton.cdiv(M, 4 * c.block_m)))
            m_per_split = triton.cdiv(triton.cdiv(M, split), c.block_m) * c.block_m
            split = triton.cdiv(M, m_per_split)
            dup = torch.empty((split, d_out, nb), device=dev, dtype=torch.float32) if n_up else None
            ddn = torch.empty((split, nb, d_in), device=dev, dtype=torch.float32) if n_dn else None
            csum = torch.empty((split, d_out), device=dev, dtype=torch.float32) if need_colsum else None
            state.update(dup=dup, ddn=ddn, csum=csum)
            dummy = pre
            kwargs = dict(
                p_dy=dy, p_a=a, p_h=h, p_g=g if g is not None else a,
                p_dup=dup if dup is not None else dummy, p_ddn=ddn if ddn is not None else dummy,
                p_dyc=csum if csum is not None else dummy,
                M=M, D_IN=d_in, D_OUT=d_out, NB=nb, s_dym=dy.stride(0), s_hm=h.stride(0),
                m_per_split=m_per_split, n_up_tiles=n_up, j_tiles=j_tiles, seed=int(seed), drop_thr=int(thr),
                BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_J=c.block_j,
                UP_COLSUM=need_colsum, HAS_DROPOUT=dropout, DOT_FP32=dt == torch.float32, DOT_PREC=prec,
            )
            _launch(_bottleneck_bwd_w_kernel, (n_up + n_dn, split), kwargs, c.num_warps, c.num_stages)

        wcfg = wgrad_config
        if wcfg is None:
            key = ("w", triton.next_power_of_2(M), d_in, d_out, B, h.dtype, dt, aligned, need_dup, need_ddown, dev)
            wcfg = _pick("wgrad", key, dev, candidates, launch_w)
        launch_w(wcfg)

    def total(name: str) -> torch.Tensor:
        t = state[name]
        assert t is not None
        return t[0] if t.shape[0] == 1 else t.sum(0)

    d_down = (total("ddn") * rescale).to(wdtype) if need_ddown else None
    d_up = (total("dup") * s).to(wdtype) if need_dup else None
    d_db = total("dbp").to(wdtype) if need_ddown_bias else None
    dyc = total("csum") if need_colsum else None
    d_ub = (dyc * s).to(wdtype) if need_dup_bias else None
    d_scale = None
    if need_dscale:
        ds = state["dsp"].sum()
        if up_bias is not None:
            ds = ds + (dyc * up_bias.float()).sum()
        d_scale = ds.reshape(scale.shape if learned else ()).to(scale.dtype if learned else torch.float32)
    return dh, d_down, d_up, d_db, d_ub, d_scale


def bottleneck_dropout_mask(shape: tuple[int, int], p: float, seed: int,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """The dropout mask the kernels apply to an h of `shape` (M, d_in) for p and seed, materialised (tests only).

    Returns (M, d_in) fp32 holding keep / (1 - p_eff): pass it as the reference's dropout_mask to run the
    reference with exactly the kernels' mask. p = 0 gives ones.
    """
    if p == 0:
        return torch.ones(shape, device=device, dtype=torch.float32)
    return launch_dropout_mask(_launch, shape, p, seed, device)


# ------------------------------------------------------------------------------------------------ AOT space
# (name, h dtype, weight dtype, torch fp32 matmul precision): the dot flavours a launch can compile
_FLAVOURS = (
    ("bf16", torch.bfloat16, torch.bfloat16, "highest"),
    ("bf16-fp32w-ieee", torch.bfloat16, torch.float32, "highest"),
    ("bf16-fp32w-tf32", torch.bfloat16, torch.float32, "high"),
)
_FLAVOURS_FULL = _FLAVOURS + (
    ("fp16", torch.float16, torch.float16, "highest"),
    ("fp32-ieee", torch.float32, torch.float32, "highest"),
    ("fp32-tf32", torch.float32, torch.float32, "high"),
)
PADDED_BOTTLENECKS = (16, 32, 64, 128, 256, 512, 1024)


def _cfg_tag(c: RowConfig | WgradConfig) -> str:
    if isinstance(c, RowConfig):
        j = "" if c.block_j is None else f"-J{c.block_j}"
        return f"{c.block_m}x{c.block_k}x{c.block_n}{j}-w{c.num_warps}s{c.num_stages}"
    return f"{c.block_m}x{c.block_n}x{c.block_j}-w{c.num_warps}s{c.num_stages}"


def _record_flavour(out: dict[str, tuple[int, Launch]], name: str, h_dt: torch.dtype, w_dt: torch.dtype,
                    aligned: bool, M: int = 16384) -> None:
    """Run the real launchers on meta tensors for every B and every config of the lists, with every feature on
    (dropout, biases, learned scale, all gradients); record (B, launch) under a label per kernel and config."""
    meta = torch.device("meta")
    d = 4096 if aligned else 4104  # 4104 = 8 * 513: not a multiple of 16
    dt = dot_dtype(h_dt, w_dt)
    for B in PADDED_BOTTLENECKS:
        nb = B if aligned else B - 3
        h = torch.empty((M, d), device=meta, dtype=h_dt)
        dy = torch.empty((M, d), device=meta, dtype=h_dt)
        Wd = torch.empty((nb, d), device=meta, dtype=w_dt)
        Wu = torch.empty((d, nb), device=meta, dtype=w_dt)
        bd = torch.empty((nb,), device=meta, dtype=w_dt)
        bu = torch.empty((d,), device=meta, dtype=w_dt)
        scale = torch.empty((1,), device=meta, dtype=torch.float32)
        fwd, dx = row_configs("fwd", B, dt, aligned), row_configs("dx", B, dt, aligned)
        wg = _wgrad_table(dt, aligned)  # labelled by the table entry; launched with BLOCK_J capped at B
        for i in range(max(len(fwd), len(dx), len(wg))):
            cf, cd, cw = fwd[min(i, len(fwd) - 1)], dx[min(i, len(dx) - 1)], wg[min(i, len(wg) - 1)]
            with use_configs(fwd=cf, dx=cd, wgrad=_cap_j(cw, B)), record_launches() as rec:
                _, pre, a = bottleneck_fwd(h, Wd, Wu, bd, bu, None, scale, 1.0, "gelu_tanh", 0.05, 1234)
                bottleneck_bwd(dy, h, Wd, Wu, bu, pre, a, scale, 1.0, "gelu_tanh", 0.05, 1234, add_dy=True,
                               need_ddown_bias=True, need_dup_bias=True, need_dscale=True)
            tags = {"fwd": _cfg_tag(cf), "dx": _cfg_tag(cd), "wgrad": _cfg_tag(cw)}
            for launch in rec:
                kind = {"_bottleneck_fwd_kernel": "fwd", "_bottleneck_bwd_dx_kernel": "dx",
                        "_bottleneck_bwd_w_kernel": "wgrad"}[getattr(launch.kernel, "__name__", None)
                                                             or launch.kernel.fn.__name__]
                label = f"{kind}-{name}-{'aligned' if aligned else 'unaligned'}-{tags[kind]}-B{B}"
                out.setdefault(label, (B, launch))


# default-space extras beyond the bf16 aligned frontier: the heaviest unaligned and fp32-operand compiles
_DEFAULT_EXTRAS = ("dx-bf16-unaligned-64x32x64-J32-w8s2-B1024", "dx-bf16-fp32w-ieee-aligned-32x32x64-w8s2-B128",
                   "fwd-bf16-fp32w-ieee-aligned-32x32x64-w8s2-B128")


def sm90_dispatch_space(full: bool = False) -> list[tuple[str, Launch]]:
    """Every (label, launch) the launchers can dispatch to on an sm_90 GPU, for the AOT compile test.

    Runs the real launchers on "meta" tensors (M = 16384, d = 4096; and d = 4104, b = B - 3 for the unaligned
    class, where sizes are not multiples of 16) under `record_launches`, with dropout, both biases, a learned
    scale and every gradient on (the heaviest variant of each config: the flags only remove code), for every
    padded bottleneck B in 16..1024 and every config of the lists, in each dot flavour: bf16 (fp16 has the same
    tiles and register use), a bf16 h with fp32 weights in "ieee" and "tf32" precision, and with `full` fp16
    and fp32 inputs too (about 280 compiles). Default (full=False, about 18 compiles): every bf16 config of the
    aligned lists at the largest B that uses it (the fused mode holds (BLOCK_M, B) tiles, so register use grows
    with B; the chunked mode does not depend on B; the wgrad tile is (BLOCK_N, min(block_j, B))) plus the
    heaviest unaligned and fp32-operand compiles (_DEFAULT_EXTRAS). Labels: kernel-flavour-alignment-config-B.
    """
    out: dict[str, tuple[int, Launch]] = {}
    old = torch.get_float32_matmul_precision()
    try:
        for aligned in (True, False):
            for name, h_dt, w_dt, prec in (_FLAVOURS_FULL if full else _FLAVOURS):
                torch.set_float32_matmul_precision(prec)
                _record_flavour(out, name, h_dt, w_dt, aligned)
    finally:
        torch.set_float32_matmul_precision(old)
    if not full:
        frontier: dict[str, tuple[int, str]] = {}
        for label, (B, _) in out.items():
            base = label.rsplit("-B", 1)[0]
            if base not in frontier or B > frontier[base][0]:
                frontier[base] = (B, label)
        keep = {label for _, label in frontier.values() if "-bf16-aligned-" in label} | set(_DEFAULT_EXTRAS)
        assert set(_DEFAULT_EXTRAS) <= set(out), sorted(set(_DEFAULT_EXTRAS) - set(out))
        out = {label: out[label] for label in keep}
    with record_launches() as rec:
        bottleneck_dropout_mask((4096, 4096), 0.05, 1234, device="meta")
    items = sorted((label, launch) for label, (_, launch) in out.items())
    return items + [("dropout-mask", rec[0])]
