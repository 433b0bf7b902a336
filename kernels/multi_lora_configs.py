"""Launch configs of the multi-LoRA kernels (kernels/multi_lora.py): pure functions of (target, dtype, buckets).

No autotuning: the kernels are memory- or launch-bound. A launcher asks `tuned(tgt, "multi_lora", "tiles", key)`
(the offline tuner's per-device table) first and falls back to `multi_lora_config`. Every config fits the shared
memory of every arch it can be picked for (sm_80 163 KiB, sm_86/sm_89 99 KiB, sm_90 227 KiB) and is compiled per
arch by tests/test_sm90_multi_lora.py (no spills).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ._configs import Target

MAX_RANK = 256
MAX_ADAPTERS = 1024  # the in-kernel segment search loads next_pow2(n + 1) offsets
DECODE_MAX_M = 256  # up to this many tokens: 16-row tiles and a split shrink
SHARED_MARGIN = 16384
MAX_SPLIT = 32


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


def rank_pad(r: int) -> int:
    """The rank padded for tl.dot: a power of two, at least 16."""
    return max(16, 1 << max(0, int(r) - 1).bit_length())


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def shrink_shared(cfg: MultiLoraConfig, r_pad: int, dtype: torch.dtype) -> int:
    """Pipelined shared memory of the shrink: stages x (x tile + A tile)."""
    return cfg.shrink_stages * (cfg.block_m + r_pad) * cfg.block_k * _size(dtype)


def expand_shared(cfg: MultiLoraConfig, dtype: torch.dtype) -> int:
    """Pipelined shared memory of the expand: stages x (h tile (fp32) + B tile)."""
    return cfg.expand_stages * (cfg.block_m * cfg.block_r * 4 + cfg.block_r * cfg.block_n * _size(dtype))


def multi_lora_config(tgt: Target, dtype: torch.dtype, m_bucket: int, r_pad: int) -> MultiLoraConfig:
    """Deterministic tiles (checked free of register spills per arch by tests/test_sm90_multi_lora.py).

    Decode (M <= DECODE_MAX_M): 16-token tiles, since a handful of tokens share an adapter. Prefill: 64-token
    tiles (32 above R_PAD 64, and for fp32). The shrink's (BLOCK_K, R_PAD) weight tile is kept to 4096
    elements per 4 warps (2048 for fp32 FMA dots); the expand works through R in chunks of BLOCK_R. Stages are cut
    to the arch's shared memory (the fp32 R_PAD-256 shrink needs 110 KiB at 3 stages: 2 on sm_86/89). Gathered
    rows make every pointer 64-bit, which is what sets the register budget here.
    """
    if not tgt.is_gpu:
        return INTERPRETER_CONFIG
    fp32 = dtype == torch.float32
    shrink_warps = 8 if r_pad >= 256 else 4
    budget = (2048 if fp32 else 4096) * (shrink_warps // 4)
    block_k = max(32 if shrink_warps == 8 else 16, min(128, budget // r_pad))
    if m_bucket <= DECODE_MAX_M:
        cfg = MultiLoraConfig(16, block_k, 64, min(r_pad, 16 if fp32 else 32), shrink_warps, 4, 3, 2)
    elif fp32:
        cfg = MultiLoraConfig(32, min(block_k, 32), 64, 16, shrink_warps, 4, 3, 2)
    else:
        bm = 64 if r_pad <= 64 else 32
        cfg = MultiLoraConfig(bm, min(block_k, 64), 128, min(r_pad, 32), shrink_warps, 8, 3, 2)
    limit = tgt.max_shared - SHARED_MARGIN
    while cfg.shrink_stages > 1 and shrink_shared(cfg, r_pad, dtype) > limit:
        cfg = replace(cfg, shrink_stages=cfg.shrink_stages - 1)
    while cfg.expand_stages > 1 and expand_shared(cfg, dtype) > limit:
        cfg = replace(cfg, expand_stages=cfg.expand_stages - 1)
    return cfg


def split_k(tgt: Target, cfg: MultiLoraConfig, m_bucket: int, k: int) -> int:
    """Shrink split over K: about two waves of SMs when the token tiles alone give fewer (decode, short prefill),
    1 when they already fill the SMs; each split keeps >= 1 BLOCK_K of K; at most MAX_SPLIT (the expand sums the
    slabs in a static loop, in a fixed order). A pure function of the M bucket, K and the target: the same shape
    always sums the same way. Decode, 32 tokens of 8 adapters, K = 4096 on sm_90: 2-8 working 16-row tiles x 32
    splits (was 16 blocks: the split was capped at K / (4 BLOCK_K) = 8)."""
    tiles = max(1, -(-m_bucket // cfg.block_m))
    if tiles >= tgt.num_sms:  # a full wave of token tiles already
        return 1
    want = -(-2 * tgt.num_sms // tiles)
    most = max(1, -(-k // cfg.block_k))
    return max(1, min(want, most, MAX_SPLIT))


_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def tiles_key(dtype: torch.dtype, m_bucket: int, r_pad: int) -> str:
    """The tuned table's key for one launch pair."""
    return f"{_TY[dtype]}/M{m_bucket}/R{r_pad}"
