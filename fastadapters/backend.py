"""Backend selection: which implementation the ops in fastadapters.ops run ("torch" | "triton" | "cuda" | "auto")."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

BACKENDS = ("torch", "triton", "cuda", "auto")
_state = threading.local()


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {BACKENDS} (FASTADAPTERS_BACKEND or use_backend)")
    return name


def get_backend() -> str:
    """The backend asked for: innermost `use_backend`, else env FASTADAPTERS_BACKEND, else "auto"."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return _check(os.environ.get("FASTADAPTERS_BACKEND", "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside this block on `name`: "torch" (reference), "triton", "cuda" or "auto"."""
    _check(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()
