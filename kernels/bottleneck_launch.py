"""Launchers of the bottleneck-adapter kernels (kernels/bottleneck.py): checks, 2-D views, the weight cast, configs,
grids, and the labelled dispatch space the compile tests and the static report compile.

Every launcher runs on its inputs' device (a torch.cuda.device guard: Triton launches on the current device) and end
to end on "meta" tensors (no .item(), no host sync, no timing), so the launch recorder lists what a GPU of any arch
would run (`dispatch_space`, under kernels._configs.use_target) and a CUDA graph can capture a step. Configs:
`tuned(...)` (the offline tuner's table) or kernels/bottleneck_configs.py. Design, napkin math:
kernels/bottleneck.py.

Weights on the layer's real path (a bf16/fp16 model with fp32 adapter weights): the launcher casts the two weight
matrices to the activation dtype once per call (one pass over 2 d b elements: 12.6 MB read + written at d = 4096,
b = 256, ~3 us at 4.3 TB/s) and every GEMM runs on 16-bit operands (tensor cores: wgmma on sm_90, mma.sync before);
the weight gradients are reduced from fp32 partials and returned in the weights' own dtype (fp32), so the master
weights get full-precision gradients. Casting tiles inside the kernel instead would keep fp32 tiles in the
cp.async pipeline (twice the shared memory per stage: the 227 KiB budget would force half the stages or tiles) and
double the L2 traffic of the weights that every row block re-reads (see kernels/bottleneck.py), which is the
kernel's limit already; the cast pass costs ~3 % of the forward floor at M = 16384 instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton

from ._common import Launch, LaunchRecorder, dropout_threshold, launch_dropout_mask, on_device
from ._common import dot_precision as _dot_precision
from ._configs import Target, shape_bucket, target, tuned, use_target
from ._space import arch_target, compile_key, distinct_compiles, is_main_loop  # noqa: F401 (public names)
from .bottleneck import ACTIVATIONS, _bottleneck_bwd_dx_kernel, _bottleneck_bwd_w_kernel, _bottleneck_fwd_kernel
from .bottleneck_configs import (
    INTERPRETER_ROW,
    INTERPRETER_WGRAD,
    MAX_BOTTLENECK,
    PADDED_BOTTLENECKS,
    RowConfig,
    WgradConfig,
    bottleneck_config,
    bottleneck_pad,
    config_key,
    from_table,
    wgrad_split,
)

__all__ = [
    "ACTIVATIONS", "INTERPRETER_ROW", "INTERPRETER_WGRAD", "MAX_BOTTLENECK", "PADDED_BOTTLENECKS", "RowConfig",
    "WgradConfig", "bottleneck_bwd", "bottleneck_dropout_mask", "bottleneck_fwd", "bottleneck_pad", "compile_key",
    "dispatch_space", "distinct_compiles", "dot_dtype", "is_main_loop", "record_launches", "sm90_dispatch_space",
    "use_configs",
]

# The launches whose main loops are GEMM-sized: the forward's phase 2 (N = d_out) and the dx kernel's phase 2
# (N = d_in) have a model dimension as N; their phase 1 and the weight-gradient tiles have N = b (the bottleneck).
MAIN_LOOP_ROLES = ("fwd", "dx", "wgrad")


def dot_dtype(h_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The tl.dot operand dtype: h's when it is 16-bit (16-bit weights as they are, fp32 weights cast to it),
    else float32 (an fp32 model)."""
    return h_dtype if h_dtype in (torch.bfloat16, torch.float16) else torch.float32


# -- launch state: config overrides (tests pass fixed configs) and recording
@dataclass(frozen=True)
class _Overrides:
    fwd: RowConfig | None = None
    dx: RowConfig | None = None
    wgrad: WgradConfig | None = None
    split: int | None = None


_overrides = _Overrides()
_recorder = LaunchRecorder()


def _launch(role: str, kernel, grid: tuple[int, ...], kwargs: dict, num_warps: int, num_stages: int) -> None:
    _recorder.launch(kernel, grid, kwargs, num_warps, num_stages, role)


@contextlib.contextmanager
def use_configs(*, row: RowConfig | None = None, fwd: RowConfig | None = None, dx: RowConfig | None = None,
                wgrad: WgradConfig | None = None, split: int | None = None) -> Iterator[None]:
    """Inside the block the launchers use these fixed configs (None: the normal choice). row: both row kernels
    (fwd and dx); fwd / dx: one of them; split: the number of partial reductions over M of the wgrad kernel."""
    global _overrides
    old = _overrides
    _overrides = _Overrides(fwd or row, dx or row, wgrad, split)
    try:
        yield
    finally:
        _overrides = old


record_launches = _recorder.record  # with record_launches() as launches: ...


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """2-D with unit inner stride (the kernels take a row stride only)."""
    if t.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but the launcher takes 2-D tensors: reshape to (-1, d)")
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _aligned(tensors: list[torch.Tensor | None], ints: list[int]) -> bool:
    """Would the launch see every pointer 16-byte aligned and every size / row stride a multiple of 16 (Triton's
    specialisation, hence vector loads and cp.async pipelining)? Picks the aligned or the unaligned configs."""
    return (all(t is None or t.data_ptr() % 16 == 0 for t in tensors) and all(int(n) % 16 == 0 for n in ints))


def _row_config(kind: str, dev: torch.device, dt: torch.dtype, M: int, d_in: int, d_out: int, B: int,
                aligned: bool) -> RowConfig:
    override = getattr(_overrides, kind)
    if override is not None:
        return override
    tgt = target(dev)
    key = config_key(dt, shape_bucket(M), d_in, d_out, B, aligned)
    return from_table(RowConfig, tuned(tgt, "bottleneck", kind, key)) or bottleneck_config(
        tgt, kind, dt, B, aligned, _dot_precision(torch.float32))


def _weights(down_weight: torch.Tensor, up_weight: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The weights as the dots read them: contiguous, in the dot dtype (fp32 masters cast once per call)."""
    return down_weight.to(dt).contiguous(), up_weight.to(dt).contiguous()


def bottleneck_fwd(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: torch.Tensor | None,
    scaling: float,
    activation: str,
    dropout_p: float = 0.0,
    seed: int = 0,
    save_pre: bool = True,
    config: RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: (y, pre, a) with y = res + s * (a W_u^T + b_u), a = act(pre), pre = D(h) W_d^T + b_d.

    h: (M, d_in), unit inner stride or copied to it; down_weight: (b, d_in); up_weight: (d_out, b) (any float dtype:
    cast to the dot dtype, see `dot_dtype`); down_bias: (b,) or None; up_bias: (d_out,) or None; residual:
    (M, d_out) in h's dtype, or None for h (d_out == d_in); scale: one-element learned scalar (any float dtype; used
    instead of `scaling`) or None. Returns y: (M, d_out) in h's dtype, pre: (M, b) fp32 and a: (M, b) in the dot
    dtype (both (0, b) unless save_pre). The dropout mask comes from `seed` (dropout_p = 0: none).
    """
    h = _rows("h", h)
    M, d_in = h.shape
    nb = down_weight.shape[0]
    d_out = up_weight.shape[0]
    if nb > MAX_BOTTLENECK:
        raise ValueError(f"bottleneck size {nb} is above the kernels' limit {MAX_BOTTLENECK}: use the 'torch' backend")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: choose one of {ACTIVATIONS}")
    res = h if residual is None else _rows("residual", residual)
    B = bottleneck_pad(nb)
    dt = dot_dtype(h.dtype, down_weight.dtype)
    dev = h.device
    y = torch.empty((M, d_out), device=dev, dtype=h.dtype)
    pre = torch.empty((M if save_pre else 0, nb), device=dev, dtype=torch.float32)
    a = torch.empty((M if save_pre else 0, nb), device=dev, dtype=dt)
    if M == 0:
        return y, pre, a
    with on_device(h):
        down_weight, up_weight = _weights(down_weight, up_weight, dt)
        dropout = dropout_p > 0.0
        thr, rescale = dropout_threshold(dropout_p) if dropout else (0, 1.0)
        aligned = _aligned([h, down_weight, up_weight, down_bias, up_bias, res, y],
                           [d_in, d_out, nb, h.stride(0), res.stride(0)])
        cfg = config or _row_config("fwd", dev, dt, M, d_in, d_out, B, aligned)
        bj = cfg.bj(B)
        p_a = a
        if bj < B and not save_pre:  # chunked mode parks act(pre) in memory between its phases
            p_a = torch.empty((M, nb), device=dev, dtype=dt)
        kwargs = dict(
            p_h=h, p_down=down_weight, p_up=up_weight,
            p_db=down_bias if down_bias is not None else down_weight,
            p_ub=up_bias if up_bias is not None else up_weight,
            p_res=res, p_scale=scale if scale is not None else y, p_y=y, p_pre=pre if save_pre else y,
            p_a=p_a if p_a.numel() else y,
            M=M, D_IN=d_in, D_OUT=d_out, NB=nb, s_hm=h.stride(0), s_rm=res.stride(0), s_ym=y.stride(0),
            scaling=float(scaling), seed=int(seed), drop_thr=int(thr), drop_scale=float(rescale),
            B=B, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, BLOCK_J=bj,
            ACTIVATION=activation, HAS_DOWN_BIAS=down_bias is not None, HAS_UP_BIAS=up_bias is not None,
            LEARNED_SCALE=scale is not None, HAS_DROPOUT=dropout, SAVE_PRE=bool(save_pre),
            DOT_FP32=dt == torch.float32, DOT_PREC=_dot_precision(torch.float32),
        )
        _launch("fwd", _bottleneck_fwd_kernel, (triton.cdiv(M, cfg.block_m),), kwargs, cfg.num_warps,
                cfg.num_stages)
    return y, pre, a


def bottleneck_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    pre: torch.Tensor,
    a: torch.Tensor,
    scale: torch.Tensor | None,
    scaling: float,
    activation: str,
    dropout_p: float = 0.0,
    seed: int = 0,
    *,
    add_dy: bool,
    need_dh: bool = True,
    need_ddown: bool = True,
    need_dup: bool = True,
    need_ddown_bias: bool = False,
    need_dup_bias: bool = False,
    need_dscale: bool = False,
    row_config: RowConfig | None = None,
    wgrad_config: WgradConfig | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Backward of `bottleneck_fwd`: (dh, d_down, d_up, d_down_bias, d_up_bias, d_scale), None where not asked for.

    dy: (M, d_out); h: (M, d_in) as in forward; pre: (M, b) fp32 and a: (M, b) from forward; same weights (master
    dtype), scale/scaling, activation, dropout_p and seed as forward; add_dy: the residual was h (dh gets dy added).
    Gradients come in the dtype of their input: dh like h, weights and biases like the weights (reduced in fp32),
    d_scale like `scale` (its shape); with scale None the d_scale slot is the gradient of the float scaling, a
    float32 () tensor (for tests). The weight gradients are bitwise the same on every run (a fixed split over M).
    """
    dy = _rows("dy", dy)
    h = _rows("h", h)
    M, d_in = h.shape
    nb = down_weight.shape[0]
    d_out = up_weight.shape[0]
    dev = h.device
    wdtype = down_weight.dtype
    B = bottleneck_pad(nb)
    dt = dot_dtype(h.dtype, wdtype)
    prec = _dot_precision(torch.float32)
    dropout = dropout_p > 0.0
    thr, rescale = dropout_threshold(dropout_p) if dropout else (0, 1.0)
    learned = scale is not None
    s = scale.reshape(()).float() if learned else float(scaling)
    need_colsum = need_dup_bias or (need_dscale and up_bias is not None)

    if M == 0:
        def zeros(*shape: int, dtype: torch.dtype = wdtype) -> torch.Tensor:
            return torch.zeros(shape, device=dev, dtype=dtype)

        return (torch.empty((0, d_in), device=dev, dtype=h.dtype) if need_dh else None,
                zeros(nb, d_in) if need_ddown else None, zeros(d_out, nb) if need_dup else None,
                zeros(nb) if need_ddown_bias else None, zeros(d_out) if need_dup_bias else None,
                (torch.zeros_like(scale) if learned else zeros(dtype=torch.float32)) if need_dscale else None)

    dbp = dsp = dup = ddn = csum = g = dh = None
    with on_device(h):
        down_weight, up_weight = _weights(down_weight, up_weight, dt)
        # -- dx kernel: t = dy W_u, g, dh and the per-tile partial sums
        if need_dh or need_ddown or need_ddown_bias or need_dscale:
            aligned = _aligned([dy, h, down_weight, up_weight, pre, a], [d_in, d_out, nb, dy.stride(0)])
            cfg = row_config or _row_config("dx", dev, dt, M, d_in, d_out, B, aligned)
            dh = torch.empty((M, d_in), device=dev, dtype=h.dtype) if need_dh else None
            chunked = cfg.bj(B) < B
            store_g = need_ddown or (chunked and need_dh)
            n_tiles = triton.cdiv(M, cfg.block_m)
            g = torch.empty((M, nb), device=dev, dtype=dt) if store_g else None
            dbp = torch.empty((n_tiles, nb), device=dev, dtype=torch.float32) if need_ddown_bias else None
            dsp = torch.empty((n_tiles,), device=dev, dtype=torch.float32) if need_dscale else None
            dummy = pre
            kwargs = dict(
                p_dy=dy, p_up=up_weight, p_down=down_weight, p_pre=pre, p_scale=scale if learned else dummy,
                p_dh=dh if need_dh else dummy, p_a=a, p_g=g if store_g else dummy,
                p_dbp=dbp if dbp is not None else dummy, p_dsp=dsp if dsp is not None else dummy,
                M=M, D_IN=d_in, D_OUT=d_out, NB=nb, s_dym=dy.stride(0),
                scaling=float(scaling), seed=int(seed), drop_thr=int(thr), drop_scale=float(rescale),
                B=B, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, BLOCK_J=cfg.bj(B),
                ACTIVATION=activation, LEARNED_SCALE=learned, SCALE_GRAD=need_dscale, HAS_DOWN_BIAS=need_ddown_bias,
                HAS_DROPOUT=dropout, ADD_DY=bool(add_dy), COMPUTE_DH=need_dh, STORE_G=store_g,
                DOT_FP32=dt == torch.float32, DOT_PREC=prec,
            )
            _launch("dx", _bottleneck_bwd_dx_kernel, (n_tiles,), kwargs, cfg.num_warps, cfg.num_stages)

        # -- weight kernel: dW_u^T = dy^T a (+ colsum dy), dW_d^T = D(h)^T g, split over M
        if need_dup or need_ddown or need_colsum:
            do_up = need_dup or need_colsum
            aligned = _aligned([dy, h, a, g], [d_in, d_out, nb, dy.stride(0), h.stride(0)])
            tgt = target(dev)
            c = wgrad_config or _overrides.wgrad
            if c is None:
                key = config_key(dt, shape_bucket(M), d_in, d_out, B, aligned)
                c = from_table(WgradConfig, tuned(tgt, "bottleneck", "wgrad", key)) or bottleneck_config(
                    tgt, "wgrad", dt, B, aligned, prec)
            j_tiles = triton.cdiv(nb, c.block_j)
            n_up = triton.cdiv(d_out, c.block_n) * j_tiles if do_up else 0
            n_dn = triton.cdiv(d_in, c.block_n) * j_tiles if need_ddown else 0
            split = _overrides.split or wgrad_split(tgt, shape_bucket(M), n_up + n_dn, c.block_m)
            m_per_split = triton.cdiv(triton.cdiv(M, split), c.block_m) * c.block_m
            split = triton.cdiv(M, m_per_split)
            dup = torch.empty((split, d_out, nb), device=dev, dtype=torch.float32) if n_up else None
            ddn = torch.empty((split, nb, d_in), device=dev, dtype=torch.float32) if n_dn else None
            csum = torch.empty((split, d_out), device=dev, dtype=torch.float32) if need_colsum else None
            dummy = pre
            kwargs = dict(
                p_dy=dy, p_a=a, p_h=h, p_g=g if g is not None else a,
                p_dup=dup if dup is not None else dummy, p_ddn=ddn if ddn is not None else dummy,
                p_dyc=csum if csum is not None else dummy,
                M=M, D_IN=d_in, D_OUT=d_out, NB=nb, s_dym=dy.stride(0), s_hm=h.stride(0),
                m_per_split=m_per_split, n_up_tiles=n_up, j_tiles=j_tiles, seed=int(seed), drop_thr=int(thr),
                BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_J=c.block_j,
                UP_COLSUM=need_colsum, HAS_DROPOUT=dropout, DOT_FP32=dt == torch.float32, DOT_PREC=prec,
            )
            _launch("wgrad", _bottleneck_bwd_w_kernel, (n_up + n_dn, split), kwargs, c.num_warps, c.num_stages)

        def total(t: torch.Tensor | None) -> torch.Tensor:
            assert t is not None
            return t[0] if t.shape[0] == 1 else t.sum(0)  # a fixed-order reduction: deterministic

        d_down = (total(ddn) * rescale).to(wdtype) if need_ddown else None
        d_up = (total(dup) * s).to(wdtype) if need_dup else None
        d_db = total(dbp).to(wdtype) if need_ddown_bias else None
        dyc = total(csum) if need_colsum else None
        d_ub = (dyc * s).to(wdtype) if need_dup_bias else None
        d_scale = None
        if need_dscale:
            ds = dsp.sum()
            if up_bias is not None:
                ds = ds + (dyc * up_bias.float()).sum()
            d_scale = ds.reshape(scale.shape if learned else ()).to(scale.dtype if learned else torch.float32)
    return dh, d_down, d_up, d_db, d_ub, d_scale


def bottleneck_dropout_mask(shape: tuple[int, int], p: float, seed: int,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """The dropout mask the kernels apply to an h of `shape` (M, d_in) for p and seed, materialised (tests only).

    Returns (M, d_in) fp32 holding keep / (1 - p_eff): pass it as the reference's dropout_mask to run the
    reference with exactly the kernels' mask. p = 0 gives ones.
    """
    if p == 0:
        return torch.ones(shape, device=device, dtype=torch.float32)

    def launch(kernel, grid, kwargs, num_warps, num_stages):
        _launch("dropout_mask", kernel, grid, kwargs, num_warps, num_stages)

    dev = torch.device(device)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        return launch_dropout_mask(launch, shape, p, seed, device)


# ------------------------------------------------------------------------------------------------ dispatch space
# Benchmark shapes (benchmarks/bench_bottleneck.py presets: M in 4096, 16384; d = 4096; b = 256; series adapter,
# silu; no biases, dropout or learned scale) on the bf16 model's two weight dtypes; odd shapes (sizes not multiples
# of 16, b = 5 / 100 / 1000, d_in != d_out) and two aligned ones (b = 256, b = 1024: the chunked mode), each with
# dropout, both biases, a learned scale and every gradient (the heaviest variant of each config: flags only remove
# code).
BENCH_SHAPES = ((4096, 4096, 4096, 256), (16384, 4096, 4096, 256))
# aligned, every feature on: the benchmark's tiles with dropout, biases and the learned scale, and the chunked mode
ALIGNED_ODD = ((4096, 4096, 4096, 256), (2048, 4096, 4096, 1024))
ODD_SHAPES = ((37, 72, 40, 5), (1000, 4104, 4104, 100), (1000, 1000, 1032, 1000))
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _cfg_tag(launch: Launch) -> str:
    kw = launch.kwargs
    dims = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_K", "BLOCK_N", "BLOCK_J") if k in kw)
    return f"{dims}-w{launch.num_warps}s{launch.num_stages}"


def _record(tgt: Target, h_dt: torch.dtype, w_dt: torch.dtype, shape: tuple[int, int, int, int], kind: str,
            prec: str = "highest") -> list[tuple[str, Launch]]:
    """One forward + backward on meta tensors under `tgt`, labelled per the static report's convention
    (benchmarks/static.py): "bottleneck/<role>[#main]@<shape key>:<config>"; kind "bench" (a benchmark shape:
    fwd / dx / wgrad are main loops, key M..-d..-b..-<dtype>[-fp32w] as the report's bench_shapes) or "odd"."""
    M, d_in, d_out, nb = shape
    meta = torch.device("meta")
    h = torch.empty((M, d_in), device=meta, dtype=h_dt)
    dy = torch.empty((M, d_out), device=meta, dtype=h_dt)
    res = torch.empty((M, d_out), device=meta, dtype=h_dt) if d_in != d_out else None
    Wd = torch.empty((nb, d_in), device=meta, dtype=w_dt)
    Wu = torch.empty((d_out, nb), device=meta, dtype=w_dt)
    bias = kind != "bench"  # the benchmark's call has no biases, no learned scale, no dropout (bench_bottleneck)
    bd = torch.empty((nb,), device=meta, dtype=w_dt) if bias else None
    bu = torch.empty((d_out,), device=meta, dtype=w_dt) if bias else None
    scale = torch.empty((1,), device=meta, dtype=torch.float32) if bias else None
    p = 0.05 if bias else 0.0
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(prec)
    try:
        with use_target(tgt), record_launches() as rec:
            _, pre, a = bottleneck_fwd(h, Wd, Wu, bd, bu, res, scale, 1.0, "silu" if not bias else "gelu_tanh", p,
                                       1234)
            bottleneck_bwd(dy, h, Wd, Wu, bu, pre, a, scale, 1.0, "silu" if not bias else "gelu_tanh", p, 1234,
                           add_dy=res is None, need_ddown_bias=bias, need_dup_bias=bias, need_dscale=bias)
    finally:
        torch.set_float32_matmul_precision(old)
    w = "" if w_dt == h_dt else f"-{_TY[w_dt]}w"
    pr = f"-{'tf32' if prec == 'high' else 'ieee'}" if h_dt == torch.float32 else ""
    if kind == "bench":
        key = f"M{M}-d{d_in}-b{nb}-{_TY[h_dt]}{w}{pr}"
    else:
        key = f"odd-M{M}-din{d_in}-dout{d_out}-b{nb}-{_TY[h_dt]}{w}{pr}"
    main = kind == "bench" and h_dt != torch.float32  # fp32 models keep fp32 dots (FMAs or tf32): not gated
    return [(f"bottleneck/{L.role}{'#main' if main and L.role in MAIN_LOOP_ROLES else ''}@{key}:{_cfg_tag(L)}", L)
            for L in rec]


def dispatch_space(arch: str, full: bool = False) -> list[tuple[str, Launch]]:
    """(label, launch) for what a forward + backward dispatches to on a GPU of `arch`, from the real launchers on
    meta tensors under `use_target(arch)` (exactly the configs that GPU would pick): every launch of every call,
    not deduplicated (the static report sums a call's launches; `compile_key` tells which compile alike), plus the
    dropout-mask kernel (tests only; no call).

    Labels (benchmarks/static.py's convention): "bottleneck/<role>[#main]@<shape>:<config>", roles fwd, dx, wgrad,
    dropout_mask; shapes "M16384-d4096-b256-bf16-fp32w" (the benchmark shapes: #main on fwd / dx / wgrad) and
    "odd-M..-din..-dout..-b..-<dtype>". Default: the benchmark shapes (benchmarks/bench_bottleneck.py's full preset,
    with dropout, biases and the learned scale off as the benchmark calls it) on a bf16 model with fp32 adapter
    weights (the layer's real path) and bf16 ones (the benchmark's), and the odd shapes (aligned b = 256 and
    b = 1024, unaligned ones)
    (every feature on: dropout, both biases, learned scale, all gradients). full: fp16 and fp32 models too, and
    every padded bottleneck 16..1024 at M = 4096, d = 4096 and its unaligned twin (d = 4104, b = B - 3).
    """
    tgt = arch_target(arch)
    global _overrides
    outer, _overrides = _overrides, _Overrides()  # the configs a GPU would pick, not a test's fixed ones
    try:
        out: list[tuple[str, Launch]] = []
        for shape in BENCH_SHAPES:
            out += _record(tgt, torch.bfloat16, torch.float32, shape, "bench")
            out += _record(tgt, torch.bfloat16, torch.bfloat16, shape, "bench")
        for shape in ALIGNED_ODD + ODD_SHAPES:
            out += _record(tgt, torch.bfloat16, torch.float32, shape, "odd")
        if full:
            for shape in BENCH_SHAPES:
                out += _record(tgt, torch.float16, torch.float32, shape, "bench")
                out += _record(tgt, torch.float32, torch.float32, shape, "bench", "highest")
                out += _record(tgt, torch.float32, torch.float32, shape, "bench", "high")
            for shape in ODD_SHAPES:
                out += _record(tgt, torch.float16, torch.float32, shape, "odd")
                out += _record(tgt, torch.float32, torch.float32, shape, "odd", "highest")
                out += _record(tgt, torch.float32, torch.float32, shape, "odd", "high")
            for B in PADDED_BOTTLENECKS:
                out += _record(tgt, torch.bfloat16, torch.float32, (4096, 4096, 4096, B), "odd")
                out += _record(tgt, torch.bfloat16, torch.float32, (4096, 4104, 4104, B - 3), "odd")
        with record_launches() as rec:
            bottleneck_dropout_mask((4096, 4096), 0.05, 1234, device="meta")
        out.append((f"bottleneck/dropout_mask:{_cfg_tag(rec[0])}", rec[0]))
    finally:
        _overrides = outer
    return out


def sm90_dispatch_space(full: bool = False) -> list[tuple[str, Launch]]:
    """dispatch_space("sm_90", full): kept for the callers written before the per-arch space."""
    return dispatch_space("sm_90", full)

