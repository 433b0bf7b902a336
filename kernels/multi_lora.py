"""Triton kernels for multi-LoRA: many adapters in one batch, one adapter index per token (SGMV-style).

    out[m] += s[i] * (x[m] A_i^T) B_i^T,   i = idx[m] in [0, n);  idx[m] = -1 (or out of range): untouched

x: (M, K), A stack: (n, R, K), B stack: (n, N, R) (adapters zero-padded to the largest rank R), s: (n,) fp32.
This file holds the kernels only. Configs: kernels/multi_lora_configs.py (pure functions of target, dtype and
shape bucket). Launchers, the token grouping, the launch recorder and `dispatch_space`:
kernels/multi_lora_launch.py (also reachable here through `__getattr__`). Reference: kernels/multi_lora_ref.py.
Custom op: fastadapters::multi_lora_delta_ (fastadapters/ops/multi_lora.py); the C++/CUDA BGMV twin: csrc/.

Design
------
Tokens are grouped by adapter on the device, without a host sync (so a CUDA graph can capture it):
    key = idx (invalid -> n);  perm = stable argsort(key);  seg_start = searchsorted(sorted key, 0..n)
    tiles of BLOCK_M tokens per adapter segment;  tile_off = [0, cumsum(cdiv(seg_len, BLOCK_M))]
The grid is sized for the worst case, T_MAX = cdiv(M, BLOCK_M) + n tiles (sum_i cdiv(len_i, BM) <= that);
program t finds its adapter as a = #{j in 1..n : tile_off[j] <= t} (one vector compare, no loop) and returns
when a == n (a spare tile). Its rows are perm[seg_start[a] + j*BM ...] (a gather): every tile belongs to ONE
adapter, so it is a plain tl.dot tile against that adapter's weights.
  1. `_multi_lora_shrink_kernel`  grid (T_MAX, SPLIT_K): h[split, rows, :] = x[rows, k-range] A_a^T in fp32,
     R padded to R_PAD = max(16, next_pow2(R)) in registers. SPLIT_K > 1 when the tiles alone do not fill the
     GPU (decode, short prefill): partial sums go to separate slabs (deterministic, no atomics, no extra launch:
     the expand adds the slabs in a fixed order).
  2. `_multi_lora_expand_kernel`  grid (T_MAX, cdiv(N, BLOCK_N)): out[rows, n-tile] += s_a * (sum of h slabs)
     B_a^T, R in chunks of BLOCK_R: one read-modify-write of each adapted out element, nothing else touched.
The grouping metadata (6 small torch ops) depends on idx only: it is cached per root index tensor (and its
version), so all LoRA layers of one forward share it (LoraLayer hands them views of one tensor); it is never
cached while a CUDA graph is being captured, so a captured graph recomputes it from the index buffer.

Napkin math (H200 ~4.8 TB/s, bf16, K = N = 4096, R = 16, 8 adapters, 132 SMs)
  decode 32 x 1   weights 8 x (RK + NR) x 2 B = 2 MiB per layer -> ~0.5 us of HBM; x + out 0.75 MiB. The floor
                  is launch latency: 2 launches (~3-5 us) per layer (+ the grouping once per forward) vs PEFT's
                  ~5 per adapter (8 adapters: ~40). The CUDA BGMV kernel (csrc/) does it in 1 launch.
                  Shrink grid: (2 + 8) tiles x SPLIT_K 32 (one BLOCK_K per split): 64-256 working blocks.
  prefill 32x512  M = 16384: shrink reads x once (128 MiB -> 28 us), 2MKR = 2.1 GFLOP; expand reads + writes out
                  (256 MiB -> 56 us) - the same bytes as a single-adapter epilogue, whatever the adapter mix.
                  The extra over one adapter is the sort/gather (M ints) and <= n spare tiles. SPLIT_K = 1 there
                  (256 tiles already give two waves).
  Prediction (napkin math, not measured; no GPU this session): decode ~2 launches' latency (~8-10 us per layer,
  ~1x the launch floor); prefill ~1.1-1.2x the 84 us byte floor (the gathered rows defeat coalescing only within
  a 64-row tile, so the x stream stays near full bandwidth).
Compiled code (Triton 3.6 + the wheel's ptxas, no GPU, 2026-12-05; bf16, K = N = 4096, r = 16; registers /
shared bytes / MMA; no spills in the default space of any arch):
  decode shrink (16x128, split 32)   sm_90 40 / 16 K / mma.sync m16n8k16   sm_80 48   sm_86/89 48
  decode expand (16x64, 32 slabs)    sm_90 32 / 4.5 K                      sm_80 32   sm_86/89 40
  prefill shrink (64x64, split 1)    sm_90 47 / 30 K / wgmma m64n16k16     sm_80 64   sm_86/89 56 (mma.sync)
  prefill expand (64x128x16, 8 w)    sm_90 64 / 22 K / wgmma m64n64k16     sm_80 62   sm_86/89 58
  The expand's rank chunks and split slabs are loops (unrolled, fp32 R256 with 32 slabs spilled on sm_90).
Precision: fp32 accumulation; h stays fp32 and is rounded to B's dtype only as the tl.dot operand; the
adapter weights are cast to x's dtype for the shrink dot. fp32 uses "ieee" unless torch allows TF32.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from ._common import INTERPRETED  # noqa: F401  (read by fastadapters.ops; importing _common applies the bf16 fix)


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _tile_rows(p_perm, p_seg, p_toff, n, i_tile, BLOCK_M: tl.constexpr, N_PAD: tl.constexpr):
    """(adapter, token rows (BLOCK_M,), row mask) of tile i_tile; adapter == n for a spare tile."""
    o_a = tl.arange(0, N_PAD)
    b_off = tl.load(p_toff + 1 + o_a, mask=o_a < n, other=2147483647)
    i_a = tl.sum((b_off <= i_tile).to(tl.int32), axis=0)
    i_a_safe = tl.minimum(i_a, n - 1)
    tile0 = tl.load(p_toff + i_a_safe)
    seg_lo = tl.load(p_seg + i_a_safe)
    seg_hi = tl.load(p_seg + i_a_safe + 1)
    o_pos = seg_lo + (i_tile - tile0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_row = (o_pos < seg_hi) & (i_a < n)
    o_tok = tl.load(p_perm + o_pos, mask=m_row, other=0).to(tl.int64)
    return i_a, o_tok, m_row


@triton.jit
def _multi_lora_shrink_kernel(
    p_x,     # (M, K) view (strides s_xm, s_xk)
    p_a,     # (n, R, K) adapter A stack (strides s_an, s_ar, s_ak), cast to x's dtype
    p_h,     # (SPLIT_K, M, R) fp32 partial sums
    p_perm,  # (M,) int64 token order grouped by adapter
    p_seg,   # (n + 1,) int64 segment starts in perm
    p_toff,  # (n + 1,) int64 first tile of each segment
    n, R, K, k_per_split,
    s_xm, s_xk, s_an, s_ar, s_ak, s_hs, s_hm, s_hr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, N_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """h[split, rows] = x[rows, split's K range] A_a^T for the rows of one adapter tile."""
    i_tile = tl.program_id(0)
    i_split = tl.program_id(1).to(tl.int64)
    i_a, o_tok, m_row = _tile_rows(p_perm, p_seg, p_toff, n, i_tile, BLOCK_M, N_PAD)
    if i_a >= n:
        return
    o_r = tl.arange(0, R_PAD)
    m_r = o_r < R
    k_lo = i_split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    p_a_ad = p_a + i_a.to(tl.int64) * s_an
    b_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < k_hi
        b_x = tl.load(p_x + o_tok[:, None] * s_xm + o_k[None, :] * s_xk, mask=m_row[:, None] & m_k[None, :],
                      other=0.0)
        b_w = tl.load(p_a_ad + o_k[:, None] * s_ak + o_r[None, :] * s_ar, mask=m_k[:, None] & m_r[None, :],
                      other=0.0)
        b_acc = tl.dot(b_x, b_w.to(b_x.dtype), b_acc, input_precision=DOT_PREC)
    p_h_blk = p_h + i_split * s_hs + o_tok[:, None] * s_hm + o_r[None, :] * s_hr
    tl.store(p_h_blk, b_acc, mask=m_row[:, None] & m_r[None, :])


@triton.jit
def _multi_lora_expand_kernel(
    p_h,     # (SPLIT_K, M, R) fp32 from the shrink
    p_b,     # (n, N, R) adapter B stack (strides s_bn, s_bN, s_br)
    p_s,     # (n,) fp32 scalings
    p_out,   # (M, N) view, read-modify-write (strides s_om, s_on)
    p_perm, p_seg, p_toff,  # grouping, as in the shrink
    n, R, N,
    s_hs, s_hm, s_hr, s_bn, s_bN, s_br, s_om, s_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_PAD: tl.constexpr,
    N_PAD: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """out[rows, n-tile] += s_a * h[rows] B_a[n-tile]^T for the rows of one adapter tile (R in BLOCK_R chunks)."""
    i_tile = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)
    i_a, o_tok, m_row = _tile_rows(p_perm, p_seg, p_toff, n, i_tile, BLOCK_M, N_PAD)
    if i_a >= n:
        return
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_scale = tl.load(p_s + i_a)
    p_b_ad = p_b + i_a.to(tl.int64) * s_bn
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R_PAD, BLOCK_R):  # loops, not unrolled: registers do not grow with R or SPLIT_K
        o_r = r0 + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        m_h = m_row[:, None] & m_r[None, :]
        p_h_blk = p_h + o_tok[:, None] * s_hm + o_r[None, :] * s_hr
        b_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for i_s in range(SPLIT_K):  # the slabs in a fixed order: deterministic
            b_h += tl.load(p_h_blk + i_s * s_hs, mask=m_h, other=0.0)
        b_b = tl.load(p_b_ad + o_r[:, None] * s_br + o_n[None, :] * s_bN, mask=m_r[:, None] & m_n[None, :],
                      other=0.0)
        b_acc = tl.dot((b_h * b_scale).to(b_b.dtype), b_b, b_acc, input_precision=DOT_PREC)
    p_out_blk = p_out + o_tok[:, None] * s_om + o_n[None, :] * s_on
    m_out = m_row[:, None] & m_n[None, :]
    b_acc += tl.load(p_out_blk, mask=m_out, other=0.0).to(tl.float32)
    tl.store(p_out_blk, b_acc.to(p_out.dtype.element_ty), mask=m_out)


def __getattr__(name: str) -> Any:
    """Launch-side names (multi_lora_fwd, dispatch_space, record_launches, ...) live in kernels/multi_lora_launch.py;
    they are forwarded lazily so this file holds kernels only."""
    if not name.startswith("__"):
        from . import multi_lora_launch

        if hasattr(multi_lora_launch, name):
            return getattr(multi_lora_launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
