"""Per-op kernel registry: which implementation of an op runs for the backend asked for.

Each op in fastadapters.ops has a pure-PyTorch reference (the "torch" backend). A fused kernel joins by
registering itself for an op and a backend, usually at import of its module:

    from fastadapters.ops._registry import register_kernel

    @register_kernel("lora_linear", "triton", supports=lambda x, *a, **kw: None if x.is_cuda else "x is on CPU")
    def lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_mask): ...

A kernel is called with exactly the reference's arguments (see kernels/<op>_ref.py), so the same tests run both.
`supports(*args, **kwargs)` (optional) returns None when the kernel can run those arguments, else a short reason.

Backend rules (fastadapters.backend.get_backend()):
  * "torch": the reference, always;
  * "triton" / "cuda": that backend's kernel; a clear KernelUnavailableError when it has none, or when its
    `supports` refuses the arguments (asking explicitly for a backend must not silently run another);
  * "auto": the first of AUTO_ORDER that is registered and supports the arguments, else the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backend import BACKENDS, get_backend

OPS = ("lora_linear", "bottleneck_adapter", "prefix_attention", "multi_lora_delta")
KERNEL_BACKENDS = ("triton", "cuda")
AUTO_ORDER = ("cuda", "triton")


class KernelUnavailableError(NotImplementedError):
    """The backend asked for explicitly has no kernel for this op, or its kernel cannot run these arguments."""


@dataclass(frozen=True)
class Kernel:
    fn: Callable[..., Any]
    supports: Callable[..., str | None] | None = None

    def refusal(self, *args: Any, **kwargs: Any) -> str | None:
        return None if self.supports is None else self.supports(*args, **kwargs)


_REFERENCES: dict[str, Callable[..., Any]] = {}
_KERNELS: dict[str, dict[str, Kernel]] = {op: {} for op in OPS}


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: fastadapters.ops has {OPS}")


def register_reference(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make `fn` the "torch" implementation of `op` (done once, by fastadapters.ops.<op>)."""
    _check_op(op)
    _REFERENCES[op] = fn
    return fn


def register_kernel(
    op: str,
    backend: str,
    fn: Callable[..., Any] | None = None,
    *,
    supports: Callable[..., str | None] | None = None,
) -> Any:
    """Register `fn` as `op`'s kernel on `backend` ("triton" or "cuda"); usable as a decorator when fn is None."""
    _check_op(op)
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernels register for one of {KERNEL_BACKENDS}, not {backend!r} ('torch' is the reference)")

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        _KERNELS[op][backend] = Kernel(f, supports)
        return f

    return deco if fn is None else deco(fn)


def unregister_kernel(op: str, backend: str) -> None:
    """Remove `op`'s kernel on `backend` if there is one (tests, or a kernel that failed to build)."""
    _check_op(op)
    _KERNELS[op].pop(backend, None)


def registered_backends(op: str) -> list[str]:
    """The backends that can run `op`: always "torch", plus those with a registered kernel."""
    _check_op(op)
    return ["torch", *[b for b in KERNEL_BACKENDS if b in _KERNELS[op]]]


def resolve(op: str, *args: Any, **kwargs: Any) -> tuple[str, Callable[..., Any]]:
    """(backend name, implementation) that runs `op` on these (reference-signature) arguments now."""
    _check_op(op)
    backend = get_backend()
    assert backend in BACKENDS, backend  # get_backend validates
    if backend == "torch":
        return "torch", _REFERENCES[op]
    if backend == "auto":
        for name in AUTO_ORDER:
            kernel = _KERNELS[op].get(name)
            if kernel is not None and kernel.refusal(*args, **kwargs) is None:
                return name, kernel.fn
        return "torch", _REFERENCES[op]
    kernel = _KERNELS[op].get(backend)
    if kernel is None:
        raise KernelUnavailableError(
            f"backend {backend!r} has no {op} kernel yet; use 'torch' or 'auto' "
            "(fastadapters.use_backend or env FASTADAPTERS_BACKEND)"
        )
    reason = kernel.refusal(*args, **kwargs)
    if reason is not None:
        raise KernelUnavailableError(
            f"backend {backend!r} cannot run {op} on these inputs: {reason}; use 'auto' to fall back to 'torch'"
        )
    return backend, kernel.fn


def dispatch(op: str, *args: Any, **kwargs: Any) -> Any:
    """Run `op` with the implementation `resolve` picks."""
    _, fn = resolve(op, *args, **kwargs)
    return fn(*args, **kwargs)
