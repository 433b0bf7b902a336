"""Pieces shared by the Triton kernel files (kernels/lora.py, bottleneck.py, prefix_attention.py, multi_lora.py).

  * INTERPRETED: the kernels run in Triton's interpreter (TRITON_INTERPRET set before import); the
    interpreter's bf16 workaround lives with the tests (tests/interpreter_fixes.py, installed by conftest);
  * the Philox keep mask of the dropout kernels (`philox`, `dropout_keep`), its threshold (`dropout_threshold`)
    and the test-only materialiser (`dropout_mask_kernel`, `launch_dropout_mask`);
  * `dot_precision`, the tl.dot input precision that matches torch's own fp32 matmuls;
  * `Launch` and `LaunchRecorder`: launches recorded instead of run (on "meta" tensors) for the sm_90 AOT tests.

Dropout: keep(m, k) from Philox4x32-10 keyed by the seed, counter m * ceil(K/8) + k // 8. One Philox call gives
4 x 32 random bits = 8 keep decisions of 16 bits each: keep iff u16 >= round(p * 2^16), so p is quantised to 2^-16
and the rescale 1 / (1 - p_eff) is exactly unbiased. Every kernel derives the mask of an (m, k) element the same way
whatever its tile shape (tiles start at multiples of 8 along k), so every kernel that uses `dropout_keep` (LoRA,
bottleneck), forward and backward, and the materialised mask agree bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

INTERPRETED = bool(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))  # kernels run on CPU tensors

PHILOX_ROUNDS = tl.constexpr(10)
DROPOUT_BITS = 16  # bits per keep decision: 8 decisions per Philox call


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: exact fp32 unless torch itself allows TF32 matmuls (ignored for fp16/bf16)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# ------------------------------------------------------------------------------------------------ launches
@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its grid, its keyword arguments (named as the kernel's parameters)."""

    kernel: Any
    grid: tuple[int, ...]
    kwargs: dict
    num_warps: int
    num_stages: int
    info: dict = field(default_factory=dict, compare=False)  # for benchmarks/static.py: {"main_loop": True, ...}
    role: str = field(default="", compare=False)  # the launcher's name for it ("fwd", "bwd_dkdv", ...)

    def __call__(self) -> None:
        self.kernel[self.grid](**self.kwargs, num_warps=self.num_warps, num_stages=self.num_stages)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on t's GPU (Triton launches on the current device); nothing for CPU or meta tensors."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class LaunchRecorder:
    """A kernel module's launch switch: `launch` runs a kernel, or, inside `record()`, appends the `Launch` it would
    make instead (the launchers then run on "meta" tensors to list every (kernel, arguments, config) a call
    dispatches to). One per module, so recording one module's launches never captures another's."""

    def __init__(self) -> None:
        self.records: list[Launch] | None = None

    @property
    def recording(self) -> bool:
        return self.records is not None

    @contextlib.contextmanager
    def record(self) -> Iterator[list[Launch]]:
        """Record the launches instead of running them: run the launchers on "meta" tensors inside the block
        (under `kernels._configs.use_target(arch)` to pick configs as on that GPU) to list every (kernel,
        arguments, config, role) a call dispatches to."""
        old, self.records = self.records, []
        try:
            yield self.records
        finally:
            self.records = old

    def launch(self, kernel, grid: tuple[int, ...], kwargs: dict, num_warps: int, num_stages: int,
               role: str = "") -> None:
        """Run (or record) one launch; its grid must fit CUDA's limits (x < 2^31, y and z <= 65535)."""
        assert all(0 < g for g in grid) and all(g <= 65535 for g in grid[1:]) and grid[0] < 2**31, grid
        launch = Launch(kernel, grid, kwargs, num_warps, num_stages, role=role)
        if self.records is not None:
            self.records.append(launch)
        else:
            launch()


# ------------------------------------------------------------------------------------------------ dropout
@triton.jit
def philox(seed, c0, c1):
    """Philox4x32 (Salmon et al., SC'11) of the counter (c0, c1, 0, 0) under the 64-bit key `seed`: four uint32
    blocks, the same bits as tl.randint4x. Written out here (not tl.randint4x) so that the kernels only call
    builtins and the package's own jit functions: they then also run in the interpreter when triton was imported
    before TRITON_INTERPRET was set (the library's own jit helpers would not be interpreted)."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(PHILOX_ROUNDS):
        prev0, prev2 = c0, c2
        c0 = tl.umulhi(0xCD9E8D57, prev2) ^ c1 ^ k0
        c2 = tl.umulhi(0xD2511F53, prev0) ^ c3 ^ k1
        c1 = tl.mul(prev2, 0xCD9E8D57, sanitize_overflow=False)
        c3 = tl.mul(prev0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def dropout_keep(seed, o_m, k0, KX, drop_thr, BLOCK_K: tl.constexpr):
    """Keep mask (len(o_m), BLOCK_K) for x[o_m, k0:k0+BLOCK_K]; k0 % 8 == 0, BLOCK_K % 8 == 0.

    Element (m, k) uses the 16-bit lane (k % 8) of Philox(seed, counter = m * ceil(KX / 8) + k // 8).
    """
    G: tl.constexpr = BLOCK_K // 8
    BM: tl.constexpr = o_m.shape[0]
    n_groups = (KX + 7) // 8
    o_c = o_m.to(tl.int64)[:, None] * n_groups + (k0 // 8 + tl.arange(0, G)).to(tl.int64)[None, :]
    b_r0, b_r1, b_r2, b_r3 = philox(seed, o_c.to(tl.uint32), (o_c >> 32).to(tl.uint32))
    b_01 = tl.join(b_r0 & 0xFFFF, b_r0 >> 16)
    b_23 = tl.join(b_r1 & 0xFFFF, b_r1 >> 16)
    b_45 = tl.join(b_r2 & 0xFFFF, b_r2 >> 16)
    b_67 = tl.join(b_r3 & 0xFFFF, b_r3 >> 16)
    b_u = tl.join(tl.join(b_01, b_23), tl.join(b_45, b_67))  # (BM, G, 2, 2, 2): lane k % 8 in binary order
    b_u = tl.reshape(b_u, (BM, BLOCK_K))
    return b_u.to(tl.int32, bitcast=True) >= drop_thr


@triton.jit(do_not_specialize=["seed"])
def dropout_mask_kernel(
    p_out,  # (M, K) fp32 out: keep / (1 - p_eff)
    M, K, seed, drop_thr, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Materialise the kernels' dropout mask (tests only: the real kernels never write it)."""
    i_m = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    b_keep = dropout_keep(seed, o_m, i_k * BLOCK_K, K, drop_thr, BLOCK_K)
    b_mask = tl.where(b_keep, drop_scale, 0.0)
    m_out = (o_m < M)[:, None] & (o_k < K)[None, :]
    tl.store(p_out + o_m[:, None] * K + o_k[None, :], b_mask, mask=m_out)


def dropout_threshold(p: float) -> tuple[int, float]:
    """(threshold, rescale): keep iff a 16-bit uniform >= threshold; rescale = 1/(1 - threshold/2^16)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p!r} is outside [0, 1)")
    full = 1 << DROPOUT_BITS
    thr = min(int(round(p * full)), full - 1)
    return thr, full / (full - thr)


def launch_dropout_mask(launch: Callable[..., None], shape: tuple[int, int], p: float, seed: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """The dropout mask of `dropout_keep` for an x of `shape` (M, K), p and seed, materialised (tests only).

    `launch(kernel, grid, kwargs, num_warps, num_stages)` is the calling module's launcher (so its launch
    recording sees this launch too). Returns (M, K) fp32 holding keep / (1 - p_eff); p = 0 gives ones.
    """
    M, K = shape
    out = torch.empty((M, K), device=device, dtype=torch.float32)
    if M == 0 or K == 0:
        return out
    thr, rescale = dropout_threshold(p)
    BM, BK = 16, 32
    kwargs = dict(p_out=out, M=M, K=K, seed=int(seed), drop_thr=thr, drop_scale=rescale, BLOCK_M=BM, BLOCK_K=BK)
    launch(dropout_mask_kernel, (triton.cdiv(M, BM), triton.cdiv(K, BK)), kwargs, 4, 1)
    return out
