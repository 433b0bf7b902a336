"""Backend selection: which implementation each op in fastadapters.ops runs.

Backends, per op (`lora_linear`, `bottleneck_adapter`, `prefix_attention`, `multi_lora_delta`):

  "torch"   the pure-PyTorch reference (the spec; what CPUs run).
  "triton"  the op's fused Triton kernel; an error (KernelUnavailableError) when the op has none or the kernel
            cannot run the arguments: asking for a backend explicitly never silently runs another.
  "cuda"    the op's GPU kernels, CUDA C++ first: the C++/CUDA extension's kernel where the op has one
            (multi_lora_delta's BGMV decode kernel), else the op's Triton kernel; an error when neither can run.
  "auto"    (default) the first of the C++/CUDA and Triton kernels that can run the arguments, else the reference.
            A kernel that fails to compile or launch on this GPU is dropped for the process with one warning,
            and the reference runs instead.

Choose with `fastadapters.use_backend(...)` (thread-local, nests) or the environment variable
FASTADAPTERS_BACKEND, both per op when needed:

    with fa.use_backend("triton"): ...                              every op on Triton
    with fa.use_backend(lora_linear="torch"): ...                   only LoRA on the reference
    with fa.use_backend("triton", prefix_attention="torch"): ...    both
    FASTADAPTERS_BACKEND=triton,lora_linear=torch

Gradient checkpointing recomputes a forward during the backward pass, usually after the `use_backend` block has
ended and, on CUDA, on autograd's own thread. So the backend an op ran its forward with is remembered, and a
recompute (any op call made inside a backward pass) runs on that one: the same kernel, the same dropout mask.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("torch", "triton", "cuda", "auto")
OPS = ("lora_linear", "bottleneck_adapter", "prefix_attention", "multi_lora_delta")
ENV = "FASTADAPTERS_BACKEND"

_state = threading.local()
# op -> the backend its last forward (outside a backward pass) was asked to run on; read by recomputes
_forward_backend: dict[str, str] = {}


def _check(name: object, where: str = f"{ENV} or use_backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {BACKENDS} ({where})")
    return str(name)


def _check_op(op: str, where: str) -> str:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r} in {where}: per-op backends are for {', '.join(OPS)}")
    return op


def parse_spec(text: str) -> dict[str, str]:
    """'triton,lora_linear=torch' -> {'*': 'triton', 'lora_linear': 'torch'} (the FASTADAPTERS_BACKEND syntax)."""
    spec: dict[str, str] = {}
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        if "=" in part:
            op, _, name = (s.strip() for s in part.partition("="))
            spec[_check_op(op, ENV)] = _check(name)
        else:
            spec["*"] = _check(part)
    return spec


def _env_spec() -> dict[str, str]:
    return parse_spec(os.environ.get(ENV, ""))


def _stack() -> list[dict[str, str]]:
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    return stack


def get_backend(op: str | None = None) -> str:
    """The backend asked for `op`: the innermost `use_backend` that names it (or a default), else the
    FASTADAPTERS_BACKEND setting, else "auto". Without `op`: the default, or inside an op's dispatch, that op's."""
    if op is None and getattr(_state, "dispatching", None) is not None:
        return _state.dispatching[1]
    keys = ("*",) if op is None else (_check_op(op, "get_backend"), "*")
    for spec in (*reversed(_stack()), _env_spec()):
        for key in keys:
            if key in spec:
                return spec[key]
    return "auto"


def in_backward() -> bool:
    """Whether this thread is running a backward pass (a gradient-checkpointing recompute happens inside one).
    False while torch.compile traces (dynamo cannot trace the engine query; a compiled region's recompute is
    its own graph, dispatched when it was traced)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def backend_for(op: str) -> str:
    """The backend `op` runs on now: inside a backward pass (a checkpoint recompute) the one its last forward ran
    on; else `get_backend(op)`, which is remembered for that recompute."""
    if in_backward() and op in _forward_backend:
        return _forward_backend[op]
    name = get_backend(op)
    if not in_backward():
        _forward_backend[op] = name
    return name


@contextlib.contextmanager
def dispatching(op: str, backend: str) -> Iterator[None]:
    """Inside the block, `get_backend()` without an op answers `backend`: the one `op` is being dispatched to
    (what kernels' `supports` checks read, also in a checkpoint recompute)."""
    old = getattr(_state, "dispatching", None)
    _state.dispatching = (op, backend)
    try:
        yield
    finally:
        _state.dispatching = old


@contextlib.contextmanager
def use_backend(name: str | None = None, /, **per_op: str) -> Iterator[None]:
    """Run the ops inside this block on backend `name` ("torch", "triton", "cuda", "auto"), and/or per op:
    `use_backend(lora_linear="torch")`, `use_backend("triton", prefix_attention="torch")`. Thread-local; nests."""
    spec = {} if name is None else {"*": _check(name)}
    for op, backend in per_op.items():
        spec[_check_op(op, "use_backend")] = _check(backend)
    if not spec:
        raise ValueError("use_backend needs a backend name and/or op=backend pairs, e.g. use_backend('torch')")
    stack = _stack()
    stack.append(spec)
    try:
        yield
    finally:
        stack.pop()
