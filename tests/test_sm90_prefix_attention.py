"""Ahead-of-time compiles of the prefix-attention kernels for every GPU architecture people own (tests/sm90.py), at
exactly the launches the launchers dispatch (kernels/prefix_attention_launch.py: dispatch_space, recorded on meta
tensors under use_target(arch)). No GPU needed.

Gates, per compile: no compile error, no register spill, shared memory within the arch's limit (sm_80 163 KiB,
sm_86/89 99 KiB, sm_90 227 KiB), no ptxas C7515 ("wgmma.mma_async instructions are serialized"); on sm_90 every
"#main" launch (forward, dK/dV, dQ) has wgmma in its loops with N >= 64 in its D-wide products, and its dK/dV
kernel holds 64+ key rows; on sm_8x its loops use mma.sync.

Default (always run): sm_90's whole default space (bf16: the bench presets B8 H32 L2048/8192 D128 P30, both
backward modes, and the odd shapes: GQA, head_dim 80 and 64, padding mask, decode) and the four main loops of the
quick preset on sm_86 (99 KiB: the tightest shared memory). FASTADAPTERS_SM90_FULL=1 adds sm_80, sm_86 and sm_89's
whole default space and every arch's full space (fp16, fp32, head_dims 16..256, non-causal): ~30x longer.
fp32 is a test dtype (exact dots lower to FMAs): for it only compile errors and shared memory fail.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # sm90 imports triton: the interpreter must be on before that

pytest.importorskip("triton")

from sm90 import compile_many, spec_from_launch  # noqa: E402

from fastadapters.kernels import prefix_attention as K  # noqa: E402

FULL = os.environ.get("FASTADAPTERS_SM90_FULL", "") not in ("", "0")
QUICK = "B8-H32-L2048-D128-P30-bf16"


def _problems(r) -> list[str]:
    problems = r.problems()
    fp32 = "-fp32" in r.label
    if fp32:
        problems = [p for p in problems if "spill" not in p]
    if r.error is None and r.serialized:
        problems.append("ptxas C7515: wgmma serialized")
    if r.error is None and K.is_main_loop(r.label) and not fp32:
        mma = _mma(r)
        if r.arch == "sm_90":
            n = sorted({int(m.group(1)) for k in mma for m in [re.match(r"wgmma\.m\d+n(\d+)", k)] if m})
            if not n:
                problems.append(f"no wgmma in the main loop ({r.mma_summary})")
            elif max(n) < 64:
                problems.append(f"wgmma N {n}: none >= 64")
        elif not any(m.startswith("mma.sync") for m in mma):
            problems.append(f"no mma.sync in the main loop ({r.mma_summary})")
    return problems


def _mma(r) -> list[str]:
    """The MMA kinds of the kernel's loops; every tl.dot of these kernels sits in a loop, so the kinds anywhere in
    the kernel stand in where the harness's loop detection finds none (LLVM writes "Loop Header" on the line after
    the block label in this PTX)."""
    return r.mma_loop or r.mma_all


def _compile(space: list, arch: str) -> list:
    specs = [spec_from_launch(launch.kernel, launch.kwargs, launch.num_warps, launch.num_stages, label)
             for label, launch in space]
    return compile_many(specs, arch, workers=2)


def _check(reports: list) -> None:
    bad = [f"{r.label} [{r.arch}]: {'; '.join(_problems(r))}" for r in reports if _problems(r)]
    assert not bad, f"{len(bad)} of {len(reports)} compiles fail:\n" + "\n".join(bad)


def test_dispatch_space_labels_and_tiles():
    """Labels follow benchmarks/static.py's convention; the space holds every kernel role at the quick preset; the
    dK/dV tiles hold 64+ key rows and 64+ query rows on every arch (FlashAttention-2's shape, wgmma-sized)."""
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90"):
        space = K.dispatch_space(arch)
        pattern = re.compile(r"^prefix/[a-z_]+(#main)?@[\w.-]+(:[\w-]*)?$")
        assert all(pattern.match(label) for label, _ in space), [lb for lb, _ in space if not pattern.match(lb)]
        roles = {label.split("/")[1].split("@")[0].replace("#main", "") for label, _ in space}
        assert roles == {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dkdv_det", "bwd_dq", "decode", "decode_combine"}
        for label, launch in K.dispatch_space(arch, full=True):
            assert len(launch.grid) == 1, label
            if "bwd_dkdv" in label and "-fp32" not in label:
                assert launch.kwargs["BLOCK_N"] >= 64 and launch.kwargs["BLOCK_M"] >= 32, label


def test_prefix_attention_compiles_for_sm90():
    _check(_compile(K.dispatch_space("sm_90"), "sm_90"))


def test_prefix_attention_main_loops_compile_for_sm86():
    space = [(lb, la) for lb, la in K.dispatch_space("sm_86") if K.is_main_loop(lb) and QUICK in lb]
    assert len(space) == 4
    _check(_compile(space, "sm_86"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90"])
def test_prefix_attention_full_space_compiles(arch):
    if not FULL:
        pytest.skip("set FASTADAPTERS_SM90_FULL=1 to compile every arch's default and full spaces (~30x longer)")
    _check(_compile(K.dispatch_space(arch, full=True), arch))
