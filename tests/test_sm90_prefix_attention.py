"""sm_90 (H100/H200) ahead-of-time compiles of every prefix_attention kernel at every tile config its launchers can
dispatch to (kernels/prefix_attention.py: sm90_dispatch_space): no compile error, no register spill, shared memory
within 227 KiB. No GPU needed (tests/sm90.py).

The specs mark pointers and strides as divisible by 16 ("*bf16:16"), Triton's launch-time specialisation for
head_dim a multiple of 16: without it Triton emits neither vector loads nor cp.async pipelines, and registers and
shared memory differ from what runs on the GPU.

The default compiles (always run, 22 kernels) hold every fp16/bf16 tile config with the heaviest flags;
FASTADAPTERS_SM90_FULL=1 also compiles fp16, more head dims, the fp32 tiles and the variants that only remove code
(non-causal, no mask, MHA): ~20x longer. fp32 is a test dtype: its exact dots lower to FMAs, compile slowly, and
ptxas spills a few registers in some variants whatever the tile, so for fp32 only compile errors and shared memory
fail the test.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # sm90 imports triton: the interpreter must be on before that

pytest.importorskip("triton")

from sm90 import Sm90Report, compile_sm90_many  # noqa: E402

from fastadapters.kernels import prefix_attention as K  # noqa: E402

WORKERS = 2


def compile_all(specs: list[dict]) -> list[Sm90Report]:
    """compile_sm90_many with WORKERS subprocesses side by side."""
    return compile_sm90_many(specs, workers=WORKERS)


def _problems(r: Sm90Report) -> list[str]:
    """What fails a compile: any problem for fp16/bf16; for fp32 (a test dtype whose exact dots lower to FMAs, where
    ptxas spills a few registers whatever the tile) only compile errors and shared memory: spills there are slow,
    not wrong."""
    problems = r.problems()
    if "-fp32-" in r.label:
        problems = [p for p in problems if "spill" not in p]
    return problems


def _kernel_name(fn) -> str:
    return getattr(fn, "fn", fn).__name__


def test_dispatch_space_covers_every_config():
    """The AOT space holds every tile config the launchers' tables can return, for each kernel and dtype; the
    default (always-run) part holds every fp16/bf16 one."""
    space = K.sm90_dispatch_space(full=True)
    compiled = {(_kernel_name(s["fn"]), s["signature"].get("p_q", "").split(":")[0], s["constexprs"].get("BLOCK_M"),
                 s["constexprs"].get("BLOCK_N"), s["num_warps"], s["num_stages"]) for s in space}
    for dtype, ty in ((torch.bfloat16, "*bf16"), (torch.float16, "*fp16"), (torch.float32, "*fp32")):
        for d_pad in (16, 32, 64, 128, 256):
            cfgs = [("_prefix_attn_fwd_kernel", K.fwd_config(d_pad, dtype)),
                    ("_prefix_attn_bwd_dkdv_kernel", K.bwd_dkdv_config(d_pad, dtype)),
                    ("_prefix_attn_bwd_dq_kernel", K.bwd_dq_config(d_pad, dtype))]
            cfgs += [("_prefix_attn_decode_kernel", K.decode_config(d_pad, dtype, rows)) for rows in range(1, 257)]
            for name, c in cfgs:
                key = (name, ty, c.block_m, c.block_n, c.num_warps, c.num_stages)
                assert key in compiled, f"{name} {c} ({ty}, D_PAD={d_pad}) is missing from sm90_dispatch_space"
    default = K.sm90_dispatch_space(full=False)
    kinds = {s["label"].split("-")[0] for s in default}
    assert kinds == {"fwd", "dkdv", "dq", "decode", "preprocess", "combine"}, kinds
    rows = {(_kernel_name(s["fn"]), s["constexprs"].get("BLOCK_M"), s["constexprs"].get("BLOCK_N"), s["num_warps"],
             s["num_stages"]) for s in default if s["signature"].get("p_q", "").startswith("*bf16")}
    for d_pad in (64, 128, 256):
        cfgs = [("_prefix_attn_fwd_kernel", K.fwd_config(d_pad, torch.bfloat16)),
                ("_prefix_attn_bwd_dkdv_kernel", K.bwd_dkdv_config(d_pad, torch.bfloat16)),
                ("_prefix_attn_bwd_dq_kernel", K.bwd_dq_config(d_pad, torch.bfloat16))]
        cfgs += [("_prefix_attn_decode_kernel", K.decode_config(d_pad, torch.bfloat16, r)) for r in (1, 17, 33)]
        for name, c in cfgs:
            assert (name, c.block_m, c.block_n, c.num_warps, c.num_stages) in rows, (name, d_pad, c)
    assert all(":16" in s["signature"]["p_q"] and s["signature"]["p_kpm"] == "*u8" for s in space if "p_kpm" in
               s["signature"])


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["default", "full"])
def test_prefix_attention_kernels_compile_for_sm90(full):
    if full and os.environ.get("FASTADAPTERS_SM90_FULL", "") in ("", "0"):
        pytest.skip("set FASTADAPTERS_SM90_FULL=1 to compile fp16, fp32 and the flag variants too (~20x longer)")
    specs = K.sm90_dispatch_space(full=full)
    if full:
        default = {s["label"] for s in K.sm90_dispatch_space(False)}
        specs = [s for s in specs if s["label"] not in default]
    reports = compile_all(specs)
    assert [r.label for r in reports] == [s["label"] for s in specs]
    problems = [f"{r.label}: {'; '.join(_problems(r))}" for r in reports if _problems(r)]
    assert not problems, f"{len(problems)} of {len(reports)} sm_90 compiles fail:\n" + "\n".join(problems)
