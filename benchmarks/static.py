"""Static report: what each op's kernels compile to on every GPU architecture, and a predicted ratio to the floor.

    python -m benchmarks.static [--archs sm_90,sm_86] [--ops lora,prefix] [--preset full] [--workers 2] [--out DIR]

No GPU needed. For each op x benchmark shape (benchmarks/bench_<op>.py presets) x arch, the launchers run on "meta"
tensors under `use_target(arch)` and `record_launches()` (what a user's GPU of that arch would dispatch: configs
come from a pure function, no autotuning), every launch is compiled for the arch (tests/sm90.py: Triton +
`ptxas -v` from the wheel) and the report lists: the config picked, registers, spills, shared memory, the MMA
instruction of each main loop and its N, the wgmma.wait_group depths (pipelining), TMA, launches per call, and the
FLOPs and HBM bytes of the plan against the floor -> a PREDICTED ratio to the floor (never a measurement).
Writes benchmarks/results/static/report.csv and report.md, prints the markdown.

## Labelling convention (the op engineers' `dispatch_space(arch, full=False)` follows it)

Each kernel module may define `dispatch_space(arch: str, full: bool = False) -> list[tuple[str, Launch | dict]]`
(the old `sm90_dispatch_space(full)` is read too, for sm_90). A label is

    <op>/<loop>[#main]@<shape>[:<details>]

  * `<op>`: lora | multi_lora | bottleneck | prefix.  `<loop>`: the kernel's role (gemm_fwd, gemm_dx, epilogue_fwd,
    shrink_xa, shrink_dA, fwd, dx, wgrad, bwd_dkdv, bwd_dq, decode, preprocess, dropout_mask, ...). A loop whose
    name starts with "bwd" or names a gradient (dx, dA, dB, dW, wgrad, dkdv, dq) is backward; the rest forward.
  * `#main`: a GEMM-sized main loop whose N is a model dimension (or a tile of one). Gated in CI
    (tests/test_static_report.py): on sm_90 at least one wgmma in the kernel's loops, every such wgmma N >= 64, no
    ptxas C7515; on sm_8x mma.sync in the loops (except where the activation itself is fp32: an fp32 model's
    exact dots run on CUDA cores by design). Loops whose N is the LoRA rank or a decode row count (shrinks,
    BGMV) are not `#main`: they are memory-bound by design.
  * `@<shape>`: the benchmark shape, fields joined by "-": `@M4096-K4096-N4096-r16-p0.05-bf16`,
    `@M16384-d4096-b256-bf16-fp32w`, `@B8-H32-L2048-D128-P30-bf16`. All launches of one op with the same shape are
    ONE call (forward + backward): their FLOPs and bytes are summed, their count is "launches per call".
    `@odd-...` for odd shapes; no `@` for config-space extras that belong to no call.
  * `:<details>`: free text (config tag), ignored here.
A `Launch` may also carry `info={"main_loop": True, "flops": ..., "bytes": ...}` (kernels/_common.py): `main_loop`
is OR-ed with `#main`; `flops` / `bytes` replace this module's per-kernel estimate.
While a module has no `dispatch_space`, this module drives today's launchers itself (LEGACY drivers below) and
names the main loops by kernel.

## The prediction (a model, not a measurement; every factor below is an assumption written down here)

plan time = sum over the call's launches of max(bytes / HBM rate, FLOPs / compute rate), where
  * bytes = every tensor argument of the launch counted once (compulsory traffic; re-reads of weights by many row
    blocks are assumed to hit L2 and are not counted: an L2-bound kernel is therefore predicted optimistic);
  * FLOPs = 2*M*N*K of each of the kernel's GEMMs (per-kernel formulas in `_triton_flops`), or of each aten
    mm/addmm/bmm a launcher calls (cuBLAS; recorded through a TorchDispatchMode on the meta tensors);
  * compute rate = the arch's dense bf16 matmul ceiling (CEILINGS) for wgmma / tcgen05 / cuBLAS, x 0.5 for tf32,
    x 0.6 for mma.sync on sm_90/sm_100 (no wgmma), the fp32 CUDA-core rate for a loop with no MMA (fma.rn.f32);
    then x min(1, N/128) for the widest wgmma N of the loop, x 0.5 when ptxas serialised the wgmmas (C7515),
    x 0.75 when every wgmma.wait_group in the loop is 0 (no overlap of the matmuls with the rest of the loop).
a launch whose grid has fewer thread blocks than the GPU has SMs gets that fraction of both rates; each launch
costs LAUNCH_SECONDS more (2 us).
floor = max(bytes / HBM rate, FLOPs / matmul ceiling) of the op's own napkin math (the bench modules' models).
CEILINGS are datasheet numbers for one representative part per arch x a fixed attainable fraction (0.9 HBM,
0.75 matmul): the benchmark suite measures these ceilings on the device (benchmarks/common.py:measure_ceilings);
here they are assumed, and only the ratio is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "results" / "static"
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100")
OPS = ("lora", "multi_lora", "bottleneck", "prefix")
MODULES = {"lora": "lora", "multi_lora": "multi_lora", "bottleneck": "bottleneck", "prefix": "prefix_attention"}

# Datasheet dense bf16 tensor TFLOP/s, fp32 CUDA-core TFLOP/s, HBM GB/s of one representative part per arch.
DATASHEET = {  # part, bf16 dense TFLOP/s, fp32 TFLOP/s, HBM GB/s, SMs
    "sm_80": ("A100 SXM 80GB", 312.0, 19.5, 2039.0, 108),
    "sm_86": ("A10", 125.0, 31.2, 600.0, 72),
    "sm_89": ("L40S", 362.0, 91.6, 864.0, 142),
    "sm_90": ("H100 SXM", 989.0, 67.0, 3350.0, 132),
    "sm_100": ("B200", 2250.0, 80.0, 8000.0, 148),
}
LAUNCH_SECONDS = 2e-6  # assumed fixed cost per launch (launch latency + ramp/tail), counted in the plan
MATMUL_FRACTION, HBM_FRACTION = 0.75, 0.9


@dataclass(frozen=True)
class Ceilings:
    part: str
    matmul: float  # FLOP/s, dense bf16 on tensor cores (cuBLAS-attainable)
    fp32: float  # FLOP/s on CUDA cores
    hbm: float  # bytes/s
    sms: int


CEILINGS = {a: Ceilings(p, m * 1e12 * MATMUL_FRACTION, f * 1e12, b * 1e9 * HBM_FRACTION, n)
            for a, (p, m, f, b, n) in DATASHEET.items()}


def _import_harness():
    """tests/sm90.py (the compile harness) from the checkout this module runs in."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import sm90

    return sm90


# ------------------------------------------------------------------------------------------------ labels
_LABEL = re.compile(r"^(?P<op>[a-z_]+)/(?P<loop>[A-Za-z0-9_]+)(?P<main>#main)?"
                    r"(?:@(?P<shape>[^:]+))?(?::(?P<details>.*))?$")
_BWD = re.compile(r"^(bwd|dx|dA|dB|dW|db|wgrad|dkdv|dq|grad)|_(dx|dA|dB|dW|dkdv|dq|bwd)\b|_(dx|dA|dB|dW|dkdv|dq)$")


def parse_label(label: str) -> dict[str, Any] | None:
    """{"op", "loop", "main", "shape", "details", "direction"} of a convention label, None for any other label."""
    m = _LABEL.match(label)
    if m is None:
        return None
    loop = m.group("loop")
    return {"op": m.group("op"), "loop": loop, "main": bool(m.group("main")), "shape": m.group("shape"),
            "details": m.group("details") or "", "direction": "bwd" if _BWD.search(loop) else "fwd"}


@dataclass
class Entry:
    """One launch of a call: a Triton kernel (compiled) or an aten op (cuBLAS etc., not compiled)."""

    op: str
    shape: str
    loop: str
    main: bool
    direction: str
    label: str
    spec: dict | None  # compile spec (tests/sm90.py), None for an aten op
    flops: float
    nbytes: float
    config: str = ""
    ctas: int = 0  # thread blocks of the launch (0: unknown / not a Triton launch)
    report: Any = None  # sm90.CompileReport after compiling
    notes: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ recording
def _kernel_name(kernel: Any) -> str:
    return getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))


def _tensor_bytes(t: Any) -> int:
    return int(t.numel()) * t.element_size() if hasattr(t, "element_size") and hasattr(t, "numel") else 0


def _launch_bytes(kwargs: dict) -> float:
    seen, total = set(), 0
    for v in kwargs.values():
        if hasattr(v, "element_size") and id(v) not in seen:
            seen.add(id(v))
            total += _tensor_bytes(v)
    return float(total)


def _triton_flops(name: str, kw: dict) -> float | None:
    """FLOPs of one launch of a known kernel (2*M*N*K per GEMM it runs), None when the kernel is unknown."""
    g = kw.get
    if name == "_lora_linear_kernel":
        return 2.0 * g("M") * g("N") * (g("K") * bool(g("HAS_MAIN")) + g("R"))
    if name == "_lora_shrink_kernel":
        return 2.0 * g("ROWS") * g("RED") * g("R")
    if name in ("_bottleneck_fwd_kernel", "_bottleneck_bwd_dx_kernel", "_bottleneck_bwd_w_kernel"):
        return 2.0 * g("M") * g("NB") * (g("D_IN") + g("D_OUT"))
    if name == "_multi_lora_shrink_kernel":
        return 2.0 * g("p_x").shape[0] * g("K") * g("R")
    if name == "_multi_lora_expand_kernel":
        return 2.0 * g("p_out").shape[0] * g("N") * g("R")
    if name.startswith("_prefix_attn") and hasattr(g("p_q"), "shape"):
        # one GEMM pass = 2 * B * Hq * Lq * (keys a query sees) * D; fwd / decode 2 passes (S, PV), the K/V-side
        # backward 4 (S, dV, dP, dK) + 1 when it also accumulates dQ, the separate dQ kernel 3 (S, dP, dQ)
        B, Hq, Lq, D = g("p_q").shape
        Lk, P = g("Lk"), g("P")
        keys = P + (Lk / 2 if g("CAUSAL") and Lq == Lk else Lk)
        passes = (4 + bool(g("ATOMIC_DQ"))) if ("bwd_kv" in name or "dkdv" in name) else 3 if "bwd_dq" in name \
            else 2 if ("fwd" in name or "decode" in name) else 0
        return 2.0 * B * Hq * Lq * keys * D * passes
    if "dropout_mask" in name or "preprocess" in name or "combine" in name:
        return 0.0
    return None


def _legacy_main(name: str, kw: dict) -> bool:
    """Which of today's kernels are GEMM-sized main loops whose N is a model dimension (before labels exist)."""
    if name == "_lora_linear_kernel":
        return bool(kw.get("HAS_MAIN"))
    return name in ("_bottleneck_fwd_kernel", "_bottleneck_bwd_dx_kernel", "_bottleneck_bwd_w_kernel",
                    "_prefix_attn_fwd_kernel", "_prefix_attn_bwd_dkdv_kernel", "_prefix_attn_bwd_kv_kernel",
                    "_prefix_attn_bwd_dq_kernel")


def _config_tag(kw: dict, num_warps: int, num_stages: int) -> str:
    keys = [k for k in kw if k.startswith("BLOCK") or k in ("GROUP_M", "R_PAD", "B", "SPLIT", "DOT_PREC")]
    return " ".join(f"{k.replace('BLOCK_', '')}={kw[k]}" for k in keys) + f" w{num_warps}s{num_stages}"


_FREE_ATEN = ("empty", "view", "t", "transpose", "permute", "expand", "as_strided", "detach", "alias", "slice",
              "select", "unsqueeze", "squeeze", "reshape", "_unsafe_view", "unbind", "split", "narrow", "lift_fresh",
              "new_empty", "empty_like", "empty_strided", "_reshape_alias", "contiguous", "resolve_conj",
              "resolve_neg", "zeros", "zeros_like", "new_zeros", "full", "ones", "scalar_tensor", "_local_scalar_dense")


@contextlib.contextmanager
def record_aten() -> Iterator[list[tuple[str, float, float]]]:
    """Inside the block, every aten op that would run a GPU kernel is listed as (name, FLOPs, bytes): mm-family
    FLOPs are 2*M*N*K; bytes are the tensor inputs and outputs (views, allocations and fills are free)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    ops: list[tuple[str, float, float]] = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name.rstrip("_") in _FREE_ATEN or name in _FREE_ATEN:
                return out
            ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            flops = 0.0
            if name in ("mm", "addmm", "bmm", "baddbmm", "addmm_"):
                a, b = [t for t in ins if t.dim() >= 2][-2:]
                flops = 2.0 * a.numel() * b.shape[-1]
            ops.append((name, flops, float(sum(_tensor_bytes(t) for t in ins + outs))))
            return out

    with Mode():
        yield ops


# ------------------------------------------------------------------------------------------------ shapes
def bench_shapes(op: str, preset: str = "full") -> list[dict[str, Any]]:
    """The benchmark shapes of `op` (benchmarks/bench_<op>.py's preset), as dicts, each with its shape key."""
    if op == "lora":
        from benchmarks.bench_lora import PRESETS

        c = PRESETS[preset]
        return [dict(M=M, K=c["K"], N=c["N"], r=c["r"], p=p, dtype="bf16",
                     key=f"M{M}-K{c['K']}-N{c['N']}-r{c['r']}-p{p}-bf16") for M in c["Ms"] for p in c["ps"]]
    if op == "bottleneck":
        from benchmarks.bench_bottleneck import PRESETS

        c = PRESETS[preset]  # the bench passes bf16 weights; a bf16 model's adapter layer holds fp32 ones
        return [dict(M=M, d=c["d"], b=c["b"], w=w, dtype="bf16", key=f"M{M}-d{c['d']}-b{c['b']}-bf16{w}")
                for M in c["Ms"] for w in ("", "-fp32w")]
    if op == "prefix":
        from benchmarks.bench_prefix_attention import PRESETS

        return [dict(B=B, H=H, L=L, D=D, P=P, dtype="bf16", key=f"B{B}-H{H}-L{L}-D{D}-P{P}-bf16")
                for B, H, L, D, P in PRESETS[preset]["shapes"]]
    if op == "multi_lora":
        from benchmarks.bench_multi_lora import PRESETS

        c = PRESETS[preset]  # llama7b projections: K = N = 4096; decode rows = batch, prefill rows = batch * prefill
        rows = [("decode", c["batch"]), ("prefill", c["batch"] * c["prefill"])]
        return [dict(M=M, K=4096, N=4096, r=c["r"], n=8, dtype="bf16", key=f"{mode}-M{M}-K4096-N4096-r{c['r']}-bf16")
                for mode, M in rows]
    raise ValueError(f"unknown op {op!r}: choose one of {', '.join(OPS)}")


def floor_of(op: str, s: dict) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes) per mode ("fwd", "bwd", "call") that any implementation must do: the bench modules' napkin
    math (bf16: 2 bytes per element)."""
    e = 2.0
    if op == "lora":
        from benchmarks.bench_lora import lora_flops

        M, K, N, r = s["M"], s["K"], s["N"], s["r"]
        f = lora_flops(M, K, N, r)
        fwd_b = e * (M * K + K * N + M * N + r * (K + N))
        bwd_b = e * (M * N + K * N + M * K + 2 * r * (K + N))
        return {"fwd": (f["fwd"], fwd_b), "bwd": (f["bwd"], bwd_b), "call": (f["fwd+bwd"], fwd_b + bwd_b)}
    if op == "bottleneck":
        from benchmarks.bench_bottleneck import floor_model

        nb, fl = floor_model(s["M"], s["d"], s["b"], 2)
        return {"fwd": (fl["fwd"], nb["fwd"]), "bwd": (fl["bwd"], nb["bwd"]), "call": (fl["fwd+bwd"], nb["fwd+bwd"])}
    if op == "prefix":
        from benchmarks.bench_prefix_attention import attention_flops

        B, H, L, D, P = s["B"], s["H"], s["L"], s["D"], s["P"]
        f = attention_flops(B, H, L, D, P)
        qkvo = e * B * H * (L * D * 4 + 2 * P * D)
        fwd_b, bwd_b = qkvo, 2 * qkvo + e * B * H * 2 * P * D
        return {"fwd": (f["fwd"], fwd_b), "bwd": (f["bwd"], bwd_b), "call": (f["fwd+bwd"], fwd_b + bwd_b)}
    if op == "multi_lora":  # forward only (decode / prefill serving): read x, the used adapters, read+write out
        M, K, N, r, n = s["M"], s["K"], s["N"], s["r"], s["n"]
        fl, nb = 2.0 * M * r * (K + N), e * (M * K + 2 * M * N + n * r * (K + N))
        return {"fwd": (fl, nb), "bwd": (0.0, 0.0), "call": (fl, nb)}
    raise ValueError(op)


# ------------------------------------------------------------------------------------------------ drivers
def kernel_module(op: str) -> Any:
    """fastadapters.kernels.<module>_launch (launchers split from kernels), else fastadapters.kernels.<module>, else
    kernels.<module> (checkouts before kernels/ moved under the package)."""
    name = MODULES[op]
    for mod in (f"fastadapters.kernels.{name}_launch", f"fastadapters.kernels.{name}", f"kernels.{name}"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if _in_checkout(m):
            return m
    raise ImportError(f"no kernel module for {op} in {ROOT}")


def _in_checkout(mod: Any) -> bool:
    """Whether `mod` was loaded from this checkout (an editable install of another one maps fastadapters.kernels.*
    to its own files: a worktree of an older commit must not report the newer kernels)."""
    return Path(getattr(mod, "__file__", "") or "").resolve().is_relative_to(ROOT)


@contextlib.contextmanager
def _target(arch: str) -> Iterator[None]:
    """use_target(arch) where the checkout has kernels/_configs.py (sm_100 is not in its table: a Target is built);
    nothing on older checkouts (their launchers pick sm_90 configs while recording)."""
    try:
        cfgmod = importlib.import_module("fastadapters.kernels._configs")
    except ImportError:
        cfgmod = None
    if cfgmod is None or not _in_checkout(cfgmod):
        yield
        return
    tgt = cfgmod.ARCHS.get(arch)
    if tgt is None:
        sm90 = _import_harness()
        lim = sm90.ARCH_LIMITS[arch]
        tgt = cfgmod.Target(arch, divmod(lim["cap"], 10), lim["max_shared"], 148)
    with cfgmod.use_target(tgt):
        yield


def _entries_from_launches(op: str, shape: str, launches: list, aten: list, sm90) -> list[Entry]:
    out = []
    for launch in launches:
        kw, name = launch.kwargs, _kernel_name(launch.kernel)
        info = getattr(launch, "info", None) or {}
        flops = info.get("flops", _triton_flops(name, kw))
        main = bool(info.get("main_loop", _legacy_main(name, kw)))
        e = Entry(op, shape, name.strip("_").replace("_kernel", ""), main,
                  "bwd" if "bwd" in name else "fwd", name,
                  sm90.spec_from_launch(launch.kernel, kw, launch.num_warps, launch.num_stages, name),
                  float(flops or 0.0), float(info.get("bytes", _launch_bytes(kw))),
                  _config_tag(kw, launch.num_warps, launch.num_stages), math.prod(launch.grid))
        if flops is None:
            e.notes.append("FLOPs not modelled for this kernel")
        out.append(e)
    for name, fl, nb in aten:
        out.append(Entry(op, shape, f"aten.{name}", False, "fwd", f"aten.{name}", None, fl, nb,
                         "cuBLAS" if fl else "torch"))
    return out


def _meta(shape, dtype, requires_grad=False):
    import torch

    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=requires_grad)


def _drive_lora(K, s: dict) -> list[tuple[str, list, list]]:
    """Today's launchers: forward, then backward with W frozen (the bench's setup), as one call."""
    import torch

    M, Kd, N, r, p = s["M"], s["K"], s["N"], s["r"], s["p"]
    dt = torch.bfloat16
    x, W, A, B, dy = _meta((M, Kd), dt), _meta((N, Kd), dt), _meta((r, Kd), dt), _meta((N, r), dt), _meta((M, N), dt)
    parts = []
    with K.record_launches() as rec, record_aten() as aten:
        _, xa = K.lora_linear_fwd(x, W, None, A, B, 2.0, p, seed=1234)
    parts.append(("fwd", list(rec), list(aten)))
    with K.record_launches() as rec, record_aten() as aten:
        K.lora_linear_bwd(dy, x, W, A, B, xa, 2.0, p, 1234, need_dW=False, need_db=False)
    parts.append(("bwd", list(rec), list(aten)))
    return parts


def _drive_bottleneck(K, s: dict) -> list[tuple[str, list, list]]:
    import torch

    M, d, b = s["M"], s["d"], s["b"]
    h_dt, w_dt = torch.bfloat16, (torch.float32 if s["w"] else torch.bfloat16)
    h, dy = _meta((M, d), h_dt), _meta((M, d), h_dt)
    Wd, Wu = _meta((b, d), w_dt), _meta((d, b), w_dt)
    parts = []
    with K.record_launches() as rec, record_aten() as aten:  # as the bench calls it: no biases, scaling 1, no dropout
        _, pre, a = K.bottleneck_fwd(h, Wd, Wu, None, None, h, None, 1.0, "silu", 0.0, 1234)
    parts.append(("fwd", list(rec), list(aten)))
    with K.record_launches() as rec, record_aten() as aten:
        K.bottleneck_bwd(dy, h, Wd, Wu, None, pre, a, None, 1.0, "silu", 0.0, 1234, add_dy=True)
    parts.append(("bwd", list(rec), list(aten)))
    return parts


def _drive_multi_lora(K, s: dict) -> list[tuple[str, list, list]]:
    import torch
    import triton

    M, Kd, N, r, n = s["M"], s["K"], s["N"], s["r"], s["n"]
    dt = torch.bfloat16
    if hasattr(K, "multi_lora_fwd"):
        try:
            with K.record_launches() as rec, record_aten() as aten:
                K.multi_lora_fwd(_meta((M, Kd), dt), _meta((n, r, Kd), dt), _meta((n, N, r), dt),
                                 _meta((n,), torch.float32), _meta((M,), torch.int64), _meta((M, N), dt))
            return [("fwd", list(rec), list(aten))]
        except (RuntimeError, NotImplementedError, AttributeError):  # older launchers sync on the indices: plan()
            pass
    r_pad = K.rank_pad(r)
    cfg = K.gpu_config(M, r_pad, dt)
    x, A, B = _meta((M, Kd), dt), _meta((n, r_pad, Kd), dt), _meta((n, N, r_pad), dt)
    sc, out = _meta((n,), torch.float32), _meta((M, N), dt)
    i64 = torch.int64
    g = K.Grouping(_meta((M,), i64), _meta((n + 1,), i64), _meta((n + 1,), i64), triton.cdiv(M, cfg.block_m) + n)
    split = K.split_for(M, n, Kd, cfg, torch.device("meta"))
    h = _meta((split, M, r_pad), torch.float32)
    return [("fwd", list(K.plan(x, A, B, sc, g, out, h, cfg)), [])]


def _legacy_prefix(K, s: dict, sm90) -> list[Entry]:
    """Today's prefix launchers launch directly (no recorder): the same kernels and configs as specs (D = 128
    bf16, causal, no padding mask, MHA), with the FLOPs and bytes of each kernel written out."""
    import torch

    B, H, L, D, P = s["B"], s["H"], s["L"], s["D"], s["P"]
    dt, e = torch.bfloat16, 2.0
    d_pad = K.head_dim_pad(D)
    base = dict(GROUP=1, D=D, D_PAD=d_pad, CAUSAL=True, HAS_KPM=False, DOT_PREC="tf32")
    gemm = 2.0 * B * H * L * (L / 2 + P) * D  # one L x (L/2 + P) x D GEMM pass (causal: half the square + prefix)
    qkv = e * B * H * (L + P) * D
    out = []
    for loop, kernel, cfg, passes, nbytes, direction, rows in (
        ("fwd", K._prefix_attn_fwd_kernel, K.fwd_config(d_pad, dt), 2, 4 * qkv, "fwd", L),
        ("bwd_dkdv", K._prefix_attn_bwd_dkdv_kernel, K.bwd_dkdv_config(d_pad, dt), 4, 6 * qkv, "bwd", L + P),
        ("bwd_dq", K._prefix_attn_bwd_dq_kernel, K.bwd_dq_config(d_pad, dt), 3, 5 * qkv, "bwd", L)):
        spec = K._aot_spec(kernel, dt, dict(base, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg, loop)
        block = cfg.block_n if loop == "bwd_dkdv" else cfg.block_m  # dkdv's programs walk key blocks
        out.append(Entry("prefix", s["key"], loop, True, direction, f"prefix/{loop}#main@{s['key']}", spec,
                         passes * gemm, nbytes, f"M={cfg.block_m} N={cfg.block_n} w{cfg.num_warps}s{cfg.num_stages}",
                         -(-rows // block) * B * H))
    small = K.AttnConfig(K.PREPROCESS_BLOCK_M, 16, 4, 1)
    spec = K._aot_spec(K._prefix_attn_bwd_preprocess_kernel, dt,
                       dict(D=D, D_PAD=d_pad, BLOCK_M=K.PREPROCESS_BLOCK_M, HAS_DLSE=True), small, "preprocess")
    out.append(Entry("prefix", s["key"], "bwd_preprocess", False, "bwd", f"prefix/bwd_preprocess@{s['key']}", spec,
                     0.0, 2 * e * B * H * L * D, f"M={K.PREPROCESS_BLOCK_M} w4s1",
                     -(-L // K.PREPROCESS_BLOCK_M) * B * H))
    return out


def _drive_prefix(K, s: dict) -> list[tuple[str, list, list]]:
    """Forward and backward, causal with the prefix, MHA, no padding mask (the bench's call)."""
    import torch

    B, H, L, D, P = s["B"], s["H"], s["L"], s["D"], s["P"]
    dt = torch.bfloat16
    q, k, v = _meta((B, H, L, D), dt), _meta((B, H, L, D), dt), _meta((B, H, L, D), dt)
    pk, pv = _meta((H, P, D), dt), _meta((H, P, D), dt)
    with K.record_launches() as rec, record_aten() as aten:
        out, lse = K.prefix_attention_fwd(q, k, v, pk, pv, None, True, D**-0.5)
    parts = [("fwd", list(rec), list(aten))]
    with K.record_launches() as rec, record_aten() as aten:
        K.prefix_attention_bwd(_meta((B, H, L, D), dt), None, q, k, v, pk, pv, None, out, lse, True, D**-0.5)
    return parts + [("bwd", list(rec), list(aten))]


def legacy_entries(op: str, arch: str, s: dict, sm90) -> list[Entry]:
    """One call at shape `s` through the launchers (on meta tensors, recorded), as entries."""
    K = kernel_module(op)
    if op == "prefix" and not hasattr(K, "record_launches"):  # before the prefix launchers could record
        return _legacy_prefix(K, s, sm90)
    driver = {"lora": _drive_lora, "bottleneck": _drive_bottleneck, "multi_lora": _drive_multi_lora,
              "prefix": _drive_prefix}[op]
    with _target(arch):
        parts = driver(K, s)
    out = []
    for direction, launches, aten in parts:
        for e in _entries_from_launches(op, s["key"], launches, aten, sm90):
            e.direction = direction
            out.append(e)
    return out


def space_entries(op: str, arch: str, full: bool, sm90) -> list[Entry] | None:
    """The op module's own `dispatch_space(arch, full)` in the labelling convention, or None when it has none."""
    K = kernel_module(op)
    fn = getattr(K, "dispatch_space", None)
    legacy = fn is None
    if legacy:  # before dispatch_space(arch): the sm_90 space, main loops named by kernel
        fn = getattr(K, "sm90_dispatch_space", None)
        if fn is None or arch != "sm_90":
            return None
        space = fn(full)
    else:
        with _target(arch):
            space = fn(arch, full)
    is_main = getattr(K, "is_main_loop", None)
    out = []
    for item in space:
        label, item = (item["label"], item) if isinstance(item, dict) else item
        parsed = parse_label(label)
        if parsed is None:  # "op/loop/dtype/shape" (the slash form some modules use): the loop is the 2nd field
            parts = label.split("/")
            parsed = {"op": op, "loop": parts[1] if len(parts) > 1 else label, "main": False, "shape": None,
                      "details": label, "direction": "bwd" if len(parts) > 1 and _BWD.search(parts[1]) else "fwd"}
        if is_main is not None:
            try:
                parsed["main"] = parsed["main"] or bool(is_main(label))
            except Exception:  # noqa: BLE001 -- a label its own helper cannot read: the label's flag stands
                pass
        if legacy:
            kern = item["fn"] if isinstance(item, dict) else item.kernel
            kw = item["constexprs"] if isinstance(item, dict) else item.kwargs
            parsed["main"] = _legacy_main(_kernel_name(kern), kw)
            parsed["direction"] = "bwd" if "bwd" in _kernel_name(kern) else "fwd"
        spec = sm90.as_spec(label, item)
        if isinstance(item, dict):
            flops, nbytes, info, cfg = None, 0.0, {}, f"w{item.get('num_warps')}s{item.get('num_stages')}"
        else:
            info = getattr(item, "info", None) or {}
            flops = info.get("flops", _triton_flops(_kernel_name(item.kernel), item.kwargs))
            nbytes = float(info.get("bytes", _launch_bytes(item.kwargs)))
            cfg = _config_tag(item.kwargs, item.num_warps, item.num_stages)
        ctas = math.prod(item.grid) if not isinstance(item, dict) else int(item.get("ctas", 0))
        e = Entry(op, parsed["shape"] or "", parsed["loop"], parsed["main"] or bool(info.get("main_loop")),
                  parsed["direction"], label, spec, float(flops or 0.0), nbytes, cfg, ctas)
        if flops is None:
            e.notes.append("FLOPs not modelled for this kernel")
        out.append(e)
    return out


def _compile_key(spec: dict, sm90) -> str:
    import json

    return json.dumps([sm90._kernel_ref(spec["fn"]), spec["signature"],
                       {a: str(b) for a, b in spec["constexprs"].items()}, spec["num_warps"], spec["num_stages"]],
                      sort_keys=True)


def collect(op: str, arch: str, preset: str, sm90, space: bool = True) -> tuple[list[Entry], str]:
    """Every entry of `op` on `arch`: one call per benchmark shape through the launchers (meta tensors, recorded
    under use_target(arch): the default path, every launch of the call), then (`space`) the module's own
    dispatch_space entries that compile differently (odd shapes, variants behind switches), with shape "" so they
    count in no call. A call launch takes the main-loop flag of the dispatch-space entry that compiles alike.
    Returns (entries, source)."""
    out = []
    for s in bench_shapes(op, preset):
        try:
            out += legacy_entries(op, arch, s, sm90)
        except Exception as exc:  # noqa: BLE001 -- a launcher that refuses a shape is a row, not a crash
            out.append(Entry(op, s["key"], "driver", False, "fwd", f"{op}@{s['key']}", None, 0.0, 0.0,
                             notes=[f"launcher failed: {type(exc).__name__}: {exc}"]))
    got = space_entries(op, arch, False, sm90) if space else None
    if got is None:
        return out, "launchers"
    by_key: dict[str, Entry] = {}
    for e in got:
        if e.spec is not None:
            k = _compile_key(e.spec, sm90)
            if k not in by_key or (e.main and not by_key[k].main):
                by_key[k] = e
    seen = set()
    for e in out:
        if e.spec is not None:
            k = _compile_key(e.spec, sm90)
            seen.add(k)
            if k in by_key:
                e.main = by_key[k].main
                e.label = by_key[k].label
    for k, e in by_key.items():
        if k not in seen:
            e.shape = ""
            out.append(e)
    return out, "launchers + dispatch_space"


# ------------------------------------------------------------------------------------------------ model
def compute_rate(arch: str, r: Any) -> tuple[float, str]:
    """(FLOP/s, why) for a compiled kernel's main loop on `arch` (see the module docstring)."""
    c = CEILINGS[arch]
    if r is None:
        return c.matmul, "cuBLAS"
    if r.error is not None:
        return 0.0, "does not compile"
    kinds = r.mma_loop
    if not kinds:
        return (c.fp32, "fp32 FMA") if r.n_fma_loop else (c.matmul, "no GEMM")
    rate, why = c.matmul, kinds[0].split(".")[0]
    if any(k.endswith(".tf32") for k in kinds):
        rate, why = rate * 0.5, why + " tf32"
    if kinds[0].startswith("mma.sync") and arch in ("sm_90", "sm_100"):
        rate, why = rate * 0.6, why + " (no wgmma)"
    ns = r.wgmma_n
    if ns:
        rate *= min(1.0, max(ns) / 128)
    if r.serialized:
        rate, why = rate * 0.5, why + " serialized"
    if r.wait_depths and max(r.wait_depths) == 0:
        rate, why = rate * 0.75, why + " unpipelined"
    return rate, why


def predict(entries: list[Entry], arch: str) -> dict[str, float]:
    """Predicted seconds per direction and for the call."""
    c = CEILINGS[arch]
    t = {"fwd": 0.0, "bwd": 0.0}
    for e in entries:
        rate, _ = compute_rate(arch, e.report)
        fill = min(1.0, e.ctas / c.sms) if e.ctas else 1.0  # a grid smaller than the GPU uses part of it
        compute = e.flops / (rate * fill) if e.flops and rate > 0 else (math.inf if e.flops else 0.0)
        t[e.direction] += max(e.nbytes / (c.hbm * fill), compute) + LAUNCH_SECONDS
    t["call"] = t["fwd"] + t["bwd"]
    return t


def floor_seconds(op: str, s: dict, arch: str) -> dict[str, float]:
    c = CEILINGS[arch]
    return {m: max(nb / c.hbm, fl / c.matmul) for m, (fl, nb) in floor_of(op, s).items()}


# ------------------------------------------------------------------------------------------------ gates
def gate_problems(e: Entry) -> list[str]:
    """The CI gates for one compiled entry on its arch: compile/limits (the harness's problems), and for a main
    loop on sm_90 wgmma with N >= 64, on sm_8x mma.sync; ptxas C7515 anywhere."""
    r = e.report
    if r is None:
        return []
    out = list(r.problems())
    if r.error is not None:
        return out
    if r.serialized:
        out.append("ptxas C7515: wgmma serialized")
    if e.main and not fp32_model(e):
        if r.arch == "sm_90":
            if not any(k.startswith("wgmma") for k in r.mma_loop):
                out.append(f"main loop not on wgmma ({r.mma_summary})")
            elif min(r.wgmma_n) < 64:
                out.append(f"main loop wgmma N={min(r.wgmma_n)} < 64")
        elif r.arch in ("sm_80", "sm_86", "sm_89") and not any(k.startswith("mma.sync") for k in r.mma_loop):
            out.append(f"main loop not on tensor cores ({r.mma_summary})")
    return out


def fp32_model(e: Entry) -> bool:
    """The launch's first tensor (the activation: x, h, q, dy) is fp32: an fp32 model, whose exact fp32 dots
    ("ieee", torch's "highest") run on CUDA cores by design; the MMA gates are for bf16/fp16 models."""
    sig = (e.spec or {}).get("signature", {})
    first = next((t for t in sig.values() if t.startswith("*")), "")
    return first.split(":")[0] == "*fp32"


# ------------------------------------------------------------------------------------------------ report
COLUMNS = ("op", "shape", "arch", "dir", "launch", "main", "config", "ctas", "regs", "spills", "smem_KiB", "mma_loop",
           "wgmma_N", "wait_depths", "tma", "cp_async", "ptxas_warnings", "GFLOP", "MB", "gates")


def compile_entries(entries: list[Entry], arch: str, workers: int, sm90) -> None:
    """Compile every entry's spec for `arch` (deduplicated by signature + config), attach the reports."""
    keyed: dict[str, dict] = {}
    for e in entries:
        if e.spec is not None:
            k = _compile_key(e.spec, sm90)
            e._key = k  # type: ignore[attr-defined]
            keyed.setdefault(k, {**e.spec, "label": k, "arch": arch})
    reports = dict(zip(keyed, sm90.compile_many(list(keyed.values()), arch, workers=workers), strict=True))
    for e in entries:
        if e.spec is not None:
            e.report = reports[e._key]  # type: ignore[attr-defined]


def rows_for(entries: list[Entry], arch: str) -> list[dict[str, Any]]:
    rows = []
    for e in entries:
        r = e.report
        rows.append({
            "op": e.op, "shape": e.shape or "(space)", "arch": arch, "dir": e.direction,
            "launch": e.loop if e.shape else e.label,
            "main": "yes" if e.main else "", "config": e.config, "ctas": e.ctas or "",
            "regs": r.n_regs if r and not r.error else "", "spills": r.n_spills if r and not r.error else "",
            "smem_KiB": round(r.shared / 1024, 1) if r and not r.error else "",
            "mma_loop": r.mma_summary if r else "cuBLAS" if e.spec is None and e.flops else "",
            "wgmma_N": "/".join(map(str, r.wgmma_n)) if r and not r.error else "",
            "wait_depths": "/".join(map(str, r.wait_depths)) if r and not r.error else "",
            "tma": r.tma if r and not r.error else "", "cp_async": r.cp_async if r and not r.error else "",
            "ptxas_warnings": " | ".join(r.ptxas_warnings) if r else "",
            "GFLOP": round(e.flops / 1e9, 2), "MB": round(e.nbytes / 1e6, 1),
            "gates": "; ".join(gate_problems(e) + e.notes) or "ok",
        })
    return rows


def summary_rows(op: str, arch: str, preset: str, entries: list[Entry], source: str) -> list[dict[str, Any]]:
    """One row per benchmark shape: launches per call and the predicted ratio to the floor per direction."""
    shapes = {s["key"]: s for s in bench_shapes(op, preset)}
    out = []
    for key, s in shapes.items():
        es = [e for e in entries if e.shape == key]
        if not es:
            continue
        t, f = predict(es, arch), floor_seconds(op, s, arch)
        row = {"op": op, "shape": key, "arch": arch, "source": source,
               "launches_fwd": sum(e.direction == "fwd" for e in es),
               "launches_bwd": sum(e.direction == "bwd" for e in es),
               "plan_GFLOP": round(sum(e.flops for e in es) / 1e9, 1),
               "floor_GFLOP": round(floor_of(op, s)["call"][0] / 1e9, 1),
               "plan_MB": round(sum(e.nbytes for e in es) / 1e6, 1),
               "floor_MB": round(floor_of(op, s)["call"][1] / 1e6, 1)}
        for m in ("fwd", "bwd", "call"):
            row[f"pred_ms_{m}"] = round(t[m] * 1e3, 4)
            row[f"floor_ms_{m}"] = round(f[m] * 1e3, 4)
            row[f"pred_x_floor_{m}"] = round(t[m] / f[m], 2) if f[m] > 0 else ""
        row["gate_failures"] = sum(bool(gate_problems(e)) for e in es)
        out.append(row)
    return out


def _md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


def _versions() -> str:
    import torch
    import triton

    return f"triton {triton.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]}"


def build(ops: list[str], archs: list[str], preset: str, workers: int,
          space: str = "sm_90") -> tuple[list[dict], list[dict], dict]:
    """(detail rows, summary rows, per-(op, arch) source) for every op x arch (compiling as it goes)."""
    sm90 = _import_harness()
    detail, summary = [], []
    for arch in archs:
        for op in ops:
            t0 = time.perf_counter()
            entries, source = collect(op, arch, preset, sm90, space == "all" or space == arch)
            compile_entries(entries, arch, workers, sm90)
            detail += rows_for(entries, arch)
            summary += summary_rows(op, arch, preset, entries, source)
            print(f"[static] {op} {arch}: {len(entries)} launches ({source}), {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    return detail, summary, {}


def render(detail: list[dict], summary: list[dict], preset: str, commit: str) -> str:
    head = (f"# Static report (compiled, not run): {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"Commit {commit}; {_versions()}; preset {preset}; no GPU: Triton AOT compiles + ptxas -v per arch.\n"
            "**pred_x_floor is a PREDICTION** from the compiled code (model in benchmarks/static.py's docstring, "
            "ceilings assumed from datasheets: "
            + ", ".join(f"{a} {c.part}" for a, c in CEILINGS.items()) + "), not a measurement.\n")
    cols = ["op", "shape", "arch", "launches_fwd", "launches_bwd", "plan_GFLOP", "floor_GFLOP", "plan_MB",
            "floor_MB", "pred_ms_call", "floor_ms_call", "pred_x_floor_fwd", "pred_x_floor_bwd",
            "pred_x_floor_call", "gate_failures"]
    dcols = ["op", "shape", "arch", "dir", "launch", "main", "config", "ctas", "regs", "spills", "smem_KiB", "mma_loop",
             "wgmma_N", "wait_depths", "tma", "GFLOP", "MB", "gates"]
    fails = [r for r in detail if r["gates"] != "ok" and not r["gates"].startswith("FLOPs not modelled")]
    out = [head, "## Per call (predicted)\n", _md_table(summary, cols), "",
           f"## Gate failures ({len(fails)})\n", _md_table(fails, dcols) if fails else "none", "",
           "## Every launch\n", _md_table(detail, dcols), ""]
    return "\n".join(out)


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--preset", default="full", choices=("quick", "full"))
    p.add_argument("--workers", type=int, default=2, help="parallel compile workers (at most 2 on the CI machine)")
    p.add_argument("--out", default=str(OUT_DIR))
    p.add_argument("--name", default="report", help="file stem under --out")
    p.add_argument("--space", default="sm_90", choices=("sm_90", "all", "none"),
                   help="where to also compile each op's dispatch_space (odd shapes, variants); elsewhere the "
                        "benchmark-shape calls only")
    a = p.parse_args(argv)
    ops, archs = a.ops.split(","), a.archs.split(",")
    for x in ops:
        if x not in OPS:
            print(f"unknown op {x!r}: choose from {', '.join(OPS)}", file=sys.stderr)
            return 2
    for x in archs:
        if x not in ARCHS:
            print(f"unknown arch {x!r}: choose from {', '.join(ARCHS)}", file=sys.stderr)
            return 2
    os.environ.pop("TRITON_INTERPRET", None)
    detail, summary, _ = build(ops, archs, a.preset, min(2, max(1, a.workers)), a.space)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in ((f"{a.name}.csv", detail), (f"{a.name}_summary.csv", summary)):
        with open(out / name, "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    md = render(detail, summary, a.preset, _commit())
    (out / f"{a.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
