"""Launchers of the multi-LoRA kernels (kernels/multi_lora.py): token grouping, configs, grids, the recorder.

`multi_lora_fwd` runs on its inputs' device (torch.cuda.device guard) and end to end on "meta" tensors (no host
sync; the grouping is a handful of device ops), so `dispatch_space(arch)` lists exactly what a GPU of that arch
would launch and a CUDA graph can capture a decode step. Configs: kernels/multi_lora_configs.py, first through the
offline tuner's table (`tuned`). Design and napkin math: kernels/multi_lora.py.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton

from ._common import INTERPRETED, Launch, LaunchRecorder, on_device
from ._common import dot_precision as _dot_precision
from ._configs import shape_bucket, target, tuned, use_target
from ._space import arch_target, compile_key, distinct_compiles, is_main_loop  # noqa: F401 (public names)
from .multi_lora import _multi_lora_expand_kernel, _multi_lora_shrink_kernel
from .multi_lora_configs import (
    DECODE_MAX_M,
    INTERPRETER_CONFIG,
    MAX_ADAPTERS,
    MAX_RANK,
    MAX_SPLIT,
    MultiLoraConfig,
    multi_lora_config,
    rank_pad,
    split_k,
    tiles_key,
)

__all__ = [
    "DECODE_MAX_M", "INTERPRETED", "INTERPRETER_CONFIG", "MAX_ADAPTERS", "MAX_RANK", "Grouping", "MultiLoraConfig",
    "config_for", "dispatch_space", "distinct_compiles", "group_tokens", "multi_lora_fwd", "plan", "rank_pad",
    "record_launches", "sm90_dispatch_space", "split_for", "use_config",
]

_override: MultiLoraConfig | None = None
_override_split: int | None = None
_recorder = LaunchRecorder()


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


record_launches = _recorder.record  # with record_launches() as launches: ...


def config_for(M: int, r_pad: int, dtype: torch.dtype, device: torch.device | None = None) -> MultiLoraConfig:
    """The config the launcher uses: `use_config` override, the tuned table, else `multi_lora_config` for the
    target of `device` (the interpreter's small tiles on CPU)."""
    if _override is not None:
        return _override
    tgt = target(device)
    m_b = shape_bucket(M)
    entry = tuned(tgt, "multi_lora", "tiles", tiles_key(dtype, m_b, r_pad))
    if entry:
        return MultiLoraConfig(**{k: int(v) for k, v in entry.items() if k in MultiLoraConfig.__dataclass_fields__})
    return multi_lora_config(tgt, dtype, m_b, r_pad)


def split_for(M: int, n: int, K: int, cfg: MultiLoraConfig, device: torch.device | None = None) -> int:
    """Shrink split over K (see multi_lora_configs.split_k); n is accepted for the tuner and ignored."""
    if _override_split is not None:
        return max(1, min(_override_split, triton.cdiv(K, cfg.block_k), MAX_SPLIT))
    return split_k(target(device), cfg, shape_bucket(M), K)


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
    n_blocks = triton.cdiv(N, cfg.block_n)
    if g.n_tiles_max >= 2**31 or split > 65535 or n_blocks > 65535:
        raise ValueError(f"multi-LoRA grid ({g.n_tiles_max}, {max(split, n_blocks)}) exceeds CUDA's limits "
                         f"(M={M}, N={N}): use the 'torch' backend")
    shrink = Launch(_multi_lora_shrink_kernel, (g.n_tiles_max, split), dict(
        p_x=x, p_a=lora_A_stack, p_h=h, **grouping, n=n, R=R, K=K, k_per_split=k_per_split,
        s_xm=x.stride(0), s_xk=x.stride(1), s_an=lora_A_stack.stride(0), s_ar=lora_A_stack.stride(1),
        s_ak=lora_A_stack.stride(2), s_hs=h.stride(0), s_hm=h.stride(1), s_hr=h.stride(2),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, R_PAD=r_pad, N_PAD=n_pad, DOT_PREC=_dot_precision(x.dtype),
    ), cfg.shrink_warps, cfg.shrink_stages)
    expand = Launch(_multi_lora_expand_kernel, (g.n_tiles_max, n_blocks), dict(
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
    with on_device(x):
        cfg = config_for(M, rank_pad(R), x.dtype, x.device)
        g = group_tokens(token_adapter_idx, n, cfg.block_m)
        split = split_for(M, n, K, cfg, x.device)
        k_per_split = triton.cdiv(triton.cdiv(max(K, 1), split), cfg.block_k) * cfg.block_k
        split = max(1, triton.cdiv(K, k_per_split))
        h = torch.empty((split, M, R), device=x.device, dtype=torch.float32)
        s = scalings.to(device=x.device, dtype=torch.float32)
        for launch in plan(x, lora_A_stack, lora_B_stack, s, g, out, h, cfg):
            _recorder.launch(launch.kernel, launch.grid, launch.kwargs, launch.num_warps, launch.num_stages)
    return out


# ------------------------------------------------------------------------------------------------ dispatch space
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# benchmarks/bench_multi_lora.py presets: llama7b layers (K = N = 4096; the MLP's 11008 is an odd, non-power-of-2
# N), r = 16, batch 32: decode M = 32, prefill 32 x 512 = 16384; 8 adapters. Odd: M = 37, K = 72, N = 40, rank 5.
BENCH_SHAPES = ((32, 4096, 4096), (16384, 4096, 4096), (32, 4096, 11008))
ODD_SHAPES = ((37, 72, 40),)


def _record(arch: str, dtype: torch.dtype, M: int, K: int, N: int, r: int, n: int) -> tuple[Launch, Launch]:
    meta = dict(device="meta")
    x = torch.empty(M, K, dtype=dtype, **meta)
    A = torch.empty(n, r, K, dtype=dtype, **meta)
    B = torch.empty(n, N, r, dtype=dtype, **meta)
    s = torch.empty(n, dtype=torch.float32, **meta)
    out = torch.empty(M, N, dtype=dtype, **meta)
    idx = torch.empty(M, dtype=torch.int64, **meta)
    with use_target(arch_target(arch)), record_launches() as rec:
        multi_lora_fwd(x, A, B, s, idx, out)
    shrink, expand = rec
    return shrink, expand


def _cfg_tag(launch: Launch) -> str:
    kw = launch.kwargs
    tile = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_K", "BLOCK_N", "BLOCK_R") if k in kw)
    split = f"-split{launch.grid[1]}" if "BLOCK_K" in kw else f"-slabs{kw['SPLIT_K']}"
    return f"{tile}-w{launch.num_warps}s{launch.num_stages}{split}"


def dispatch_space(arch: str, full: bool = False) -> list[tuple[str, Launch]]:
    """(label, launch) for both launches of each call of multi_lora_fwd on a GPU of `arch` (meta tensors under
    use_target(arch): the configs that GPU would pick).

    Labels (benchmarks/static.py's convention) "multi_lora/<shrink|expand>@[odd-]<decode|prefill>-M..-K..-N..-r..
    -n..-<dtype>:<config>"; no `#main` (the shrink's N is the rank, the expand's K is the rank: memory- and
    launch-bound by design). Default: the benchmark shapes in bf16 at rank pads 16 and 64 (and 256 with 1024
    adapters, the widest segment search), fp16 at 16, fp32 at 16 and 256, the odd shape in bf16; full: every dtype
    at every rank pad 16..256. `distinct_compiles(space)`: one entry per distinct binary.
    """
    arch_target(arch)  # an unknown arch fails here, with the list of known ones
    global _override, _override_split
    outer, (_override, _override_split) = (_override, _override_split), (None, None)
    out: list[tuple[str, Launch]] = []
    try:
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            pads = (16, 32, 64, 128, 256) if full else {torch.bfloat16: (16, 64, 256), torch.float16: (16,),
                                                         torch.float32: (16, 256)}[dt]
            shapes = BENCH_SHAPES + (ODD_SHAPES if dt == torch.bfloat16 or full else ())
            for r_pad in pads:
                for M, K, N in shapes:
                    odd = (M, K, N) in ODD_SHAPES
                    r = 5 if odd else r_pad
                    if rank_pad(r) != r_pad:
                        continue
                    n = MAX_ADAPTERS if r_pad == 256 else 8
                    mode = "decode" if M <= DECODE_MAX_M else "prefill"
                    tag = f"{'odd-' if odd else ''}{mode}-M{M}-K{K}-N{N}-r{r}-n{n}-{_TY[dt]}"
                    for kind, launch in zip(("shrink", "expand"), _record(arch, dt, M, K, N, r, n), strict=True):
                        out.append((f"multi_lora/{kind}@{tag}:{_cfg_tag(launch)}", launch))
    finally:
        _override, _override_split = outer
    return out


def sm90_dispatch_space(full: bool = False) -> list[tuple[str, Launch]]:
    """dispatch_space("sm_90", full): kept for the callers written before the per-arch space."""
    return dispatch_space("sm_90", full)
