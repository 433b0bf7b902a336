"""Fused Triton kernels for the LoRA linear op:  y = x W^T + b + s * dropout(x) A^T B^T.

x: (M, K), W: (N, K), b: (N,), A: (r, K), B: (N, r), s = lora_alpha / r, dropout keep-probability 1 - p.

Design
------
Forward, two launches:
  1. `_lora_shrink_kernel`  xa = (x * keep / (1 - p)) A^T in fp32, (M, r). One pass over x; the dropout mask is
     drawn from Philox inside the kernel (never an M x K mask nor a dropped copy of x). r is padded to
     R_PAD = max(16, next_pow2(r)) in registers only (tl.dot needs >= 16); memory holds (M, r).
  2. `_lora_linear_kernel`  y = x W^T + b + s * xa B^T: a grouped-order tiled GEMM whose accumulator starts as
     the rank-r product (an extra K-chunk of width R_PAD, in chunks of BLOCK_R), then runs the K loop of the
     base product and adds the bias in the epilogue: one write of y, no read-modify-write.
  Or, below FUSED_GEMM_MIN_M tokens (tunable, see `base_gemm_choice`): cuBLAS `addmm` for x W^T + b, then the
  same kernel with HAS_MAIN=False, ACCUMULATE=True as an in-place epilogue y += s * xa B^T.
Saved for backward: x (the base layer saves it anyway), xa (M x r fp32) and the seed: nothing else.

Backward (derivation above `_lora_shrink_kernel`), four launches plus cuBLAS for dW only when W needs a grad:
  dxa = s dy B (shrink over N), dB = s dy^T xa (shrink over M, split), dx = dy W + (dxa A) * keep/(1-p)
  (the same GEMM kernel: W as the (K_red=N, N_out=K) operand, A as the rank-r operand, mask on the rank-r
  term only), dA = dxa^T (x * keep/(1-p)) (shrink over M, split, mask regenerated from the seed).

Dropout (kernels/_common.py): keep(m, k) from Philox4x32-10 (the bits of tl.randint4x) keyed by the seed,
counter m * ceil(K/8) + k // 8.
One Philox call gives 4 x 32 random bits = 8 keep decisions of 16 bits each: keep iff u16 >= round(p * 2^16).
So the effective p is quantised to 2^-16 (|p_eff - p| <= 2^-17) and the rescale is 1 / (1 - p_eff), exactly
unbiased. Every kernel derives the mask of an (m, k) element the same way whatever its tile shape (tiles start
at multiples of 8 along k), so forward, backward and the test-only `lora_dropout_mask` agree bit for bit.

Napkin math (H200: ~4.8 TB/s HBM, ~990 TFLOP/s dense bf16; M = 16384, K = N = 4096, r = 16, bf16)
  base GEMM        2MKN = 550 GFLOP -> 0.56 ms at peak; the measured cuBLAS floor is 0.74-0.79 ms.
  shrink (fwd)     reads x once: 2MK bytes = 128 MiB -> 28 us; 2MKr = 2.1 GFLOP (noise); writes 4Mr = 1 MiB.
  rank-r K-chunk   2MNr = 2.1 GFLOP inside the GEMM (0.4 %), xa/B tiles come from L2.
  cuBLAS epilogue  read + write of y: 4MN bytes = 256 MiB -> 56 us (7 % of the fwd floor): the fused GEMM wins
                   when a tuned Triton GEMM is within ~5 % of cuBLAS, hence the M threshold and the env switch.
  dropout          Philox-10 is ~100 integer instructions per call; M*K/8 = 8.4 M calls per pass ~ 30-60 us,
                   which the x stream of the shrink kernel mostly hides. tl.rand (one decision per call) would
                   cost 8x that and make the shrink kernel ALU-bound: hence the 16-bit lanes.
  backward extra   dxa and dB read dy (2 x 28 us), dA reads x (28 us + Philox), the dx GEMM adds the rank-r
                   chunk and one mask tile per output tile before its main loop.
  memory           saved beyond x: 4Mr = 1 MiB for xa (0.4 % of the 256 MiB floor) and the seed.
  Estimate (not measured: written without a GPU): fwd ~ floor + 40 us (~1.05x) and fwd+bwd ~ floor + 150 us
  (~1.09x) at M = 16384 IF the Triton GEMM runs at cuBLAS speed. The issue measured a plain Triton GEMM at
  1.07-1.16x cuBLAS; this one (grouped tile order, pointer loads, no persistent grid or TMA descriptors) will be
  near that, so FUSED_GEMM_MIN_M and the config lists must be tuned on the GPU (benchmarks/bench_lora.py with
  FASTADAPTERS_LORA_GEMM=fused / cublas), and a persistent TMA variant is the next step if the fused path stays
  behind the cuBLAS + epilogue path. Further fusions, if the GPU shows they pay: dB into the dxa pass (fp32
  atomics on N x r), dA into the dx epilogue (atomics on r x K; saves a Philox pass and a read of x).
  Launches: fwd 2 (+1 cuBLAS on the cuBLAS path), bwd 4 (+2 small sums for the split reductions, +cuBLAS dW).

Register budget (checked for sm_90 by tests/test_sm90_lora.py, no spills allowed): the dx GEMM draws its mask
with the accumulator live, and tiles holding more than DROPOUT_MAX_ACC_REGS fp32 accumulator registers per thread
(128x256 on 8 warps) spill there, so `gemm_configs(..., dropout=True)` leaves them out. The rank-r chunks are a
loop, not unrolled, so registers do not grow with r.

Several adapters on one layer: each call is independent (its own seed, so its own mask) and gradients add up
through autograd (tests/test_kernels_lora.py::test_several_adapters_on_one_layer).

Precision: fp32 accumulation everywhere; xa and dxa stay fp32 and are rounded to the input dtype only as
tl.dot operands (as the reference rounds x A^T). fp32 inputs use input_precision "ieee" unless torch allows
TF32 (torch.get_float32_matmul_precision() != "highest"), matching torch's own fp32 matmul.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, Launch, LaunchRecorder, dropout_threshold, launch_dropout_mask
from ._common import dot_precision as _dot_precision
from ._common import dropout_keep as _dropout_keep

MAX_RANK = 256
SM90_MAX_SHARED = 232448  # 227 KiB: the opt-in shared memory per block on sm_90

# Below this many tokens the base product goes to cuBLAS (addmm) and the LoRA term is an in-place epilogue;
# at or above it one fused Triton GEMM does everything. A guess to be tuned on the GPU with
# benchmarks/bench_lora.py (FASTADAPTERS_LORA_GEMM=fused|cublas forces either path for the comparison).
FUSED_GEMM_MIN_M = 2048


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
    p_out,   # (M, N): y or dx; read first when ACCUMULATE
    M, N, K, R,
    s_am, s_ak, s_bk, s_bn, s_lm, s_lr, s_lwr, s_lwn, s_om, s_on,
    scale, seed, drop_thr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    R_PAD: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_MAIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """out = [out +] [a @ b] + scale * D?(l @ lw) [+ bias], D the dropout keep mask in out's (m, n) coordinates.

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
    if HAS_BIAS:
        b_acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(p_out_blk, b_acc.to(p_out.dtype.element_ty), mask=m_out)


# ================================================================================================ launchers
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


# Device-aware lists for the fused GEMM; the launcher benchmarks them once per (M bucket, N, K, r, dtype, flags)
# on the GPU unless FASTADAPTERS_TRITON_AUTOTUNE=0 (then the first fitting one runs). fp32 dots are FMA-based
# ("ieee"), so fp32 tiles are small. tests/test_sm90_lora.py compiles every entry for sm_90.
_GEMM_16BIT = (
    GemmConfig(128, 256, 64, 8, 3),
    GemmConfig(128, 128, 64, 8, 4),
    GemmConfig(64, 128, 64, 4, 4),
    GemmConfig(64, 64, 64, 4, 4),
)
_GEMM_16BIT_SM80 = (
    GemmConfig(128, 256, 32, 8, 3),
    GemmConfig(128, 128, 32, 8, 4),
    GemmConfig(64, 128, 32, 4, 4),
    GemmConfig(64, 64, 32, 4, 4),
)
_GEMM_FP32 = (
    GemmConfig(64, 64, 32, 4, 3),
    GemmConfig(32, 64, 32, 4, 3),
)
# With the dropout mask in the GEMM (the dx kernel) the Philox state shares the registers with the accumulator:
# sm_90 compiles of 128x256/8 warps (128 fp32 accumulator registers per thread) spill, so the dropout variant
# keeps to tiles with at most this many accumulator registers per thread.
DROPOUT_MAX_ACC_REGS = 64
# The in-place epilogue after cuBLAS (HAS_MAIN=False): a rank-r dot and one read + write of each out tile.
EPILOGUE_CONFIG = GemmConfig(64, 128, 16, 4, 1)
EPILOGUE_CONFIG_FP32 = GemmConfig(32, 64, 16, 4, 1)
# Small tiles for the interpreter: several programs, K iterations and ragged edges even at M=37, K=72.
INTERPRETER_GEMM = GemmConfig(16, 32, 16, 4, 1, group_m=2, block_r=16)
INTERPRETER_SHRINK = ShrinkConfig(16, 32, 4, 1)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def gemm_configs(dtype: torch.dtype, capability: tuple[int, int] = (9, 0), max_shared: int = SM90_MAX_SHARED,
                 dropout: bool = False) -> list[GemmConfig]:
    """The fused-GEMM configs the dispatch may pick for `dtype` on a GPU of `capability` / `max_shared` bytes,
    for the kernel with the dropout mask inside (`dropout`, the dx GEMM) or without (the forward GEMM)."""
    if dtype == torch.float32:
        base = _GEMM_FP32
    elif tuple(capability) >= (9, 0):
        base = _GEMM_16BIT
    else:
        base = _GEMM_16BIT_SM80
    size = _itemsize(dtype)
    fitting = [c for c in base if c.num_stages * (c.block_m + c.block_n) * c.block_k * size <= max_shared - 16384]
    if dropout:
        fitting = [c for c in fitting if c.block_m * c.block_n // (32 * c.num_warps) <= DROPOUT_MAX_ACC_REGS]
    return fitting or [base[-1]]


def epilogue_config(dtype: torch.dtype) -> GemmConfig:
    """The tile of the in-place epilogue that follows a cuBLAS base product."""
    return EPILOGUE_CONFIG_FP32 if dtype == torch.float32 else EPILOGUE_CONFIG


def shrink_config(r_pad: int, dtype: torch.dtype) -> ShrinkConfig:
    """Deterministic tile for the shrink kernel, so its fp32 (BLOCK_ROW, R_PAD) accumulator fits in registers."""
    if dtype == torch.float32:
        return ShrinkConfig(64 if r_pad <= 32 else 32, 32, 4, 3)
    if r_pad <= 64:
        return ShrinkConfig(64, 128, 4, 3)
    return ShrinkConfig(32, 64, 4, 3)


def rank_pad(r: int) -> int:
    """The rank padded for tl.dot: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(r))


# -- launch state: config overrides (tests pass fixed configs; never autotune inside a test) and recording
@dataclass(frozen=True)
class _Overrides:
    gemm: GemmConfig | None = None
    shrink: ShrinkConfig | None = None
    epilogue: GemmConfig | None = None
    base: str | None = None  # "fused" | "cublas"
    split: int | None = None


_overrides = _Overrides()
_recorder = LaunchRecorder()
_launch = _recorder.launch
_GPU_SMS = 132  # the SM count assumed while recording for a GPU target (H100/H200 SXM)


@contextlib.contextmanager
def use_configs(*, gemm: GemmConfig | None = None, shrink: ShrinkConfig | None = None,
                epilogue: GemmConfig | None = None, base: str | None = None,
                split: int | None = None) -> Iterator[None]:
    """Inside the block the launchers use these fixed configs (None: keep the enclosing block's, else the normal
    choice). gemm applies to both fused GEMMs (forward and dx): pick one valid for both (see gemm_configs).

    base: "fused" (one Triton GEMM) or "cublas" (addmm + in-place epilogue); split: the split count of the
    reductions over M (dB, dA).
    """
    global _overrides
    if base not in (None, "fused", "cublas"):
        raise ValueError(f"base={base!r}: use 'fused', 'cublas' or None")
    old = _overrides
    _overrides = _Overrides(gemm or old.gemm, shrink or old.shrink, epilogue or old.epilogue, base or old.base,
                            split or old.split)
    try:
        yield
    finally:
        _overrides = old


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Record the launches instead of running them, choosing configs as on a GPU: run the launchers on "meta"
    tensors inside the block to list every (kernel, arguments, config) a call dispatches to (the sm_90 test)."""
    with _recorder.record() as records:
        yield records


def _gpu_configs(device: torch.device) -> bool:
    return _recorder.recording or (device.type == "cuda" and not INTERPRETED)


def base_gemm_choice(M: int) -> str:
    """'fused' or 'cublas' for M tokens: use_configs(base=...), else env FASTADAPTERS_LORA_GEMM, else the M rule."""
    if _overrides.base is not None:
        return _overrides.base
    env = os.environ.get("FASTADAPTERS_LORA_GEMM", "auto").strip().lower() or "auto"
    if env in ("fused", "cublas"):
        return env
    if env != "auto":
        raise ValueError(f"FASTADAPTERS_LORA_GEMM={env!r}: use 'fused', 'cublas' or 'auto'")
    return "fused" if M >= FUSED_GEMM_MIN_M else "cublas"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and not _recorder.recording:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _GPU_SMS if _gpu_configs(device) else 4


def _pick_shrink(r_pad: int, dtype: torch.dtype, device: torch.device) -> ShrinkConfig:
    if _overrides.shrink is not None:
        return _overrides.shrink
    return shrink_config(r_pad, dtype) if _gpu_configs(device) else INTERPRETER_SHRINK


def _pick_epilogue(dtype: torch.dtype, device: torch.device) -> GemmConfig:
    if _overrides.epilogue is not None:
        return _overrides.epilogue
    return epilogue_config(dtype) if _gpu_configs(device) else INTERPRETER_GEMM


_tuned: dict[tuple, GemmConfig] = {}


def _pick_gemm(key: tuple, device: torch.device, dtype: torch.dtype, dropout: bool, launch) -> GemmConfig:
    """The fused-GEMM config: override, interpreter tile, cached tuning result, or benchmark the device list."""
    if _overrides.gemm is not None:
        return _overrides.gemm
    if not _gpu_configs(device):
        return INTERPRETER_GEMM
    if _recorder.recording:
        return gemm_configs(dtype, dropout=dropout)[0]
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    props = torch.cuda.get_device_properties(device)
    max_shared = getattr(props, "shared_memory_per_block_optin", SM90_MAX_SHARED)
    configs = gemm_configs(dtype, (props.major, props.minor), max_shared, dropout=dropout)
    if len(configs) == 1 or os.environ.get("FASTADAPTERS_TRITON_AUTOTUNE", "1") == "0":
        cfg = configs[0]
    else:
        best = None
        for c in configs:
            try:
                t = triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=20)
            except triton.runtime.errors.OutOfResources:
                continue
            if best is None or t < best[0]:
                best = (t, c)
        cfg = configs[0] if best is None else best[1]
    _tuned[key] = cfg
    return cfg


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but the launcher takes 2-D tensors: reshape to (-1, K)")


def _check_rank(R: int) -> None:
    if not 1 <= R <= MAX_RANK:
        raise ValueError(f"rank r={R} is outside the kernels' range 1..{MAX_RANK}: use the 'torch' backend")


def lora_shrink(inp: torch.Tensor, w: torch.Tensor, scale: float, *, seed: int = 0, drop_thr: int = 0,
                dropout: bool = False, trans_in: bool = False, kx: int = 0, split: int = 1) -> torch.Tensor:
    """out = scale * D?(inp) @ w^T in fp32, summed over `split` partial reductions.

    inp: (ROWS, RED) any strides; w: (R, RED) any strides and float dtype; returns (ROWS, R) fp32.
    With `dropout`, D zeroes the elements the kernels' mask drops; mask coordinates are x's (m, k) with
    row length kx: inp is x (trans_in False) or x^T (trans_in True). The 1/(1-p) rescale belongs in `scale`.
    """
    _check_2d("inp", inp)
    _check_2d("w", w)
    ROWS, RED = inp.shape
    R = w.shape[0]
    if w.shape[1] != RED:
        raise ValueError(f"w has shape {tuple(w.shape)} but inp {tuple(inp.shape)} needs (R, {RED})")
    _check_rank(R)
    r_pad = rank_pad(R)
    cfg = _pick_shrink(r_pad, inp.dtype, inp.device)
    n_red = triton.cdiv(max(RED, 1), cfg.block_red)  # BLOCK_RED chunks
    split = max(1, min(split, n_red))
    red_per_split = triton.cdiv(n_red, split) * cfg.block_red
    split = triton.cdiv(max(RED, 1), red_per_split)
    if ROWS == 0 or RED == 0:
        return torch.zeros((ROWS, R), device=inp.device, dtype=torch.float32)
    out = torch.empty((split, ROWS, R), device=inp.device, dtype=torch.float32)
    kwargs = dict(
        p_in=inp, p_w=w, p_out=out, ROWS=ROWS, RED=RED, R=R, red_per_split=red_per_split,
        s_in_row=inp.stride(0), s_in_red=inp.stride(1), s_w_r=w.stride(0), s_w_red=w.stride(1),
        s_out_split=out.stride(0), s_out_row=out.stride(1), s_out_r=out.stride(2),
        scale=float(scale), seed=int(seed), drop_thr=int(drop_thr), KX=int(kx),
        BLOCK_ROW=cfg.block_row, BLOCK_RED=cfg.block_red, R_PAD=r_pad,
        HAS_DROPOUT=bool(dropout), TRANS_IN=bool(trans_in), DOT_PREC=_dot_precision(inp.dtype),
    )
    _launch(_lora_shrink_kernel, (triton.cdiv(ROWS, cfg.block_row), split), kwargs, cfg.num_warps, cfg.num_stages)
    return out[0] if split == 1 else out.sum(0)


def _split_for(rows: int, red: int, cfg: ShrinkConfig, device: torch.device) -> int:
    """Split a long reduction (over M) so the grid covers about two waves of SMs."""
    if _overrides.split is not None:
        return _overrides.split
    row_blocks = triton.cdiv(rows, cfg.block_row)
    return max(1, min(triton.cdiv(2 * _num_sms(device), row_blocks), triton.cdiv(red, 4 * cfg.block_red)))


def lora_gemm(a: torch.Tensor, b: torch.Tensor | None, lr: torch.Tensor, lw: torch.Tensor, bias: torch.Tensor | None,
              out: torch.Tensor, scale: float, *, seed: int = 0, drop_thr: int = 0, dropout: bool = False,
              accumulate: bool = False, config: GemmConfig | None = None) -> torch.Tensor:
    """out = [out +] a @ b + scale * D?(lr @ lw) [+ bias], written into `out` (M, N), returned.

    a: (M, K) and b: (K, N) views (b None: no main product, the epilogue-only kernel); lr: (M, R) fp32, the
    rank-r left operand; lw: (R, N) view; bias: (N,) or None. D is the dropout mask in out's (m, n) coordinates
    (n = x's k).
    """
    M, N = out.shape
    R = lr.shape[1]
    _check_rank(R)
    if M == 0 or N == 0:
        return out
    r_pad = rank_pad(R)
    has_main = b is not None
    a_ = a if has_main else lr
    b_ = b if has_main else lw
    K = a.shape[1] if has_main else 0
    dtype = out.dtype

    def launch(cfg: GemmConfig) -> None:
        kwargs = dict(
            p_a=a_, p_b=b_, p_l=lr, p_lw=lw, p_bias=bias if bias is not None else out, p_out=out, M=M, N=N, K=K, R=R,
            s_am=a_.stride(0), s_ak=a_.stride(1), s_bk=b_.stride(0), s_bn=b_.stride(1), s_lm=lr.stride(0),
            s_lr=lr.stride(1), s_lwr=lw.stride(0), s_lwn=lw.stride(1), s_om=out.stride(0), s_on=out.stride(1),
            scale=float(scale), seed=int(seed), drop_thr=int(drop_thr),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=min(cfg.block_r, r_pad),
            R_PAD=r_pad, GROUP_M=cfg.group_m, HAS_MAIN=has_main, HAS_BIAS=bias is not None,
            HAS_DROPOUT=bool(dropout), ACCUMULATE=bool(accumulate), DOT_PREC=_dot_precision(dtype),
        )
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        _launch(_lora_linear_kernel, grid, kwargs, cfg.num_warps, cfg.num_stages)

    if config is None:
        if not has_main:
            config = _pick_epilogue(dtype, out.device)
        else:
            key = (triton.next_power_of_2(M), N, K, r_pad, dtype, bias is not None, bool(dropout), out.device)
            config = _pick_gemm(key, out.device, dtype, bool(dropout), launch)
    launch(config)
    return out


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (y, xa) with y = x W^T + b + s * dropout(x) A^T B^T and xa = dropout(x) A^T in fp32.

    x: (M, K) any strides; weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r).
    Returns y: (M, N) in x's dtype, xa: (M, r) fp32 (saved for backward). The mask comes from `seed`.
    """
    _check_2d("x", x)
    M, K = x.shape
    N = weight.shape[0]
    dropout = dropout_p > 0.0
    thr, rescale = dropout_threshold(dropout_p) if dropout else (0, 1.0)
    xa = lora_shrink(x, lora_A, rescale, seed=seed, drop_thr=thr, dropout=dropout, kx=K)
    if base_gemm_choice(M) == "cublas":
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        lora_gemm(x, None, xa, lora_B.t(), None, y, scaling, accumulate=True)
    else:
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
        lora_gemm(x, weight.t(), xa, lora_B.t(), bias, y, scaling)
    return y, xa


def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, xa: torch.Tensor, scaling: float, dropout_p: float, seed: int, *,
                    need_dx: bool = True, need_dA: bool = True, need_dB: bool = True, need_dW: bool = False,
                    need_db: bool = False) -> tuple[torch.Tensor | None, ...]:
    """Backward of `lora_linear_fwd`: (dx, dA, dB, dW, db), None where not asked for.

    dy: (M, N); x: (M, K) as in forward; xa: (M, r) fp32 from forward; same seed and dropout_p as forward.
    dx: (M, K), dA: (r, K), dB: (N, r), dW: (N, K), db: (N,), each in its input's dtype.
    """
    _check_2d("dy", dy)
    M, K = x.shape
    N = weight.shape[0]
    dtype = x.dtype
    dropout = dropout_p > 0.0
    thr, rescale = dropout_threshold(dropout_p) if dropout else (0, 1.0)
    r_pad = rank_pad(lora_A.shape[0])
    dx = dA = dB = dW = db = None
    dxa = None
    if need_dx or need_dA:
        dxa = lora_shrink(dy, lora_B.t(), scaling)  # (M, r) fp32: s dy B
    if need_dB:
        split = _split_for(N, M, _pick_shrink(r_pad, dtype, dy.device), dy.device)
        dB = lora_shrink(dy.t(), xa.t(), scaling, split=split).to(lora_B.dtype)  # (N, r): s dy^T xa
    if need_dx:
        drop = dict(seed=seed, drop_thr=thr, dropout=dropout)
        if base_gemm_choice(M) == "cublas":
            dx = torch.mm(dy, weight)
            lora_gemm(dy, None, dxa, lora_A, None, dx, rescale, accumulate=True, **drop)
        else:
            dx = torch.empty((M, K), device=x.device, dtype=dtype)
            lora_gemm(dy, weight, dxa, lora_A, None, dx, rescale, **drop)
    if need_dA:
        split = _split_for(K, M, _pick_shrink(r_pad, dtype, x.device), x.device)
        dA_t = lora_shrink(x.t(), dxa.t(), rescale, seed=seed, drop_thr=thr, dropout=dropout, trans_in=True,
                           kx=K, split=split)  # (K, r): (dxa^T D(x))^T
        dA = dA_t.t().to(lora_A.dtype)
    if need_dW:
        dW = torch.mm(dy.t(), x)
    if need_db:
        db = dy.sum(0)
    return dx, dA, dB, dW, db


def lora_dropout_mask(shape: tuple[int, int], p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The dropout mask the kernels use for an x of `shape` (M, K), p and seed, materialised (tests only).

    Returns (M, K) fp32 holding keep / (1 - p_eff): pass it as the reference's dropout_mask to run the reference
    with exactly the kernels' mask. p = 0 gives ones.
    """
    return launch_dropout_mask(_launch, shape, p, seed, device)


# ------------------------------------------------------------------------------------------------ sm_90 space
_TY_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _label(launch: Launch, dtype_name: str, tag: str) -> str:
    kw = launch.kwargs
    if launch.kernel is _lora_shrink_kernel:
        role = ("dA" if kw["TRANS_IN"] else "xa") if kw["HAS_DROPOUT"] else ("dB" if kw["s_in_row"] == 1 else "dxa")
        return f"shrink-{role}-{dtype_name}-R{kw['R_PAD']}"
    if launch.kernel is _lora_linear_kernel:
        if kw["HAS_MAIN"]:
            role = "dx" if kw["HAS_DROPOUT"] else "fwd"
        else:
            role = "epilogue-dx" if kw["HAS_DROPOUT"] else "epilogue-fwd"
        return f"gemm-{role}-{dtype_name}-R{kw['R_PAD']}-{tag}"
    return "dropout-mask"


def sm90_dispatch_space(full: bool = False) -> list[tuple[str, Launch]]:
    """(label, launch) for the kernel configs a forward + backward dispatches to on sm_90, as compile specs.

    Runs the real launchers on "meta" tensors (M = 16384, K = N = 4096) under `record_launches`, with dropout,
    bias and every weight trainable, for each base path (every config of `gemm_configs`, and the cuBLAS +
    epilogue path). Default: bf16 and fp32 (fp16 compiles to the same tiles as bf16); the shrink kernel at the
    largest padded rank of each of its tiles (R_PAD 32/64 and 256: the accumulator is BLOCK_ROW x R_PAD) with all
    four of its uses at R_PAD 256 and the dropout uses (xa, dA) below; the GEMM kernel, whose registers do not
    depend on r (the rank-r chunks are a loop), at r = 256. `full`: every dtype, R_PAD in 16..256 plus r = 5,
    every use.
    """
    global _overrides
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16, torch.float32)
    ranks = (5, 16, 32, 64, 128, 256) if full else (32, 64, 256)
    gemm_ranks = ranks if full else (256,)
    M, K, N = 16384, 4096, 4096
    meta = torch.device("meta")
    out: dict[str, Launch] = {}
    outer, _overrides = _overrides, _Overrides()  # the configs a GPU would pick, not a test's fixed ones
    try:
        _record_space(out, dtypes, ranks, gemm_ranks, full, M, K, N, meta)
    finally:
        _overrides = outer
    with record_launches() as rec:
        lora_dropout_mask((M, K), 0.05, 1234, device=meta)
    out["dropout-mask"] = rec[0]
    return sorted(out.items())


def _record_space(out: dict[str, Launch], dtypes, ranks, gemm_ranks, full: bool, M: int, K: int, N: int,
                  meta: torch.device) -> None:
    for dt in dtypes:
        name = _TY_NAME[dt]
        for r in ranks:
            x = torch.empty((M, K), device=meta, dtype=dt)
            W = torch.empty((N, K), device=meta, dtype=dt)
            b = torch.empty((N,), device=meta, dtype=dt)
            A = torch.empty((r, K), device=meta, dtype=dt)
            B = torch.empty((N, r), device=meta, dtype=dt)
            dy = torch.empty((M, N), device=meta, dtype=dt)
            paths: list[tuple[str, str, GemmConfig | None]] = [("cublas", "cublas", None)]
            cfgs = dict.fromkeys(gemm_configs(dt) + gemm_configs(dt, dropout=True))
            paths += [(f"{c.block_m}x{c.block_n}x{c.block_k}-w{c.num_warps}s{c.num_stages}", "fused", c) for c in cfgs]
            for tag, base, cfg in paths:
                with use_configs(gemm=cfg, base=base), record_launches() as rec:
                    _, xa = lora_linear_fwd(x, W, b, A, B, 2.0, 0.05, seed=1234)
                    lora_linear_bwd(dy, x, W, A, B, xa, 2.0, 0.05, 1234, need_dW=True, need_db=True)
                for launch in rec:
                    kw = launch.kwargs
                    if launch.kernel is _lora_linear_kernel:
                        if r not in gemm_ranks:
                            continue
                        if kw["HAS_MAIN"] and cfg not in gemm_configs(dt, dropout=bool(kw["HAS_DROPOUT"])):
                            continue  # this path would not pick cfg for this kernel
                    elif not full and launch.kernel is _lora_shrink_kernel and not kw["HAS_DROPOUT"] and r != 256:
                        continue
                    out.setdefault(_label(launch, name, tag), launch)
