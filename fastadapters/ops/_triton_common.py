"""Python-side pieces shared by the "triton" backends of fastadapters.ops (lora_triton, bottleneck_triton,
prefix_attention_triton, multi_lora): interpreter detection, the CPU-tensor refusal, seeds for in-kernel dropout.

Importing this module does not import triton, so TRITON_INTERPRET can still be set before the kernels load.
"""

from __future__ import annotations

import os
import sys

import torch

from ..backend import get_backend

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SEED_MOD = 2**63  # user seeds are reduced modulo this (the kernels take a non-negative int64)


def interpreting(kernel_module: str | None = None) -> bool:
    """Whether the Triton kernels run in the interpreter: the loaded kernel module's own flag (fixed when it was
    imported), else the TRITON_INTERPRET environment variable. kernel_module: e.g. "fastadapters.kernels.lora"."""
    mod = sys.modules.get(kernel_module) if kernel_module else None
    if mod is not None:
        return bool(mod.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def draw_seed() -> int:
    """A fresh dropout seed from torch's CPU generator (so torch.manual_seed makes runs repeatable)."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


def device_refusal(t: torch.Tensor, name: str, kernel_module: str) -> str | None:
    """None when the kernels can run on t's device, else why not: CUDA tensors run; CPU tensors only in the
    interpreter and only when backend "triton" was asked for explicitly ("auto" keeps the reference on CPU).
    name: what t is called in the message ("x", "h", "q")."""
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu" and interpreting(kernel_module):
        if get_backend() == "auto":
            return "'auto' does not pick the Triton interpreter on CPU (ask for backend 'triton' explicitly)"
        return None
    return (f"{name} is on {t.device}: the triton kernels need a CUDA device (or TRITON_INTERPRET=1, set before "
            "triton is imported, to run them on CPU in the interpreter)")


def mask_refusal(call: str) -> str:
    """The error for a precomputed dropout_mask given to a kernel that draws its mask from a seed.
    call: the public op, e.g. "fastadapters.ops.lora_linear"."""
    return ("the triton kernel draws its dropout mask from a seed inside the kernel and does not read a "
            f"precomputed dropout_mask; call {call}(..., dropout_p=p, seed=...)")
