"""The multi-LoRA kernels compile for sm_90 (H100/H200) without a GPU.

* Triton: the shrink and expand kernels at the launches the dispatch makes (built by
  fastadapters.kernels.multi_lora.plan on meta tensors, so the specialisation matches a real launch): no compile
  error, no register spill, shared memory within 227 KiB. The default space covers the extremes of every tile
  rule (bf16 at rank pads 16, 64, 256, fp16 at 16, fp32 at 16 and 256); FASTADAPTERS_SM90_FULL=1 compiles
  every dtype at every rank pad.
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
from sm90 import SM90_MAX_SHARED, Sm90Report, compile_space  # noqa: E402

from fastadapters.kernels import multi_lora as K  # noqa: E402

FULL = os.environ.get("FASTADAPTERS_SM90_FULL", "0") not in ("", "0")
SPACE = K.sm90_dispatch_space(full=FULL)
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
def reports(nvcc_job) -> dict[str, Sm90Report]:
    """All Triton compiles at once (in-process or parallel workers); each test below checks one."""
    return compile_space(SPACE)


@pytest.mark.parametrize("label", [label for label, _ in SPACE])
def test_triton_kernel_compiles_for_sm90(label, reports):
    n_regs, n_spills, shared = reports[label].check()
    assert 0 < n_regs <= 255 and n_spills == 0 and 0 <= shared <= SM90_MAX_SHARED


def test_space_covers_the_dispatch():
    """Every tile the launcher can pick for a GPU (decode and prefill, each dtype, each rank pad) is compiled."""
    labels = {label for label, _ in SPACE}
    pads = {"bf16": (16, 64, 256), "fp16": (16,), "fp32": (16, 256)}
    for dt, rs in pads.items():
        for r_pad in (16, 32, 64, 128, 256) if FULL else rs:
            for mode in ("decode", "prefill"):
                assert {f"shrink-{mode}-{dt}-R{r_pad}", f"expand-{mode}-{dt}-R{r_pad}"} <= labels
    assert {K.gpu_config(M, r, torch.bfloat16) for M in (32, 16384) for r in (16, 32, 64, 128, 256)} >= {
        K.gpu_config(M, r, torch.bfloat16) for M in (1, 256) for r in (16, 32, 64)}  # decode tiles: M-independent
    configs = {(label.split("-")[1], label.split("-")[2], label.split("-")[3]) for label, _ in SPACE}
    assert len(configs) * 2 == len(SPACE)


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
