"""Per-op kernel registry: which implementation of an op runs for the backend asked for.

Each op in fastadapters.ops has a pure-PyTorch reference (the "torch" backend). A fused kernel joins by
registering itself for an op and a backend, usually at import of its module:

    from fastadapters.ops._registry import register_kernel

    @register_kernel("lora_linear", "triton", supports=lambda x, *a, **kw: None if x.is_cuda else "x is on CPU")
    def lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_mask): ...

A kernel is called with exactly the reference's arguments (see kernels/<op>_ref.py), so the same tests run both.
`supports(*args, **kwargs)` (optional) returns None when the kernel can run those arguments, else a short reason.

Backend rules (per op; see fastadapters.backend for how they are chosen):
  * "torch": the reference, always;
  * "triton": that backend's kernel; a clear KernelUnavailableError when it has none, or when its `supports`
    refuses the arguments (asking explicitly for a backend must not silently run another);
  * "cuda": the op's "cuda" (C++/CUDA extension) kernel, else its "triton" kernel, else KernelUnavailableError;
  * "auto": the first of AUTO_ORDER that is registered and supports the arguments, else the reference. Under
    "auto" a kernel that fails to compile or launch (a Triton or CUDA launch error, e.g. out of shared memory on
    a smaller GPU) is dropped for that device with one warning naming the op, the GPU and the switch, and the
    reference runs: never a crash (`call`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..backend import BACKENDS, ENV, OPS, backend_for, dispatching

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
    backend = backend_for(op)
    assert backend in BACKENDS, backend  # get_backend validates
    if backend == "torch":
        return "torch", _REFERENCES[op]
    device = _device_of(args, kwargs)
    with dispatching(op, backend):
        if backend == "auto":
            for name in AUTO_ORDER:
                kernel = _KERNELS[op].get(name)
                if kernel is not None and (op, name, device) not in _FAILED and kernel.refusal(*args, **kwargs) is None:
                    return name, kernel.fn
            return "torch", _REFERENCES[op]
        names = ("cuda", "triton") if backend == "cuda" else (backend,)
        reasons = []
        for name in names:
            kernel = _KERNELS[op].get(name)
            if kernel is None:
                reasons.append(f"backend {name!r} has no {op} kernel")
                continue
            reason = kernel.refusal(*args, **kwargs)
            if reason is None:
                return name, kernel.fn
            reasons.append(f"backend {name!r} cannot run {op} on these inputs: {reason}")
    raise KernelUnavailableError(
        "; ".join(reasons) + f"; use 'auto' to fall back to 'torch' (fastadapters.use_backend({op}=...) or env {ENV})"
    )


def dispatch(op: str, *args: Any, **kwargs: Any) -> Any:
    """Run `op` with the implementation `resolve` picks (the reference if the kernel fails to build, see `call`)."""
    backend, fn = resolve(op, *args, **kwargs)
    return call(op, backend, lambda: fn(*args, **kwargs), lambda: _REFERENCES[op](*args, **kwargs),
                _device_of(args, kwargs))


# ------------------------------------------------------------------------------------------------ fallback
_FAILED: dict[tuple[str, str, str], str] = {}  # (op, backend, device) -> why its kernel was dropped


def _device_of(args: tuple, kwargs: dict) -> str:
    for t in (*args, *kwargs.values()):
        if isinstance(t, torch.Tensor):
            return str(t.device)
    return "cpu"


def is_kernel_failure(err: BaseException) -> bool:
    """A compile or launch failure of a kernel (Triton's compiler/runtime errors, CUDA launch-resource errors),
    as opposed to a bad argument or an out-of-memory, which must reach the caller."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    mod = type(err).__module__ or ""
    if mod.startswith("triton"):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("out of resources", "ptxas", "too many resources requested", "no kernel image",
                            "cuda driver error", "triton"))


def _gpu_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return device


def call(op: str, backend: str, kernel_call: Callable[[], Any], reference_call: Callable[[], Any],
         device: str) -> Any:
    """Run `kernel_call` (backend's kernel for op); under "auto", a compile/launch failure drops that kernel for
    `device` with one warning and runs `reference_call` instead. Explicit backends raise the failure."""
    if backend == "torch":
        return reference_call()
    try:
        return kernel_call()
    except Exception as err:
        if backend_for(op) != "auto" or not is_kernel_failure(err):
            raise
        _FAILED[(op, backend, device)] = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"fastadapters: the {backend} kernel of {op} failed to compile or launch on {_gpu_name(device)} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); {op} runs on the torch "
            f"reference from now on in this process. Set {ENV}={op}=torch to silence this, and please report it.",
            RuntimeWarning, stacklevel=3)
        return reference_call()


def failed_kernels() -> dict[tuple[str, str, str], str]:
    """The kernels dropped after a compile/launch failure: (op, backend, device) -> the error."""
    return dict(_FAILED)
