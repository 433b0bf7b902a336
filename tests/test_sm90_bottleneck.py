"""The bottleneck Triton kernels compile for sm_90 (H100/H200) at the configs the launchers can dispatch to, with no
register spills and at most 227 KiB of shared memory. No GPU needed: Triton compiles ahead of time for a
GPUTarget("cuda", 90, 32). The launches come from running the real launchers on meta tensors
(fastadapters.kernels.bottleneck.sm90_dispatch_space), so the specialisation (16-divisible sizes, aligned
pointers, or not) matches what a launch would compile.

Default run (18 compiles, 15-60 s on 2 cores with a cold Triton cache, seconds warm): every bf16 config of the
aligned lists at the largest bottleneck it serves (register use grows with B in the fused mode and does not depend
on it in the chunked mode) and the heaviest unaligned and fp32-weight compiles. FASTADAPTERS_SM90_FULL=1 adds the
full product: every B, both alignments, bf16 / fp16 / fp32 inputs and fp32 weights in "ieee" and "tf32"
(about 280 compiles, ~25 min on 2 cores; all clean when these lists were written).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the kernel tests share the process)

import pytest

pytest.importorskip("triton")

from sm90 import SM90_MAX_SHARED, Sm90Report, compile_space  # noqa: E402

from fastadapters.kernels import bottleneck as K  # noqa: E402

SPACE = K.sm90_dispatch_space()
FULL = os.environ.get("FASTADAPTERS_SM90_FULL", "0") not in ("", "0")


@pytest.fixture(scope="module")
def reports() -> dict[str, Sm90Report]:
    """All default-space compiles at once (parallel workers); each test below checks one."""
    return compile_space(SPACE)


@pytest.mark.parametrize("label", [label for label, _ in SPACE])
def test_kernel_config_compiles_for_sm90(label, reports):
    n_regs, n_spills, shared = reports[label].check()
    assert 0 < n_regs <= 255 and n_spills == 0 and 0 <= shared <= SM90_MAX_SHARED


def test_space_covers_every_list_entry():
    """The full space holds each config of each list (row kernels per B and alignment, wgrad) at the largest B
    that uses it, for each kernel and dot flavour; the default space holds all of the bf16 aligned ones (the
    production path). Every launch carries its kernel's full argument list."""
    full = dict(K.sm90_dispatch_space(full=True))
    default = {label for label, _ in SPACE}
    for flavour, dt, prec in (("bf16", torch.bfloat16, None), ("fp16", torch.float16, None),
                              ("bf16-fp32w-ieee", torch.float32, "ieee"), ("bf16-fp32w-tf32", torch.float32, "tf32"),
                              ("fp32-ieee", torch.float32, "ieee"), ("fp32-tf32", torch.float32, "tf32")):
        for aligned in (True, False):
            align = "aligned" if aligned else "unaligned"
            expected = []
            for kind in ("fwd", "dx"):
                largest: dict[K.RowConfig, int] = {}
                for B in K.PADDED_BOTTLENECKS:
                    for c in K.row_configs(kind, B, dt, aligned, prec):
                        largest[c] = B
                expected += [f"{kind}-{flavour}-{align}-{K._cfg_tag(c)}-B{B}" for c, B in largest.items()]
            expected += [f"wgrad-{flavour}-{align}-{K._cfg_tag(c)}-B1024" for c in K._wgrad_table(dt, aligned)]
            for label in expected:
                assert label in full, label
                if flavour == "bf16" and aligned:
                    assert label in default, label
    for label, launch in full.items():
        assert set(launch.kwargs) == set(launch.kernel.arg_names), label
    # the unaligned class really is unaligned, the aligned one aligned (what decides vector loads and cp.async)
    aligned_fwd = next(v for k, v in full.items() if k.startswith("fwd-bf16-aligned"))
    unaligned_fwd = next(v for k, v in full.items() if k.startswith("fwd-bf16-unaligned"))
    assert aligned_fwd.kwargs["D_IN"] % 16 == 0 and aligned_fwd.kwargs["NB"] % 16 == 0
    assert unaligned_fwd.kwargs["D_IN"] % 16 != 0 and unaligned_fwd.kwargs["NB"] % 16 != 0


def test_fused_mode_stays_within_the_register_budget():
    """The design rule behind the lists: fused row tiles hold (BLOCK_M, B) fp32 values, at most 16K per CTA of
    8 warps (64 per thread per live tile); chunked tiles are bounded by BLOCK_M x block_j the same way."""
    for dt in (torch.bfloat16, torch.float32):
        for aligned in (True, False):
            for kind in ("fwd", "dx"):
                for B in K.PADDED_BOTTLENECKS:
                    for c in K.row_configs(kind, B, dt, aligned, "ieee") + K.row_configs(kind, B, dt, aligned, "tf32"):
                        per_thread = c.block_m * c.bj(B) // (32 * c.num_warps)
                        assert per_thread <= 64, (kind, B, dt, aligned, c)
                        assert c.block_m >= 16 and c.block_k >= 16 and c.block_n >= 16 and c.bj(B) >= 16


@pytest.mark.skipif(not FULL, reason="set FASTADAPTERS_SM90_FULL=1 (about 280 compiles, ~25 min on 2 cores)")
def test_full_space_compiles_for_sm90():
    """Every B, every flavour (fp16 and fp32 inputs too), aligned and unaligned."""
    problems = [f"{r.label}: {'; '.join(r.problems())}" for r in compile_space(K.sm90_dispatch_space(True)).values()
                if r.problems()]
    assert not problems, "\n".join(problems)
