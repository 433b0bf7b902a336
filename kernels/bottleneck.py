"""Fused Triton kernels for the bottleneck adapter:  y = r + s * (act(D(h) W_d^T + b_d) W_u^T + b_u).

This file holds the kernels only. Launchers (checks, the weight cast, grids, the dispatch space):
kernels/bottleneck_launch.py; configs (pure functions of arch, dtype and shape bucket): kernels/bottleneck_configs.py;
the reference: kernels/bottleneck_ref.py. The launch-side names of the op contract (dispatch_space,
record_launches, ...) are also reachable here (`__getattr__` at the end).

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
  then tiny torch ops reduce the partials in a fixed order and apply s and the dropout rescale. The split count is
  a function of the arch and the M bucket (kernels/bottleneck_configs.wgrad_split), never of a timing race: the
  weight gradients are bitwise the same run to run.
  Save or recompute pre? Recomputing it in the backward costs a third GEMM over h, 2 M d b FLOPs, and a read of h
  in the dx pass; saving costs 4 M b bytes written + read. At d = 4096, b = 256 (bf16, H200 4.3 TB/s,
  790 TFLOP/s): recompute 2*M*4096*256 / 790e12 + 2*M*4096 / 4.3e12 = M * 4.6 ps, save 8*M*256 / 4.3e12 =
  M * 0.48 ps: saving is ~10x cheaper, and pre (M x b fp32) is 1/8 of h's bytes: it is saved. a is saved too
  (2 M b more bytes): the dx epilogue computing act(pre) as well as act'(pre) next to t spilled on sm_90.
Large b: the fused mode keeps (BLOCK_M, B) tiles in registers; past B = 256 (and for unaligned shapes past 64)
  the row kernels switch to a chunked mode (BLOCK_J < B): phase 1 runs per BLOCK_J columns of b and parks
  act(pre) (forward) or g (dx) in memory, in this program's rows (L2-resident, a barrier between the phases),
  and phase 2 reduces over b in BLOCK_J steps. h / dy tiles are re-read per chunk from L2: correct, not tuned.

Tensor cores on the layer's real path. A bf16/fp16 model keeps its adapter weights in fp32. The launcher casts
  them to the activation dtype once per call and every dot runs on 16-bit operands with fp32 accumulation; the
  weight gradients are reduced in fp32 and returned in fp32 (bottleneck_launch.py says why the cast is outside
  the kernel). Before this, such a call ran fp32 "ieee" dots on 32x32x64 tiles: in the sm_90 compile, no wgmma
  and no mma.sync, 768 (fwd), 776 (dx) and 1024 (wgrad) fma.rn.f32 in the PTX. Now it compiles to the 16-bit
  tiles: wgmma m64n256k16 / m64n128k16 (fwd, dx), m64n128k16 (wgrad) on sm_90, mma.sync m16n8k16 on sm_80/86/89.
  fp32 dots remain only for an fp32 model ("ieee" FMAs unless torch allows TF32, as torch's own fp32 matmul).

Weight re-reads (the L2 traffic). Every row program reads both weight matrices in full (2 d b e = 4 MiB at
  d = 4096, b = 256, bf16), from L2 (they stay resident: 4 MiB of 50-60 MB). Per pass over M that is
  M / BLOCK_M * 4 MiB: 1.07 GB at BLOCK_M = 64, 0.54 GB at 128, for 68.7 GFLOP of math (64 FLOP per L2 byte at
  64 rows: an H200 at 790 TFLOP/s would need ~12 TB/s of L2 -> SM bandwidth to stay FLOP-bound). Options weighed:
    grid order / persistent grid: does not help: every program needs the whole of both weights whatever the
      order (the bytes are L2 -> SM, not HBM -> L2; they already hit L2);
    split into plain GEMMs (pre = h W_d^T, then y = r + s a W_u^T with K = b): with 128 x 128 tiles each GEMM moves
      M d b e (1/128 + 1/128) = 0.54 GB, 1.07 GB for the pair -- exactly the fused kernel's traffic at 64 rows,
      plus a pass over a; 128 x 256 tiles hit the same register wall as below. No gain;
    larger row blocks: the (BLOCK_M, B) fp32 accumulator at 128 x 256 is 128 registers per thread at 8 warps, and
      the activation epilogue needs temporaries beside it. Compiled for sm_90 (Triton 3.6): clean (255 registers)
      only for silu without biases or dropout; tanh spilled 56-64 bytes, gelu_tanh with biases 520, with dropout
      192-680; holding the tile as two b halves 8-40 bytes; 16 warps 40-96 bytes. A config that spills for the
      default activation (tanh) is not shipped.
  Chosen: 128-row blocks up to B = 128 on sm_90 (0.54 GB per pass at b = 128), 64-row blocks at B = 256 (1.07 GB:
  the same L2 traffic as a pair of 128x128-tiled GEMMs, i.e. what cuBLAS-class tiling would move for this math).
  The fix that remains: 2-CTA clusters sharing each weight tile through TMA multicast, or a warp-specialised
  kernel keeping act(pre) in shared memory -- neither is expressible in Triton 3.6's tl.dot kernels here.

Napkin math (M = 16384, d_in = d_out = 4096, b = 256, bf16; e = 2 bytes; H200: 4.3 TB/s HBM and 790 TFLOP/s as
measured by the benchmark driver's ceilings; L2 -> SM bandwidth assumed 7-10 TB/s, NOT measured here)
  fwd      FLOPs 4 M d b = 68.7 G -> 87 us; HBM h 134 MB + y 134 MB (+ pre, a 25 MB when training) -> 62 (68) us.
           Floor 87 us (FLOP-bound). L2 weight reads 1.07 GB -> 107-153 us: L2-bound. Plus the weight cast (fp32
           weights): 12.6 MB, ~3 us.
  bwd dx   FLOPs 4 M d b -> 87 us; HBM dy 134 + dh 134 + pre 17 + a, g 17 MB -> 70 us; L2 weight reads 1.07 GB
           -> 107-153 us: L2-bound.
  bwd w    FLOPs 4 M d b -> 87 us; HBM dy 134 + h 134 MB (+ a, g from L2) -> 62 us; 128x128 output tiles read
           M (128 + 128) e per tile from L2: 1.07 GB -> 107-153 us, overlapped with the math (a plain GEMM's ratio).
  fwd+bwd  12 M d b FLOPs (no recompute): 261 us floor, the same as the benchmark's model.
PREDICTION (from the compiled code and the numbers above, not a measurement; no GPU has run these kernels):
  fwd 0.11-0.16 ms (1.2-1.8x the 87 us floor), dx 0.11-0.16 ms (1.2-1.8x), wgrad 0.10-0.15 ms (1.2-1.7x),
  fwd+bwd 0.33-0.47 ms (1.3-1.8x the 261 us floor); with fp32 adapter weights ~6 us more (two casts).
  Before (fp32 weights): fp32 FMA dots on CUDA cores, <= 67 TFLOP/s on an H100/H200 (datasheet), so >= 12x the
  floor on math alone, 20-50x by the issue's estimate.
  benchmarks/static.py's model (compulsory bytes, no L2 term, so optimistic for these L2-bound kernels; sm_90,
  H100 SXM datasheet ceilings; run 2026-12-05 15:18 UTC on this code): M = 16384 with fp32 weights fwd 1.18x,
  bwd 1.33x, call 1.28x the floor; M = 4096: 2.7x -- the row kernels run cdiv(4096, 64) = 64 programs on 132 SMs
  (half the GPU idle), and the wgrad split partials and the casts weigh more at small M.
Next: measure on a GPU; then the cluster / warp-specialised forward and dx above, and a small-M plan (more row
  programs without more weight re-reads: split phase 2 over d_out across a 2-CTA cluster).

  memory   saved for backward beyond the caller's h: pre + a, 6 M b = 24 MiB (torch's reference keeps an fp32
           copy of h, 4 M d = 256 MiB, plus two M x b fp32 tensors); backward scratch g (2 M b = 8 MiB) and the
           split partials (split * 2 d b * 4 bytes).

Dropout on the adapter input: keep(m, k) from Philox4x32-10 keyed by the seed, counter m * ceil(d_in/8) + k // 8,
one 16-bit lane of the four 32-bit outputs per element (8 decisions per Philox call), keep iff u16 >= round(p 2^16),
rescale 1 / (1 - p_eff). The same helper as the LoRA kernels (kernels/_common.py), so the same seed and shape give
the same mask in both ops. The mask is regenerated from the seed wherever it is needed (forward phase 1, dx phase 2,
dW_d) and never stored; `bottleneck_dropout_mask` materialises it for tests. Kept values stay exact in the dot
dtype: the 1/(1-p) rescale is applied to the fp32 accumulators, not to h.

Precision: fp32 accumulation and activation; dot operands in the 16-bit activation dtype (weights cast to it;
act(pre) and g rounded to it as dot operands, as any bf16 GEMM rounds its inputs), or fp32 for an fp32 model.
The learned scalar's gradient sums a * t with the saved a in the dot dtype: ~1e-3 relative in bf16.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from ._common import INTERPRETED  # noqa: F401  (the flag fastadapters.ops reads from this module)
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




_LAUNCH_NAMES = ("dispatch_space", "sm90_dispatch_space", "record_launches", "is_main_loop", "bottleneck_fwd",
                 "bottleneck_bwd", "bottleneck_dropout_mask", "use_configs", "MAIN_LOOP_ROLES")


def __getattr__(name: str) -> Any:
    """The launch-side names the op contract asks of a kernel module (dispatch_space, record_launches, ...) live in
    kernels/bottleneck_launch.py; reachable here too (imported lazily: that module imports this one)."""
    if name in _LAUNCH_NAMES:
        from . import bottleneck_launch

        return getattr(bottleneck_launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
