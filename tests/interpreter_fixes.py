"""Triton-interpreter workarounds for the CPU test runs (not part of the shipped library).

tests/conftest.py installs them when TRITON_INTERPRET is set, before any test module imports the kernels. A child
process that runs kernels in the interpreter outside pytest (a test's subprocess) calls `install()` itself.
"""

from __future__ import annotations

import torch
import triton.language as tl


def fix_interpreter_bf16() -> None:
    """Triton 3.6's interpreter holds bf16 as raw uint16: tl.dot multiplies the bit patterns and fp32 -> bf16
    casts truncate. Make both exact (bf16 operands widened to fp32, round-to-nearest-even casts) so the CPU tests
    check the kernels' arithmetic, not the interpreter's. Interpreter mode only; idempotent."""
    import numpy as np
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder, "_fastadapters_bf16_fix", False):
        return

    def widen(h):
        if h.dtype == tl.bfloat16:
            return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    orig_dot, orig_cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interp.TensorHandle(t.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    builder._fastadapters_bf16_fix = True


def install() -> None:
    """Every workaround (today: the bf16 one); a no-op unless TRITON_INTERPRET is set."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        fix_interpreter_bf16()
