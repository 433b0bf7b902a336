"""The bottleneck Triton kernels compile, for every GPU arch people own (sm_80, sm_86, sm_89, sm_90), at exactly the
configs the launchers dispatch to there: no register spills, shared memory within the arch's limit, and on the
layer's real path (a bf16 model with fp32 adapter weights) every main loop on tensor cores: wgmma with N >= 64 on
sm_90, mma.sync before. No GPU needed: Triton compiles ahead of time for a GPUTarget("cuda", cap, 32). The launches
come from the real launchers on meta tensors under use_target(arch) (fastadapters.kernels.bottleneck_launch.
dispatch_space), so the specialisation (16-divisible sizes, aligned pointers, or not) and the configs match what
that GPU would run.

Default run (one compile per distinct binary, 31 in all; 7.8 min with a cold Triton cache on 2 cores loaded by
4 other sessions (load average ~15), 2026-12-05): the whole default space for sm_90 (the benchmark shapes' call,
the same tiles with dropout, biases and a learned scale, b = 1024, odd shapes, the dropout mask) and for sm_80 and
sm_86 the benchmark shapes' call and its every-feature twin (b = 256, aligned); sm_89 dispatches sm_86's configs
(checked without compiling; its compiles gave the same registers and shared memory).
FASTADAPTERS_SM90_FULL=1 adds the full space on every arch (fp16 and fp32 models, every padded bottleneck
16..1024, aligned and unaligned).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the kernel tests share the process)

import pytest

pytest.importorskip("triton")

from sm90 import CompileReport, compile_many, spec_from_launch  # noqa: E402

from fastadapters.kernels import bottleneck_launch as K  # noqa: E402

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
FULL = os.environ.get("FASTADAPTERS_SM90_FULL", "0") not in ("", "0")


def _space() -> list[tuple[str, str, object]]:
    """(arch, label, launch): the default set (see the module docstring), one per distinct compile."""
    out = [("sm_90", label, launch) for label, launch in K.distinct_compiles(K.dispatch_space("sm_90"))]
    for arch in ("sm_80", "sm_86"):  # sm_89 picks sm_86's configs (test_sm89_picks_the_sm86_configs)
        out += [(arch, label, launch) for label, launch in K.distinct_compiles(K.dispatch_space(arch))
                if "@M4096-d4096-b256-bf16-fp32w:" in label or "@odd-M4096-din4096-dout4096-b256-" in label]
    return out


SPACE = _space()


@pytest.fixture(scope="module")
def reports() -> dict[tuple[str, str], CompileReport]:
    """All default compiles at once (parallel workers); each test below checks one."""
    specs = [{**spec_from_launch(launch.kernel, launch.kwargs, launch.num_warps, launch.num_stages, label),
              "arch": arch} for arch, label, launch in SPACE]
    return {(r.arch, r.label): r for r in compile_many(specs)}


def _tensor_core_problems(r: CompileReport, label: str) -> list[str]:
    """The main-loop gate: tensor-core MMAs in the loops (wgmma with N >= 64 on sm_90), no fp32 FMA dot, no
    serialized wgmma."""
    if not K.is_main_loop(label):
        return []
    out = []
    if not r.mma_loop:
        out.append(f"no MMA in the loops ({r.n_fma_loop} fma.rn.f32)")
    elif r.arch == "sm_90":
        if not r.wgmma_n or any("wgmma" not in m for m in r.mma_loop):
            out.append(f"not wgmma: {r.mma_loop}")
        elif min(r.wgmma_n) < 64:
            out.append(f"wgmma N {r.wgmma_n} < 64")
        if r.serialized:
            out.append("ptxas C7515: wgmma serialized")
    return out


@pytest.mark.parametrize("arch,label", [(a, lbl) for a, lbl, _ in SPACE], ids=[f"{a}:{lbl}" for a, lbl, _ in SPACE])
def test_dispatched_config_compiles(arch, label, reports):
    r = reports[arch, label]
    n_regs, n_spills, shared = r.check()
    assert 0 < n_regs <= 255 and n_spills == 0 and 0 <= shared <= r.limits["max_shared"]
    problems = _tensor_core_problems(r, label)
    assert not problems, f"{label} [{arch}]: {'; '.join(problems)} ({r.mma_summary})"


def test_real_path_runs_on_16bit_operands_on_every_arch():
    """fp32 adapter weights on a bf16 model: every launch gets the weights cast to bf16 and 16-bit dots (the compile
    test above then shows the MMAs); the fp32-operand flag is off everywhere."""
    for arch in ARCHS:
        for label, launch in K.dispatch_space(arch):
            if "-fp32w" not in label:
                continue
            assert launch.kwargs["DOT_FP32"] is False, (arch, label)
            for name in ("p_down", "p_up"):
                if name in launch.kwargs:
                    assert launch.kwargs[name].dtype == torch.bfloat16, (arch, label, name)


def test_space_labels_and_main_loops():
    """Every arch's default space holds the three kernels at both benchmark shapes' compile, labelled by role, with
    the kernel's full argument list; the main loops are exactly the fwd / dx / wgrad launches at benchmark shapes;
    the 99 KiB parts get smaller tiles than sm_90."""
    for arch in ARCHS:
        space = dict(K.dispatch_space(arch))
        roles = {label.split("/")[1].split("@")[0].split(":")[0].removesuffix("#main") for label in space}
        assert roles == {"fwd", "dx", "wgrad", "dropout_mask"}, (arch, roles)
        mains = [label for label in space if K.is_main_loop(label)]
        assert len(mains) == 12, (arch, mains)  # 3 kernels x 2 benchmark M x 2 weight dtypes
        assert all("@M" in label and "-b256-bf16" in label for label in mains), mains
        for label, launch in space.items():
            assert set(launch.kwargs) == set(launch.kernel.arg_names), label
            assert all(g <= 65535 for g in launch.grid[1:]), (label, launch.grid)
    def fwd(arch: str):
        return next(launch for label, launch in K.dispatch_space(arch)
                    if label.startswith("bottleneck/fwd#main@M16384-d4096-b256-bf16-fp32w:"))

    fwd90, fwd86 = fwd("sm_90"), fwd("sm_86")
    assert fwd86.kwargs["BLOCK_K"] * fwd86.kwargs["BLOCK_N"] < fwd90.kwargs["BLOCK_K"] * fwd90.kwargs["BLOCK_N"]


def test_sm89_picks_the_sm86_configs():
    """Same 99 KiB shared memory, same tables: every sm_89 launch equals sm_86's but for nothing (grids, tiles,
    warps, stages, arguments), so the sm_86 compiles stand for sm_89 in the default run."""
    def plan(arch: str) -> list:
        return [(label, L.grid, L.num_warps, L.num_stages,
                 tuple((k, v) for k, v in L.kwargs.items() if not isinstance(v, torch.Tensor)))
                for label, L in K.dispatch_space(arch)]

    assert plan("sm_89") == plan("sm_86")


@pytest.mark.skipif(not FULL, reason="set FASTADAPTERS_SM90_FULL=1 (the full space on every arch, ~300 compiles)")
def test_full_space_compiles_on_every_arch():
    specs = [{**spec_from_launch(launch.kernel, launch.kwargs, launch.num_warps, launch.num_stages, label),
              "arch": arch} for arch in ARCHS for label, launch in K.distinct_compiles(K.dispatch_space(arch, True))]
    problems = []
    for r in compile_many(specs):
        p = r.problems() + _tensor_core_problems(r, r.label)
        if p:
            problems.append(f"{r.label} [{r.arch}]: {'; '.join(p)}")
    assert not problems, "\n".join(problems)
