"""Shared test setup: tests/ on sys.path, the `gpu` marker's auto-skip, and the NaN poison for new allocations."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from tiny_models import ...`

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. It must be switched on before triton
# is first imported (importing fastadapters imports it), so here, ahead of every test module. Backend "auto" never
# picks the interpreter; tests ask for backend "triton" explicitly.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # Triton-interpreter workarounds live with the tests, not in the library (tests/interpreter_fixes.py); they
    # patch only the interpreter, so installing them where kernels compile changes nothing
    from interpreter_fixes import fix_interpreter_bf16

    fix_interpreter_bf16()
except ImportError:  # no triton: the kernel tests skip
    pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip cleanly when CUDA is not available, so a plain `pytest` passes on CPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh tensor with NaN (floats) or a loud sentinel (ints), so an element nobody writes shows up."""
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(math.nan)
        elif t.dtype != torch.bool and t.numel():
            t.fill_(torch.iinfo(t.dtype).max)
    return t


@contextlib.contextmanager
def nan_poisoned() -> Iterator[None]:
    """Inside the block torch.empty, torch.empty_like and Tensor.new_empty return NaN-filled tensors."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    own_new_empty = "new_empty" in vars(torch.Tensor)  # else inherited from TensorBase: delete, not reassign

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return _poison(real_new_empty(self, *args, **kwargs))

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
        if own_new_empty:
            torch.Tensor.new_empty = real_new_empty
        else:
            del torch.Tensor.new_empty


@pytest.fixture
def nan_poison() -> Iterator[None]:
    """Poison new allocations for one test (fla's conftest); opt a whole module in with
    `pytestmark = pytest.mark.usefixtures("nan_poison")`."""
    with nan_poisoned():
        yield


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a test module: tiny models run fastest so, and a busy 2-core machine stalls
    multi-threaded BLAS. (`pytestmark = pytest.mark.usefixtures("one_thread")`)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
