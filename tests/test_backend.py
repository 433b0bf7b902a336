"""Backend selection (use_backend, FASTADAPTERS_BACKEND), the per-op kernel registry, and the test fixtures."""

from __future__ import annotations

import math
import threading

import pytest
import torch

import fastadapters as fa
from fastadapters.kernels.bottleneck_ref import bottleneck_ref
from fastadapters.kernels.lora_ref import lora_ref
from fastadapters.kernels.prefix_attention_ref import prefix_attention_ref
from fastadapters.ops import _registry
from fastadapters.ops._registry import KernelUnavailableError


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("FASTADAPTERS_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _empty_registry():
    """Dispatch is tested on a registry without the real kernels; they are put back afterwards."""
    saved = {op: dict(kernels) for op, kernels in _registry._KERNELS.items()}
    for kernels in _registry._KERNELS.values():
        kernels.clear()
    try:
        yield
    finally:
        for op, kernels in saved.items():
            _registry._KERNELS[op].clear()
            _registry._KERNELS[op].update(kernels)


def lora_args(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 5, 12), (6, 12), (6,), (3, 12), (6, 3)]
    ts = [torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    return (*ts, 2.0)


def bottleneck_args(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    h, down, up = (torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in [(2, 5, 12), (4, 12), (12, 4)])
    return h, down, up, "gelu", 0.5


def prefix_args(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    shapes = [(2, 4, 5, 8), (2, 2, 5, 8), (2, 2, 5, 8), (2, 3, 8), (2, 3, 8)]
    return tuple(torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in shapes)


OPS = {
    "lora_linear": (fa.ops.lora_linear, lora_args),
    "bottleneck_adapter": (fa.ops.bottleneck_adapter, bottleneck_args),
    "prefix_attention": (fa.ops.prefix_attention, prefix_args),
}


# ---------------------------------------------------------------- backend selection


def test_default_backend_is_auto():
    assert fa.get_backend() == "auto"


@pytest.mark.parametrize("value,expected", [("torch", "torch"), (" Triton ", "triton"), ("CUDA", "cuda"), ("", "auto")],
                         ids=["torch", "spaces-case", "upper", "empty"])
def test_env_var_selects_backend(monkeypatch, value, expected):
    monkeypatch.setenv("FASTADAPTERS_BACKEND", value)
    assert fa.get_backend() == expected


def test_env_var_unknown_backend(monkeypatch):
    monkeypatch.setenv("FASTADAPTERS_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"unknown backend 'tpu': choose one of \('torch', 'triton', 'cuda', 'auto'\)"):
        fa.get_backend()
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        fa.ops.lora_linear(*lora_args())


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.setenv("FASTADAPTERS_BACKEND", "cuda")
    assert fa.get_backend() == "cuda"
    with fa.use_backend("torch"):
        assert fa.get_backend() == "torch"  # the context wins over the env var
        with fa.use_backend("triton"):
            assert fa.get_backend() == "triton"
            with fa.use_backend("auto"):
                assert fa.get_backend() == "auto"
            assert fa.get_backend() == "triton"
        assert fa.get_backend() == "torch"
    assert fa.get_backend() == "cuda"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"), fa.use_backend("torch"):
        raise RuntimeError("boom")
    assert fa.get_backend() == "auto"


def test_use_backend_unknown_name():
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'"), fa.use_backend("gpu"):
        pass
    assert fa.get_backend() == "auto"


def test_use_backend_is_per_thread():
    seen = []
    with fa.use_backend("torch"):
        t = threading.Thread(target=lambda: seen.append(fa.get_backend()))
        t.start()
        t.join()
    assert seen == ["auto"]


# ---------------------------------------------------------------- dispatch without kernels


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", list(OPS))
def test_explicit_backend_without_kernel_raises(op, backend):
    fn, make = OPS[op]
    with fa.use_backend(backend), pytest.raises(
        KernelUnavailableError, match=rf"backend '{backend}' has no {op} kernel.*; use 'auto' to fall back to 'torch'"
    ):
        fn(*make())


def test_env_var_backend_without_kernel_raises(monkeypatch):
    monkeypatch.setenv("FASTADAPTERS_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match="backend 'triton' has no prefix_attention kernel"):
        fa.ops.prefix_attention(*prefix_args())


@pytest.mark.parametrize("op", list(OPS))
def test_checks_run_before_dispatch(op):
    fn, make = OPS[op]
    args = list(make())
    args[0] = args[0][..., :-1]  # wrong last dim: a ValueError about the input, whatever the backend
    with fa.use_backend("triton"), pytest.raises(ValueError, match="has shape"):
        fn(*args)


@pytest.mark.parametrize("op", list(OPS))
def test_torch_and_auto_run_the_reference(op, nan_poison):
    fn, make = OPS[op]
    refs = {"lora_linear": lora_ref, "bottleneck_adapter": bottleneck_ref, "prefix_attention": prefix_attention_ref}
    expected = refs[op](*make())
    for backend in ("torch", "auto"):
        with fa.use_backend(backend):
            assert torch.equal(fn(*make()), expected)
    assert fa.ops.registered_backends(op) == ["torch"]


# ---------------------------------------------------------------- the registry


@pytest.fixture
def fake_kernels():
    """Register recording fake kernels for lora_linear; `refuse[backend]` makes that kernel's supports refuse."""
    calls, refuse = [], {}

    def make(backend):
        def kernel(*args):
            calls.append((backend, args))
            return lora_ref(*args) + 1.0  # distinguishable from the reference

        def supports(*args):
            return refuse.get(backend)

        return kernel, supports

    try:
        for backend in ("triton", "cuda"):
            kernel, supports = make(backend)
            _registry.register_kernel("lora_linear", backend, kernel, supports=supports)
        yield calls, refuse
    finally:
        for backend in ("triton", "cuda"):
            _registry.unregister_kernel("lora_linear", backend)


def test_registered_kernel_runs_with_the_reference_signature(fake_kernels):
    calls, _ = fake_kernels
    args = lora_args()
    with fa.use_backend("triton"):
        y = fa.ops.lora_linear(*args, dropout_p=0.2, seed=3)
    backend, got = calls[-1]
    assert backend == "triton" and len(got) == 7
    assert all(a is b for a, b in zip(got[:5], args[:5], strict=True)) and got[5] == 2.0
    assert torch.equal(got[6], fa.ops.dropout_mask(args[0].shape, 0.2, seed=3))
    assert torch.equal(y, lora_ref(*got) + 1.0)
    assert fa.ops.registered_backends("lora_linear") == ["torch", "triton", "cuda"]


def test_auto_prefers_cuda_then_triton_then_reference(fake_kernels):
    calls, refuse = fake_kernels
    args = lora_args()
    assert _registry.resolve("lora_linear", *args, None)[0] == "cuda"
    refuse["cuda"] = "not built"
    assert _registry.resolve("lora_linear", *args, None)[0] == "triton"
    refuse["triton"] = "x is on cpu"
    assert _registry.resolve("lora_linear", *args, None)[0] == "torch"
    assert torch.equal(fa.ops.lora_linear(*args), lora_ref(*args))
    assert calls == []
    with fa.use_backend("torch"):
        del refuse["cuda"]
        assert torch.equal(fa.ops.lora_linear(*args), lora_ref(*args))  # torch never runs a kernel
    assert calls == []


def test_explicit_backend_whose_kernel_refuses_raises(fake_kernels):
    _, refuse = fake_kernels
    refuse["triton"] = "x is on cpu"
    with fa.use_backend("triton"), pytest.raises(
        KernelUnavailableError,
        match=r"backend 'triton' cannot run lora_linear on these inputs: x is on cpu; use 'auto'",
    ):
        fa.ops.lora_linear(*lora_args())


def test_register_kernel_as_decorator_and_bad_registrations():
    try:
        @fa.ops.register_kernel("bottleneck_adapter", "cuda")
        def fake(*args):
            return bottleneck_ref(*args) * 0

        with fa.use_backend("cuda"):
            assert torch.all(fa.ops.bottleneck_adapter(*bottleneck_args()) == 0)
    finally:
        _registry.unregister_kernel("bottleneck_adapter", "cuda")
    with pytest.raises(ValueError, match=r"kernels register for one of \('triton', 'cuda'\), not 'torch'"):
        fa.ops.register_kernel("lora_linear", "torch", lora_ref)
    with pytest.raises(ValueError, match=r"unknown op 'lora': fastadapters\.ops has"):
        fa.ops.register_kernel("lora", "triton", lora_ref)


def test_cuda_backend_means_gpu_kernels_cpp_first_then_triton(fake_kernels):
    """'cuda' runs the op's C++/CUDA kernel where it has one, else its Triton kernel (only multi-LoRA has a C++
    kernel: 'cuda' must not break LoRA, bottleneck and prefix models)."""
    calls, refuse = fake_kernels
    with fa.use_backend("cuda"):
        fa.ops.lora_linear(*lora_args())
        assert calls[-1][0] == "cuda"
        refuse["cuda"] = "extension not built"
        fa.ops.lora_linear(*lora_args())
        assert calls[-1][0] == "triton"
        refuse["triton"] = "x is on cpu"
        with pytest.raises(KernelUnavailableError, match=r"backend 'cuda' cannot run lora_linear on these inputs: "
                                                         r"extension not built; backend 'triton' cannot run"):
            fa.ops.lora_linear(*lora_args())
    _registry.unregister_kernel("lora_linear", "cuda")
    del refuse["triton"]
    with fa.use_backend("cuda"):
        fa.ops.lora_linear(*lora_args())
    assert calls[-1][0] == "triton"


def test_per_op_backends_in_use_backend_and_env(monkeypatch, fake_kernels):
    calls, _ = fake_kernels
    with fa.use_backend("triton", lora_linear="torch"):
        assert fa.get_backend() == "triton" and fa.get_backend("lora_linear") == "torch"
        assert fa.get_backend("prefix_attention") == "triton"
        assert torch.equal(fa.ops.lora_linear(*lora_args()), lora_ref(*lora_args()))
        with fa.use_backend(lora_linear="cuda"):
            fa.ops.lora_linear(*lora_args())
            assert calls[-1][0] == "cuda" and fa.get_backend("bottleneck_adapter") == "triton"
        with fa.use_backend("auto"):  # the innermost block that names the op, or sets a default, wins
            assert fa.get_backend("lora_linear") == "auto"
    monkeypatch.setenv("FASTADAPTERS_BACKEND", "triton, lora_linear=torch")
    assert fa.get_backend() == "triton" and fa.get_backend("lora_linear") == "torch"
    assert torch.equal(fa.ops.lora_linear(*lora_args()), lora_ref(*lora_args()))
    monkeypatch.setenv("FASTADAPTERS_BACKEND", "lora=torch")
    with pytest.raises(ValueError, match="unknown op 'lora' in FASTADAPTERS_BACKEND"):
        fa.get_backend()
    with pytest.raises(ValueError, match="unknown op 'lora_lin' in use_backend"), fa.use_backend(lora_lin="torch"):
        pass
    with pytest.raises(ValueError, match="unknown backend 'gpu'"), fa.use_backend(lora_linear="gpu"):
        pass


class FakeCompileError(Exception):
    """Stands for triton's CompilationError / OutOfResources (any exception raised from a triton module)."""


FakeCompileError.__module__ = "triton.runtime.errors"


def test_auto_falls_back_once_when_a_kernel_fails_to_compile(fake_kernels, recwarn):
    calls, refuse = fake_kernels
    refuse["cuda"] = "not built"
    tried = []

    def broken(*args):
        tried.append(1)
        raise FakeCompileError("out of resources: shared memory, Required: 180224, Hardware limit: 101376")

    _registry.register_kernel("lora_linear", "triton", broken)
    args = lora_args()
    with pytest.warns(RuntimeWarning, match=r"the triton kernel of lora_linear failed to compile or launch on cpu "
                                            r"\(FakeCompileError: out of resources.*"
                                            r"FASTADAPTERS_BACKEND=lora_linear=torch"):
        y = fa.ops.lora_linear(*args)
    assert torch.equal(y, lora_ref(*args)) and len(tried) == 1
    y = fa.ops.lora_linear(*args)  # dropped for this device: no second try, no second warning
    assert torch.equal(y, lora_ref(*args)) and len(tried) == 1
    assert [w for w in recwarn if issubclass(w.category, RuntimeWarning)] == []
    assert ("lora_linear", "triton", "cpu") in _registry.failed_kernels()
    _registry._FAILED.clear()
    with fa.use_backend("triton"), pytest.raises(FakeCompileError):  # asked for explicitly: the error surfaces
        fa.ops.lora_linear(*args)


def test_auto_does_not_hide_bad_arguments_or_bugs(fake_kernels):
    _, refuse = fake_kernels
    refuse["cuda"] = "not built"

    def buggy(*args):
        raise IndexError("a bug in a kernel launcher")

    _registry.register_kernel("lora_linear", "triton", buggy)
    with pytest.raises(IndexError, match="a bug"):
        fa.ops.lora_linear(*lora_args())


# ---------------------------------------------------------------- gradient checkpointing x backend


def test_checkpoint_recompute_runs_on_the_forward_backend():
    """Forward under use_backend("triton"), backward after the block (on CUDA: on autograd's thread): the recompute
    must run the kernel that ran the forward, in both checkpointing modes. The fake kernel refuses under "auto"
    (as the real ones do on CPU), so a recompute that read the backend at call time would run the reference."""
    calls = []

    def kernel(*args):
        calls.append("triton")
        return lora_ref(*args)

    _registry.register_kernel("lora_linear", "triton", kernel,
                              supports=lambda *a: "CPU under auto" if fa.get_backend() == "auto" else None)
    x, w, b, A, B, s = lora_args()
    A.requires_grad_(True)

    def f(x):
        return fa.ops.lora_linear(x, w, b, A, B, s)

    for reentrant in (True, False):
        calls.clear()
        xin = x.clone().requires_grad_(True)
        with fa.use_backend("triton"):
            y = torch.utils.checkpoint.checkpoint(f, xin, use_reentrant=reentrant)
        assert fa.get_backend("lora_linear") == "auto" and calls == ["triton"]
        y.sum().backward()
        assert calls == ["triton", "triton"], (reentrant, calls)


# ---------------------------------------------------------------- conftest's NaN poison


def test_nan_poison_fills_new_allocations(nan_poison):
    assert torch.empty(3, 4).isnan().all()
    assert torch.empty_like(torch.zeros(5, dtype=torch.bfloat16)).isnan().all()
    assert torch.zeros(2).new_empty(7).isnan().all()
    assert torch.all(torch.empty(4, dtype=torch.int32) == torch.iinfo(torch.int32).max)
    leaf = torch.empty(3, requires_grad=True)
    assert leaf.requires_grad and leaf.isnan().all()


def test_nan_poison_is_undone_after_the_block():
    from conftest import nan_poisoned

    real = torch.empty
    with nan_poisoned():
        assert torch.empty is not real
        assert math.isnan(torch.empty(1).item())
    assert torch.empty is real and "new_empty" not in vars(torch.Tensor)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", list(OPS))
def test_reference_on_cuda_matches_cpu(op, dtype):
    fn, make = OPS[op]
    out_gpu = fn(*make("cuda", dtype))
    out_cpu = fn(*make("cpu", dtype))
    assert out_gpu.device.type == "cuda" and out_gpu.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_seeded_dropout_on_cuda():
    args = lora_args("cuda")
    y1 = fa.ops.lora_linear(*args, dropout_p=0.3, seed=7)
    y2 = fa.ops.lora_linear(*args, dropout_p=0.3, seed=7)
    assert torch.equal(y1, y2)
    mask = fa.ops.dropout_mask(args[0].shape, 0.3, device="cuda", seed=7)
    assert mask.is_cuda and torch.equal(y1, lora_ref(*args, mask))
