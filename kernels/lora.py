"""Triton kernels of the LoRA linear op:  y = x W^T + b + s * dropout(x) A^T B^T  (kernels only).

x: (M, K), W: (N, K), b: (N,), A: (r, K), B: (N, r), s = lora_alpha / r, dropout keep-probability 1 - p.
Configs: kernels/lora_configs.py (pure functions of target, dtype, shape bucket; no autotuning). Launchers, the
launch recorder and `dispatch_space`: kernels/lora_launch.py (also reachable here, see `__getattr__` below).
Reference: kernels/lora_ref.py. Custom ops and autograd: fastadapters/ops/lora_triton.py.

Design
------
Default path (FASTADAPTERS_LORA_GEMM unset or "cublas"): every GEMM-sized product goes to cuBLAS, so the op cannot
lose to the unfused layer by more than its rank-r work:
  fwd  1. `_lora_shrink_kernel`  xa = (x * keep / (1 - p)) A^T in fp32 (M, r): one pass over x, the dropout mask
          drawn from Philox inside the kernel (never an M x K mask nor a dropped copy of x), split over K into
          fp32 partials when the rows alone do not fill the GPU (small M), summed in a fixed order.
       2. cuBLAS  y = addmm(b, x, W^T), then cuBLAS  y.addmm_(xa, B^T, alpha=s)  in place (beta = 1: one read and
          one write of y; xa rounded to x's dtype as the reference rounds x A^T).
  bwd  dxa = s dy B and dB = s dy^T xa (shrinks; dB split over M), dx = dy W (cuBLAS) + D(dxa A): the masked term
       is `_lora_linear_kernel` with HAS_MAIN=False, ACCUMULATE=True (one read + write of dx, the mask in its
       epilogue), or cuBLAS addmm_ when p = 0; dA = dxa^T D(x) (shrink over M, split, mask regenerated from the
       seed); dW, db by cuBLAS only when the base layer trains.
Opt-in fused path (FASTADAPTERS_LORA_GEMM=fused): `_lora_linear_kernel` with HAS_MAIN=True does y = x W^T + b +
s xa B^T in one grouped-order tiled GEMM (the rank-r term is an extra K-chunk before the main loop; one write of
y) and dx = dy W + D(dxa A) likewise. It saves one pass over y (~8 % of the fwd floor at M=16384) but a plain
Triton GEMM measured 1.07-1.16x cuBLAS on an H200 (issue 11), so it stays opt-in until a committed GPU
measurement (benchmarks/bench_lora.py, both settings) shows it wins. Nothing here has run on a GPU yet.
Saved for backward: x (the base layer saves it anyway), xa (M x r fp32) and the seed.
The epilogue kernel takes an optional per-output-column scale (HAS_COL_SCALE: out = col * (out + lora) + b),
the hook for DoRA's magnitude vector (issue 16).

Dropout (kernels/_common.py): keep(m, k) from Philox4x32-10 keyed by the seed, counter m * ceil(K/8) + k // 8.
One Philox call gives 4 x 32 random bits = 8 keep decisions of 16 bits each: keep iff u16 >= round(p * 2^16),
so p is quantised to 2^-16 and the rescale 1 / (1 - p_eff) is exactly unbiased. Every kernel derives the mask of
an (m, k) element the same way whatever its tile shape (tiles start at multiples of 8 along k), so forward,
backward and the test-only `lora_dropout_mask` agree bit for bit.

Napkin math (H200: ~4.8 TB/s HBM, ~990 TFLOP/s dense bf16, 132 SMs; K = N = 4096, r = 16, bf16)
  base GEMM (cuBLAS)  2MKN: M=16384 550 GFLOP -> 0.56 ms at peak (measured cuBLAS 0.74-0.79 ms); M=256 ~12 us.
  shrink xa           reads x once: 2MK bytes (M=16384: 128 MiB -> 28 us; M=256: 2 MiB -> 0.4 us + launch), plus
                      Philox: M*K/8 calls x ~100 integer instructions; at M=16384 that is ~0.8 G instructions,
                      ~50 us of the SMs' integer issue rate: the dropout shrink is ALU-bound at ~2x its bytes.
                      Grid: cdiv(M, BLOCK_ROW) x split, split = min(2*SMs / row blocks, K / max(BLOCK_RED,
                      4 R_PAD), 64) per shape bucket: M=256 -> 8 x 32 = 256 blocks (was 4); M=4096 -> 64 x 5
                      (was 64); M=16384 -> 256 x 2. Partials: 4*split*M*r bytes (M=256: 0.5 MiB), summed by one
                      torch reduction in a fixed order.
  LoRA term (cuBLAS)  read + write of y: 4MN bytes (M=16384: 256 MiB -> 56 us, 7 % of the fwd floor); M=256 1 us.
  bwd extra           dxa, dB read dy (2 x 28 us at M=16384), dA reads x (28 us + Philox), the masked dx epilogue
                      reads + writes dx (56 us) with one Philox per 8 elements; dx without dropout: cuBLAS addmm_.
  memory              saved beyond x: 4Mr = 1 MiB for xa and the seed.
  Prediction (from the napkin math, not measured: no GPU this session), default path, against the base layer's
  own cuBLAS time (M = 16384: ~0.75 ms fwd, ~1.5 ms fwd+bwd with W frozen):
    M = 16384, p = 0.05: fwd ~1.15x (shrink ~50 us Philox-bound + LoRA term ~60 us), fwd+bwd ~1.2x (+ dxa, dB
                         ~28 us each, masked dx epilogue ~60 us, dA ~50 us); p = 0: fwd ~1.1x.
    M = 256:             fwd ~2x of the base GEMM's ~12 us: 3-4 launches of ~3-5 us dominate (launch-bound).
  Against the byte/FLOP floor of benchmarks/static.py (base GEMM at the matmul ceiling, 0.56 ms) multiply by
  ~1.35 (cuBLAS's own distance to peak). The opt-in fused GEMM would save the LoRA term's pass (~60 us) if it ran
  at cuBLAS speed; at the measured 1.07-1.16x of plain Triton GEMMs it loses 0-7 % fwd.
  Launches: fwd 2 Triton (shrink, + the partial sum when split) + 2 cuBLAS; bwd 4 Triton with dropout (3 without)
  + 2-3 partial sums + cuBLAS dx (and dW, db when the base trains).

Compiled code (Triton 3.6 + the wheel's ptxas, no GPU, 2026-12-05; dispatch_space configs, bf16, K = N = 4096;
registers / shared bytes / main-loop MMA; no spills anywhere, no C7515):
  role (shape)              sm_90                       sm_80                     sm_86 = sm_89 (99 KiB)
  shrink_xa  (M256, split)  64 / 32 K / mma.sync m16n8  76 / 32 K / mma.sync      70 / 32 K / mma.sync
  shrink_xa  (M4096)        112 / 52 K / wgmma m64n16   128 / 56 K / mma.sync     128 / 56 K / mma.sync
  shrink_dA  (M16384)       130 / 68 K / wgmma m64n16   168 / 64 K / mma.sync     164 / 64 K / mma.sync
  shrink_xa  (r256)         204 / 76 K / mma.sync       194 / 76 K / mma.sync     198 / 40 K (2 stages)
  epilogue_dx (masked)      82 / 8 K / - (K = r)        80 / 8 K                  78 / 8 K
  gemm_fwd#main (fused)     198 / 152 K / wgmma m64n256 255 / 96 K / mma.sync     222 / 48 K / mma.sync
  gemm_dx#main (fused)      186 / 132 K / wgmma m64n128 186 / 96 K / mma.sync     178 / 48 K / mma.sync
  The fused GEMM's wgmma loops are pipelined (wait_group 1). The shrinks' N is the padded rank (16): memory-bound
  by design; 32-row tiles (M <= 256) take mma.sync on sm_90 (wgmma needs 64 rows per warpgroup).
Philox cost (SASS, sm_90, shrink 64x128 tile): 1496 instructions with the mask vs 555 without: ~940 per K step,
~117 per Philox call (8 calls per thread per step). That is Philox-10 itself (one call per 8 elements already);
fewer rounds or a saved bit-mask would change kernels/_common.py (shared with bottleneck): not done here.

Register budget (no spills allowed): the masked GEMMs draw the mask with the accumulator live, so
`gemm_config(..., dropout=True)` keeps to <= 64 accumulator registers per thread and the masked epilogue uses 64x64
tiles (64x128 reached 255 registers and spilled at unaligned shapes, K = 72). The rank-r chunks are a loop, not
unrolled, so registers do not grow with r.

Several adapters on one layer: each call is independent (its own seed, so its own mask) and gradients add up
through autograd (tests/test_kernels_lora.py::test_several_adapters_on_one_layer).

Precision: fp32 accumulation everywhere; xa and dxa stay fp32 and are rounded to the input dtype only as dot
operands (as the reference rounds x A^T). fp32 inputs use input_precision "ieee" unless torch allows TF32
(torch.get_float32_matmul_precision() != "highest"), matching torch's own fp32 matmul.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

# INTERPRETED: the flag fastadapters.ops reads; importing _common applies the interpreter's bf16 fix
from ._common import INTERPRETED  # noqa: F401
from ._common import dropout_keep as _dropout_keep


# ------------------------------------------------------------------------------------------------ shrink
# Backward derivation. Forward, with D = diag-free shorthand for "times keep(m, k) / (1 - p)":
#     x_d = D(x)            (M, K)     the dropped input, never stored
#     xa  = x_d A^T         (M, r)     saved, fp32
#     y   = x W^T + b + s xa B^T
# Given dy = dL/dy (M, N):
#     dL/dB  = s dy^T xa                    (N, r)   reduction over M   -> shrink(dy^T, xa^T), split over M
#     dxa    = s dy B                       (M, r)   reduction over N   -> shrink(dy, B^T)
#     dL/dA  = dxa^T x_d                    (r, K)   reduction over M   -> shrink(D(x)^T, dxa^T), split over M,
#                                                                          the mask regenerated from the seed
#     dL/dx  = dy W + D(dxa A)              (M, K)   the GEMM kernel: main operand W, rank-r operand A, and the
#                                                    mask on the rank-r term only (x_d = D(x) is linear in x)
#     dL/dW  = dy^T x,  dL/db = sum_m dy    only when the base layer trains (cuBLAS, no dropout there)
# So one generic "shrink" kernel  out (ROWS, R) = scale * D?(in) (ROWS, RED) @ w^T (RED, R)  covers xa, dxa,
# dB and dA through strides, and one GEMM kernel covers y and dx.
@triton.jit(do_not_specialize=["seed"])
def _lora_shrink_kernel(
    p_in,   # (ROWS, RED) view: x, dy, x^T or dy^T (strides s_in_row, s_in_red)
    p_w,    # (R, RED) view: lora_A, lora_B^T, xa^T or dxa^T (any float dtype; cast to p_in's)
    p_out,  # (SPLIT, ROWS, R) fp32 partial sums, one slab per split of RED
    ROWS, RED, R, red_per_split,
    s_in_row, s_in_red, s_w_r, s_w_red, s_out_split, s_out_row, s_out_r,
    scale, seed, drop_thr, KX,
    BLOCK_ROW: tl.constexpr, BLOCK_RED: tl.constexpr, R_PAD: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, TRANS_IN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """out[split] = scale * D?(in)[:, split range] @ w[:, split range]^T.

    With HAS_DROPOUT, D zeroes the dropped elements of in; the mask is indexed in x's (m, k) coordinates:
    (row, red) when TRANS_IN is False (in = x), (red, row) when it is True (in = x^T). The 1/(1-p) rescale
    is part of `scale`. red_per_split is a multiple of BLOCK_RED.
    """
    i_row = tl.program_id(0).to(tl.int64)
    i_split = tl.program_id(1).to(tl.int64)
    o_row = i_row * BLOCK_ROW + tl.arange(0, BLOCK_ROW)
    o_r = tl.arange(0, R_PAD)
    m_row = o_row < ROWS
    m_r = o_r < R
    red_lo = i_split * red_per_split
    red_hi = tl.minimum(red_lo + red_per_split, RED)
    b_acc = tl.full((BLOCK_ROW, R_PAD), 0.0, dtype=tl.float32)
    for red0 in range(red_lo, red_hi, BLOCK_RED):
        o_red = red0 + tl.arange(0, BLOCK_RED)
        m_red = o_red < red_hi
        p_in_blk = p_in + o_row[:, None] * s_in_row + o_red[None, :] * s_in_red
        b_in = tl.load(p_in_blk, mask=m_row[:, None] & m_red[None, :], other=0.0)
        if HAS_DROPOUT:
            if TRANS_IN:
                b_keep = tl.trans(_dropout_keep(seed, o_red, i_row * BLOCK_ROW, KX, drop_thr, BLOCK_ROW))
            else:
                b_keep = _dropout_keep(seed, o_row, red0, KX, drop_thr, BLOCK_RED)
            b_in = tl.where(b_keep, b_in, 0.0).to(b_in.dtype)
        p_w_blk = p_w + o_red[:, None] * s_w_red + o_r[None, :] * s_w_r
        b_w = tl.load(p_w_blk, mask=m_red[:, None] & m_r[None, :], other=0.0)
        b_acc = tl.dot(b_in, b_w.to(b_in.dtype), b_acc, input_precision=DOT_PREC)
    b_acc = b_acc * scale
    p_out_blk = p_out + i_split * s_out_split + o_row[:, None] * s_out_row + o_r[None, :] * s_out_r
    tl.store(p_out_blk, b_acc, mask=m_row[:, None] & m_r[None, :])


# ------------------------------------------------------------------------------------------------ GEMM
@triton.jit(do_not_specialize=["seed"])
def _lora_linear_kernel(
    p_a,     # (M, K) view: x (forward) or dy (dx)
    p_b,     # (K, N) view: W^T (forward) or W (dx)
    p_l,     # (M, R) fp32: xa (forward) or dxa (dx)
    p_lw,    # (R, N) view: B^T (forward) or A (dx)
    p_bias,  # (N,) bias, read only when HAS_BIAS
    p_col,   # (N,) fp32 per-output-column scale, read only when HAS_COL_SCALE
    p_out,   # (M, N): y or dx; read first when ACCUMULATE
    M, N, K, R,
    s_am, s_ak, s_bk, s_bn, s_lm, s_lr, s_lwr, s_lwn, s_om, s_on,
    scale, seed, drop_thr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    R_PAD: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_MAIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """out = col? * ([out +] [a @ b] + scale * D?(l @ lw)) [+ bias], D the dropout keep mask in out's (m, n)
    coordinates, col the optional per-column scale (DoRA's magnitude / column norm).

    The rank-r term is computed first so that only one fp32 accumulator is live: the mask applies to it alone.
    """
    i_pid = tl.program_id(0)
    n_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    n_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    n_in_group = GROUP_M * n_pid_n
    i_group = i_pid // n_in_group
    first_m = i_group * GROUP_M
    group_m = tl.minimum(n_pid_m - first_m, GROUP_M)
    i_m = (first_m + (i_pid % n_in_group) % group_m).to(tl.int64)
    i_n = ((i_pid % n_in_group) // group_m).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N

    # rank-r term: the extra K-chunk, R_PAD wide, in chunks of BLOCK_R
    b_acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for r0 in range(0, R_PAD, BLOCK_R):  # a loop, not unrolled: registers do not grow with r
        o_r = r0 + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        b_l = tl.load(p_l + o_m[:, None] * s_lm + o_r[None, :] * s_lr, mask=m_m[:, None] & m_r[None, :], other=0.0)
        b_lw = tl.load(p_lw + o_r[:, None] * s_lwr + o_n[None, :] * s_lwn, mask=m_r[:, None] & m_n[None, :],
                       other=0.0)
        b_acc = tl.dot(b_l.to(b_lw.dtype), b_lw, b_acc, input_precision=DOT_PREC)
    if HAS_DROPOUT:
        b_keep = _dropout_keep(seed, o_m, i_n * BLOCK_N, N, drop_thr, BLOCK_N)
        b_acc = tl.where(b_keep, b_acc, 0.0)
    b_acc = b_acc * scale

    if HAS_MAIN:
        o_k = tl.arange(0, BLOCK_K)
        p_a_blk = p_a + (o_m % M)[:, None] * s_am + o_k[None, :] * s_ak
        p_b_blk = p_b + o_k[:, None] * s_bk + (o_n % N)[None, :] * s_bn
        for k0 in range(0, K, BLOCK_K):
            m_k = o_k < K - k0
            b_a = tl.load(p_a_blk, mask=m_k[None, :], other=0.0)
            b_b = tl.load(p_b_blk, mask=m_k[:, None], other=0.0)
            b_acc = tl.dot(b_a, b_b, b_acc, input_precision=DOT_PREC)
            p_a_blk += BLOCK_K * s_ak
            p_b_blk += BLOCK_K * s_bk

    p_out_blk = p_out + o_m[:, None] * s_om + o_n[None, :] * s_on
    m_out = m_m[:, None] & m_n[None, :]
    if ACCUMULATE:
        b_acc += tl.load(p_out_blk, mask=m_out, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        b_acc *= tl.load(p_col + o_n, mask=m_n, other=0.0)[None, :]
    if HAS_BIAS:
        b_acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(p_out_blk, b_acc.to(p_out.dtype.element_ty), mask=m_out)


def __getattr__(name: str) -> Any:
    """The launch-side names the op contract asks of a kernel module (dispatch_space, record_launches, ...) live in
    kernels/lora_launch.py; they are forwarded lazily so this file holds kernels only."""
    if name in ("dispatch_space", "sm90_dispatch_space", "record_launches"):
        from . import lora_launch

        return getattr(lora_launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
