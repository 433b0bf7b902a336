"""Launch configs of the bottleneck-adapter kernels (kernels/bottleneck.py): pure functions of (target, dtype, shape
bucket), never a timing race at run time.

A launcher asks `tuned(tgt, "bottleneck", kernel, key)` (the offline tuner's per-device table,
kernels/configs/<device>.json) and falls back to `bottleneck_config(tgt, kernel, dot_dtype, B, aligned)`. The
weight-gradient split over M is `wgrad_split(tgt, ...)`: a function of the arch and the M bucket only, so the
weight gradients round the same way on every run (no config race decides how M is cut).

Tables, one per arch family, every entry compiled by tests/test_sm90_bottleneck.py for the archs that pick it
(no spills, shared memory within the limit; Triton 3.6). The row kernels hold (BLOCK_M, B) fp32 tiles in
registers, so BLOCK_M * B <= 16K at 8 warps for every variant (activation, dropout, biases, learned scale):
  hopper (sm_90, 227 KiB)  128-row blocks up to B = 128 (fwd 128x64x128, 3 stages), 64-row blocks at B = 256
                           (64x64x128, 2 stages, 176 KiB shared, wgmma m64n256 / m64n128). 128 x 256 was tried
                           (sm_90 compiles, 8 warps): 255 registers and no spill only for silu without biases or
                           dropout; tanh 56-64 bytes of stack, gelu_tanh with biases 520, with dropout 192-680;
                           two b halves (separate accumulators) 8-40; 16 warps 40-96: not shipped
  ampere (sm_80, 163 KiB)  the same tiles, 64-row blocks from B = 128; dx from B = 256 the small family's tiles
  small (sm_86 / sm_89, 99 KiB)  K step 32, N step 64, 2 stages (B = 256: 72 KiB), 64-row blocks from B = 128
Large b (B >= 512) runs the chunked mode (block_j < B). fp32 dot operands (an fp32 model) and unaligned shapes
(sizes / row strides not multiples of 16: no vector loads, no cp.async) keep small tiles: correct, not tuned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ._configs import ARCHS, Target

MAX_BOTTLENECK = 1024
PADDED_BOTTLENECKS = (16, 32, 64, 128, 256, 512, 1024)


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


_R = RowConfig
# Keyed by padded bottleneck B (16 .. 1024). Fused mode (block_j None) keeps (BLOCK_M, B) fp32 tiles in registers.
_HOPPER_FWD = {16: _R(128, 64, 128, 8, 3), 32: _R(128, 64, 128, 8, 3), 64: _R(128, 64, 128, 8, 3),
               128: _R(128, 64, 128, 8, 3), 256: _R(64, 64, 128, 8, 2),
               512: _R(64, 64, 128, 8, 3, 128), 1024: _R(64, 64, 128, 8, 3, 128)}
_HOPPER_DX = {16: _R(128, 64, 64, 8, 3), 32: _R(128, 64, 64, 8, 3), 64: _R(128, 64, 64, 8, 3),
              128: _R(64, 64, 128, 8, 3), 256: _R(64, 64, 128, 8, 2),
              512: _R(64, 64, 128, 8, 3, 128), 1024: _R(64, 64, 128, 8, 3, 128)}
_AMPERE_FWD = {**_HOPPER_FWD, 128: _R(64, 64, 128, 8, 3)}
# sm_80 compiles with dropout, biases and a learned scale: 64x64x128 spilled 32 bytes at B = 256 and chunked (J128)
_AMPERE_DX = {**_HOPPER_DX, 256: _R(64, 32, 64, 8, 2), 512: _R(64, 32, 64, 8, 2, 64), 1024: _R(64, 32, 64, 8, 2, 64)}
_SMALL_FWD = {16: _R(128, 32, 64, 8, 2), 32: _R(128, 32, 64, 8, 2), 64: _R(128, 32, 64, 8, 2),
              128: _R(64, 32, 64, 8, 2), 256: _R(64, 32, 64, 8, 2),
              512: _R(64, 32, 64, 8, 2, 64), 1024: _R(64, 32, 64, 8, 2, 64)}
_SMALL_DX = {16: _R(128, 32, 64, 8, 2), 32: _R(128, 32, 64, 8, 2), 64: _R(128, 32, 64, 8, 2),
             128: _R(64, 32, 64, 8, 2), 256: _R(64, 32, 64, 8, 2),
             512: _R(64, 32, 64, 8, 2, 64), 1024: _R(64, 32, 64, 8, 2, 64)}
# fp32 dot operands (an fp32 model): "ieee" lowers tl.dot to FMAs (its register use is erratic: a fused 64 x 128
# dx tile spilled thousands of times), "tf32" to mma. One table for both, sized for "ieee".
_ROW_FP32 = {B: _R(32, 32, 64, 8, 2, None if B <= 128 else 64) for B in PADDED_BOTTLENECKS}
# Unaligned shapes: every element carries its own address, so tiles are small and the fused mode stops at B = 64.
_ROW_UNALIGNED_16BIT = {B: _R(64, 32, 64, 8, 2, None if B <= 64 else 32) for B in PADDED_BOTTLENECKS}
_ROW_UNALIGNED_FP32 = {B: _R(32, 32, 64, 8, 2, None if B <= 64 else 32) for B in PADDED_BOTTLENECKS}
# ... with "tf32" the chunked 32x32x64 forward landed on ptxas' 128-register choice with a spill, 32x32x32 not.
_ROW_UNALIGNED_TF32 = {**_ROW_UNALIGNED_FP32, **{B: _R(32, 32, 32, 8, 2, 32) for B in (128, 256, 512, 1024)}}
_WGRAD_16BIT = {"hopper": WgradConfig(64, 128, 128, 8, 3), "ampere": WgradConfig(64, 128, 128, 8, 3),
                "small": WgradConfig(64, 128, 128, 8, 2)}
_WGRAD_FP32 = WgradConfig(32, 64, 64, 8, 2)
_WGRAD_UNALIGNED = WgradConfig(32, 64, 64, 8, 2)
# Small tiles for the interpreter: several programs, loop iterations and ragged edges even at M=37, d=72.
INTERPRETER_ROW = RowConfig(16, 32, 32, 4, 1)
INTERPRETER_WGRAD = WgradConfig(16, 32, 16, 4, 1)


def bottleneck_pad(b: int) -> int:
    """The bottleneck padded for tl.dot: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(b))


def family(tgt: Target) -> str:
    """'hopper' (sm_90 / sm_100: 227 KiB), 'ampere' (sm_80-class: >= 163 KiB) or 'small' (sm_86 / sm_89 / sm_120:
    99 KiB)."""
    if tgt.hopper and tgt.max_shared >= ARCHS["sm_90"].max_shared:
        return "hopper"
    return "ampere" if tgt.max_shared >= ARCHS["sm_80"].max_shared else "small"


def bottleneck_config(tgt: Target, kernel: str, dot_dtype: torch.dtype, B: int, aligned: bool = True,
                      prec: str = "ieee") -> RowConfig | WgradConfig:
    """The built-in config of `kernel` ("fwd", "dx" or "wgrad") on `tgt` for dot dtype, padded bottleneck B,
    alignment and fp32 dot precision ("ieee" / "tf32"). The interpreter gets small tiles."""
    if kernel not in ("fwd", "dx", "wgrad"):
        raise ValueError(f"unknown bottleneck kernel {kernel!r}: choose fwd, dx or wgrad")
    if not tgt.is_gpu:
        return INTERPRETER_WGRAD if kernel == "wgrad" else INTERPRETER_ROW
    fp32 = dot_dtype == torch.float32
    if kernel == "wgrad":
        c = _WGRAD_UNALIGNED if not aligned else _WGRAD_FP32 if fp32 else _WGRAD_16BIT[family(tgt)]
        return WgradConfig(c.block_m, c.block_n, min(c.block_j, B), c.num_warps, c.num_stages)
    if not aligned:
        table = _ROW_UNALIGNED_16BIT if not fp32 else _ROW_UNALIGNED_TF32 if prec == "tf32" else _ROW_UNALIGNED_FP32
    elif fp32:
        table = _ROW_FP32
    else:
        fam = family(tgt)
        table = {("hopper", "fwd"): _HOPPER_FWD, ("hopper", "dx"): _HOPPER_DX, ("ampere", "fwd"): _AMPERE_FWD,
                 ("ampere", "dx"): _AMPERE_DX, ("small", "fwd"): _SMALL_FWD, ("small", "dx"): _SMALL_DX}[fam, kernel]
    return table[B]


def wgrad_split(tgt: Target, m_bucket: int, tiles: int, block_m: int) -> int:
    """How many partial sums over M the weight-gradient kernel makes: two waves of the arch's SMs, at least four
    row steps per split, at most 16. A function of the arch and the M bucket only (never of a timing run, nor of
    the exact M), so the rounding of the weight gradients is the same on every run."""
    sms = ARCHS[tgt.arch].num_sms if tgt.arch in ARCHS else tgt.num_sms
    return max(1, min(triton.cdiv(2 * sms, max(1, tiles)), m_bucket // (4 * block_m), 16))


_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def config_key(dot_dtype: torch.dtype, m_bucket: int, d_in: int, d_out: int, B: int, aligned: bool) -> str:
    """The tuned table's key of a bottleneck launch (per kernel: fwd, dx, wgrad)."""
    return f"{_TY[dot_dtype]}/M{m_bucket}/din{d_in}/dout{d_out}/B{B}/{'aligned' if aligned else 'unaligned'}"


def from_table(cls, entry: dict | None):
    """A config dataclass from a tuned-table entry (its field names), or None."""
    if not entry:
        return None
    return cls(**{k: (None if v is None else int(v)) for k, v in entry.items() if k in cls.__dataclass_fields__})
