"""Launchers of the prefix-attention kernels (kernels/prefix_attention.py): checks, allocation, configs, grids.

Every launcher runs on its inputs' device (a torch.cuda.device guard: Triton launches on the current device) and
end to end on "meta" tensors (no .item(), no host sync), so the launch recorder can list what a GPU of any arch
would run (`dispatch_space`) and a CUDA graph can capture a step. Configs: kernels/prefix_attention_configs.py,
first through the offline tuner's table (`tuned`), never by timing at run time. Every grid is 1-D (B * H folded
into grid x). Design and napkin math: kernels/prefix_attention.py.

Backward mode: `deterministic=None` (the default) follows FASTADAPTERS_PREFIX_DETERMINISTIC ("1" / "0") when set,
else `torch.are_deterministic_algorithms_enabled()`: atomic dQ (5 GEMM-sized products per tile) unless the user
asked PyTorch for deterministic algorithms, then the separate dq kernel (7 products, no atomics, bitwise
reproducible). The prefix dK/dV reduction is deterministic in both modes.
"""

from __future__ import annotations

import os

import torch
import triton

from ._common import INTERPRETED, Launch, LaunchRecorder, dot_precision, on_device
from ._configs import ARCHS, target, tuned, use_target
from ._space import arch_target, compile_key, distinct_compiles, is_main_loop  # noqa: F401 (public names)
from .prefix_attention import (
    LOG2E,
    _prefix_attn_bwd_dq_kernel,
    _prefix_attn_bwd_kv_kernel,
    _prefix_attn_bwd_preprocess_kernel,
    _prefix_attn_combine_kernel,
    _prefix_attn_decode_kernel,
    _prefix_attn_fwd_kernel,
)
from .prefix_attention_configs import (
    COMBINE_CHUNK,
    DECODE_BLOCK_MS,
    DECODE_MAX_LQ,
    MAX_DECODE_SPLITS,
    MAX_HEAD_DIM,
    PREPROCESS_BLOCK_M,
    AttnConfig,
    PrefixConfigs,
    config_key,
    decode_chunk,
    decode_config,
    head_dim_pad,
    prefix_config,
    seq_bucket,
)

__all__ = [
    "COMBINE_CHUNK", "DECODE_BLOCK_MS", "DECODE_MAX_LQ", "INTERPRETED", "MAIN_LOOP_ROLES", "MAX_DECODE_SPLITS",
    "MAX_HEAD_DIM", "AttnConfig", "PrefixConfigs", "configs_for", "decode_chunk", "decode_config",
    "deterministic_backward", "dispatch_space", "head_dim_pad", "is_main_loop", "prefix_attention_bwd",
    "prefix_attention_fwd", "record_launches", "sm90_dispatch_space",
]

OP = "prefix_attention"
# Launch roles whose main loop is GEMM-sized with N a model dimension (D) in its PV / dV / dK / dQ products.
MAIN_LOOP_ROLES = ("fwd", "bwd_dkdv", "bwd_dkdv_det", "bwd_dq")
DETERMINISTIC_ENV = "FASTADAPTERS_PREFIX_DETERMINISTIC"

_recorder = LaunchRecorder()


record_launches = _recorder.record  # with record_launches() as launches: ...


def _launch(role: str, kernel, grid: tuple[int, ...], kwargs: dict, num_warps: int, num_stages: int) -> None:
    _recorder.launch(kernel, grid, kwargs, num_warps, num_stages, role)


def _kw(kernel, args: tuple, **constexprs) -> dict:
    """The kernel's keyword arguments: its runtime parameters in order, then the constexprs by name."""
    names = [n for n in kernel.arg_names if n not in constexprs]
    if len(names) != len(args):
        raise TypeError(f"{kernel.__name__ if hasattr(kernel, '__name__') else kernel}: {len(args)} arguments for "
                        f"{len(names)} parameters")
    return dict(zip(names, args, strict=True), **constexprs)


def deterministic_backward() -> bool:
    """Whether the backward avoids atomics: FASTADAPTERS_PREFIX_DETERMINISTIC=1/0 when set, else PyTorch's
    torch.are_deterministic_algorithms_enabled()."""
    env = os.environ.get(DETERMINISTIC_ENV, "").strip()
    if env in ("1", "0"):
        return env == "1"
    if env:
        raise ValueError(f"{DETERMINISTIC_ENV}={env!r}: use 1 (no atomics, bitwise reproducible), 0 (atomic dQ) "
                         "or leave it unset (follow torch.use_deterministic_algorithms)")
    return torch.are_deterministic_algorithms_enabled()


def configs_for(device: torch.device, dtype: torch.dtype, D: int, Lq: int, Lk: int, P: int) -> PrefixConfigs:
    """The tiles a launch on `device` uses: the tuned table's entry per kernel, else the built-in prefix_config."""
    tgt = target(device)
    bucket = seq_bucket(Lq, Lk, P)
    base = prefix_config(tgt, dtype, D, bucket)
    key = config_key(dtype, D, bucket)
    fwd = AttnConfig.from_table(tuned(tgt, OP, "fwd", key)) or base.fwd
    kv = AttnConfig.from_table(tuned(tgt, OP, "bwd_kv", key)) or base.kv
    dq = AttnConfig.from_table(tuned(tgt, OP, "bwd_dq", key)) or base.dq
    return PrefixConfigs(fwd, kv, dq, base.decode_block_n)


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


def _common_args(q, k, v, pk, pv, kpm) -> tuple:
    mask_strides = (kpm.stride(0), kpm.stride(1)) if kpm is not None else (0, 0)
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), pk.stride(0), pk.stride(1), pv.stride(0), pv.stride(1),
            *mask_strides)


def _check_head_dim(D: int) -> None:
    if head_dim_pad(D) > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {D} is above {MAX_HEAD_DIM}: split the heads, or use the 'torch' backend")


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
    tiles and the split size (tests)."""
    with on_device(q):
        return _fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, config, decode, decode_chunk_size)


def _fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, config, decode, decode_chunk_size):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    _check_head_dim(D)
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
    flags = dict(GROUP=group, D=D, D_PAD=d_pad, CAUSAL=causal, HAS_KPM=kpm is not None, DOT_PREC=prec)
    tgt = target(q.device)
    cfgs = configs_for(q.device, q.dtype, D, Lq, Lk, P)
    if decode:
        rows = group * Lq
        cfg = config or decode_config(d_pad, q.dtype, rows, cfgs.decode_block_n, tgt.is_gpu)
        n_row_blocks = triton.cdiv(rows, cfg.block_m)
        chunk = decode_chunk_size or decode_chunk(B * Hkv * n_row_blocks, P, Lk, cfg.block_n, tgt.num_sms)
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
            kernel = _prefix_attn_decode_kernel
            args = (q, k, v, pk, pv, kpm_arg, o_part, lse_part, *strides, B, Hkv, Lq, Lk, P, qk_scale, chunk, n_ps,
                    S, n_row_blocks)
            _launch("decode", kernel, (S * n_row_blocks * B * Hkv,),
                    _kw(kernel, args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags), cfg.num_warps,
                    cfg.num_stages)
        kernel = _prefix_attn_combine_kernel
        _launch("decode_combine", kernel, (B * Hq * Lq,),
                _kw(kernel, (o_part, lse_part, out, lse, B * Hq * Lq, S), D=D, D_PAD=d_pad, S_PAD=MAX_DECODE_SPLITS,
                    S_CHUNK=COMBINE_CHUNK), 4, 1)
        return out, lse
    cfg = config or cfgs.fwd
    kernel = _prefix_attn_fwd_kernel
    args = (q, k, v, pk, pv, kpm_arg, out, lse, *strides, out.stride(0), out.stride(1), out.stride(2),
            B * Hq, Hq, Lq, Lk, P, qk_scale)
    _launch("fwd", kernel, (triton.cdiv(Lq, cfg.block_m) * B * Hq,),
            _kw(kernel, args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags), cfg.num_warps, cfg.num_stages)
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
    deterministic: bool | None = None,
    kv_config: AttnConfig | None = None,
    dq_config: AttnConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher. dout: (B, Hq, Lq, D); dlse: (B, Hq, Lq) or None; out, lse from prefix_attention_fwd.
    Returns dq, dk, dv (shapes of q, k, v, contiguous, input dtype) and d(prefix_k), d(prefix_v) (Hkv, P, D),
    P = 0 when there is no prefix. deterministic: None = `deterministic_backward()`; True = no atomics (the dq
    kernel recomputes S and dP), bitwise reproducible; False = atomic fp32 dQ. The prefix grads are summed over
    the batch by torch.sum over fp32 per-batch partials in both modes."""
    with on_device(q):
        return _bwd(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale,
                    deterministic_backward() if deterministic is None else bool(deterministic), kv_config, dq_config)


def _bwd(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, deterministic,
         kv_config, dq_config):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    _check_head_dim(D)
    q, k, v, pk, pv, kpm = _prep(q, k, v, prefix_k, prefix_v, key_padding_mask)
    dout = _last_contiguous(dout)
    P = pk.shape[1]
    dk = torch.empty((B, Hkv, Lk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Hkv, Lk, D), device=q.device, dtype=v.dtype)
    dpk_part = torch.empty((B, Hkv, P, D), device=q.device, dtype=torch.float32)
    dpv_part = torch.empty((B, Hkv, P, D), device=q.device, dtype=torch.float32)
    if Lq == 0 or B == 0:  # nothing attends: every grad is 0
        for t in (dk, dv, dpk_part, dpv_part):
            t.zero_()
        dq = torch.zeros((B, Hq, Lq, D), device=q.device, dtype=q.dtype)
        return dq, dk, dv, dpk_part.sum(0).to(pk.dtype), dpv_part.sum(0).to(pv.dtype)
    d_pad = head_dim_pad(D)
    group = Hq // Hkv
    prec = dot_precision(q.dtype)
    delta = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    dlse_arg = dlse.contiguous().float() if dlse is not None else delta
    n_m = triton.cdiv(Lq, PREPROCESS_BLOCK_M)
    kernel = _prefix_attn_bwd_preprocess_kernel
    _launch("bwd_preprocess", kernel, (n_m * B * Hq,),
            _kw(kernel, (out, dout, dlse_arg, delta, dout.stride(0), dout.stride(1), dout.stride(2), Hq, Lq, n_m),
                D=D, D_PAD=d_pad, BLOCK_M=PREPROCESS_BLOCK_M, HAS_DLSE=dlse is not None), 4, 1)
    kpm_arg = kpm if kpm is not None else q
    strides = _common_args(q, k, v, pk, pv, kpm) + (dout.stride(0), dout.stride(1), dout.stride(2))
    qk_scale = scale * LOG2E
    cfgs = configs_for(q.device, q.dtype, D, Lq, Lk, P)
    flags = dict(GROUP=group, D=D, D_PAD=d_pad, CAUSAL=causal, HAS_KPM=kpm is not None, DOT_PREC=prec)
    atomic = not deterministic
    if atomic:
        dq_acc = torch.zeros((B, Hq, Lq, D), device=q.device, dtype=torch.float32)
        dq = None
    else:
        dq = torch.empty((B, Hq, Lq, D), device=q.device, dtype=q.dtype)
        dq_acc = dq  # never written when ATOMIC_DQ is False
    c1 = kv_config or cfgs.kv
    n_pb = triton.cdiv(P, c1.block_n)
    n_blocks = n_pb + triton.cdiv(Lk, c1.block_n)
    if n_blocks:
        kernel = _prefix_attn_bwd_kv_kernel
        args = (q, k, v, pk, pv, kpm_arg, dout, lse, delta, dk, dv, dpk_part, dpv_part, dq_acc, *strides,
                B * Hkv, Hkv, Lq, Lk, P, n_pb, scale, qk_scale)
        _launch("bwd_dkdv" if atomic else "bwd_dkdv_det", kernel, (n_blocks * B * Hkv,),
                _kw(kernel, args, BLOCK_M=c1.block_m, BLOCK_N=c1.block_n, ATOMIC_DQ=atomic,
                    DQ_T=target(q.device).hopper, **flags),
                c1.num_warps, c1.num_stages)
    if atomic:
        dq = dq_acc.to(q.dtype)  # the scale is applied in the kernel
    else:
        c2 = dq_config or cfgs.dq
        kernel = _prefix_attn_bwd_dq_kernel
        args = (q, k, v, pk, pv, kpm_arg, dout, lse, delta, dq, *strides, B * Hq, Hq, Lq, Lk, P, scale, qk_scale)
        _launch("bwd_dq", kernel, (triton.cdiv(Lq, c2.block_m) * B * Hq,),
                _kw(kernel, args, BLOCK_M=c2.block_m, BLOCK_N=c2.block_n, **flags), c2.num_warps, c2.num_stages)
    dpk = dpk_part.sum(0).to(pk.dtype)  # fixed-order reduction over the batch
    dpv = dpv_part.sum(0).to(pv.dtype)
    return dq, dk, dv, dpk, dpv


# ------------------------------------------------------------------------------------------------ dispatch space
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# benchmarks/bench_prefix_attention.py presets (B, H, L, D, P): quick / full; MHA, causal, no padding mask.
BENCH_SHAPES = ((8, 32, 2048, 128, 30), (2, 32, 8192, 128, 30))
# Odd shapes: (B, Hq, Hkv, Lq, Lk, D, P, causal, padding mask): GQA, padded head_dim 80, ragged lengths, a prefix
# that is not a multiple of any tile, decode (Lq 1 and 16), non-causal.
ODD_SHAPES = ((2, 12, 4, 1000, 1000, 80, 7, True, True), (3, 8, 2, 16, 1037, 128, 30, True, True),
              (1, 32, 8, 1, 4097, 64, 5, True, False))
FULL_ODD_SHAPES = ((2, 4, 4, 37, 37, 16, 5, True, True), (2, 4, 2, 100, 100, 32, 3, False, True),
                   (2, 8, 8, 300, 300, 96, 30, True, False), (2, 8, 4, 257, 257, 192, 30, True, True),
                   (2, 8, 4, 129, 129, 256, 9, True, True), (1, 32, 32, 1, 2048, 128, 30, True, False))


def _record(arch: str, dtype: torch.dtype, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, P: int,
            causal: bool = True, kpm: bool = False, odd: bool = False) -> list[tuple[str, Launch]]:
    """(label, launch) of one call (forward + backward) per backward mode at one shape, recorded on meta tensors as
    a GPU of `arch` would launch them. The deterministic mode's call carries "-det" in its shape."""
    meta = torch.device("meta")
    q = torch.empty((B, Hq, Lq, D), device=meta, dtype=dtype)
    k = torch.empty((B, Hkv, Lk, D), device=meta, dtype=dtype)
    v = torch.empty((B, Hkv, Lk, D), device=meta, dtype=dtype)
    pk = torch.empty((Hkv, P, D), device=meta, dtype=dtype)
    pv = torch.empty((Hkv, P, D), device=meta, dtype=dtype)
    mask = torch.empty((B, Lk), device=meta, dtype=torch.bool) if kpm else None
    if odd or Hq != Hkv or Lq != Lk:
        shape = f"B{B}-Hq{Hq}-Hkv{Hkv}-Lq{Lq}-Lk{Lk}-D{D}-P{P}"
    else:
        shape = f"B{B}-H{Hq}-L{Lq}-D{D}-P{P}"
    shape = ("odd-" if odd else "") + shape + ("" if causal else "-noncausal") + ("-kpm" if kpm else "")
    shape += f"-{_TY[dtype]}"
    scale = D**-0.5
    out_labels: list[tuple[str, Launch]] = []
    for det in (False, True) if Lq > DECODE_MAX_LQ else (False,):
        with use_target(arch), record_launches() as rec:
            out, lse = prefix_attention_fwd(q, k, v, pk, pv, mask, causal, scale)
            if Lq > DECODE_MAX_LQ:
                prefix_attention_bwd(out, None, q, k, v, pk, pv, mask, out, lse, causal, scale, deterministic=det)
        tag = shape + ("-det" if det else "")
        for launch in rec:
            role = launch.role
            cfg = f"BM{launch.kwargs['BLOCK_M']}-BN{launch.kwargs['BLOCK_N']}" if "BLOCK_N" in launch.kwargs else ""
            details = f":{cfg}-w{launch.num_warps}-s{launch.num_stages}".replace(":-", ":")
            main = "#main" if role in MAIN_LOOP_ROLES else ""
            out_labels.append((f"prefix/{role}{main}@{tag}{details}", launch))
    return out_labels


def dispatch_space(arch: str, full: bool = False) -> list[tuple[str, Launch]]:
    """(label, launch) for what a forward + backward (both backward modes) dispatches to on a GPU of `arch`, from
    the real launchers on meta tensors under `use_target(arch)` (so exactly the configs that GPU would pick), one
    launch per distinct compile (the first label that needs it).

    Labels follow benchmarks/static.py's convention "prefix/<loop>[#main]@<shape>:<config>": shapes
    "B8-H32-L2048-D128-P30-bf16" (the bench presets) and "odd-B2-Hq12-Hkv4-Lq1000-Lk1000-D80-P7-kpm-bf16"; the
    deterministic backward's call has "-det" appended to its shape. Loops: fwd, decode, decode_combine,
    bwd_preprocess, bwd_dkdv (dK/dV with atomic dQ, the default), bwd_dkdv_det and bwd_dq (deterministic mode);
    "#main" marks MAIN_LOOP_ROLES (GEMM-sized, N a model dimension).
    Default: bf16 at the benchmark shapes (the quick preset
    B8 H32 L2048 D128 P30 and the full preset's L8192) and the odd shapes (GQA, head_dim 80 and 64, padding mask,
    decode with Lq 1 and 16, ragged lengths). full: fp16 and fp32 too, head_dims 16..256, non-causal.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    runs: list[list[tuple[str, Launch]]] = []
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,)
    for dt in dtypes:
        for B, H, L, D, P in BENCH_SHAPES:
            runs.append(_record(arch, dt, B, H, H, L, L, D, P))
        for shape in ODD_SHAPES + (FULL_ODD_SHAPES if full else ()):
            B, Hq, Hkv, Lq, Lk, D, P, causal, kpm = shape
            runs.append(_record(arch, dt, B, Hq, Hkv, Lq, Lk, D, P, causal, kpm, odd=True))
    return distinct_compiles([entry for run in runs for entry in run])


def sm90_dispatch_space(full: bool = False) -> list[tuple[str, Launch]]:
    """dispatch_space("sm_90", full): kept for the callers written before the per-arch space."""
    return dispatch_space("sm_90", full)

