"""Launch configs of the prefix-attention kernels (kernels/prefix_attention.py): a pure function of the GPU target,
dtype, padded head_dim and a sequence-length bucket, never a timing race at run time.

The launcher asks `tuned(target, "prefix_attention", <kernel>, key) or prefix_config(...)`: the offline tuner's
per-device table (kernels/configs/<device>.json, `python -m benchmarks.tune`) first, else these built-in tables.

Every config these functions return is compiled for sm_80, sm_86, sm_89 and sm_90 by
tests/test_sm90_prefix_attention.py (no spills, shared memory within the arch's limit, no ptxas C7515): the
per-arch rows below are the tiles that pass there. Why these tiles:
  * fwd: 128 query rows x 64 keys, 8 warps (two warpgroups, wgmma m64n64 for QK^T and m64n128 for PV at D=128),
    3 load stages on sm_90 (128 KiB shared). On sm_80 / sm_86 / sm_89 (mma.sync) 128 x 64 spills 20-92 bytes
    whatever the stages or warps (ptxas, Triton 3.6), so they take 64 x 64 with 8 warps (184 registers), 3 stages
    on sm_80 and 2 within sm_86/89's 99 KiB.
  * kv (backward, FlashAttention-2's shape): 64 key rows held, 64 query rows streamed, 8 warps: S^T / dP^T are
    m64n32 per warpgroup (N = half the query tile), dV / dK / dQ m64n64 (N = half of D = 128). 128 key rows
    (FA2's tile) spill 20-80 bytes at D = 128 (dK and dV alone are 128 fp32 registers per thread), and 32 query
    rows make the dQ product fall off wgmma (mma.sync, ptxas C7515).
  * dq (deterministic mode only): 128 query rows held, 64 keys streamed on sm_90; 64 x 64 on sm_8x.
fp32 (a test dtype: exact "ieee" dots lower to FMAs holding both operands in registers) gets small tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import triton

from ._configs import Target, shape_bucket

MAX_HEAD_DIM = 256
DECODE_MAX_LQ = 16  # q_len up to this takes the split-K decode path
MAX_DECODE_SPLITS = 128  # a power of two (the combine kernel's S_PAD)
PREPROCESS_BLOCK_M = 64
COMBINE_CHUNK = 16  # splits the combine kernel reads at a time
DECODE_BLOCK_MS = (16, 32, 64)  # every block_m decode_config can return (fp32: 16, 32)


@dataclass(frozen=True)
class AttnConfig:
    """Tile shape and launch parameters of one kernel: rows (queries) x cols (keys) per program."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @classmethod
    def from_table(cls, entry: dict | None) -> AttnConfig | None:
        """An AttnConfig from a tuned-table entry {"block_m", "block_n", "num_warps", "num_stages"}, or None."""
        if entry is None:
            return None
        return cls(**{f.name: int(entry[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class PrefixConfigs:
    """The tiles of one (target, dtype, head_dim, bucket): forward, backward kv and dq kernels, decode block_n."""

    fwd: AttnConfig
    kv: AttnConfig
    dq: AttnConfig
    decode_block_n: int


def head_dim_pad(D: int) -> int:
    """D padded to a power of two >= 16 (tl.arange and tl.dot need it)."""
    return max(16, triton.next_power_of_2(D))


C = AttnConfig
# fp16 / bf16 tiles per arch family and padded head_dim (the smallest row at or above d_pad):
#   d_pad: (fwd, kv, dq, decode block_n)
_HALF: dict[str, dict[int, tuple[AttnConfig, AttnConfig, AttnConfig, int]]] = {
    "sm_90": {
        64: (C(128, 64, 8, 3), C(64, 64, 8, 3), C(128, 64, 8, 2), 64),
        128: (C(128, 64, 8, 3), C(64, 64, 8, 3), C(128, 64, 8, 2), 64),
        256: (C(64, 64, 8, 2), C(64, 64, 8, 1), C(64, 32, 8, 2), 32),
    },
    "sm_80": {
        64: (C(64, 64, 8, 3), C(64, 64, 8, 2), C(64, 64, 8, 2), 64),
        128: (C(64, 64, 8, 3), C(64, 64, 8, 2), C(64, 64, 8, 2), 64),
        256: (C(64, 64, 8, 2), C(64, 64, 8, 1), C(64, 32, 8, 2), 32),
    },
    "sm_86": {  # 99 KiB shared (A10, RTX 3090; sm_89: L4, L40S, RTX 4090 use the same rows)
        64: (C(64, 64, 8, 2), C(64, 64, 8, 2), C(64, 64, 8, 2), 64),
        128: (C(64, 64, 8, 2), C(64, 64, 8, 2), C(64, 64, 8, 2), 64),
        256: (C(64, 32, 8, 2), C(64, 64, 8, 1), C(64, 32, 8, 1), 32),
    },
}
_FP32: dict[int, tuple[AttnConfig, AttnConfig, AttnConfig, int]] = {
    128: (C(32, 16, 8, 1), C(16, 16, 4, 1), C(32, 16, 8, 1), 16),
    256: (C(32, 16, 8, 1), C(16, 16, 8, 1), C(32, 16, 8, 1), 16),
}
# The interpreter (CPU tests): small tiles so that short test sequences span several blocks.
_INTERPRETER = (C(16, 16, 4, 1), C(16, 16, 4, 1), C(16, 16, 4, 1), 16)


def _family(tgt: Target) -> str:
    if tgt.hopper and tgt.max_shared >= 166912:
        return "sm_90"
    if tgt.capability >= (8, 6) or tgt.max_shared < 166912:
        return "sm_86"
    return "sm_80"


def prefix_config(tgt: Target, dtype: torch.dtype, head_dim: int, bucket: int = 0) -> PrefixConfigs:
    """The built-in tiles for `tgt` (its arch family and shared-memory limit), dtype, head_dim (padded here) and
    the sequence bucket (shape_bucket of max(Lq, P + Lk); today every bucket gets the same tiles). Pure."""
    d_pad = head_dim_pad(head_dim)
    if d_pad > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} (padded to {d_pad}) is above {MAX_HEAD_DIM}: split the heads, or use "
                         "the 'torch' backend")
    if not tgt.is_gpu:
        return PrefixConfigs(*_INTERPRETER)
    table = _FP32 if dtype == torch.float32 else _HALF[_family(tgt)]
    return PrefixConfigs(*table[min(k for k in table if k >= d_pad)])


def config_key(dtype: torch.dtype, head_dim: int, bucket: int) -> str:
    """The tuned table's key: "bf16/D128/L2048" (padded head_dim, sequence bucket)."""
    ty = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return f"{ty}/D{head_dim_pad(head_dim)}/L{bucket}"


def seq_bucket(Lq: int, Lk: int, P: int) -> int:
    """The sequence-length bucket configs are chosen by: shape_bucket(max(Lq, P + Lk))."""
    return shape_bucket(max(Lq, P + Lk))


def decode_config(d_pad: int, dtype: torch.dtype, rows: int, block_n: int, gpu: bool = True) -> AttnConfig:
    """Decode tiles: block_m >= the GROUP * Lq packed rows (capped at 64, 32 for fp32), block_n keys streamed."""
    if not gpu:
        return AttnConfig(16, 16, 4, 1)
    if dtype == torch.float32:
        return AttnConfig(min(32, max(16, triton.next_power_of_2(rows))), block_n, 8, 1)
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if d_pad > 128:
        return AttnConfig(block_m, block_n, 8 if block_m == 64 else 4, 2)
    return AttnConfig(block_m, block_n, 4, 3 if block_m < 64 else 2)


def decode_chunk(n_programs: int, P: int, Lk: int, block_n: int, num_sms: int) -> int:
    """Keys per split of the decode path: a multiple of block_n chosen so that n_programs (B * Hkv * row blocks)
    times the number of splits reaches about 2 programs per SM, with at most MAX_DECODE_SPLITS splits."""
    total = max(P + Lk, 1)
    want = max(1, min(MAX_DECODE_SPLITS // 2, triton.cdiv(2 * num_sms, max(n_programs, 1))))
    chunk = triton.cdiv(triton.cdiv(total, want), block_n) * block_n
    while triton.cdiv(P, chunk) + triton.cdiv(Lk, chunk) > MAX_DECODE_SPLITS:
        chunk *= 2
    return max(chunk, block_n)
