"""Prefix-augmented flash attention in Triton: causal attention of q over [prefix ; tokens].

q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D), Lq <= Lk when causal (queries are the last Lq positions, bottom-right
alignment); prefix_k, prefix_v: (Hkv, P, D) shared by the batch; key_padding_mask (B, Lk) bool, True = real token.
Every query sees the whole prefix and the tokens up to its own position; the padding mask never hides the prefix;
a row that sees no key gives 0 and lse = -inf. The spec is kernels/prefix_attention_ref.py.

Design
------
The prefix is a second key/value source, never concatenated or expanded: each kernel runs its key loop twice, once
over the prefix buffer (no causal or padding mask, only the P bound) and once over the tokens (the causal and
padding masks), sharing one online softmax (fp32, base-2 exponent with scale * log2(e) folded into the scores).
Token key blocks are split in a mask-free part (blocks every query of the tile sees) and a masked part (the
diagonal and the Lk edge); the padding mask, when there is one, is one (BLOCK_N,) byte load per key block.
head_dim D is padded to D_PAD = max(16, next_pow2(D)) in registers only (masked loads/stores).
Strides are passed for every tensor (transformers hands over q/k/v as transposed views); the last dim must be
contiguous (the launcher copies otherwise).

  forward      `_prefix_attn_fwd_kernel`, grid (cdiv(Lq, BM), B * Hq), heaviest query blocks first. Writes out and
               lse (natural log, fp32) for the backward.
  decode       Lq <= DECODE_MAX_LQ: `_prefix_attn_decode_kernel` packs the GROUP query heads of one kv head and
               the Lq queries into the rows of one tile (K/V are read once per kv head, not once per query head),
               and splits the keys flash-decoding style: split s covers a chunk of the prefix or of the tokens, so
               B * Hkv * row_blocks * splits programs fill the GPU even at B = 1; `_prefix_attn_combine_kernel`
               merges the per-split (out, lse) pairs.
  backward     `_prefix_attn_bwd_preprocess_kernel` delta = rowsum(dO * O) - dlse; `_prefix_attn_bwd_dkdv_kernel`
               one program per key block of (prefix blocks ; token blocks) x (b, kv head), looping over the GROUP
               query heads and the query blocks that see the block: token dk/dv written once (GQA summed in the
               program), prefix dk/dv written to fp32 partials (B, Hkv, P, D), summed over the batch afterwards
               in a fixed order (torch.sum): deterministic, no atomics. `_prefix_attn_bwd_dq_kernel` one program
               per query block, keys as in the forward.

Napkin math (H200: ~990 TFLOP/s dense bf16, 4.8 TB/s; B=8, H=32, L=2048, D=128, P=30, bf16)
  forward FLOPs   4 B H D (L (L+1) / 2 + L P) = 2.75e11 (causal part) + 8.1e9 (prefix: +2.9 %) = 2.83e11.
                  The no-prefix SDPA floor takes 0.553 ms (~500 TFLOP/s); the same efficiency with the prefix is
                  0.569 ms = 1.03x the floor; the goal (1.10x) leaves 7 % for a Triton kernel's lower efficiency.
  forward bytes   q, k, v, o: 4 * 2 B H L D = 537 MB -> 0.11 ms at 4.8 TB/s: compute-bound (intensity ~530).
                  The prefix is Hkv * P * D * 2 * 2 = 0.5 MB, read by every program from L2.
  backward        5 GEMMs per tile (recompute S, dP, dV, dK, dQ) = 2.5x the forward: 7.1e11; the prefix adds its
                  own 2.9 % plus a B x Hkv x P x D fp32 partial per grad (2 x 3.9 MB written + read: ~3 us).
  D = 80/96       padded to 128: 60 % / 33 % extra tensor-core work on the padding (a kernel with a 64 + 16/32
                  split of D would avoid it; not done yet).
  decode          Lq = 1, Lk = 2048, MHA: K and V are 2 B H Lk D * 2 = 268 MB -> 56 us floor. With B = 1 only
                  32 programs would run on 132 SMs without the split; the split targets ~2 programs per SM.
Blocks come from a deterministic per-head-dim table (`fwd_config`, `bwd_dkdv_config`, `bwd_dq_config`,
`decode_config`); every config they can return is compiled for sm_90 in tests/test_sm90_prefix_attention.py
(no spills, shared memory <= 227 KiB, with the launch-time 16-divisibility of pointers and strides). No
autotuning. The tiles are first guesses that compile cleanly: they have not been timed on an H200 yet (no GPU
for this issue); benchmarks/bench_prefix_attention.py measures them against SDPA.

Precision: fp32 accumulation and softmax; P and dS are rounded to the input dtype as tl.dot operands (as flash
attention does). fp32 inputs use input_precision "ieee" unless torch allows TF32 matmuls.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, dot_precision  # noqa: F401 (INTERPRETED: tests read it here)

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the kernels' copies
_LN2 = tl.constexpr(0.6931471805599453)
DECODE_MAX_LQ = 16  # q_len up to this takes the split-K decode path
MAX_HEAD_DIM = 256
MAX_DECODE_SPLITS = 128  # a power of two (the combine kernel's S_PAD)


# ------------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class AttnConfig:
    """Tile shape and launch parameters of one kernel: rows (queries) x cols (keys) per program."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def head_dim_pad(D: int) -> int:
    """D padded to a power of two >= 16 (tl.arange and tl.dot need it)."""
    return max(16, triton.next_power_of_2(D))


# Tiles per padded head_dim, checked for sm_90 (no spills, shared <= 227 KiB) by tests/test_sm90_prefix_attention.py.
# fp16/bf16: wgmma tiles. fp32 (a test dtype) with exact "ieee" dots lowers to FMAs that hold both operands in
# registers, so it gets small tiles (fine for its tiny test shapes). Speed guesses until tuned on the H200 with
# benchmarks/bench_prefix_attention.py.
_HALF_TILES = {  # d_pad limit: (fwd, dkdv, dq, decode block_n)
    64: (AttnConfig(128, 64, 8, 3), AttnConfig(32, 128, 8, 2), AttnConfig(128, 64, 8, 2), 64),
    128: (AttnConfig(128, 64, 8, 3), AttnConfig(16, 64, 8, 2), AttnConfig(128, 32, 8, 2), 64),
    256: (AttnConfig(64, 64, 8, 2), AttnConfig(32, 32, 8, 1), AttnConfig(64, 32, 8, 2), 32),
}
_FP32_TILES = {
    128: (AttnConfig(32, 16, 8, 1), AttnConfig(16, 16, 4, 1), AttnConfig(32, 16, 8, 1), 16),
    256: (AttnConfig(32, 16, 8, 1), AttnConfig(16, 16, 8, 1), AttnConfig(32, 16, 8, 1), 16),
}


def _tiles(d_pad: int, dtype: torch.dtype) -> tuple[AttnConfig, AttnConfig, AttnConfig, int]:
    if d_pad > MAX_HEAD_DIM:
        raise ValueError(f"head_dim padded to {d_pad} is above {MAX_HEAD_DIM}")
    table = _FP32_TILES if dtype == torch.float32 else _HALF_TILES
    return table[min(k for k in table if k >= d_pad)]


def fwd_config(d_pad: int, dtype: torch.dtype) -> AttnConfig:
    """Forward tiles: block_m queries held, block_n keys streamed."""
    return _tiles(d_pad, dtype)[0]


def bwd_dkdv_config(d_pad: int, dtype: torch.dtype) -> AttnConfig:
    """dK/dV tiles: block_n keys held (dk, dv accumulate in registers), block_m queries streamed."""
    return _tiles(d_pad, dtype)[1]


def bwd_dq_config(d_pad: int, dtype: torch.dtype) -> AttnConfig:
    """dQ tiles: block_m queries held (dq accumulates in registers), block_n keys streamed."""
    return _tiles(d_pad, dtype)[2]


def decode_config(d_pad: int, dtype: torch.dtype, rows: int) -> AttnConfig:
    """Decode tiles: block_m >= the GROUP * Lq packed rows (capped at 64, 32 for fp32), block_n keys streamed."""
    block_n = _tiles(d_pad, dtype)[3]
    if dtype == torch.float32:
        return AttnConfig(min(32, max(16, triton.next_power_of_2(rows))), block_n, 8, 1)
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if d_pad > 128:
        return AttnConfig(block_m, block_n, 8 if block_m == 64 else 4, 2)
    return AttnConfig(block_m, block_n, 4, 3 if block_m < 64 else 2)


DECODE_BLOCK_MS = (16, 32, 64)  # every block_m decode_config can return (fp32: 16, 32)


PREPROCESS_BLOCK_M = 64
COMBINE_CHUNK = 16  # splits the combine kernel reads at a time


def decode_chunk(n_programs: int, P: int, Lk: int, block_n: int, num_sms: int) -> int:
    """Keys per split of the decode path: a multiple of block_n chosen so that n_programs (B * Hkv * row blocks)
    times the number of splits reaches about 2 programs per SM, with at most MAX_DECODE_SPLITS splits."""
    total = max(P + Lk, 1)
    want = max(1, min(MAX_DECODE_SPLITS // 2, triton.cdiv(2 * num_sms, max(n_programs, 1))))
    chunk = triton.cdiv(triton.cdiv(total, want), block_n) * block_n
    while triton.cdiv(P, chunk) + triton.cdiv(Lk, chunk) > MAX_DECODE_SPLITS:
        chunk *= 2
    return max(chunk, block_n)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small "GPU" so the tests exercise several splits at small shapes


# ------------------------------------------------------------------------------------------------ forward
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
    """Online softmax over keys [n_lo, n_hi) of one source; q_pos (BLOCK_M,) = each row's causal position."""
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
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
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
    Hq, Lq, Lk, P, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """out[b, h, m0:m0+BM] and lse for one query block; qk_scale = scale * log2(e)."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last) query blocks first
    i_bh = tl.program_id(1).to(tl.int64)
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
    B, Hkv, Lq, Lk, P, qk_scale, chunk, n_prefix_splits,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One split of the keys for BLOCK_M packed rows (query head g of the kv head's group, query i): row r is
    (g, i) = (r // Lq, r % Lq). Splits [0, n_prefix_splits) cover the prefix in chunks, the rest the tokens."""
    i_s = tl.program_id(0)
    i_r = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
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
# the GROUP query heads. The dkdv kernel holds one key block and streams the query blocks that see it (causal:
# query i sees token j iff i + Lk - Lq >= j, so blocks from max(0, n0 - offset) on; only those straddling the
# diagonal need the element mask). Column masks (padding, the Lk/P edge) touch only their own column of dK/dV,
# so the kernel applies them once, zeroing those rows at the end. The dq kernel walks keys like the forward.
@triton.jit
def _prefix_attn_bwd_preprocess_kernel(
    p_o,     # (B, Hq, Lq, D) out, contiguous
    p_do,    # (B, Hq, Lq, D) dout, any strides, last dim contiguous
    p_dlse,  # (B, Hq, Lq) fp32 contiguous (read only when HAS_DLSE)
    p_delta,  # (B, Hq, Lq) fp32 out
    s_dob, s_doh, s_dom, Hq, Lq,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
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
def _bwd_dkdv_inner_kernel(
    b_dk, b_dv, b_k, b_v,
    p_qb,     # q of this (b, h)
    p_dob,    # dout of this (b, h)
    p_lseb,   # lse row of this (b, h): (Lq,) fp32
    p_deltab,  # delta row of this (b, h)
    s_qm, s_dom, Lq, m_lo, m_hi, o_n, offset, o_d, qk_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, MASK_CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dK/dV (not yet scaled) of one held key block from query rows [m_lo, m_hi); rows >= Lq read lse = +inf."""
    for m0 in tl.range(m_lo, m_hi, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < Lq
        m_q = m_m[:, None]
        if D != D_PAD:
            m_q = m_q & (o_d < D)[None, :]
        b_q = tl.load(p_qb + o_m[:, None] * s_qm + o_d[None, :], mask=m_q, other=0.0)
        b_lse = tl.load(p_lseb + o_m, mask=m_m, other=float("inf"))
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * _LOG2E
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M) = S^T, log2
        b_pt = tl.math.exp2(b_st - b_lse[None, :])
        if MASK_CAUSAL:
            b_pt = tl.where((o_m[None, :] + offset) >= o_n[:, None], b_pt, 0.0)
        b_do = tl.load(p_dob + o_m[:, None] * s_dom + o_d[None, :], mask=m_q, other=0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PREC)
        b_delta = tl.load(p_deltab + o_m, mask=m_m, other=0.0)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PREC)
    return b_dk, b_dv


@triton.jit
def _prefix_attn_bwd_dkdv_kernel(
    p_q, p_k, p_v,  # as in the forward
    p_pk, p_pv,     # (Hkv, P, D)
    p_kpm,          # (B, Lk) uint8
    p_do,           # (B, Hq, Lq, D) dout
    p_lse,          # (B, Hq, Lq) fp32 from the forward
    p_delta,        # (B, Hq, Lq) fp32 from the preprocess
    p_dk, p_dv,     # (B, Hkv, Lk, D) contiguous, input dtype
    p_dpk, p_dpv,   # (B, Hkv, P, D) fp32 contiguous per-batch prefix partials
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_pkh, s_pkn, s_pvh, s_pvn, s_mb, s_mn, s_dob, s_doh, s_dom,
    Hkv, Lq, Lk, P, n_prefix_blocks, sm_scale, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program (i_n, b * Hkv + h_kv): key block i_n of [prefix blocks ; token blocks]; sums the GROUP query heads."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
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
    b_dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    b_dv = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    offset = Lk - Lq
    # query rows that see the block: all for the prefix and non-causal; causal tokens from n0 - offset on, masked
    # up to m_mid (the rows below n0 + BLOCK_N - 1 - offset miss part of the block)
    if CAUSAL:
        m_lo = tl.where(is_prefix, 0, (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M)
        m_mid = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M,
                           tl.cdiv(Lq, BLOCK_M) * BLOCK_M)
        m_mid = tl.where(is_prefix, 0, tl.maximum(m_mid, m_lo))
    else:
        m_lo = 0
        m_mid = 0
    for g in range(GROUP):
        i_hq = i_hk * GROUP + g
        i_bhq = i_b * (Hkv * GROUP) + i_hq
        p_qb = p_q + i_b * s_qb + i_hq * s_qh
        p_dob = p_do + i_b * s_dob + i_hq * s_doh
        p_lseb = p_lse + i_bhq * Lq
        p_deltab = p_delta + i_bhq * Lq
        b_dk, b_dv = _bwd_dkdv_inner_kernel(b_dk, b_dv, b_k, b_v, p_qb, p_dob, p_lseb, p_deltab, s_qm, s_dom, Lq,
                                            m_lo, m_mid, o_n, offset, o_d, qk_scale,
                                            D, D_PAD, BLOCK_M, True, DOT_PREC)
        b_dk, b_dv = _bwd_dkdv_inner_kernel(b_dk, b_dv, b_k, b_v, p_qb, p_dob, p_lseb, p_deltab, s_qm, s_dom, Lq,
                                            m_mid, Lq, o_n, offset, o_d, qk_scale,
                                            D, D_PAD, BLOCK_M, False, DOT_PREC)
    b_dk = b_dk * sm_scale
    if is_prefix:
        o_row = (i_bh * P + o_n)[:, None] * D + o_d[None, :]
        tl.store(p_dpk + o_row, b_dk, mask=m_kv)
        tl.store(p_dpv + o_row, b_dv, mask=m_kv)
    else:
        if HAS_KPM:  # padded keys are seen by no query: zero their rows (the loops did not mask them)
            m_real = tl.load(p_kpm + i_b * s_mb + o_n * s_mn, mask=m_n, other=0) != 0
            b_dk = tl.where(m_real[:, None], b_dk, 0.0)
            b_dv = tl.where(m_real[:, None], b_dv, 0.0)
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
    Hq, Lq, Lk, P, sm_scale, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq of one query block: keys of the prefix, then the tokens (same ranges as the forward)."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
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


# ------------------------------------------------------------------------------------------------ launchers
def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _prep(q, k, v, prefix_k, prefix_v, key_padding_mask):
    """Inputs as the kernels read them: last dims contiguous, an empty prefix for None, the mask as uint8."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    if prefix_k is None:
        prefix_k = prefix_v = q.new_zeros((k.shape[1], 0, q.shape[-1]))
    prefix_k, prefix_v = _last_contiguous(prefix_k), _last_contiguous(prefix_v)
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.bool)
        kpm = kpm.view(torch.uint8)  # same bytes, any strides
    return q, k, v, prefix_k, prefix_v, kpm


def _common_args(q, k, v, pk, pv, kpm):
    mask_strides = (kpm.stride(0), kpm.stride(1)) if kpm is not None else (0, 0)
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), pk.stride(0), pk.stride(1), pv.stride(0), pv.stride(1),
            *mask_strides)


def prefix_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    *,
    config: AttnConfig | None = None,
    decode: bool | None = None,
    decode_chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher. q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D); prefix_k/v: (Hkv, P, D) or None;
    key_padding_mask: (B, Lk) bool or None. Returns out (B, Hq, Lq, D) contiguous in q's dtype and lse (B, Hq, Lq)
    fp32. decode=None picks the split-K path for Lq <= DECODE_MAX_LQ; config / decode_chunk_size override the
    tile table and the split size (tests)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, v, pk, pv, kpm = _prep(q, k, v, prefix_k, prefix_v, key_padding_mask)
    P = pk.shape[1]
    out = torch.empty((B, Hq, Lq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    d_pad = head_dim_pad(D)
    group = Hq // Hkv
    qk_scale = scale * LOG2E
    kpm_arg = kpm if kpm is not None else q  # never read when HAS_KPM is False
    strides = _common_args(q, k, v, pk, pv, kpm)
    if decode is None:
        decode = Lq <= DECODE_MAX_LQ
    prec = dot_precision(q.dtype)
    if decode:
        rows = group * Lq
        cfg = config or decode_config(d_pad, q.dtype, rows)
        n_row_blocks = triton.cdiv(rows, cfg.block_m)
        chunk = decode_chunk_size or decode_chunk(B * Hkv * n_row_blocks, P, Lk, cfg.block_n, _num_sms(q.device))
        n_ps, n_ts = triton.cdiv(P, chunk), triton.cdiv(Lk, chunk)
        if chunk % cfg.block_n or n_ps + n_ts > MAX_DECODE_SPLITS:
            raise ValueError(f"decode chunk {chunk} must be a multiple of block_n={cfg.block_n} and give at most "
                             f"{MAX_DECODE_SPLITS} splits (P={P}, Lk={Lk})")
        S = max(n_ps + n_ts, 1)
        o_part = torch.empty((S, B, Hq, Lq, D), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((S, B, Hq, Lq), device=q.device, dtype=torch.float32)
        if n_ps + n_ts == 0:  # no key at all (P == 0, Lk == 0, non-causal)
            o_part.zero_()
            lse_part.fill_(float("-inf"))
        else:
            _prefix_attn_decode_kernel[(S, n_row_blocks, B * Hkv)](
                q, k, v, pk, pv, kpm_arg, o_part, lse_part, *strides,
                B, Hkv, Lq, Lk, P, qk_scale, chunk, n_ps,
                GROUP=group, D=D, D_PAD=d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
                HAS_KPM=kpm is not None, DOT_PREC=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _prefix_attn_combine_kernel[(B * Hq * Lq,)](
            o_part, lse_part, out, lse, B * Hq * Lq, S, D=D, D_PAD=d_pad,
            S_PAD=MAX_DECODE_SPLITS, S_CHUNK=COMBINE_CHUNK, num_warps=4)
        return out, lse
    cfg = config or fwd_config(d_pad, q.dtype)
    grid = (triton.cdiv(Lq, cfg.block_m), B * Hq)
    _prefix_attn_fwd_kernel[grid](
        q, k, v, pk, pv, kpm_arg, out, lse, *strides, out.stride(0), out.stride(1), out.stride(2),
        Hq, Lq, Lk, P, qk_scale,
        GROUP=group, D=D, D_PAD=d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        HAS_KPM=kpm is not None, DOT_PREC=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def prefix_attention_bwd(
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
    *,
    dkdv_config: AttnConfig | None = None,
    dq_config: AttnConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher. dout: (B, Hq, Lq, D); dlse: (B, Hq, Lq) or None; out, lse from prefix_attention_fwd.
    Returns dq, dk, dv (shapes of q, k, v, contiguous, input dtype) and d(prefix_k), d(prefix_v) (Hkv, P, D),
    P = 0 when there is no prefix. Deterministic: no atomics; the prefix grads are summed over the batch by
    torch.sum over fp32 per-batch partials."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, v, pk, pv, kpm = _prep(q, k, v, prefix_k, prefix_v, key_padding_mask)
    dout = _last_contiguous(dout)
    P = pk.shape[1]
    dq = torch.empty((B, Hq, Lq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Hkv, Lk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Hkv, Lk, D), device=q.device, dtype=v.dtype)
    dpk_part = torch.empty((B, Hkv, P, D), device=q.device, dtype=torch.float32)
    dpv_part = torch.empty((B, Hkv, P, D), device=q.device, dtype=torch.float32)
    if Lq == 0 or B == 0:  # nothing attends: every grad is 0
        for t in (dq, dk, dv, dpk_part, dpv_part):
            t.zero_()
        return dq, dk, dv, dpk_part.sum(0).to(pk.dtype), dpv_part.sum(0).to(pv.dtype)
    d_pad = head_dim_pad(D)
    group = Hq // Hkv
    prec = dot_precision(q.dtype)
    delta = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    dlse_arg = dlse.contiguous().float() if dlse is not None else delta
    _prefix_attn_bwd_preprocess_kernel[(triton.cdiv(Lq, PREPROCESS_BLOCK_M), B * Hq)](
        out, dout, dlse_arg, delta, dout.stride(0), dout.stride(1), dout.stride(2), Hq, Lq,
        D=D, D_PAD=d_pad, BLOCK_M=PREPROCESS_BLOCK_M, HAS_DLSE=dlse is not None, num_warps=4)
    kpm_arg = kpm if kpm is not None else q
    strides = _common_args(q, k, v, pk, pv, kpm) + (dout.stride(0), dout.stride(1), dout.stride(2))
    qk_scale = scale * LOG2E
    c1 = dkdv_config or bwd_dkdv_config(d_pad, q.dtype)
    n_pb = triton.cdiv(P, c1.block_n)
    n_blocks = n_pb + triton.cdiv(Lk, c1.block_n)
    if n_blocks:
        _prefix_attn_bwd_dkdv_kernel[(n_blocks, B * Hkv)](
            q, k, v, pk, pv, kpm_arg, dout, lse, delta, dk, dv, dpk_part, dpv_part, *strides,
            Hkv, Lq, Lk, P, n_pb, scale, qk_scale,
            GROUP=group, D=D, D_PAD=d_pad, BLOCK_M=c1.block_m, BLOCK_N=c1.block_n, CAUSAL=causal,
            HAS_KPM=kpm is not None, DOT_PREC=prec, num_warps=c1.num_warps, num_stages=c1.num_stages)
    c2 = dq_config or bwd_dq_config(d_pad, q.dtype)
    _prefix_attn_bwd_dq_kernel[(triton.cdiv(Lq, c2.block_m), B * Hq)](
        q, k, v, pk, pv, kpm_arg, dout, lse, delta, dq, *strides,
        Hq, Lq, Lk, P, scale, qk_scale,
        GROUP=group, D=D, D_PAD=d_pad, BLOCK_M=c2.block_m, BLOCK_N=c2.block_n, CAUSAL=causal,
        HAS_KPM=kpm is not None, DOT_PREC=prec, num_warps=c2.num_warps, num_stages=c2.num_stages)
    dpk = dpk_part.sum(0).to(pk.dtype)  # fixed-order reduction over the batch
    dpv = dpv_part.sum(0).to(pv.dtype)
    return dq, dk, dv, dpk, dpv


# ------------------------------------------------------------------------------------------------ AOT space
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_FLOAT_ARGS = ("qk_scale", "sm_scale")
_F32_POINTERS = ("p_lse", "p_op", "p_lsep", "p_delta", "p_dlse", "p_dpk", "p_dpv")


_NOT_ALIGNED = ("p_kpm", "s_mb", "s_mn")  # the padding mask may be a sliced view with any length


def _aot_spec(kernel, dtype: torch.dtype, constexprs: dict, cfg: AttnConfig, label: str) -> dict:
    """A compile spec for tests/sm90.py (compile_sm90_many). Types carry ":16" where a launch with head_dim a
    multiple of 16 sees the argument divisible by 16 (pointers: 16-byte aligned), as Triton's launch-time
    specialisation marks it: every pointer and stride except the padding mask's; lengths may be anything."""
    t = _TY[dtype]
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name == "p_kpm":
            ty = "*u8"
        elif name in _F32_POINTERS:
            ty = "*fp32"
        elif name.startswith("p_"):
            ty = f"*{t}"
        elif name in _FLOAT_ARGS:
            ty = "fp32"
        else:
            ty = "i32"
        aligned = name.startswith(("p_", "s_")) and name not in _NOT_ALIGNED
        sig[name] = ty + (":16" if aligned else "")
    return {"fn": kernel, "signature": sig, "constexprs": dict(constexprs), "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages, "label": label}


def sm90_dispatch_space(full: bool = False) -> list[dict]:
    """Every (kernel, tile config) the launchers can dispatch to, as compile specs (see _aot_spec).

    Default (what a CPU test run compiles): bf16, one head_dim per row of the fp16/bf16 tile table (64, 80 for the
    128 row: the same tiles as 128 plus the padded-D masks, 256), the forward, decode (each block_m), dkdv and dq
    kernels with the heaviest flags (causal, padding mask, GQA), and the preprocess and combine kernels.
    full=True adds head_dims 16, 32, 96, 128, 192, fp16, the fp32 tiles (exact and TF32 dots: fp32 is a test
    dtype), and the flag variants (non-causal, no mask, MHA), which only remove code.
    """
    specs: list[dict] = []
    half_dims = [(64, 64), (80, 128), (256, 256)]  # one per tile row; 80 has the padded-D masks of the 128 row
    fp32_dims = [(80, 128), (256, 256)]
    runs = [(torch.bfloat16, "tf32", half_dims)]
    flag_sets = [(True, True, 4)]
    if full:
        extra = [(16, 16), (32, 32), (96, 128), (128, 128), (192, 256)]
        runs = [(torch.bfloat16, "tf32", half_dims + extra), (torch.float16, "tf32", half_dims + [(128, 128)]),
                (torch.float32, "ieee", fp32_dims + extra), (torch.float32, "tf32", fp32_dims)]
        flag_sets += [(False, False, 1), (True, False, 1), (False, True, 8)]
    for dtype, prec, dims in runs:
        for D, d_pad in dims:
            for causal, kpm, group in flag_sets:
                tag = (f"{_TY[dtype]}-{prec}-D{D}-{'causal' if causal else 'full'}-{'kpm' if kpm else 'nokpm'}"
                       f"-G{group}")
                base = dict(GROUP=group, D=D, D_PAD=d_pad, CAUSAL=causal, HAS_KPM=kpm, DOT_PREC=prec)
                for name, kernel, cfg in (("fwd", _prefix_attn_fwd_kernel, fwd_config(d_pad, dtype)),
                                          ("dkdv", _prefix_attn_bwd_dkdv_kernel, bwd_dkdv_config(d_pad, dtype)),
                                          ("dq", _prefix_attn_bwd_dq_kernel, bwd_dq_config(d_pad, dtype))):
                    consts = dict(base, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
                    specs.append(_aot_spec(kernel, dtype, consts, cfg, f"{name}-{tag}"))
                for cfg in sorted({decode_config(d_pad, dtype, rows) for rows in DECODE_BLOCK_MS},
                                  key=lambda c: c.block_m):
                    consts = dict(base, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
                    specs.append(_aot_spec(_prefix_attn_decode_kernel, dtype, consts, cfg,
                                           f"decode-M{cfg.block_m}-{tag}"))
    small = AttnConfig(PREPROCESS_BLOCK_M, 16, 4, 1)
    for dtype, D, d_pad in ((torch.bfloat16, 80, 128), (torch.float32, 256, 256)):
        specs.append(_aot_spec(_prefix_attn_bwd_preprocess_kernel, dtype,
                               dict(D=D, D_PAD=d_pad, BLOCK_M=PREPROCESS_BLOCK_M, HAS_DLSE=True), small,
                               f"preprocess-{_TY[dtype]}-D{D}"))
        specs.append(_aot_spec(_prefix_attn_combine_kernel, dtype,
                               dict(D=D, D_PAD=d_pad, S_PAD=MAX_DECODE_SPLITS, S_CHUNK=COMBINE_CHUNK), small,
                               f"combine-{_TY[dtype]}-D{D}"))
    return specs
