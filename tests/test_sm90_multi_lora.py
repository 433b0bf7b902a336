"""The multi-LoRA kernels compile for every GPU arch people own (sm_80, sm_86, sm_89, sm_90) without a GPU.

* Triton: the shrink and expand kernels at the launches the dispatch makes on each arch (recorded from
  fastadapters.kernels.multi_lora_launch.multi_lora_fwd on meta tensors under use_target(arch), so configs and
  specialisation match a real launch): no compile error, no register spill, shared memory within the arch's
  limit. The default compiles sm_90's space (the extremes of every tile rule: bf16 at rank pads 16, 64, 256, fp16
  at 16, fp32 at 16 and 256, decode and prefill) and, for sm_80 / sm_86 / sm_89, the tiles with the most shared
  memory; FASTADAPTERS_SM90_FULL=1 compiles every arch's full space (every dtype at every rank pad).
* CUDA: csrc/multi_lora_cuda.cu through nvcc for sm_90 with the torch headers (when nvcc is installed): it
  compiles, and ptxas reports no spills for any instantiation. The report is cached in the user cache per
  (source, nvcc, torch), so only a changed source is compiled again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

# Kernels imported without TRITON_INTERPRET compile right here; interpreted ones go to tests/sm90.py's workers.
from sm90 import Sm90Report, as_spec, compile_many  # noqa: E402

from fastadapters.kernels import multi_lora as K  # noqa: E402
from fastadapters.kernels import multi_lora_launch as ML  # noqa: E402
from fastadapters.kernels._configs import ARCHS, use_target  # noqa: E402
from fastadapters.kernels.multi_lora_configs import (  # noqa: E402
    SHARED_MARGIN,
    MultiLoraConfig,
    expand_shared,
    multi_lora_config,
    shrink_shared,
)

FULL = os.environ.get("FASTADAPTERS_SM90_FULL", "0") not in ("", "0")
GPU_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
SPACES = {arch: ML.dispatch_space(arch, full=FULL) for arch in GPU_ARCHS}  # both launches of every call
DISTINCT = {arch: ML.distinct_compiles(space) for arch, space in SPACES.items()}  # one per binary
SPACE = DISTINCT["sm_90"]


def _shared_estimate(label: str, launch) -> int:
    kw = launch.kwargs
    cfg = MultiLoraConfig(kw["BLOCK_M"], kw.get("BLOCK_K", 16), kw.get("BLOCK_N", 16), kw.get("BLOCK_R", 16),
                          launch.num_warps, launch.num_warps, launch.num_stages, launch.num_stages)
    if label.startswith("multi_lora/shrink@"):
        return shrink_shared(cfg, kw["R_PAD"], kw["p_x"].dtype)
    return expand_shared(cfg, kw["p_b"].dtype)


def _selected() -> list[tuple[str, str]]:
    """(arch, label) to compile: everything with FULL, else sm_90's default space and, on the other archs, the
    shrink and the expand with the most shared memory."""
    if FULL:
        return [(arch, label) for arch in GPU_ARCHS for label, _ in DISTINCT[arch]]
    out = [("sm_90", label) for label, _ in SPACE]
    for arch in ("sm_80", "sm_86", "sm_89"):
        for kind in ("shrink", "expand"):
            entries = [(lab, la) for lab, la in DISTINCT[arch] if lab.startswith(f"multi_lora/{kind}@")]
            out.append((arch, max(entries, key=lambda e: _shared_estimate(*e))[0]))
    return out


SELECTED = _selected()
CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _nvcc_args(nvcc: str, out_dir: str, write_stub: bool = True) -> list[str]:
    """nvcc's command line; with write_stub, the header stub a CPU build of torch needs is written to out_dir."""
    inc = Path(torch.__file__).parent / "include"
    args = [nvcc, "-c", str(CSRC / "multi_lora_cuda.cu"), "-o", os.path.join(out_dir, "multi_lora_cuda.o"),
            "-gencode", "arch=compute_90,code=sm_90", "-std=c++17", "-O0", "--expt-relaxed-constexpr",
            "-Xptxas", "-v", "-I", str(inc), "-I", str(inc / "torch" / "csrc" / "api" / "include"),
            "-I", sysconfig.get_paths()["include"], "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-w"]
    if not (inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # a CPU build of torch ships the c10/cuda headers but not this generated one: give it the CUDA build's
        if write_stub:
            stub = Path(out_dir) / "stub" / "c10" / "cuda" / "impl"
            stub.mkdir(parents=True, exist_ok=True)
            (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        args[args.index("-I"):args.index("-I")] = ["-I", str(Path(out_dir) / "stub")]
    return args


def _nvcc_cache_file(nvcc: str) -> Path:
    """Where the ptxas report of this source + nvcc + torch headers is kept (the user cache: runs share it)."""
    from fastadapters import ext

    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256((CSRC / "multi_lora_cuda.cu").read_bytes())
    h.update(f"{version}|{torch.__version__}|{' '.join(_nvcc_args('nvcc', '', write_stub=False)[5:])}".encode())
    return ext.cache_root() / "nvcc-sm90" / f"multi_lora_cuda-{h.hexdigest()[:16]}.log"


@pytest.fixture(scope="module")
def nvcc_job():
    """The nvcc compile, started first (a subprocess) so it overlaps the Triton compiles; yields a function that
    waits and returns (exit code, ptxas log), or None without nvcc. A successful report is cached per source."""
    nvcc = _nvcc()
    if nvcc is None:
        yield None
        return
    cached = _nvcc_cache_file(nvcc)
    if cached.exists():
        yield lambda: (0, cached.read_text())
        return
    tmp = tempfile.mkdtemp(prefix="fa_nvcc_")
    log = os.path.join(tmp, "nvcc.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(_nvcc_args(nvcc, tmp), stdout=f, stderr=subprocess.STDOUT)

    def result() -> tuple[int, str]:
        rc = proc.wait(timeout=600)
        text = Path(log).read_text()
        if rc == 0:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(text)
        return rc, text

    yield result
    if proc.poll() is None:
        proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def reports(nvcc_job) -> dict[tuple[str, str], Sm90Report]:
    """All selected Triton compiles at once (parallel workers); each test below checks one."""
    spaces = {arch: dict(SPACES[arch]) for arch in GPU_ARCHS}
    specs = [dict(as_spec(f"{arch}|{label}", spaces[arch][label]), arch=arch) for arch, label in SELECTED]
    return {tuple(r.label.split("|")): r for r in compile_many(specs)}


@pytest.mark.parametrize("arch,label", SELECTED, ids=[f"{a}-{lab.split(':')[0]}" for a, lab in SELECTED])
def test_triton_kernel_compiles(arch, label, reports):
    n_regs, n_spills, shared = reports[(arch, label)].check()
    assert 0 < n_regs <= 255 and n_spills == 0 and 0 <= shared <= ARCHS[arch].max_shared


def test_space_covers_the_dispatch():
    """Every tile the launcher can pick on sm_90 (decode and prefill, each dtype, each rank pad) is compiled; the
    decode tiles do not depend on M below DECODE_MAX_M."""
    assert K.dispatch_space is ML.dispatch_space and K.record_launches is ML.record_launches  # the op contract
    labels = {label.split(":")[0] for label, _ in SPACES["sm_90"]}
    pads = {"bf16": (16, 64, 256), "fp16": (16,), "fp32": (16, 256)}
    for dt, rs in pads.items():
        for r_pad in (16, 32, 64, 128, 256) if FULL else rs:
            for kind in ("shrink", "expand"):
                for mode, M in (("decode", 32), ("prefill", 16384)):
                    n = 1024 if r_pad == 256 else 8
                    assert f"multi_lora/{kind}@{mode}-M{M}-K4096-N4096-r{r_pad}-n{n}-{dt}" in labels, (kind, dt, mode)
    sm90 = ARCHS["sm_90"]
    assert {multi_lora_config(sm90, torch.bfloat16, M, r) for M in (16, 32, 64, 256) for r in (16, 32, 64)} == {
        multi_lora_config(sm90, torch.bfloat16, 32, r) for r in (16, 32, 64)}


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_every_config_fits_the_arch_and_the_grid_limits(arch):
    """By tile arithmetic (no compile): pipelined shared memory within the arch's limit less a margin; grids within
    CUDA's limits; the decode shrink splits K so that it launches at least one block per SM."""
    budget = ARCHS[arch].max_shared - SHARED_MARGIN
    for label, launch in SPACES[arch]:
        assert _shared_estimate(label, launch) <= budget, label
        assert launch.grid[0] < 2**31 and all(0 < g <= 65535 for g in launch.grid[1:]), (label, launch.grid)
    decode = {lab.split(":")[0]: la for lab, la in SPACES[arch]}["multi_lora/shrink@decode-M32-K4096-N4096-r16-n8-bf16"]
    assert decode.grid[1] >= 16  # 2-8 working 16-row tiles (32 tokens, 8 adapters) x the split: >= 32-128 blocks
    with use_target(arch):
        meta = torch.device("meta")
        cfg = ML.config_for(16384, 16, torch.bfloat16, meta)
        assert ML.split_for(16384, 8, 4096, cfg, meta) == 1  # prefill: the token tiles fill the GPU already


def test_cuda_source_compiles_for_sm90_without_spills(nvcc_job):
    if nvcc_job is None:
        pytest.skip("nvcc not found (set CUDA_HOME): the CUDA decode kernel is compiled on the GPU machine only")
    rc, text = nvcc_job()
    assert rc == 0, f"nvcc failed for csrc/multi_lora_cuda.cu:\n{text[-4000:]}"
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    assert len(entries) == 16, f"expected 16 instantiations (4 dtypes x 2 index types x 2 vector modes):\n{text}"
    assert spills and all(s == ("0", "0") for s in spills), text
    print(f"\nmulti_lora_bgmv_kernel on sm_90: {len(entries)} instantiations, registers {min(regs)}-{max(regs)}, "
          "no spills", file=sys.stderr)
