"""The LoRA Triton kernels compile for sm_90 (H100/H200) at every config the launchers can dispatch to, with no
register spills and at most 227 KiB of shared memory. No GPU needed: Triton compiles ahead of time for a
GPUTarget("cuda", 90, 32). The configs come from running the real launchers on meta tensors
(fastadapters.kernels.lora.sm90_dispatch_space), so the specialisation matches what a launch would compile.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the kernel tests share the process)

import pytest

pytest.importorskip("triton")

from sm90 import SM90_MAX_SHARED, Sm90Report, compile_sm90, compile_space  # noqa: E402

from fastadapters.kernels import lora as K  # noqa: E402

SPACE = K.sm90_dispatch_space()


@pytest.fixture(scope="module")
def reports() -> dict[str, Sm90Report]:
    """All default-space compiles at once (parallel workers); each test below checks one."""
    return compile_space(SPACE)


@pytest.mark.parametrize("label", [label for label, _ in SPACE])
def test_kernel_config_compiles_for_sm90(label, reports):
    n_regs, n_spills, shared = reports[label].check()
    assert 0 < n_regs <= 255 and n_spills == 0 and 0 <= shared <= SM90_MAX_SHARED


def test_space_covers_every_dispatchable_config():
    """Every GEMM config of both lists, the cuBLAS epilogue and every shrink tile appear in the compiled space."""
    labels = [label for label, _ in SPACE]
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for dropout, role in ((False, "fwd"), (True, "dx")):
            for c in K.gemm_configs(dtype, dropout=dropout):
                tag = f"gemm-{role}-{name}-R256-{c.block_m}x{c.block_n}x{c.block_k}-w{c.num_warps}s{c.num_stages}"
                assert tag in labels, tag
        for role in ("epilogue-fwd", "epilogue-dx"):
            assert f"gemm-{role}-{name}-R256-cublas" in labels
        for role in ("xa", "dA", "dxa", "dB"):
            assert f"shrink-{role}-{name}-R256" in labels
        shrink_tiles = {K.shrink_config(r, dtype) for r in (16, 32, 64, 128, 256)}
        covered = {K.shrink_config(launch.kwargs["R_PAD"], dtype) for label, launch in SPACE
                   if label.startswith("shrink-") and f"-{name}-" in label}
        assert shrink_tiles <= covered
    # the dropout GEMM list leaves out the tile that spills with the Philox state live (checked in the full space)
    assert all(c.block_m * c.block_n // (32 * c.num_warps) <= K.DROPOUT_MAX_ACC_REGS
               for c in K.gemm_configs(torch.bfloat16, dropout=True))


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


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTADAPTERS_SM90_FULL", "0") in ("", "0"),
                    reason="about 180 compiles (minutes): set FASTADAPTERS_SM90_FULL=1 to run")
def test_full_space_compiles_for_sm90():
    """Every dtype (fp16 too), R_PAD 16..256 and r = 5, every use of each kernel (about 180 compiles)."""
    problems = [f"{r.label}: {'; '.join(r.problems())}" for r in compile_space(K.sm90_dispatch_space(True)).values()
                if r.problems()]
    assert not problems, "\n".join(problems)
