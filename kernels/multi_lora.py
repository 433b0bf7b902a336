"""Triton kernels for multi-LoRA: many adapters in one batch, one adapter index per token (SGMV-style).

    out[m] += s[i] * (x[m] A_i^T) B_i^T,   i = idx[m] in [0, n);  idx[m] = -1 (or out of range): untouched

x: (M, K), A stack: (n, R, K), B stack: (n, N, R) (adapters zero-padded to the largest rank R), s: (n,) fp32.

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
     R padded to R_PAD = max(16, next_pow2(R)) in registers. SPLIT_K > 1 for decode, where only a few tiles
     exist: partial sums go to separate slabs (deterministic, no atomics, no extra launch).
  2. `_multi_lora_expand_kernel`  grid (T_MAX, cdiv(N, BLOCK_N)): out[rows, n-tile] += s_a * (sum of h slabs)
     B_a^T, R in chunks of BLOCK_R: one read-modify-write of each adapted out element, nothing else touched.
The grouping metadata (6 small torch ops) depends on idx only: it is cached per root index tensor (and its
version), so all LoRA layers of one forward share it (LoraLayer hands them views of one tensor); it is never
cached while a CUDA graph is being captured, so a captured graph recomputes it from the index buffer.
Fused qkv layers (GPT-2's c_attn) are one linear layer, so their q/k/v slices are one launch pair already.

Napkin math (H200 ~4.8 TB/s, bf16, K = N = 4096, R = 16, 8 adapters)
  decode 32 x 1   weights 8 x (RK + NR) x 2 B = 2 MiB per layer -> ~0.5 us of HBM; x + out 0.75 MiB. The floor
                  is launch latency: 2 launches (~3-5 us) per layer (+ the grouping once per forward) vs PEFT's
                  ~5 per adapter (8 adapters: ~40). The CUDA BGMV kernel (csrc/) does it in 1 launch.
                  BM = 16 tiles: 8 adapters x 4 tokens waste 3/4 of each tl.dot tile, irrelevant at these FLOPs;
                  SPLIT_K brings the shrink to ~2 waves of SMs.
  prefill 32x512  M = 16384: shrink reads x once (128 MiB -> 28 us), 2MKR = 2.1 GFLOP; expand reads + writes out
                  (256 MiB -> 56 us) - the same bytes as a single-adapter epilogue, whatever the adapter mix.
                  The extra over one adapter is the sort/gather (M ints) and <= n spare tiles.
Precision: fp32 accumulation; h stays fp32 and is rounded to B's dtype only as the tl.dot operand; the
adapter weights are cast to x's dtype for the shrink dot. fp32 uses "ieee" unless torch allows TF32.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, Launch  # importing it applies the interpreter's bf16 fix under TRITON_INTERPRET
from ._common import dot_precision as _dot_precision

MAX_RANK = 256
MAX_ADAPTERS = 1024  # the in-kernel segment search loads next_pow2(n + 1) offsets
DECODE_MAX_M = 256  # up to this many tokens: 16-row tiles and a split shrink


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
    for r0 in tl.static_range(0, R_PAD, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        m_h = m_row[:, None] & m_r[None, :]
        p_h_blk = p_h + o_tok[:, None] * s_hm + o_r[None, :] * s_hr
        b_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for i_s in tl.static_range(SPLIT_K):
            b_h += tl.load(p_h_blk + i_s * s_hs, mask=m_h, other=0.0)
        b_b = tl.load(p_b_ad + o_r[:, None] * s_br + o_n[None, :] * s_bN, mask=m_r[:, None] & m_n[None, :],
                      other=0.0)
        b_acc = tl.dot((b_h * b_scale).to(b_b.dtype), b_b, b_acc, input_precision=DOT_PREC)
    p_out_blk = p_out + o_tok[:, None] * s_om + o_n[None, :] * s_on
    m_out = m_row[:, None] & m_n[None, :]
    b_acc += tl.load(p_out_blk, mask=m_out, other=0.0).to(tl.float32)
    tl.store(p_out_blk, b_acc.to(p_out.dtype.element_ty), mask=m_out)


# ================================================================================================ launchers
@dataclass(frozen=True)
class MultiLoraConfig:
    """Tiles: BLOCK_M tokens per tile (shared by both kernels: the grouping depends on it); the shrink's BLOCK_K,
    warps and stages; the expand's BLOCK_N, BLOCK_R (rank chunk), warps and stages."""

    block_m: int
    block_k: int
    block_n: int
    block_r: int = 32
    shrink_warps: int = 4
    expand_warps: int = 4
    shrink_stages: int = 3
    expand_stages: int = 2


INTERPRETER_CONFIG = MultiLoraConfig(16, 32, 32, 16, 4, 4, 1, 1)
_override: MultiLoraConfig | None = None
_override_split: int | None = None


@contextlib.contextmanager
def use_config(config: MultiLoraConfig | None = None, split_k: int | None = None) -> Iterator[None]:
    """Inside the block the launcher uses this fixed config / shrink split (None: the normal choice)."""
    global _override, _override_split
    old = _override, _override_split
    _override, _override_split = config, split_k
    try:
        yield
    finally:
        _override, _override_split = old


def rank_pad(r: int) -> int:
    """The rank padded for tl.dot: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(max(r, 1)))


def gpu_config(M: int, r_pad: int, dtype: torch.dtype) -> MultiLoraConfig:
    """Deterministic GPU tiles (no autotuning: the kernels are memory- or launch-bound), checked free of
    register spills on sm_90 by tests/test_sm90_multi_lora.py.

    Decode (M <= DECODE_MAX_M): 16-token tiles, since a handful of tokens share an adapter. Prefill: 64-token
    tiles (32 above R_PAD 64, and for fp32). The shrink's (BLOCK_K, R_PAD) weight tile is kept to 4096
    elements per 4 warps (2048 for fp32 FMA dots); the expand works through R in chunks of BLOCK_R. Gathered rows make
    every pointer 64-bit, which is what sets the register budget here.
    """
    fp32 = dtype == torch.float32
    shrink_warps = 8 if r_pad >= 256 else 4
    budget = (2048 if fp32 else 4096) * (shrink_warps // 4)
    block_k = max(32 if shrink_warps == 8 else 16, min(128, budget // r_pad))
    if M <= DECODE_MAX_M:
        return MultiLoraConfig(16, block_k, 64, min(r_pad, 16 if fp32 else 32), shrink_warps, 4, 3, 2)
    if fp32:
        return MultiLoraConfig(32, min(block_k, 32), 64, 16, shrink_warps, 4, 3, 2)
    bm = 64 if r_pad <= 64 else 32
    return MultiLoraConfig(bm, min(block_k, 64), 128, min(r_pad, 32), shrink_warps, 8, 3, 2)


def config_for(M: int, r_pad: int, dtype: torch.dtype) -> MultiLoraConfig:
    """The config the launcher uses: `use_config` override, the interpreter's small tiles, else `gpu_config`."""
    if _override is not None:
        return _override
    if INTERPRETED:
        return INTERPRETER_CONFIG
    return gpu_config(M, r_pad, dtype)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_for(M: int, n: int, K: int, cfg: MultiLoraConfig, device: torch.device) -> int:
    """Shrink split over K: about two waves of SMs for decode, 1 for prefill."""
    if _override_split is not None:
        return max(1, min(_override_split, triton.cdiv(K, cfg.block_k)))
    tiles = min(triton.cdiv(M, cfg.block_m), n)  # tiles that do work when adapters are evenly mixed
    want = triton.cdiv(2 * _num_sms(device), max(tiles, 1))
    return max(1, min(want, triton.cdiv(K, 4 * cfg.block_k), 16))


@dataclass(frozen=True)
class Grouping:
    """Tokens grouped by adapter (device tensors, computed without a host sync)."""

    perm: torch.Tensor       # (M,) int64
    seg_start: torch.Tensor  # (n + 1,) int64
    tile_off: torch.Tensor   # (n + 1,) int64
    n_tiles_max: int         # grid size: cdiv(M, BLOCK_M) + n


# id(root of idx) -> (weak reference to the root, key, Grouping); an entry leaves when the root is freed.
_groupings: dict[int, tuple[weakref.ref, tuple, Grouping]] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def group_tokens(idx: torch.Tensor, n: int, block_m: int) -> Grouping:
    """Group the tokens of `idx` (M,) (values in [0, n) adapt, anything else does not) by adapter.

    Cached on idx's root tensor (views share it: every LoRA layer of a forward sees a view of one index tensor),
    its version counter (in-place writes bump it), the view's geometry, n and block_m. Not cached while a CUDA
    graph is being captured, so the captured graph always holds the grouping kernels.
    """
    root = idx._base if idx._base is not None else idx
    key = (root._version, idx.storage_offset(), tuple(idx.shape), tuple(idx.stride()), n, block_m)
    capture = _capturing(idx.device)
    if not capture:
        cached = _groupings.get(id(root))
        if cached is not None and cached[0]() is root and cached[1] == key:
            return cached[2]
    M = idx.shape[0]
    k = idx.to(torch.int64)
    k = torch.where((k < 0) | (k >= n), torch.full_like(k, n), k)
    sorted_k, perm = torch.sort(k, stable=True)
    seg_start = torch.searchsorted(sorted_k, torch.arange(n + 1, device=idx.device, dtype=torch.int64))
    seg_len = seg_start[1:] - seg_start[:-1]
    tiles = torch.div(seg_len + (block_m - 1), block_m, rounding_mode="floor")
    tile_off = torch.zeros(n + 1, device=idx.device, dtype=torch.int64)
    tile_off[1:] = torch.cumsum(tiles, 0)
    g = Grouping(perm, seg_start, tile_off, triton.cdiv(M, block_m) + n)
    if not capture:
        i = id(root)
        _groupings[i] = (weakref.ref(root, lambda _, i=i: _groupings.pop(i, None)), key, g)
    return g


def plan(x: torch.Tensor, lora_A_stack: torch.Tensor, lora_B_stack: torch.Tensor, scalings: torch.Tensor,
         g: Grouping, out: torch.Tensor, h: torch.Tensor, cfg: MultiLoraConfig) -> tuple[Launch, Launch]:
    """(shrink, expand) launches for these tensors, grouping, fp32 rank buffer h (SPLIT_K, M, R) and tiles.

    The AOT checks build their compile specs from this same function (on meta tensors).
    """
    M, K = x.shape
    n, R, _ = lora_A_stack.shape
    N = lora_B_stack.shape[1]
    split = h.shape[0]
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), split), cfg.block_k) * cfg.block_k
    r_pad, n_pad = rank_pad(R), triton.next_power_of_2(n + 1)
    grouping = dict(p_perm=g.perm, p_seg=g.seg_start, p_toff=g.tile_off)
    shrink = Launch(_multi_lora_shrink_kernel, (g.n_tiles_max, split), dict(
        p_x=x, p_a=lora_A_stack, p_h=h, **grouping, n=n, R=R, K=K, k_per_split=k_per_split,
        s_xm=x.stride(0), s_xk=x.stride(1), s_an=lora_A_stack.stride(0), s_ar=lora_A_stack.stride(1),
        s_ak=lora_A_stack.stride(2), s_hs=h.stride(0), s_hm=h.stride(1), s_hr=h.stride(2),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, R_PAD=r_pad, N_PAD=n_pad, DOT_PREC=_dot_precision(x.dtype),
    ), cfg.shrink_warps, cfg.shrink_stages)
    expand = Launch(_multi_lora_expand_kernel, (g.n_tiles_max, triton.cdiv(N, cfg.block_n)), dict(
        p_h=h, p_b=lora_B_stack, p_s=scalings, p_out=out, **grouping, n=n, R=R, N=N,
        s_hs=h.stride(0), s_hm=h.stride(1), s_hr=h.stride(2), s_bn=lora_B_stack.stride(0),
        s_bN=lora_B_stack.stride(1), s_br=lora_B_stack.stride(2), s_om=out.stride(0), s_on=out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=min(cfg.block_r, r_pad), R_PAD=r_pad, N_PAD=n_pad,
        SPLIT_K=split, DOT_PREC=_dot_precision(lora_B_stack.dtype),
    ), cfg.expand_warps, cfg.expand_stages)
    return shrink, expand


def multi_lora_fwd(x: torch.Tensor, lora_A_stack: torch.Tensor, lora_B_stack: torch.Tensor, scalings: torch.Tensor,
                   token_adapter_idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[m] += s[i] (x[m] A_i^T) B_i^T for i = token_adapter_idx[m] in [0, n); other rows untouched.

    x: (M, K) any strides; lora_A_stack: (n, R, K); lora_B_stack: (n, N, R); scalings: (n,) fp32;
    token_adapter_idx: (M,) int32/int64; out: (M, N) any strides and float dtype, updated in place and returned.
    """
    M, K = x.shape
    n, R, _ = lora_A_stack.shape
    N = lora_B_stack.shape[1]
    if R > MAX_RANK:
        raise ValueError(f"rank {R} is above the Triton kernels' limit {MAX_RANK}: use the 'torch' backend")
    if n > MAX_ADAPTERS:
        raise ValueError(f"{n} adapters is above the Triton kernels' limit {MAX_ADAPTERS}: use the 'torch' backend")
    if M == 0 or N == 0 or n == 0 or R == 0:
        return out
    cfg = config_for(M, rank_pad(R), x.dtype)
    g = group_tokens(token_adapter_idx, n, cfg.block_m)
    split = split_for(M, n, K, cfg, x.device)
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), split), cfg.block_k) * cfg.block_k
    split = max(1, triton.cdiv(K, k_per_split))
    h = torch.empty((split, M, R), device=x.device, dtype=torch.float32)
    s = scalings.to(device=x.device, dtype=torch.float32)
    for launch in plan(x, lora_A_stack, lora_B_stack, s, g, out, h, cfg):
        launch()
    return out


# ------------------------------------------------------------------------------------------------ AOT space
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def sm90_dispatch_space(full: bool = False) -> list[tuple[str, Launch]]:
    """The launches the dispatch can make on sm_90, on meta tensors, labelled; compile them with tests/sm90.py.

    Llama-7B-like shapes (K = N = 4096), decode (M = 32, the split shrink at its largest split) and prefill
    (M = 16384). Default: bf16 at rank pads 16, 64, 256, fp16 at 16, fp32 at 16 and 256 (the extremes of every
    tile rule); full=True: every dtype at every rank pad (16 ... 256).
    """
    out = []
    K = N = 4096
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for r_pad in (16, 32, 64, 128, 256):
            default = {torch.bfloat16: (16, 64, 256), torch.float16: (16,), torch.float32: (16, 256)}[dt]
            if not full and r_pad not in default:
                continue
            for M in (32, 16384):
                n = 8 if r_pad < 256 else MAX_ADAPTERS  # also the widest segment search
                cfg = gpu_config(M, r_pad, dt)
                meta = dict(device="meta")
                x = torch.empty(M, K, dtype=dt, **meta)
                A = torch.empty(n, r_pad, K, dtype=dt, **meta)
                B = torch.empty(n, N, r_pad, dtype=dt, **meta)
                s = torch.empty(n, dtype=torch.float32, **meta)
                out_t = torch.empty(M, N, dtype=dt, **meta)
                i64 = dict(dtype=torch.int64, **meta)
                g = Grouping(torch.empty(M, **i64), torch.empty(n + 1, **i64), torch.empty(n + 1, **i64),
                             triton.cdiv(M, cfg.block_m) + n)
                split = 16 if M <= DECODE_MAX_M else 1
                h = torch.empty(split, M, r_pad, dtype=torch.float32, **meta)
                mode = "decode" if M <= DECODE_MAX_M else "prefill"
                shrink, expand = plan(x, A, B, s, g, out_t, h, cfg)
                tag = f"{mode}-{_TY[dt]}-R{r_pad}"
                out += [(f"shrink-{tag}", shrink), (f"expand-{tag}", expand)]
    return out
