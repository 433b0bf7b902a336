"""Launchers of the LoRA kernels (kernels/lora.py): checks, 2-D views, allocation, configs, grids.

Every launcher runs on its inputs' device (a torch.cuda.device guard: Triton launches on the current device) and
end to end on "meta" tensors (no .item(), no host sync), so the launch recorder can list what a GPU of any arch
would run (`dispatch_space`) and a CUDA graph can capture a step. Configs: kernels/lora_configs.py, first
through the offline tuner's table (`tuned`), never by timing at run time. Design and napkin math: kernels/lora.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import triton

from ._common import INTERPRETED, Launch, LaunchRecorder, dropout_threshold, launch_dropout_mask, on_device
from ._common import dot_precision as _dot_precision
from ._configs import shape_bucket, target, tuned, use_target
from ._space import arch_target, compile_key, distinct_compiles, is_main_loop  # noqa: F401 (public names)
from .lora import _lora_linear_kernel, _lora_shrink_kernel
from .lora_configs import (
    INTERPRETER_GEMM,
    INTERPRETER_SHRINK,
    MAX_RANK,
    GemmConfig,
    ShrinkConfig,
    epilogue_config,
    from_table,
    gemm_config,
    gemm_key,
    rank_pad,
    shrink_config,
    shrink_key,
    shrink_split,
)

__all__ = [
    "INTERPRETED", "INTERPRETER_GEMM", "INTERPRETER_SHRINK", "MAX_RANK", "GemmConfig", "ShrinkConfig",
    "base_gemm_choice", "dispatch_space", "distinct_compiles", "dropout_threshold", "lora_dropout_mask",
    "lora_gemm", "lora_linear_bwd", "lora_linear_fwd", "lora_shrink", "rank_pad", "record_launches",
    "sm90_dispatch_space", "use_configs",
]

# The launches whose main loop is a GEMM with N a model dimension (the wgmma N >= 64 gate): only the opt-in
# fused GEMM (16-bit, benchmark shapes). The shrinks (N = r) and the epilogue (K = r) are memory-bound by design.
MAIN_LOOP_ROLES = ("gemm_fwd", "gemm_dx")


# -- launch state: config overrides (tests pass fixed configs) and recording
@dataclass(frozen=True)
class _Overrides:
    gemm: GemmConfig | None = None
    shrink: ShrinkConfig | None = None
    epilogue: GemmConfig | None = None
    base: str | None = None  # "fused" | "cublas"
    split: int | None = None


_overrides = _Overrides()
_recorder = LaunchRecorder()


def _launch(role: str, kernel, grid: tuple[int, ...], kwargs: dict, num_warps: int, num_stages: int) -> None:
    _recorder.launch(kernel, grid, kwargs, num_warps, num_stages, role)


@contextlib.contextmanager
def use_configs(*, gemm: GemmConfig | None = None, shrink: ShrinkConfig | None = None,
                epilogue: GemmConfig | None = None, base: str | None = None,
                split: int | None = None) -> Iterator[None]:
    """Inside the block the launchers use these fixed configs (None: keep the enclosing block's, else the normal
    choice). gemm applies to both fused GEMMs (forward and dx).

    base: "fused" (one Triton GEMM) or "cublas" (cuBLAS products + rank-r terms); split: the split count of every
    shrink's reduction.
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


record_launches = _recorder.record  # with record_launches() as launches: ...


def base_gemm_choice(M: int | None = None) -> str:
    """'cublas' (the default) or 'fused': use_configs(base=...), else env FASTADAPTERS_LORA_GEMM.

    Default cuBLAS: a plain Triton GEMM measured 1.07-1.16x slower than cuBLAS on an H200 (issue 11) and the fused
    GEMM saves only one pass over y (~8 %); no GPU measurement of this fused GEMM exists yet (none was available
    when this was written), so it stays behind FASTADAPTERS_LORA_GEMM=fused until a committed benchmark shows it
    wins. M is accepted for a future size rule and ignored.
    """
    if _overrides.base is not None:
        return _overrides.base
    env = os.environ.get("FASTADAPTERS_LORA_GEMM", "cublas").strip().lower() or "cublas"
    if env == "auto":
        env = "cublas"
    if env not in ("fused", "cublas"):
        raise ValueError(f"FASTADAPTERS_LORA_GEMM={env!r}: use 'cublas' (default) or 'fused'")
    return env


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but the launcher takes 2-D tensors: reshape to (-1, K)")


def _check_rank(R: int) -> None:
    if not 1 <= R <= MAX_RANK:
        raise ValueError(f"rank r={R} is outside the kernels' range 1..{MAX_RANK}: use the 'torch' backend")


_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def shrink_plan(rows: int, red: int, r: int, dtype: torch.dtype, device: torch.device) -> tuple[ShrinkConfig, int]:
    """(tile, split) of a shrink out (rows, r) = in (rows, red) @ w^T: override, tuned table, else the pure rule."""
    tgt = target(device)
    r_pad = rank_pad(r)
    rows_b, red_b = shape_bucket(rows), shape_bucket(red)
    cfg = _overrides.shrink
    if cfg is None:
        key = shrink_key(dtype, r_pad, rows_b, red_b)
        cfg = from_table(ShrinkConfig, tuned(tgt, "lora", "shrink", key)) or shrink_config(tgt, dtype, r_pad, rows_b)
    split = _overrides.split or shrink_split(tgt, cfg, r_pad, rows_b, red_b)
    return cfg, split


def lora_shrink(inp: torch.Tensor, w: torch.Tensor, scale: float, *, seed: int = 0, drop_thr: int = 0,
                dropout: bool = False, trans_in: bool = False, kx: int = 0, split: int | None = None,
                role: str = "shrink") -> torch.Tensor:
    """out = scale * D?(inp) @ w^T in fp32, the reduction split into partial sums added in a fixed order.

    inp: (ROWS, RED) any strides; w: (R, RED) any strides and float dtype; returns (ROWS, R) fp32.
    With `dropout`, D zeroes the elements the kernels' mask drops; mask coordinates are x's (m, k) with
    row length kx: inp is x (trans_in False) or x^T (trans_in True). The 1/(1-p) rescale belongs in `scale`.
    split: the number of partial sums (None: `shrink_plan`'s, from the shape buckets and the GPU).
    """
    _check_2d("inp", inp)
    _check_2d("w", w)
    ROWS, RED = inp.shape
    R = w.shape[0]
    if w.shape[1] != RED:
        raise ValueError(f"w has shape {tuple(w.shape)} but inp {tuple(inp.shape)} needs (R, {RED})")
    _check_rank(R)
    if ROWS == 0 or RED == 0:
        return torch.zeros((ROWS, R), device=inp.device, dtype=torch.float32)
    cfg, planned = shrink_plan(ROWS, RED, R, inp.dtype, inp.device)
    n_red = triton.cdiv(RED, cfg.block_red)  # BLOCK_RED chunks
    split = max(1, min(split or planned, n_red))
    red_per_split = triton.cdiv(n_red, split) * cfg.block_red
    split = triton.cdiv(RED, red_per_split)
    out = torch.empty((split, ROWS, R), device=inp.device, dtype=torch.float32)
    kwargs = dict(
        p_in=inp, p_w=w, p_out=out, ROWS=ROWS, RED=RED, R=R, red_per_split=red_per_split,
        s_in_row=inp.stride(0), s_in_red=inp.stride(1), s_w_r=w.stride(0), s_w_red=w.stride(1),
        s_out_split=out.stride(0), s_out_row=out.stride(1), s_out_r=out.stride(2),
        scale=float(scale), seed=int(seed), drop_thr=int(drop_thr), KX=int(kx),
        BLOCK_ROW=cfg.block_row, BLOCK_RED=cfg.block_red, R_PAD=rank_pad(R),
        HAS_DROPOUT=bool(dropout), TRANS_IN=bool(trans_in), DOT_PREC=_dot_precision(inp.dtype),
    )
    with on_device(inp):
        _launch(role, _lora_shrink_kernel, (triton.cdiv(ROWS, cfg.block_row), split), kwargs, cfg.num_warps,
                cfg.num_stages)
        # the partials, summed by one torch reduction: a fixed order for a fixed split (no atomics)
        return out[0] if split == 1 else out.sum(0)


def lora_gemm(a: torch.Tensor | None, b: torch.Tensor | None, lr: torch.Tensor, lw: torch.Tensor,
              bias: torch.Tensor | None, out: torch.Tensor, scale: float, *, seed: int = 0, drop_thr: int = 0,
              dropout: bool = False, accumulate: bool = False, col_scale: torch.Tensor | None = None,
              config: GemmConfig | None = None, role: str | None = None) -> torch.Tensor:
    """out = col? * ([out +] a @ b + scale * D?(lr @ lw)) [+ bias], written into `out` (M, N), returned.

    a: (M, K) and b: (K, N) views (b None: no main product, the epilogue-only kernel); lr: (M, R) fp32, the
    rank-r left operand; lw: (R, N) view; bias: (N,) or None; col_scale: (N,) fp32 or None. D is the dropout
    mask in out's (m, n) coordinates (n = x's k).
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
    tgt = target(out.device)
    if config is None:
        if not has_main:
            config = _overrides.epilogue or from_table(GemmConfig, tuned(tgt, "lora", "epilogue", _TY[dtype])) \
                or epilogue_config(tgt, dtype)
        else:
            m_b = shape_bucket(M)
            config = _overrides.gemm or from_table(
                GemmConfig, tuned(tgt, "lora", "gemm", gemm_key(dtype, m_b, N, K, dropout))) \
                or gemm_config(tgt, dtype, m_b, dropout=bool(dropout))
    cfg = config
    if role is None:
        role = ("gemm_dx" if dropout else "gemm_fwd") if has_main else "epilogue"
    kwargs = dict(
        p_a=a_, p_b=b_, p_l=lr, p_lw=lw, p_bias=bias if bias is not None else out,
        p_col=col_scale if col_scale is not None else out, p_out=out, M=M, N=N, K=K, R=R,
        s_am=a_.stride(0), s_ak=a_.stride(1), s_bk=b_.stride(0), s_bn=b_.stride(1), s_lm=lr.stride(0),
        s_lr=lr.stride(1), s_lwr=lw.stride(0), s_lwn=lw.stride(1), s_om=out.stride(0), s_on=out.stride(1),
        scale=float(scale), seed=int(seed), drop_thr=int(drop_thr),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=min(cfg.block_r, r_pad),
        R_PAD=r_pad, GROUP_M=cfg.group_m, HAS_MAIN=has_main, HAS_BIAS=bias is not None,
        HAS_DROPOUT=bool(dropout), ACCUMULATE=bool(accumulate), HAS_COL_SCALE=col_scale is not None,
        DOT_PREC=_dot_precision(dtype),
    )
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    with on_device(out):
        _launch(role, _lora_linear_kernel, grid, kwargs, cfg.num_warps, cfg.num_stages)
    return out


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, seed: int = 0,
                    col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (y, xa) with y = c * (x W^T + s * dropout(x) A^T B^T) + b and xa = dropout(x) A^T in fp32.

    x: (M, K) any strides; weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); col_scale: c, (N,)
    fp32 or None (DoRA's magnitude / column norm: then the rank-r term and c run in the epilogue kernel, one read +
    write of y, instead of cuBLAS's beta = 1 addmm). Returns y: (M, N) in x's dtype, xa: (M, r) fp32 (saved for
    backward). The mask comes from `seed`.
    """
    _check_2d("x", x)
    M, K = x.shape
    N = weight.shape[0]
    dropout = dropout_p > 0.0
    thr, rescale = dropout_threshold(dropout_p) if dropout else (0, 1.0)
    with on_device(x):
        xa = lora_shrink(x, lora_A, rescale, seed=seed, drop_thr=thr, dropout=dropout, kx=K, role="shrink_xa")
        if base_gemm_choice(M) == "cublas":
            if col_scale is not None:  # y = c * (x W^T + s xa B^T) + b: the bias after the scale
                y = torch.mm(x, weight.t())
                lora_gemm(x, None, xa, lora_B.t(), bias, y, scaling, accumulate=True, col_scale=col_scale,
                          role="epilogue_fwd")
            else:
                y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
                y.addmm_(xa.to(y.dtype), lora_B.t().to(y.dtype), alpha=scaling)  # cuBLAS beta = 1: y += s xa B^T
        else:
            y = torch.empty((M, N), device=x.device, dtype=x.dtype)
            lora_gemm(x, weight.t(), xa, lora_B.t(), bias, y, scaling, col_scale=col_scale)
    return y, xa


def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, xa: torch.Tensor, scaling: float, dropout_p: float, seed: int, *,
                    need_dx: bool = True, need_dA: bool = True, need_dB: bool = True, need_dW: bool = False,
                    need_db: bool = False) -> tuple[torch.Tensor | None, ...]:
    """Backward of `lora_linear_fwd`: (dx, dA, dB, dW, db), None where not asked for.

    dy: (M, N); x: (M, K) as in forward; xa: (M, r) fp32 from forward; same seed and dropout_p as forward.
    dx: (M, K), dA: (r, K), dB: (N, r), dW: (N, K), db: (N,), each in its input's dtype. dA and dB are bitwise
    reproducible: fixed tiles and split counts per shape bucket and GPU, partials summed in a fixed order.
    """
    _check_2d("dy", dy)
    M, K = x.shape
    dtype = x.dtype
    dropout = dropout_p > 0.0
    thr, rescale = dropout_threshold(dropout_p) if dropout else (0, 1.0)
    dx = dA = dB = dW = db = None
    drop = dict(seed=seed, drop_thr=thr, dropout=dropout)
    with on_device(dy):
        dxa = None
        if need_dx or need_dA:
            dxa = lora_shrink(dy, lora_B.t(), scaling, role="shrink_dxa")  # (M, r) fp32: s dy B
        if need_dB:
            dB = lora_shrink(dy.t(), xa.t(), scaling, role="shrink_dB").to(lora_B.dtype)  # (N, r): s dy^T xa
        if need_dx:
            if base_gemm_choice(M) == "cublas":
                dx = torch.mm(dy, weight)
                if dropout:  # the mask sits on the rank-r term: the epilogue kernel draws it
                    lora_gemm(dy, None, dxa, lora_A, None, dx, rescale, accumulate=True, role="epilogue_dx", **drop)
                else:
                    dx.addmm_(dxa.to(dtype), lora_A.to(dtype))  # cuBLAS beta = 1: dx += dxa A
            else:
                dx = torch.empty((M, K), device=x.device, dtype=dtype)
                lora_gemm(dy, weight, dxa, lora_A, None, dx, rescale, **drop)
        if need_dA:
            dA_t = lora_shrink(x.t(), dxa.t(), rescale, trans_in=True, kx=K, role="shrink_dA",
                               **drop)  # (K, r): (dxa^T D(x))^T
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
    def launch(kernel, grid, kwargs, num_warps, num_stages):
        _launch("dropout_mask", kernel, grid, kwargs, num_warps, num_stages)

    dev = torch.device(device)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        return launch_dropout_mask(launch, shape, p, seed, dev)


# ------------------------------------------------------------------------------------------------ dispatch space
# Benchmark shapes (benchmarks/bench_lora.py presets: M in 256, 4096, 16384; K = N = 4096; r = 16; p in 0.05, 0)
# and odd shapes (no 16-divisible sizes, rank 5, ragged tiles).
BENCH_SHAPES = ((256, 4096, 4096, 16), (4096, 4096, 4096, 16), (16384, 4096, 4096, 16))
ODD_SHAPES = ((37, 72, 40, 5), (1000, 4095, 4097, 13))
RANK_SHAPES = ((4096, 4096, 4096, 256),)  # the largest rank: the widest shrink accumulator


def _cfg_tag(launch: Launch) -> str:
    kw = launch.kwargs
    if "BLOCK_ROW" in kw:
        return (f"{kw['BLOCK_ROW']}x{kw['BLOCK_RED']}xR{kw['R_PAD']}-w{launch.num_warps}s{launch.num_stages}"
                f"-split{launch.grid[1]}")
    if "BLOCK_M" in kw and "BLOCK_N" in kw:
        return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}-w{launch.num_warps}s{launch.num_stages}"
    return f"w{launch.num_warps}s{launch.num_stages}"


def _record(arch: str, dtype: torch.dtype, shape: tuple[int, int, int, int], p: float, base: str,
            bias: bool = True, odd: bool = False) -> list[tuple[str, Launch]]:
    """Every launch of one forward + backward (all gradients) on meta tensors, labelled per benchmarks/static.py:
    "lora/<role>[#main]@[odd-]M..-K..-N..-r..-p..-<dtype>[-fused]:<config>"."""
    M, K, N, r = shape
    meta = torch.device("meta")
    x = torch.empty((M, K), device=meta, dtype=dtype)
    W = torch.empty((N, K), device=meta, dtype=dtype)
    b = torch.empty((N,), device=meta, dtype=dtype) if bias else None
    A = torch.empty((r, K), device=meta, dtype=dtype)
    B = torch.empty((N, r), device=meta, dtype=dtype)
    dy = torch.empty((M, N), device=meta, dtype=dtype)
    with use_target(arch_target(arch)), use_configs(base=base), record_launches() as rec:
        _, xa = lora_linear_fwd(x, W, b, A, B, 2.0, p, seed=1234)
        lora_linear_bwd(dy, x, W, A, B, xa, 2.0, p, 1234, need_dW=True, need_db=True)
    tag = ("odd-" if odd else "") + f"M{M}-K{K}-N{N}-r{r}-p{p:g}-{_TY[dtype]}" + ("-fused" if base == "fused" else "")
    out = []
    for launch in rec:
        role = launch.role
        # the wgmma gate's main loops: the fused GEMM of a 16-bit model at the benchmark shapes (fp32 keeps
        # torch's exact-fp32 contract, "ieee" dots on FMA, unless TF32 is allowed; odd shapes are checked for
        # resources only)
        main = role in MAIN_LOOP_ROLES and dtype != torch.float32 and not odd
        if main:
            launch = replace(launch, info={**launch.info, "main_loop": True})
        out.append((f"lora/{role}{'#main' if main else ''}@{tag}:{_cfg_tag(launch)}", launch))
    return out


def dispatch_space(arch: str, full: bool = False) -> list[tuple[str, Launch]]:
    """(label, launch) for every launch of a forward + backward on a GPU of `arch`, from the real launchers on meta
    tensors under `use_target(arch)` (so exactly the configs that GPU would pick), one call per shape and path.

    Labels (benchmarks/static.py's convention): "lora/<role>[#main]@<shape>:<config>"; roles shrink_xa,
    shrink_dxa, shrink_dB, shrink_dA, epilogue_dx (the default cuBLAS path: the base products and the unmasked
    rank-r terms are cuBLAS, seen by static.py through the meta aten ops) and gemm_fwd#main, gemm_dx#main (the
    opt-in fused GEMM, shape tag "-fused"); "lora/dropout_mask" (test-only materialiser) belongs to no call.
    Default: bf16 and fp32 at the benchmark shapes with dropout on the default path, the fused GEMM at M = 4096
    and M = 256 (its two tile rules), the odd shapes and rank 256 in bf16. full: fp16 too, p = 0 and 0.05, every
    shape on both paths, ranks 16..256 at M = 4096. `distinct_compiles(space)`: one entry per distinct binary.
    """
    tgt = arch_target(arch)
    global _overrides
    outer, _overrides = _overrides, _Overrides()  # the configs a GPU would pick, not a test's fixed ones
    out: list[tuple[str, Launch]] = []
    try:
        dtypes = (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16, torch.float32)
        for dt in dtypes:
            shapes = BENCH_SHAPES + ODD_SHAPES + RANK_SHAPES if (full or dt == torch.bfloat16) else BENCH_SHAPES
            for shape in shapes:
                odd = shape in ODD_SHAPES
                for p in ((0.05, 0.0) if full else (0.05,)):
                    out += _record(arch, dt, shape, p, "cublas", odd=odd)
                    if full or shape[0] in (256, 4096) and shape in BENCH_SHAPES:
                        out += _record(arch, dt, shape, p, "fused", odd=odd)
            if full:
                for r in (32, 64, 128):
                    out += _record(arch, dt, (4096, 4096, 4096, r), 0.05, "cublas")
                    out += _record(arch, dt, (4096, 4096, 4096, r), 0.05, "fused")
        with use_target(tgt), record_launches() as rec:
            lora_dropout_mask((4096, 4096), 0.05, 1234, device="meta")
        out.append((f"lora/dropout_mask:{_cfg_tag(rec[0])}", rec[0]))
    finally:
        _overrides = outer
    return out


def sm90_dispatch_space(full: bool = False) -> list[tuple[str, Launch]]:
    """dispatch_space("sm_90", full): kept for the callers written before the per-arch space."""
    return dispatch_space("sm_90", full)


def role_of(label: str) -> str:
    """"lora/shrink_xa@M256-...:64x128" -> "shrink_xa"."""
    return label.split("/")[1].split("@")[0].split(":")[0].removesuffix("#main")
