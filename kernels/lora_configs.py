"""Launch configs of the LoRA kernels (kernels/lora.py): pure functions of (target, dtype, shape bucket).

No autotuning and no timing at run time: a launcher asks `tuned(tgt, "lora", kernel, key)` (the offline tuner's
per-device table, kernels/configs/<device>.json) and falls back to the functions here. Every config below fits
the shared memory of every target it can be picked for (sm_80 163 KiB, sm_86/sm_89 99 KiB, sm_90 227 KiB), with
a margin for the epilogue's layout conversion; tests/test_sm90_lora.py compiles them per arch (no spills, shared
memory within the limit).

Shared memory of a pipelined tile = stages x (A tile + B tile) x element size:
  GEMM   stages x (BLOCK_M + BLOCK_N) x BLOCK_K x size
  shrink stages x (BLOCK_ROW + R_PAD) x BLOCK_RED x size
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ._configs import Target

MAX_RANK = 256
SHARED_MARGIN = 16384  # bytes kept free for the epilogue's layout conversion and barriers


@dataclass(frozen=True)
class GemmConfig:
    """Tile of `_lora_linear_kernel` (BLOCK_R: width of one rank-r chunk, capped at R_PAD)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    block_r: int = 32


@dataclass(frozen=True)
class ShrinkConfig:
    """Tile of `_lora_shrink_kernel` (the R_PAD width is the whole padded rank)."""

    block_row: int
    block_red: int
    num_warps: int
    num_stages: int


# Small tiles for the interpreter: several programs, K iterations and ragged edges even at M=37, K=72.
INTERPRETER_GEMM = GemmConfig(16, 32, 16, 4, 1, group_m=2, block_r=16)
INTERPRETER_SHRINK = ShrinkConfig(16, 32, 4, 1)

# With the dropout mask in the GEMM (the dx kernel) the Philox state shares the registers with the accumulator:
# sm_90 compiles of 128x256 on 8 warps (128 fp32 accumulator registers per thread) spilled, so the dropout
# variant keeps to tiles with at most this many accumulator registers per thread.
DROPOUT_MAX_ACC_REGS = 64


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def rank_pad(r: int) -> int:
    """The rank padded for tl.dot: a power of two, at least 16."""
    return max(16, 1 << max(0, int(r) - 1).bit_length())


def gemm_shared(cfg: GemmConfig, dtype: torch.dtype) -> int:
    return cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * itemsize(dtype)


def shrink_shared(cfg: ShrinkConfig, r_pad: int, dtype: torch.dtype) -> int:
    return cfg.num_stages * (cfg.block_row + r_pad) * cfg.block_red * itemsize(dtype)


def _fit_stages(cfg, shared_of, budget: int, min_stages: int = 2):
    """cfg with as many of its stages as fit in `budget` bytes (at least min_stages), else None."""
    for stages in range(cfg.num_stages, min_stages - 1, -1):
        c = replace(cfg, num_stages=stages)
        if shared_of(c) <= budget:
            return c
    return None


def gemm_config(tgt: Target, dtype: torch.dtype, m_bucket: int, *, dropout: bool = False) -> GemmConfig:
    """The opt-in fused GEMM's tile (y = x W^T + b + s xa B^T, or dx with the mask: `dropout`).

    sm_90: 128x256x64 on 8 warps, 3 stages (144 KiB: wgmma m64n256); dx with the mask: 128x128x64, 4 stages
    (64 accumulator registers per thread, room for the Philox state). sm_80 (163 KiB): the same tiles. sm_86/89
    (99 KiB): BLOCK_K 32 (128x256: 72 KiB, 128x128: 64 KiB). M <= 512 tokens: 64x128 tiles (twice the blocks).
    fp32 ("ieee" dots run on FMA): 64x64x32, 3 stages (48 KiB) everywhere.
    """
    if not tgt.is_gpu:
        return INTERPRETER_GEMM
    budget = tgt.max_shared - SHARED_MARGIN
    if dtype == torch.float32:
        cfg = GemmConfig(64, 64, 32, 4, 3)
    else:
        bk = 64 if tgt.max_shared >= 160 * 1024 else 32
        if m_bucket <= 512:
            cfg = GemmConfig(64, 128, bk, 4, 4)
        elif dropout:
            cfg = GemmConfig(128, 128, bk, 8, 4)
        else:
            cfg = GemmConfig(128, 256, bk, 8, 3)
    fitted = _fit_stages(cfg, lambda c: gemm_shared(c, dtype), budget)
    assert fitted is not None, (tgt.arch, cfg)  # every tile above fits every arch at 2 stages
    return fitted


def epilogue_config(tgt: Target, dtype: torch.dtype) -> GemmConfig:
    """The in-place rank-r epilogue after a cuBLAS product (HAS_MAIN=False): a BLOCK_R-wide dot and one read +
    write of each out tile, the dropout mask drawn with the accumulator live (the masked dx term). 64x64 (fp32:
    32x64) on 4 warps: 32 (16) accumulator registers per thread; 64x128 reached 255 registers and spilled on sm_90
    at unaligned shapes (K = 72: no vectorised loads). Its shared memory is a few KiB on every arch."""
    if not tgt.is_gpu:
        return INTERPRETER_GEMM
    if dtype == torch.float32:
        return GemmConfig(32, 64, 16, 4, 1, block_r=16)
    return GemmConfig(64, 64, 16, 4, 1)


def shrink_config(tgt: Target, dtype: torch.dtype, r_pad: int, rows_bucket: int) -> ShrinkConfig:
    """Tile of out (ROWS, R) = D?(in) (ROWS, RED) @ w^T: the fp32 (BLOCK_ROW, R_PAD) accumulator stays in
    registers (<= 64 per thread on 4 warps), BLOCK_ROW is 32 at <= 256 rows and follows the row bucket down to 16
    (decode: few tokens; the split over RED, see `shrink_split`, fills the GPU instead), and stages are cut to the
    arch's shared memory."""
    if not tgt.is_gpu:
        return INTERPRETER_SHRINK
    fp32 = dtype == torch.float32
    block_row = 64 if r_pad <= 64 else 32
    if fp32:
        block_row = 64 if r_pad <= 32 else 32
    if rows_bucket <= 256:  # few rows: more row blocks (the split over RED does the rest, see shrink_split)
        block_row = min(block_row, 32)
    block_row = min(block_row, max(16, rows_bucket))
    block_red = (32 if fp32 else 128) if r_pad <= 64 else (32 if fp32 else 64)
    cfg = ShrinkConfig(block_row, block_red, 4, 3)
    budget = tgt.max_shared - SHARED_MARGIN
    fitted = _fit_stages(cfg, lambda c: shrink_shared(c, r_pad, dtype), budget)
    while fitted is None:  # only reachable for a target with very little shared memory
        cfg = replace(cfg, block_red=cfg.block_red // 2)
        fitted = _fit_stages(cfg, lambda c: shrink_shared(c, r_pad, dtype), budget, min_stages=1)
    return fitted


def shrink_split(tgt: Target, cfg: ShrinkConfig, r_pad: int, rows_bucket: int, red_bucket: int) -> int:
    """How many partial sums a shrink's reduction (over RED = K, N or M) is split into: a pure function of the
    buckets and the target, so a shape always reduces in the same order (bitwise reproducible).

    Aim: about two waves of blocks (2 x num_sms) when the rows alone give fewer; each split keeps at least
    max(BLOCK_RED, 4 R_PAD) of the reduction, so the fp32 partials written (split x ROWS x R x 4 bytes) stay at
    most half the input read (ROWS x RED x 2 bytes); at most 64 partials.
    """
    row_blocks = max(1, -(-rows_bucket // cfg.block_row))
    want = -(-2 * tgt.num_sms // row_blocks)
    most = max(1, red_bucket // max(cfg.block_red, 4 * r_pad))
    return max(1, min(want, most, 64))


def gemm_key(dtype: torch.dtype, m_bucket: int, n: int, k: int, dropout: bool) -> str:
    """The tuned table's key for a fused-GEMM launch."""
    return f"{_TY[dtype]}/M{m_bucket}/N{n}/K{k}/drop{int(dropout)}"


def shrink_key(dtype: torch.dtype, r_pad: int, rows_bucket: int, red_bucket: int) -> str:
    return f"{_TY[dtype]}/R{r_pad}/rows{rows_bucket}/red{red_bucket}"


_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def from_table(cls, entry: dict | None):
    """A config dataclass from a tuned-table entry (its field names), or None."""
    if not entry:
        return None
    return cls(**{k: int(v) for k, v in entry.items() if k in cls.__dataclass_fields__})
