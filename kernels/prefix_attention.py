"""Prefix-augmented flash attention in Triton: causal attention of q over [prefix ; tokens] (kernels only).

q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D), Lq <= Lk when causal (queries are the last Lq positions, bottom-right
alignment); prefix_k, prefix_v: (Hkv, P, D) shared by the batch; key_padding_mask (B, Lk) bool, True = real token.
Every query sees the whole prefix and the tokens up to its own position; the padding mask never hides the prefix;
a row that sees no key gives 0 and lse = -inf. The spec is kernels/prefix_attention_ref.py; launchers, the launch
recorder and `dispatch_space`: kernels/prefix_attention_launch.py (also reachable here, see `__getattr__` at the
end); configs: kernels/prefix_attention_configs.py; custom ops: fastadapters/ops/prefix_attention_triton.py.

Design
------
The prefix is a second key/value source, never concatenated or expanded: each kernel runs its key loop twice, once
over the prefix buffer (no causal or padding mask, only the P bound) and once over the tokens (the causal and
padding masks), sharing one online softmax (fp32, base-2 exponent with scale * log2(e) folded into the scores).
Token key blocks are split in a mask-free part (blocks every query of the tile sees) and a masked part (the
diagonal and the Lk edge); the padding mask, when there is one, is one (BLOCK_N,) byte load per key block.
head_dim D is padded to D_PAD = max(16, next_pow2(D)) in registers only (masked loads/stores).
Strides are passed for every tensor (transformers hands over q/k/v as transposed views); the last dim must be
contiguous (the launcher copies otherwise). Every grid is 1-D: (b, head) is folded into grid x with the block
index, so B * H has no 65535 limit (grid y/z have one).

  forward   `_prefix_attn_fwd_kernel`, cdiv(Lq, BM) * B * Hq programs, the heaviest query blocks first. Writes out
            and lse (natural log, fp32) for the backward. acc = dot(p, v, acc * alpha): the PV wgmma accumulates
            in place and stays in flight across the loop edge while the next K/V tiles load (cp.async, num_stages
            deep) and the next QK^T issues.
  decode    Lq <= DECODE_MAX_LQ: `_prefix_attn_decode_kernel` packs the GROUP query heads of one kv head and the
            Lq queries into the rows of one tile (K/V read once per kv head, not once per query head) and splits
            the keys flash-decoding style: split s covers a chunk of the prefix or of the tokens, so
            B * Hkv * row_blocks * splits programs fill the GPU even at B = 1; `_prefix_attn_combine_kernel`
            merges the per-split (out, lse) pairs.
  backward  FlashAttention-2's shape. `_prefix_attn_bwd_preprocess_kernel` delta = rowsum(dO * O) - dlse;
            `_prefix_attn_bwd_kv_kernel` one program per key block (64-128 key rows) of (prefix blocks ; token
            blocks) x (b, kv head), looping over the GROUP query heads and the query blocks that see the block:
            S^T, dP^T, dV += P^T dO, dK += dS^T Q, and (default) dQ += dS K added to an fp32 accumulator with
            atomics: 5 GEMM-sized products per tile, S and dP computed once. Token dK/dV are written once (GQA
            summed in the program); prefix dK/dV go to fp32 per-batch partials (B, Hkv, P, D), summed over the
            batch afterwards in a fixed order (torch.sum): deterministic in both modes.
            Deterministic mode (`torch.use_deterministic_algorithms(True)`, or FASTADAPTERS_PREFIX_DETERMINISTIC=1):
            no atomics; `_prefix_attn_bwd_dq_kernel`, one program per query block, recomputes S and dP for dQ
            (7 GEMM-sized products instead of 5: ~1.4x the backward's tensor-core work).
  default   atomic dQ, as FlashAttention-2 and PyTorch's own attention backward do: an fp32 atomic sum of the
            per-key-block dQ shares is not bitwise reproducible (its order depends on scheduling; differences are
            a few fp32 ulps of dQ), and in a model dQ flows into the earlier layers, so bitwise run-to-run equal
            gradients need the deterministic mode. PyTorch users ask for that with
            torch.use_deterministic_algorithms(True) (transformers' `full_determinism`), which the launcher
            honours; the fast path stays the default, as in PyTorch.

Napkin math (B=8, H=32, L=2048, D=128, P=30, bf16, causal; H200: 990 TFLOP/s dense bf16 datasheet, 4.8 TB/s)
  forward FLOPs   4 B H D (L (L+1) / 2 + L P) = 2.75e11 (causal part) + 8.1e9 (prefix: +2.9 %) = 2.83e11.
  forward bytes   q, k, v, o: 4 * 2 B H L D = 537 MB -> 0.11 ms at 4.8 TB/s: compute-bound (intensity ~530).
                  The prefix is Hkv * P * D * 2 * 2 = 0.5 MB, read by every program from L2.
  floor           FLOPs at 0.75 x 990 TFLOP/s (the attainable matmul rate benchmarks/static.py assumes):
                  fwd 0.38 ms, bwd (2.5x: 5 GEMMs per tile) 0.95 ms, fwd+bwd 1.33 ms.
  backward        5 GEMM-sized products per (key block, query block) tile: S^T, dP^T, dV, dK, dQ (7 in the
                  deterministic mode: the dq kernel recomputes S and dP). Extra traffic of the atomic dQ: every
                  key block of 64 adds a (query rows x D) fp32 share, ~16.5 passes per head over its 1 MiB dQ
                  (causal) = 4.3 GB of fp32 reductions in L2 (2.2 GB with FA2's 128-key tiles, which spill here),
                  plus the dQ accumulator's zeroing and cast (0.8 GB of HBM). The prefix adds its own 2.9 % plus a
                  B x Hkv x P x D fp32 partial per grad (2 x 3.9 MB written + read: ~3 us).
  D = 80/96       padded to 128: 60 % / 33 % extra tensor-core work on the padding (not split yet).
  decode          Lq = 1, Lk = 2048, MHA: K and V are 2 B H Lk D * 2 = 268 MB -> 56 us floor. With B = 1 only
                  32 programs would run on 132 SMs without the split; the split targets ~2 programs per SM.

Compiled code (Triton 3.6, ptxas from the wheel; tests/test_sm90_prefix_attention.py holds the gates). sm_90, quick
preset: fwd 128x64 tiles, 8 warps, 3 stages: wgmma m64n64k16 (QK^T) + m64n128k16 (PV), 238 registers, no spill,
128 KiB shared, cp.async.wait_group 2 (loads 2 tiles ahead), every wgmma.wait_group 0. dK/dV + atomic dQ: 64x64
tiles, 8 warps, 3 stages: wgmma m64n32k16 (S^T, dP^T: N = half the query tile) + m64n64k16 (dV, dK, dQ^T: N =
half of D), 255 registers, no spill, 145 KiB shared, no C7515 (before: 16x64 tiles, m64n8k16, C7515). dQ is
computed as dQ^T = K^T dS^T on sm_90 (K^T is a view of K's shared tile; dS K with a register transpose spills at
odd shapes), as dS K on sm_8x (the transposed form spills 300-1300 bytes on mma.sync). 128-key tiles (FA2's) spill
at D = 128 in Triton. Deterministic mode: dK/dV 253 registers, dq kernel 128x64 233 registers, no spill.
wgmma.wait_group > 0 is not reachable from tl code in Triton 3.6 (nor 3.9): its Hopper pipeliner
(WGMMAPipeline.cpp, dotCanBeProperlyAsync) leaves a wgmma in flight only when its result feeds nothing in the loop
but the next iteration's accumulator; the softmax reads S in the same loop, which forces a wait 0, and any wait 0
in a loop suppresses the deeper waits. Tried and compiled: the tutorial's acc = dot(p, v, acc), a hand-pipelined
loop issuing S(j+1) before PV(j), two 64-row halves per program, tl.range(warp_specialize=True): all wait_group 0.
The overlap this kernel gets is between its two warpgroups and between the PV wgmma and the next tile's loads;
FA3-style intra-warpgroup overlap needs Gluon (explicit warpgroup_mma_wait(1)): not done.

PREDICTED (not measured; no GPU run yet) on an H200 at the quick preset: forward 0.55-0.70 ms = 1.5-1.8x the floor
(Triton-class FA2 forward efficiency, 400-500 TFLOP/s, with wait_group 0); backward (atomic dQ, default)
1.6-2.4 ms = 1.7-2.5x (5 products on m64n32 / m64n64 tiles at ~45 % of the matmul ceiling, the 4.3 GB of dQ
reductions partly overlapped), deterministic mode 2.0-2.8 ms; fwd+bwd 2.2-3.1 ms = 1.6-2.3x the floor. The
audit's prediction for the old backward (16x64 tiles, serialized wgmma, 7 products) was 3-5 ms.

Precision: fp32 accumulation and softmax; P and dS are rounded to the input dtype as tl.dot operands (as flash
attention does); dQ is accumulated in fp32 and rounded once. fp32 inputs use input_precision "ieee" unless torch
allows TF32 matmuls.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the kernels' copies
_LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _block_ids_kernel(n_bh):
    """(query block, b * H + h) of this program on a 1-D grid of n_blocks * n_bh programs (B * H on grid x: no
    65535 limit), the heaviest (last) query blocks of every head first."""
    pid = tl.program_id(0)
    n_m = tl.num_programs(0) // n_bh
    i_m = n_m - 1 - pid // n_bh
    i_bh = (pid % n_bh).to(tl.int64)
    return i_m, i_bh


@triton.jit
def _load_rows_kernel(p_rows, o_n, n_end, o_d, MASK_END: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """Load a (BLOCK_N, D_PAD) tile whose row n starts at p_rows[n] (pointers (BLOCK_N, 1)): rows below n_end
    (when MASK_END) and columns below D; zeros elsewhere."""
    p_tile = p_rows + o_d[None, :]
    if MASK_END:
        if D != D_PAD:
            return tl.load(p_tile, mask=(o_n < n_end)[:, None] & (o_d < D)[None, :], other=0.0)
        else:
            return tl.load(p_tile, mask=(o_n < n_end)[:, None], other=0.0)
    else:
        if D != D_PAD:
            return tl.load(p_tile, mask=(o_d < D)[None, :], other=0.0)
        else:
            return tl.load(p_tile)


@triton.jit
def _fwd_inner_kernel(
    b_acc, b_mx, b_l, b_q,
    p_kb,  # keys of this (b, kv head): prefix_k[h] or k[b, h]; row n at p_kb + n * s_kn
    p_vb,  # values, same layout
    p_mb,  # key padding mask row of batch b (uint8), read only when HAS_KPM
    s_kn, s_vn, s_mn,
    n_lo, n_hi, n_end, q_pos, o_d, qk_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_CAUSAL: tl.constexpr, MASK_END: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Online softmax over keys [n_lo, n_hi) of one source; q_pos (BLOCK_M,) = each row's causal position.

    The PV product accumulates into b_acc inside the wgmma (acc = dot(p, v, acc * alpha)): no separate add, and
    the dot stays in flight across the loop edge (Triton makes it "properly async") while the next K tile's loads
    and the next QK^T are issued."""
    for n0 in tl.range(n_lo, n_hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        b_k = _load_rows_kernel(p_kb + o_n[:, None] * s_kn, o_n, n_end, o_d, MASK_END, D, D_PAD)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
        if MASK_CAUSAL or MASK_END or HAS_KPM:
            m_col = tl.full((BLOCK_N,), 1, tl.int1)
            if MASK_END:
                m_col = m_col & (o_n < n_end)
            if HAS_KPM:
                m_col = m_col & (tl.load(p_mb + o_n * s_mn, mask=o_n < n_end, other=0) != 0)
            m_s = m_col[None, :]
            if MASK_CAUSAL:
                m_s = m_s & (q_pos[:, None] >= o_n[None, :])
            b_s = tl.where(m_s, b_s, float("-inf"))
        b_mn = tl.maximum(b_mx, tl.max(b_s, 1))
        b_mu = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # rows with nothing visible yet: keep p = 0, no NaN
        b_p = tl.math.exp2(b_s - b_mu[:, None])
        b_alpha = tl.math.exp2(b_mx - b_mu)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = _load_rows_kernel(p_vb + o_n[:, None] * s_vn, o_n, n_end, o_d, MASK_END, D, D_PAD)
        b_acc = b_acc * b_alpha[:, None]
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision=DOT_PREC)
        b_mx = b_mn
    return b_acc, b_mx, b_l


@triton.jit
def _prefix_attn_fwd_kernel(
    p_q,    # (B, Hq, Lq, D) any strides, last dim contiguous
    p_k,    # (B, Hkv, Lk, D)
    p_v,    # (B, Hkv, Lk, D)
    p_pk,   # (Hkv, P, D) prefix keys (any valid pointer when P == 0)
    p_pv,   # (Hkv, P, D) prefix values
    p_kpm,  # (B, Lk) uint8 key padding mask, 1 = real token (read only when HAS_KPM)
    p_o,    # (B, Hq, Lq, D) out
    p_lse,  # (B, Hq, Lq) fp32 contiguous, natural log
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_pkh, s_pkn, s_pvh, s_pvn, s_mb, s_mn, s_ob, s_oh, s_om,
    BH, Hq, Lq, Lk, P, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """out[b, h, m0:m0+BM] and lse for one query block; qk_scale = scale * log2(e). Grid: cdiv(Lq, BM) * BH."""
    i_m, i_bh = _block_ids_kernel(BH)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // GROUP
    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D_PAD)
    m_q = (o_m < Lq)[:, None]
    if D != D_PAD:
        m_q = m_q & (o_d < D)[None, :]
    b_q = tl.load(p_q + i_b * s_qb + i_h * s_qh + o_m[:, None] * s_qm + o_d[None, :], mask=m_q, other=0.0)

    b_acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    b_mx = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    b_l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    offset = Lk - Lq  # query m sits at token position m + offset (bottom-right alignment)
    q_pos = o_m + offset

    # prefix: every query sees every prefix key
    p_full = (P // BLOCK_N) * BLOCK_N
    p_pkb = p_pk + i_hk * s_pkh
    p_pvb = p_pv + i_hk * s_pvh
    b_acc, b_mx, b_l = _fwd_inner_kernel(b_acc, b_mx, b_l, b_q, p_pkb, p_pvb, p_kpm, s_pkn, s_pvn, s_mn,
                                         0, p_full, P, q_pos, o_d, qk_scale, D, D_PAD, BLOCK_N,
                                         False, False, False, DOT_PREC)
    b_acc, b_mx, b_l = _fwd_inner_kernel(b_acc, b_mx, b_l, b_q, p_pkb, p_pvb, p_kpm, s_pkn, s_pvn, s_mn,
                                         p_full, P, P, q_pos, o_d, qk_scale, D, D_PAD, BLOCK_N,
                                         False, True, False, DOT_PREC)
    # tokens: [0, n_full) seen by every row of the block, [n_full, n_hi) masked (diagonal, Lk edge)
    if CAUSAL:
        n_hi = tl.minimum(Lk, m0 + BLOCK_M + offset)
        n_full = tl.minimum(((m0 + offset + 1) // BLOCK_N) * BLOCK_N, (Lk // BLOCK_N) * BLOCK_N)
    else:
        n_hi = Lk
        n_full = (Lk // BLOCK_N) * BLOCK_N
    p_kb = p_k + i_b * s_kb + i_hk * s_kh
    p_vb = p_v + i_b * s_vb + i_hk * s_vh
    p_mb = p_kpm + i_b * s_mb
    b_acc, b_mx, b_l = _fwd_inner_kernel(b_acc, b_mx, b_l, b_q, p_kb, p_vb, p_mb, s_kn, s_vn, s_mn,
                                         0, n_full, Lk, q_pos, o_d, qk_scale, D, D_PAD, BLOCK_N,
                                         False, False, HAS_KPM, DOT_PREC)
    b_acc, b_mx, b_l = _fwd_inner_kernel(b_acc, b_mx, b_l, b_q, p_kb, p_vb, p_mb, s_kn, s_vn, s_mn,
                                         n_full, n_hi, Lk, q_pos, o_d, qk_scale, D, D_PAD, BLOCK_N,
                                         CAUSAL, True, HAS_KPM, DOT_PREC)

    m_row = b_l > 0.0
    b_o = b_acc / tl.where(m_row, b_l, 1.0)[:, None]
    b_lse = tl.where(m_row, (b_mx + tl.math.log2(tl.where(m_row, b_l, 1.0))) * _LN2, float("-inf"))
    tl.store(p_o + i_b * s_ob + i_h * s_oh + o_m[:, None] * s_om + o_d[None, :], b_o.to(p_o.dtype.element_ty),
             mask=m_q)
    tl.store(p_lse + i_bh * Lq + o_m, b_lse, mask=o_m < Lq)


# ------------------------------------------------------------------------------------------------ decode
@triton.jit
def _prefix_attn_decode_kernel(
    p_q,     # (B, Hq, Lq, D)
    p_k,     # (B, Hkv, Lk, D)
    p_v,     # (B, Hkv, Lk, D)
    p_pk,    # (Hkv, P, D)
    p_pv,    # (Hkv, P, D)
    p_kpm,   # (B, Lk) uint8
    p_op,    # (S, B, Hq, Lq, D) fp32 per-split normalised outputs
    p_lsep,  # (S, B, Hq, Lq) fp32 per-split lse (-inf: the split saw no key)
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_pkh, s_pkn, s_pvh, s_pvn, s_mb, s_mn,
    B, Hkv, Lq, Lk, P, qk_scale, chunk, n_prefix_splits, n_splits, n_row_blocks,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One split of the keys for BLOCK_M packed rows (query head g of the kv head's group, query i): row r is
    (g, i) = (r // Lq, r % Lq). Splits [0, n_prefix_splits) cover the prefix in chunks, the rest the tokens."""
    pid = tl.program_id(0)  # (b * Hkv + h, row block, split) folded on grid x, the split fastest
    i_s = pid % n_splits
    i_r = (pid // n_splits) % n_row_blocks
    i_bh = (pid // (n_splits * n_row_blocks)).to(tl.int64)
    i_b = i_bh // Hkv
    i_hk = i_bh % Hkv
    o_r = i_r * BLOCK_M + tl.arange(0, BLOCK_M)
    m_r = o_r < GROUP * Lq
    o_i = o_r % Lq
    o_h = i_hk * GROUP + o_r // Lq  # int64
    o_d = tl.arange(0, D_PAD)
    m_q = m_r[:, None]
    if D != D_PAD:
        m_q = m_q & (o_d < D)[None, :]
    b_q = tl.load(p_q + i_b * s_qb + o_h[:, None] * s_qh + o_i[:, None] * s_qm + o_d[None, :], mask=m_q, other=0.0)
    q_pos = o_i + (Lk - Lq)

    # one key loop for both sources (a second loop would double the pipeline buffers): the split picks the
    # source; prefix splits see every key (no causal limit, no padding mask)
    is_prefix = i_s < n_prefix_splits
    if is_prefix:
        n_lo = i_s * chunk
        n_hi = tl.minimum(n_lo + chunk, P)
        p_kb = p_pk + i_hk * s_pkh
        p_vb = p_pv + i_hk * s_pvh
        s_kn_src = s_pkn
        s_vn_src = s_pvn
    else:
        n_lo = (i_s - n_prefix_splits) * chunk
        n_hi = tl.minimum(n_lo + chunk, Lk)
        p_kb = p_k + i_b * s_kb + i_hk * s_kh
        p_vb = p_v + i_b * s_vb + i_hk * s_vh
        s_kn_src = s_kn
        s_vn_src = s_vn
    if CAUSAL:
        q_lim = tl.where(is_prefix, 2147483647, q_pos)  # last visible key per row
    p_mb = p_kpm + i_b * s_mb
    b_acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    b_mx = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    b_l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in tl.range(n_lo, n_hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < n_hi
        b_k = _load_rows_kernel(p_kb + o_n[:, None] * s_kn_src, o_n, n_hi, o_d, True, D, D_PAD)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
        if HAS_KPM:
            m_n = m_n & (tl.load(p_mb + o_n * s_mn, mask=m_n & (i_s >= n_prefix_splits), other=1) != 0)
        m_s = m_n[None, :]
        if CAUSAL:
            m_s = m_s & (q_lim[:, None] >= o_n[None, :])
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_mn = tl.maximum(b_mx, tl.max(b_s, 1))
        b_mu = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_p = tl.math.exp2(b_s - b_mu[:, None])
        b_alpha = tl.math.exp2(b_mx - b_mu)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = _load_rows_kernel(p_vb + o_n[:, None] * s_vn_src, o_n, n_hi, o_d, True, D, D_PAD)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_mx = b_mn
    m_row = b_l > 0.0
    b_o = b_acc / tl.where(m_row, b_l, 1.0)[:, None]
    b_lse = tl.where(m_row, b_mx + tl.math.log2(tl.where(m_row, b_l, 1.0)), float("-inf"))  # log2 units
    o_row = ((i_s * B + i_b) * (Hkv * GROUP) + o_h) * Lq + o_i  # row of (S, B, Hq, Lq)
    tl.store(p_op + o_row[:, None] * D + o_d[None, :], b_o, mask=m_q)
    tl.store(p_lsep + o_row, b_lse, mask=m_r)


@triton.jit
def _prefix_attn_combine_kernel(
    p_op,    # (S, ROWS, D) fp32 per-split outputs (ROWS = B * Hq * Lq)
    p_lsep,  # (S, ROWS) fp32 per-split lse, log2 units
    p_o,     # (ROWS, D) out, contiguous
    p_lse,   # (ROWS,) fp32 lse, natural log
    ROWS, S,
    D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, S_CHUNK: tl.constexpr,
):
    """out = sum_s w_s out_s / sum_s w_s with w_s = 2^(lse_s - max lse); lse = max + log2(sum w), in natural log.
    S <= S_PAD; the outputs are read S_CHUNK splits at a time."""
    i_row = tl.program_id(0).to(tl.int64)
    o_s = tl.arange(0, S_PAD)
    o_d = tl.arange(0, D_PAD)
    b_lse = tl.load(p_lsep + o_s * ROWS + i_row, mask=o_s < S, other=float("-inf"))
    b_max = tl.max(b_lse, 0)
    b_mu = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_sum = tl.sum(tl.math.exp2(b_lse - b_mu), 0)
    b_acc = tl.zeros((D_PAD,), dtype=tl.float32)
    for s0 in tl.range(0, S, S_CHUNK):
        o_c = s0 + tl.arange(0, S_CHUNK)
        m_c = o_c < S
        b_w = tl.math.exp2(tl.load(p_lsep + o_c * ROWS + i_row, mask=m_c, other=float("-inf")) - b_mu)
        b_op = tl.load(p_op + (o_c * ROWS + i_row)[:, None] * D + o_d[None, :],
                       mask=m_c[:, None] & (o_d < D)[None, :], other=0.0)
        b_acc += tl.sum(b_w[:, None] * b_op, 0)
    b_o = b_acc / tl.where(b_sum > 0.0, b_sum, 1.0)
    tl.store(p_o + i_row * D + o_d, b_o.to(p_o.dtype.element_ty), mask=o_d < D)
    b_out_lse = tl.where(b_sum > 0.0, (b_mu + tl.math.log2(tl.where(b_sum > 0.0, b_sum, 1.0))) * _LN2,
                         float("-inf"))
    tl.store(p_lse + i_row, b_out_lse)




# ------------------------------------------------------------------------------------------------ backward
# Backward derivation. Per (b, query head h), with K~ = [prefix_k[h_kv] ; k[b, h_kv]] and V~ likewise (h_kv = h //
# GROUP), s the scale and M the visibility mask (prefix always, tokens causal and unpadded):
#     S = s Q K~^T (+ -inf where not M)      P = exp(S - lse)  (lse = log sum_j exp S_ij, saved by the forward)
#     O = P V~                               and optionally the lse itself is an output.
# Given dO = dL/dO and dlse = dL/dlse (0 when unused):
#     dV~   = P^T dO
#     dP    = dO V~^T
#     dS_ij = P_ij (dP_ij - delta_i)         delta_i = sum_j P_ij dP_ij - dlse_i = rowsum(dO * O)_i - dlse_i
#                                            (sum_j P_ij dP_ij = dO_i . sum_j P_ij V~_j = dO_i . O_i; the lse
#                                            term: dlse_i / dS_ij = P_ij)
#     dQ    = s dS K~
#     dK~   = s dS^T Q
# Masked pairs have P_ij = 0, so they drop out of every sum; rows that see no key (lse = -inf) are read as
# lse = +inf, which makes their P row 0. Splitting K~ back: the first P rows of dK~/dV~ are the prefix grads of
# this (b, h); d(prefix_k)[h_kv] = sum over b and over the GROUP query heads of h_kv. Token dK/dV of (b, h_kv) sum
# the GROUP query heads.
# Tiling (FlashAttention-2): the kv kernel holds one key block K_j, V_j and streams the query blocks i that see it
# (causal: query m sees token n iff m + Lk - Lq >= n, so blocks from max(0, n0 - offset) on; only those straddling
# the diagonal need the element mask), computing S_ij^T = K_j Q_i^T and dP_ij^T = V_j dO_i^T once; dV_j and dK_j
# accumulate in registers over i, and dQ_i = s sum_j dS_ij K_j is a sum over the key blocks, which run in other
# programs: each adds its term dS_ij K_j to an fp32 dQ accumulator (atomics; summation order = scheduling order),
# or, deterministic, the dq kernel holds Q_i and walks the key blocks j itself (recomputing S_ij and dP_ij).
# Padded token keys have P = 0 in every row (applied in the loop, so they add nothing to dQ and get dK = dV = 0);
# keys past the Lk / P edge load as zero rows (their dQ term dS K is 0) and are not stored.
@triton.jit
def _prefix_attn_bwd_preprocess_kernel(
    p_o,     # (B, Hq, Lq, D) out, contiguous
    p_do,    # (B, Hq, Lq, D) dout, any strides, last dim contiguous
    p_dlse,  # (B, Hq, Lq) fp32 contiguous (read only when HAS_DLSE)
    p_delta,  # (B, Hq, Lq) fp32 out
    s_dob, s_doh, s_dom, Hq, Lq, n_m,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse."""
    pid = tl.program_id(0)  # (b * Hq + h, row block) folded on grid x
    i_m = pid % n_m
    i_bh = (pid // n_m).to(tl.int64)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D_PAD)
    m = (o_m < Lq)[:, None] & (o_d < D)[None, :]
    b_o = tl.load(p_o + (i_bh * Lq + o_m)[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_do = tl.load(p_do + i_b * s_dob + i_h * s_doh + o_m[:, None] * s_dom + o_d[None, :], mask=m,
                   other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    if HAS_DLSE:
        b_delta -= tl.load(p_dlse + i_bh * Lq + o_m, mask=o_m < Lq, other=0.0)
    tl.store(p_delta + i_bh * Lq + o_m, b_delta, mask=o_m < Lq)




@triton.jit
def _bwd_kv_inner_kernel(
    b_dk, b_dv, b_k, b_v, m_col,
    p_qh,     # q of (b, first query head of this kv head); head g at p_qh + g * s_qh
    p_doh,    # dout, same; head g at p_doh + g * s_doh
    p_lseh,   # lse of (b, first query head): (GROUP, Lq) fp32 rows
    p_deltah,  # delta, same layout
    p_dqh,    # (GROUP, Lq, D) fp32 dq accumulator rows, written only when ATOMIC_DQ
    s_qh, s_qm, s_doh, s_dom, Lq, m_lo, o_n, offset, o_d, qk_scale, sm_scale,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, MASK_CAUSAL: tl.constexpr,
    MASK_COL: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr, DQ_T: tl.constexpr,
):
    """dK, dV (dK unscaled) of a held key block from rows [m_lo, Lq) of the GROUP heads (one flat loop), + dQ."""
    n_it = tl.cdiv(Lq - m_lo, BLOCK_M)
    for it in tl.range(0, GROUP * n_it):
        g = it // n_it
        o_m = m_lo + (it - g * n_it) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < Lq
        m_q = m_m[:, None]
        if D != D_PAD:
            m_q = m_q & (o_d < D)[None, :]
        b_q = tl.load(p_qh + g * s_qh + o_m[:, None] * s_qm + o_d[None, :], mask=m_q, other=0.0)
        b_lse = tl.load(p_lseh + g * Lq + o_m, mask=m_m, other=float("inf"))
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * _LOG2E
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M) = S^T, log2
        b_pt = tl.math.exp2(b_st - b_lse[None, :])
        if MASK_CAUSAL:  # a compare per element: cheaper than a second (diagonal-only) loop and its pipeline
            b_pt = tl.where((o_m[None, :] + offset) >= o_n[:, None], b_pt, 0.0)
        if MASK_COL:  # padded keys: P = 0, so they add nothing to dQ and get dK = dV = 0
            b_pt = tl.where(m_col[:, None], b_pt, 0.0)
        b_do = tl.load(p_doh + g * s_doh + o_m[:, None] * s_dom + o_d[None, :], mask=m_q, other=0.0)
        b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PREC)
        b_delta = tl.load(p_deltah + g * Lq + o_m, mask=m_m, other=0.0)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)
        b_dst = (b_pt * (b_dpt - b_delta[None, :])).to(b_q.dtype)
        b_dk = tl.dot(b_dst, b_q, b_dk, input_precision=DOT_PREC)
        if ATOMIC_DQ and DQ_T:  # sm_90: dQ^T = K^T dS^T (K^T is a view of K's shared tile, no register transpose)
            b_dqt = tl.dot(tl.trans(b_k), b_dst, input_precision=DOT_PREC) * sm_scale  # (D_PAD, BLOCK_M)
            tl.atomic_add(p_dqh + (g * Lq + o_m)[None, :] * D + o_d[:, None], b_dqt, mask=tl.trans(m_q), sem="relaxed")
        elif ATOMIC_DQ:  # sm_8x (mma.sync): dQ = dS K (the transposed form spills there)
            b_dq = tl.dot(tl.trans(b_dst), b_k, input_precision=DOT_PREC) * sm_scale
            tl.atomic_add(p_dqh + (g * Lq + o_m)[:, None] * D + o_d[None, :], b_dq, mask=m_q, sem="relaxed")
    return b_dk, b_dv


@triton.jit
def _prefix_attn_bwd_kv_kernel(
    p_q, p_k, p_v,  # as in the forward
    p_pk, p_pv,     # (Hkv, P, D)
    p_kpm,          # (B, Lk) uint8
    p_do,           # (B, Hq, Lq, D) dout
    p_lse,          # (B, Hq, Lq) fp32 from the forward
    p_delta,        # (B, Hq, Lq) fp32 from the preprocess
    p_dk, p_dv,     # (B, Hkv, Lk, D) contiguous, input dtype
    p_dpk, p_dpv,   # (B, Hkv, P, D) fp32 contiguous per-batch prefix partials
    p_dqa,          # (B, Hq, Lq, D) fp32 contiguous, zeroed: dq accumulator (written only when ATOMIC_DQ)
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_pkh, s_pkn, s_pvh, s_pvn, s_mb, s_mn, s_dob, s_doh, s_dom,
    BH, Hkv, Lq, Lk, P, n_prefix_blocks, sm_scale, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr, DQ_T: tl.constexpr,
):
    """Program i_n * BH + (b * Hkv + h_kv): key block i_n of [prefix blocks ; token blocks] (the heaviest, first
    blocks first); sums the GROUP query heads; with ATOMIC_DQ also adds every query block's dQ share."""
    pid = tl.program_id(0)
    i_n = pid // BH
    i_bh = (pid % BH).to(tl.int64)
    i_b = i_bh // Hkv
    i_hk = i_bh % Hkv
    o_d = tl.arange(0, D_PAD)
    is_prefix = i_n < n_prefix_blocks
    if is_prefix:
        n0 = i_n * BLOCK_N
        n_end = P
        p_kb = p_pk + i_hk * s_pkh
        p_vb = p_pv + i_hk * s_pvh
        s_kn_src = s_pkn
        s_vn_src = s_pvn
    else:
        n0 = (i_n - n_prefix_blocks) * BLOCK_N
        n_end = Lk
        p_kb = p_k + i_b * s_kb + i_hk * s_kh
        p_vb = p_v + i_b * s_vb + i_hk * s_vh
        s_kn_src = s_kn
        s_vn_src = s_vn
    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = o_n < n_end
    m_kv = m_n[:, None]
    if D != D_PAD:
        m_kv = m_kv & (o_d < D)[None, :]
    b_k = tl.load(p_kb + o_n[:, None] * s_kn_src + o_d[None, :], mask=m_kv, other=0.0)
    b_v = tl.load(p_vb + o_n[:, None] * s_vn_src + o_d[None, :], mask=m_kv, other=0.0)
    if HAS_KPM:  # token keys that are padding (the prefix is never masked: other=1)
        m_col = tl.load(p_kpm + i_b * s_mb + o_n * s_mn, mask=m_n & (i_n >= n_prefix_blocks), other=1) != 0
    else:
        m_col = m_n
    b_dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    b_dv = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    offset = Lk - Lq
    # query rows that see the block: all for the prefix and non-causal; causal tokens from n0 - offset on (the
    # causal mask is applied with offset 2^30 for the prefix: every query sees every prefix key)
    if CAUSAL:
        m_lo = tl.where(is_prefix, 0, (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M)
    else:
        m_lo = 0
    i_bhq = i_b * (Hkv * GROUP) + i_hk * GROUP  # (b, first query head of this kv head)
    b_dk, b_dv = _bwd_kv_inner_kernel(b_dk, b_dv, b_k, b_v, m_col,
                                      p_q + i_b * s_qb + i_hk * GROUP * s_qh, p_do + i_b * s_dob + i_hk * GROUP * s_doh,
                                      p_lse + i_bhq * Lq, p_delta + i_bhq * Lq, p_dqa + i_bhq * Lq * D,
                                      s_qh, s_qm, s_doh, s_dom, Lq, m_lo, o_n, tl.where(is_prefix, 1 << 30, offset),
                                      o_d, qk_scale, sm_scale,
                                      GROUP, D, D_PAD, BLOCK_M, CAUSAL, HAS_KPM, ATOMIC_DQ, DOT_PREC, DQ_T)
    b_dk = b_dk * sm_scale
    if is_prefix:
        o_row = (i_bh * P + o_n)[:, None] * D + o_d[None, :]
        tl.store(p_dpk + o_row, b_dk, mask=m_kv)
        tl.store(p_dpv + o_row, b_dv, mask=m_kv)
    else:
        o_row = (i_bh * Lk + o_n)[:, None] * D + o_d[None, :]
        tl.store(p_dk + o_row, b_dk.to(p_dk.dtype.element_ty), mask=m_kv)
        tl.store(p_dv + o_row, b_dv.to(p_dv.dtype.element_ty), mask=m_kv)


@triton.jit
def _bwd_dq_inner_kernel(
    b_dq, b_q, b_do, b_lse, b_delta,
    p_kb, p_vb,  # keys / values of one source for this (b, kv head)
    p_mb,        # key padding mask row (uint8), read only when HAS_KPM
    s_kn, s_vn, s_mn, n_lo, n_hi, n_end, q_pos, o_d, qk_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_CAUSAL: tl.constexpr, MASK_END: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dQ (not yet scaled) of one held query block from keys [n_lo, n_hi); b_lse in log2 units (+inf: empty row)."""
    for n0 in tl.range(n_lo, n_hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        b_k = _load_rows_kernel(p_kb + o_n[:, None] * s_kn, o_n, n_end, o_d, MASK_END, D, D_PAD)
        b_v = _load_rows_kernel(p_vb + o_n[:, None] * s_vn, o_n, n_end, o_d, MASK_END, D, D_PAD)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
        b_p = tl.math.exp2(b_s - b_lse[:, None])
        if MASK_CAUSAL or MASK_END or HAS_KPM:
            m_col = tl.full((BLOCK_N,), 1, tl.int1)
            if MASK_END:
                m_col = m_col & (o_n < n_end)
            if HAS_KPM:
                m_col = m_col & (tl.load(p_mb + o_n * s_mn, mask=o_n < n_end, other=0) != 0)
            m_s = m_col[None, :]
            if MASK_CAUSAL:
                m_s = m_s & (q_pos[:, None] >= o_n[None, :])
            b_p = tl.where(m_s, b_p, 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PREC)
    return b_dq




@triton.jit
def _prefix_attn_bwd_dq_kernel(
    p_q, p_k, p_v, p_pk, p_pv, p_kpm, p_do, p_lse, p_delta,  # as in the dkdv kernel
    p_dq,  # (B, Hq, Lq, D) contiguous, input dtype
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_pkh, s_pkn, s_pvh, s_pvn, s_mb, s_mn, s_dob, s_doh, s_dom,
    BH, Hq, Lq, Lk, P, sm_scale, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq of one query block: keys of the prefix, then the tokens (same ranges as the forward). The deterministic
    path (no atomics): a second recomputation of S and dP, 2 of the 7 GEMM-sized passes."""
    i_m, i_bh = _block_ids_kernel(BH)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // GROUP
    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D_PAD)
    m_m = o_m < Lq
    m_q = m_m[:, None]
    if D != D_PAD:
        m_q = m_q & (o_d < D)[None, :]
    b_q = tl.load(p_q + i_b * s_qb + i_h * s_qh + o_m[:, None] * s_qm + o_d[None, :], mask=m_q, other=0.0)
    b_do = tl.load(p_do + i_b * s_dob + i_h * s_doh + o_m[:, None] * s_dom + o_d[None, :], mask=m_q, other=0.0)
    b_lse = tl.load(p_lse + i_bh * Lq + o_m, mask=m_m, other=float("inf"))
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * _LOG2E
    b_delta = tl.load(p_delta + i_bh * Lq + o_m, mask=m_m, other=0.0)
    b_dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    offset = Lk - Lq
    q_pos = o_m + offset

    p_full = (P // BLOCK_N) * BLOCK_N
    p_pkb = p_pk + i_hk * s_pkh
    p_pvb = p_pv + i_hk * s_pvh
    b_dq = _bwd_dq_inner_kernel(b_dq, b_q, b_do, b_lse, b_delta, p_pkb, p_pvb, p_kpm, s_pkn, s_pvn, s_mn,
                                0, p_full, P, q_pos, o_d, qk_scale, D, D_PAD, BLOCK_N, False, False, False, DOT_PREC)
    b_dq = _bwd_dq_inner_kernel(b_dq, b_q, b_do, b_lse, b_delta, p_pkb, p_pvb, p_kpm, s_pkn, s_pvn, s_mn,
                                p_full, P, P, q_pos, o_d, qk_scale, D, D_PAD, BLOCK_N, False, True, False, DOT_PREC)
    if CAUSAL:
        n_hi = tl.minimum(Lk, m0 + BLOCK_M + offset)
        n_full = tl.minimum(((m0 + offset + 1) // BLOCK_N) * BLOCK_N, (Lk // BLOCK_N) * BLOCK_N)
    else:
        n_hi = Lk
        n_full = (Lk // BLOCK_N) * BLOCK_N
    p_kb = p_k + i_b * s_kb + i_hk * s_kh
    p_vb = p_v + i_b * s_vb + i_hk * s_vh
    p_mb = p_kpm + i_b * s_mb
    b_dq = _bwd_dq_inner_kernel(b_dq, b_q, b_do, b_lse, b_delta, p_kb, p_vb, p_mb, s_kn, s_vn, s_mn,
                                0, n_full, Lk, q_pos, o_d, qk_scale, D, D_PAD, BLOCK_N,
                                False, False, HAS_KPM, DOT_PREC)
    b_dq = _bwd_dq_inner_kernel(b_dq, b_q, b_do, b_lse, b_delta, p_kb, p_vb, p_mb, s_kn, s_vn, s_mn,
                                n_full, n_hi, Lk, q_pos, o_d, qk_scale, D, D_PAD, BLOCK_N,
                                CAUSAL, True, HAS_KPM, DOT_PREC)
    b_dq = b_dq * sm_scale
    tl.store(p_dq + (i_bh * Lq + o_m)[:, None] * D + o_d[None, :], b_dq.to(p_dq.dtype.element_ty), mask=m_q)


def __getattr__(name: str) -> Any:
    """The launch-side names of the op contract (dispatch_space, record_launches, the launchers, the config
    helpers) live in kernels/prefix_attention_launch.py; they are forwarded lazily so this file holds kernels only."""
    if not name.startswith("__"):
        from . import prefix_attention_launch

        if hasattr(prefix_attention_launch, name):
            return getattr(prefix_attention_launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
