"""Every launcher of every op runs end to end on "meta" tensors, for every GPU architecture, and records launches that
a GPU of that arch can run.

Meta tensors hold no data: `.item()`, `.tolist()`, `.cpu()` or a data-dependent shape on them raise, so a launcher
that completes here has no host sync and can be captured in a CUDA graph (issue 11, item 4). Under
`use_target(arch)` the launchers pick their configs exactly as on a GPU of that arch (kernels/_configs.py) and,
under `record_launches()`, list the launches instead of running them. For each recorded launch this checks that
it carries every kernel argument, that its grid fits CUDA's limits (x < 2^31, y and z <= 65535: B*H on grid y
fails past 65535), and that the pipelined operand tiles it asks for fit the arch's shared memory (an estimate,
num_stages x the per-stage operand tiles: the real compiles are in tests/test_static_report.py and
tests/test_sm90_*.py). Forward and backward, bf16 / fp16 / fp32 (bottleneck: a bf16 model with fp32 adapter
weights too), every arch of kernels/_configs.ARCHS (sm_80 to sm_120). No compile: a few seconds.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the kernel tests share the process)

import pytest

pytest.importorskip("triton")

from fastadapters.kernels import _configs  # noqa: E402

ARCHS = tuple(_configs.ARCHS)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ELEM = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
META = torch.device("meta")


def _launch_module(name: str):
    """kernels/<name>_launch.py where the op has split its launchers out, else the kernel module itself."""
    try:
        return importlib.import_module(f"fastadapters.kernels.{name}_launch")
    except ModuleNotFoundError:
        return importlib.import_module(f"fastadapters.kernels.{name}")


def _target(arch: str):
    return _configs.use_target(arch)


def _limits(arch: str) -> int:
    return _configs.ARCHS[arch].max_shared


def m(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, device=META, dtype=dtype)


# ------------------------------------------------------------------------------------------------ drivers
def run_lora(L, dt: torch.dtype) -> None:
    """Forward and backward (every gradient, W trainable too), with dropout, at a prefill, a decode and an odd
    shape (the fused-GEMM switch's both sides: FUSED_GEMM_MIN_M)."""
    for M, K, N, r in ((16384, 4096, 4096, 16), (32, 4096, 4096, 16), (37, 72, 80, 5)):
        x, W, b = m(M, K, dtype=dt), m(N, K, dtype=dt), m(N, dtype=dt)
        A, B, dy = m(r, K, dtype=dt), m(N, r, dtype=dt), m(M, N, dtype=dt)
        for p in (0.05, 0.0):
            y, xa = L.lora_linear_fwd(x, W, b, A, B, 2.0, p, seed=1234)
            assert y.shape == (M, N) and y.device == META
            grads = L.lora_linear_bwd(dy, x, W, A, B, xa, 2.0, p, 1234, need_dW=True, need_db=True)
            assert grads[0].shape == (M, K)


def run_bottleneck(L, dt: torch.dtype, w_dt: torch.dtype | None = None) -> None:
    """Forward and backward with every feature on (dropout, both biases, learned scale, every gradient), at the
    benchmark shape and an unaligned one."""
    w_dt = w_dt or dt
    for M, d, b in ((16384, 4096, 256), (37, 72, 13)):
        h, dy = m(M, d, dtype=dt), m(M, d, dtype=dt)
        Wd, Wu, bd, bu = m(b, d, dtype=w_dt), m(d, b, dtype=w_dt), m(b, dtype=w_dt), m(d, dtype=w_dt)
        scale = m(1, dtype=torch.float32)
        y, pre, a = L.bottleneck_fwd(h, Wd, Wu, bd, bu, None, scale, 1.0, "gelu_tanh", 0.05, 1234)
        assert y.shape == (M, d)
        L.bottleneck_bwd(dy, h, Wd, Wu, bu, pre, a, scale, 1.0, "gelu_tanh", 0.05, 1234, add_dy=True,
                         need_ddown_bias=True, need_dup_bias=True, need_dscale=True)


def run_prefix(L, dt: torch.dtype) -> None:
    """Forward (prefill and the split-K decode) and backward, causal with a padding mask and GQA, at the benchmark
    shape, an odd head_dim, and B*H = 70000 (past grid y's 65535)."""
    for B, Hq, Hkv, Lq, Lk, D, P in ((8, 32, 32, 2048, 2048, 128, 30), (2, 4, 2, 37, 37, 80, 5),
                                     (1750, 40, 40, 16, 16, 64, 4), (4, 8, 8, 1, 300, 128, 30)):
        q, k, v = m(B, Hq, Lq, D, dtype=dt), m(B, Hkv, Lk, D, dtype=dt), m(B, Hkv, Lk, D, dtype=dt)
        pk, pv = m(Hkv, P, D, dtype=dt), m(Hkv, P, D, dtype=dt)
        kpm = m(B, Lk, dtype=torch.bool)
        causal = Lq == Lk
        out, lse = L.prefix_attention_fwd(q, k, v, pk, pv, kpm, causal, D**-0.5)
        assert out.shape == q.shape and lse.shape == (B, Hq, Lq)
        if Lq > 1:
            L.prefix_attention_bwd(torch.empty_like(out), None, q, k, v, pk, pv, kpm, out, lse, causal, D**-0.5)


def run_multi_lora(L, dt: torch.dtype) -> None:
    """The per-token multi-LoRA update at decode (32 rows) and prefill (16384 rows), 8 adapters, and an odd shape."""
    for M, K, N, r, n in ((32, 4096, 4096, 16, 8), (16384, 4096, 4096, 16, 8), (37, 72, 80, 5, 3)):
        x, A, B = m(M, K, dtype=dt), m(n, r, K, dtype=dt), m(n, N, r, dtype=dt)
        s, idx, out = m(n, dtype=torch.float32), m(M, dtype=torch.int64), m(M, N, dtype=dt)
        assert L.multi_lora_fwd(x, A, B, s, idx, out).shape == (M, N)


OPS = {  # op -> (launch module, driver, dtype flavours)
    "lora": ("lora", run_lora, ("bf16", "fp16", "fp32")),
    "bottleneck": ("bottleneck", run_bottleneck, ("bf16", "fp16", "fp32", "bf16-fp32w")),
    "prefix": ("prefix_attention", run_prefix, ("bf16", "fp16", "fp32")),
    "multi_lora": ("multi_lora", run_multi_lora, ("bf16", "fp16", "fp32")),
}
XFAIL: dict[str, str] = {}  # op -> reason, only while its engineer's change has not landed


# ------------------------------------------------------------------------------------------------ checks
def smem_estimate(launch) -> int | None:
    """Bytes of shared memory the pipelined operand tiles of a tiled launch need at least: num_stages x (the two
    operand tiles of one step), in the element size of its first tensor argument; None for a kernel without the
    usual BLOCK_* names (row-wise kernels)."""
    kw = launch.kwargs
    tensors = [v for v in kw.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not tensors:
        return None
    e = ELEM.get(tensors[0].dtype, 2)
    bm, bn, bk = kw.get("BLOCK_M"), kw.get("BLOCK_N"), kw.get("BLOCK_K")
    if bm and bn and bk:
        return launch.num_stages * (bm * bk + bk * bn) * e
    d = kw.get("D_PAD")
    if bm and bn and d:  # attention: K and V tiles of BLOCK_N rows per stage (Q may stay in registers)
        return launch.num_stages * 2 * bn * d * e
    return None


def check_launch(launch, arch: str) -> list[str]:
    name = getattr(getattr(launch.kernel, "fn", launch.kernel), "__name__", "?")
    problems = []
    missing = set(launch.kernel.arg_names) - set(launch.kwargs)
    if missing:
        problems.append(f"{name}: kernel arguments not passed: {sorted(missing)}")
    g = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
    if len(launch.grid) > 3 or g[0] >= 2**31 or g[1] > 65535 or g[2] > 65535 or min(g) < 0:
        problems.append(f"{name}: grid {launch.grid} outside CUDA's limits (x < 2^31, y, z <= 65535)")
    smem = smem_estimate(launch)
    if smem is not None and smem > _limits(arch):
        problems.append(f"{name}: {launch.num_stages} stages of its tiles need >= {smem} bytes of shared memory, "
                        f"{arch} has {_limits(arch)}")
    return problems


CASES = [(op, flavour, arch) for op, (_, _, flavours) in OPS.items() for flavour in flavours for arch in ARCHS]


@pytest.mark.parametrize("op,flavour,arch", [
    pytest.param(*c, marks=[pytest.mark.xfail(reason=XFAIL[c[0]], strict=False)] if c[0] in XFAIL else [])
    for c in CASES], ids=[f"{op}-{fl}-{arch}" for op, fl, arch in CASES])
def test_launchers_run_on_meta_and_fit_the_arch(op, flavour, arch):
    module, driver, _ = OPS[op]
    L = _launch_module(module)
    dt = DTYPES[flavour.split("-")[0]]
    old = torch.get_float32_matmul_precision()
    try:
        with _target(arch), L.record_launches() as rec:
            if flavour == "bf16-fp32w":
                driver(L, dt, torch.float32)
            else:
                driver(L, dt)
    finally:
        torch.set_float32_matmul_precision(old)
    assert rec, f"{op} {flavour} on {arch}: no launch recorded (does the launcher use its module's recorder?)"
    problems = [p for launch in rec for p in check_launch(launch, arch)]
    assert not problems, f"{op} {flavour} on {arch}:\n" + "\n".join(sorted(set(problems)))


def test_meta_tensors_catch_a_host_sync():
    """The premise: a launcher that reads device data on the host fails on meta tensors."""
    t = m(4, dtype=torch.int64)
    for sync in (lambda: t.max().item(), lambda: t.tolist(), lambda: t.cpu(), lambda: torch.nonzero(t)):
        with pytest.raises((RuntimeError, NotImplementedError)):
            sync()


@pytest.mark.parametrize("grid,ok", [((2**31 - 1, 65535, 65535), True), ((1, 70000), False), ((1, 1, 65536), False)],
                         ids=["at-limits", "y-past-65535", "z-past-65535"])
def test_grid_check_fails_past_cudas_limits(grid, ok):
    from fastadapters.kernels._common import Launch

    class K:  # a stand-in kernel with no arguments
        arg_names: list[str] = []

    assert (check_launch(Launch(K, grid, {}, 4, 1), "sm_90") == []) is ok


@pytest.mark.parametrize("op", ["lora", "multi_lora", "bottleneck", "prefix_attention"])
def test_sm120_picks_the_sm86_tiles(op, monkeypatch):
    """sm_120 (RTX 50xx, RTX PRO Blackwell) is newer than Hopper but has sm_86's 99 KiB and no wgmma: it must get
    sm_86's tiles (whose real compiles are tested), never the 150-176 KiB Hopper ones (an out-of-resources crash).
    Compared at sm_86's SM count, since grids and split counts follow the SM count."""
    mod = importlib.import_module(f"fastadapters.kernels.{op}_launch")
    sm86 = _configs.ARCHS["sm_86"]
    monkeypatch.setitem(_configs.ARCHS, "sm_120", dataclasses.replace(_configs.ARCHS["sm_120"], num_sms=sm86.num_sms))

    def plan(arch: str) -> list:
        return [(label, L.grid, L.num_warps, L.num_stages,
                 tuple((k, v) for k, v in L.kwargs.items() if not isinstance(v, torch.Tensor)))
                for label, L in mod.dispatch_space(arch)]

    assert plan("sm_120") == plan("sm_86")
