"""DoRA's kernel path compiles for sm_90 (H100/H200) on tensor cores: the launches of fastadapters::dora_linear_fwd
(the LoRA shrink, the epilogue with the column scale, and the opt-in fused GEMM with it) recorded on meta tensors
under use_target("sm_90") at the benchmark shape, compiled ahead of time (tests/sm90.py): no spills, shared memory
within sm_90's limit, and the fused GEMM's main loop on wgmma with N >= 64. No GPU needed.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the kernel tests share the process)

import pytest

pytest.importorskip("triton")

from sm90 import as_spec, compile_many  # noqa: E402

from fastadapters.kernels import lora_launch as L  # noqa: E402
from fastadapters.kernels._configs import ARCHS, use_target  # noqa: E402

M, K, N, R = 4096, 4096, 4096, 16  # benchmarks/bench_dora.py's quick preset


def dora_launches(base: str) -> list:
    """(role, launch) of one DoRA forward in bf16 on an sm_90 GPU, cuBLAS base GEMM or the fused GEMM."""
    meta = torch.device("meta")
    x = torch.empty(M, K, device=meta, dtype=torch.bfloat16)
    W = torch.empty(N, K, device=meta, dtype=torch.bfloat16)
    b = torch.empty(N, device=meta, dtype=torch.bfloat16)
    A = torch.empty(R, K, device=meta, dtype=torch.bfloat16)
    B = torch.empty(N, R, device=meta, dtype=torch.bfloat16)
    col = torch.empty(N, device=meta, dtype=torch.float32)
    with use_target("sm_90"), L.use_configs(base=base), L.record_launches() as launches:
        L.lora_linear_fwd(x, W, b, A, B, 2.0, 0.0, 0, col_scale=col)  # what fastadapters::dora_linear_fwd runs
    return list(launches)


@pytest.fixture(scope="module")
def reports():
    specs, kinds = [], []
    for base in ("cublas", "fused"):
        for i, launch in enumerate(dora_launches(base)):
            if launch.kwargs.get("HAS_COL_SCALE"):
                kinds.append((base, launch.kwargs["HAS_MAIN"]))
                specs.append(dict(as_spec(f"dora/{base}/{i}", launch), arch="sm_90"))
    assert kinds == [("cublas", False), ("fused", True)], kinds
    return dict(zip(kinds, compile_many(specs), strict=True))


@pytest.mark.parametrize("base", ["cublas", "fused"])
def test_dora_epilogue_compiles_for_sm90(base, reports):
    report = reports[(base, base == "fused")]
    n_regs, n_spills, shared = report.check()
    assert 0 < n_regs <= 255 and n_spills == 0 and 0 <= shared <= ARCHS["sm_90"].max_shared
    if base == "fused":  # the main loop on tensor cores, N a model-dimension tile
        assert any(k.startswith("wgmma") for k in report.mma_loop), report.mma_summary
        assert min(report.wgmma_n) >= 64 and not report.serialized
