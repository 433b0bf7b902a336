"""The LoRA Triton kernels compile for every GPU arch people own (sm_80, sm_86, sm_89, sm_90) at the configs the
launchers dispatch to there, with no register spills and shared memory within each arch's limit. No GPU needed:
Triton compiles ahead of time for a GPUTarget of each arch (tests/sm90.py). The launches come from the real
launchers on meta tensors under `use_target(arch)` (fastadapters.kernels.lora_launch.dispatch_space), so the
configs and the specialisation are what that GPU would run.

Default: a small set chosen for risk (the largest shared-memory tile of each arch, the register-tight masked
epilogue and dropout shrinks at unaligned shapes); FASTADAPTERS_SM90_FULL=1 compiles every arch's full space.
Checks without compiling (fast): every config of every arch's full space fits that arch's shared memory by the
tile arithmetic, grids stay within CUDA's limits, small-M shrinks fill the GPU, splits are a pure function.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the kernel tests share the process)

import pytest

pytest.importorskip("triton")

from sm90 import SM90_MAX_SHARED, Sm90Report, as_spec, compile_many, compile_sm90  # noqa: E402

from fastadapters.kernels import lora as K  # noqa: E402
from fastadapters.kernels import lora_launch as L  # noqa: E402
from fastadapters.kernels._configs import ARCHS, shape_bucket, use_target  # noqa: E402
from fastadapters.kernels.lora_configs import (  # noqa: E402
    SHARED_MARGIN,
    GemmConfig,
    ShrinkConfig,
    gemm_shared,
    shrink_shared,
)

FULL = os.environ.get("FASTADAPTERS_SM90_FULL", "0") not in ("", "0")
GPU_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
SPACES = {arch: L.dispatch_space(arch, full=FULL) for arch in GPU_ARCHS}  # every launch of every call
DISTINCT = {arch: dict(L.distinct_compiles(space)) for arch, space in SPACES.items()}  # one per binary

# (arch, label before its ":config") compiled by default: what most often breaks (shared memory of the largest tile
# per arch; registers of the masked kernels at unaligned shapes, which cannot use vectorised loads).
DEFAULT = [
    ("sm_90", "lora/shrink_xa@M256-K4096-N4096-r16-p0.05-bf16"),
    ("sm_90", "lora/shrink_xa@odd-M1000-K4095-N4097-r13-p0.05-bf16"),
    ("sm_90", "lora/shrink_dA@odd-M1000-K4095-N4097-r13-p0.05-bf16"),
    ("sm_90", "lora/epilogue_dx@odd-M37-K72-N40-r5-p0.05-bf16"),
    ("sm_90", "lora/gemm_fwd#main@M4096-K4096-N4096-r16-p0.05-bf16-fused"),
    ("sm_90", "lora/gemm_dx#main@M4096-K4096-N4096-r16-p0.05-bf16-fused"),
    ("sm_86", "lora/gemm_fwd#main@M4096-K4096-N4096-r16-p0.05-bf16-fused"),
    ("sm_89", "lora/epilogue_dx@M256-K4096-N4096-r16-p0.05-bf16"),
    ("sm_80", "lora/gemm_fwd#main@M4096-K4096-N4096-r16-p0.05-bf16-fused"),
]


def _full_label(arch: str, prefix: str) -> str:
    [label] = [lab for lab, _ in SPACES[arch] if lab.split(":")[0] == prefix]
    return label


SELECTED = ([(arch, label) for arch in GPU_ARCHS for label in DISTINCT[arch]] if FULL
            else [(arch, _full_label(arch, prefix)) for arch, prefix in DEFAULT])


@pytest.fixture(scope="module")
def reports() -> dict[tuple[str, str], Sm90Report]:
    """Every selected compile at once (parallel workers); each test below checks one."""
    spaces = {arch: dict(SPACES[arch]) for arch in GPU_ARCHS}
    specs = [dict(as_spec(f"{arch}|{label}", spaces[arch][label]), arch=arch) for arch, label in SELECTED]
    return {tuple(r.label.split("|")): r for r in compile_many(specs)}


@pytest.mark.parametrize("arch,label", SELECTED, ids=[f"{a}-{lab.split(':')[0]}" for a, lab in SELECTED])
def test_dispatched_config_compiles(arch, label, reports):
    report = reports[(arch, label)]
    n_regs, n_spills, shared = report.check()
    assert 0 < n_regs <= 255 and n_spills == 0 and 0 <= shared <= ARCHS[arch].max_shared
    if L.is_main_loop(label):  # the fused GEMM's main loop on tensor cores, N a model-dim tile
        if arch == "sm_90":
            assert any(k.startswith("wgmma") for k in report.mma_loop), report.mma_summary
            assert min(report.wgmma_n) >= 64 and not report.serialized
        else:
            assert any(k.startswith("mma.sync") for k in report.mma_loop), report.mma_summary


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_every_config_fits_the_arch_and_the_grid_limits(arch):
    """The space's tiles by arithmetic (no compile): pipelined shared memory within the arch's limit less a
    margin, the dropout GEMM within its register rule, grids within CUDA's limits, every role present."""
    space = SPACES[arch]
    roles = {L.role_of(label) for label, _ in space}
    assert roles == {"shrink_xa", "shrink_dxa", "shrink_dB", "shrink_dA", "epilogue_dx", "gemm_fwd", "gemm_dx",
                     "dropout_mask"}
    assert len({label for label, _ in space}) == len(space)  # labels are unique
    budget = ARCHS[arch].max_shared - SHARED_MARGIN
    for label, launch in space:
        kw = launch.kwargs
        dtype = kw["p_out"].dtype
        if L.role_of(label) == "dropout_mask":
            continue
        if launch.kernel is K._lora_shrink_kernel:
            cfg = ShrinkConfig(kw["BLOCK_ROW"], kw["BLOCK_RED"], launch.num_warps, launch.num_stages)
            assert shrink_shared(cfg, kw["R_PAD"], kw["p_in"].dtype) <= budget, label
        else:
            cfg = GemmConfig(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], launch.num_warps, launch.num_stages)
            assert gemm_shared(cfg, dtype) <= budget, label
            if kw["HAS_DROPOUT"]:
                assert cfg.block_m * cfg.block_n // (32 * cfg.num_warps) <= 64, label
        assert launch.grid[0] < 2**31 and all(g <= 65535 for g in launch.grid[1:]), (label, launch.grid)
        assert L.is_main_loop(label) == ("/gemm_" in label and "-fp32" not in label and "@odd-" not in label)
        assert launch.info.get("main_loop", False) == L.is_main_loop(label)


def test_shrinks_fill_the_gpu_at_small_m_and_split_by_bucket():
    """At M = 256 (and 4096) the x·A^T and dy·B shrinks launch at least one block per SM on sm_90 (132 SMs): the
    split over K does what the rows cannot. Splits depend on the shape bucket only: M = 250 and 256 share one."""
    space = {label.split(":")[0]: launch for label, launch in SPACES["sm_90"]}
    sms = ARCHS["sm_90"].num_sms
    for M in (256, 4096):
        for role in ("shrink_xa", "shrink_dxa"):
            grid = space[f"lora/{role}@M{M}-K4096-N4096-r16-p0.05-bf16"].grid
            assert grid[0] * grid[1] >= sms, (role, M, grid)
    with use_target("sm_90"):
        meta = torch.device("meta")
        plans = {M: L.shrink_plan(M, 4096, 16, torch.bfloat16, meta) for M in (250, 256, 16384)}
    assert shape_bucket(250) == shape_bucket(256) and plans[250] == plans[256]
    assert plans[256][1] > 1 and plans[16384][1] <= 2


def test_helper_reports_a_clean_kernel_and_rejects_what_the_gpu_rejects():
    """The helper itself: a copy kernel compiles without spills; an 8x8 tl.dot (fine in the interpreter) fails."""
    import sm90

    n_regs, n_spills, shared = compile_sm90(sm90.selftest_copy_kernel,
                                            {"p_x": "*fp32:16", "p_y": "*fp32:16", "n": "i32", "BLOCK": "constexpr"},
                                            {"BLOCK": 256}, num_warps=4, num_stages=1)
    assert 0 < n_regs < 64 and n_spills == 0 and shared == 0
    with pytest.raises(AssertionError, match="compile failed"):
        compile_sm90(sm90.selftest_tiny_dot_kernel, {"p_a": "*fp32:16", "p_c": "*fp32:16", "BLOCK": "constexpr"},
                     {"BLOCK": 8}, num_warps=4, num_stages=1)


@pytest.mark.parametrize(
    "report,problem",
    [(Sm90Report("spills", n_regs=255, n_spills=3, stack=24, shared=1024), "spill"),
     (Sm90Report("smem", n_regs=128, n_spills=0, stack=0, shared=SM90_MAX_SHARED + 1), "shared memory"),
     (Sm90Report("error", error="boom"), "compile failed")],
    ids=["spills", "shared-over-227KiB", "error"],
)
def test_report_check_fails_on_each_problem(report, problem):
    with pytest.raises(AssertionError, match=problem):
        report.check()
    assert Sm90Report("fine", n_regs=128, n_spills=0, stack=0, shared=SM90_MAX_SHARED).check() == (128, 0,
                                                                                                    SM90_MAX_SHARED)
