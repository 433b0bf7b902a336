"""CPU micro-benchmarks of the reference path (pytest-benchmark): a regression signal for machines without a GPU.

    pytest benchmarks/ --benchmark-only                       (not part of the default run: testpaths is tests/)
    pytest benchmarks/ --benchmark-only --benchmark-autosave  (then --benchmark-compare against the saved run)

Small shapes, float32, one intra-op thread (set OMP_NUM_THREADS to change), "torch" backend: the numbers track
the reference ops and one tiny-model training step, not any kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import fastadapters as fa

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (requirements/test.txt)")

MODES = ("fwd", "fwd+bwd")


@pytest.fixture(autouse=True)
def _one_thread_torch_backend():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with fa.use_backend("torch"):
        yield
    torch.set_num_threads(threads)


def _call(fwd: Callable[[], torch.Tensor], leaves: list[torch.Tensor], mode: str) -> Callable[[], None]:
    """fwd, or fwd + backward of a fixed random cotangent, resetting the leaves' grads each call."""
    dy = torch.randn_like(fwd())

    def call() -> None:
        for t in leaves:
            t.grad = None
        out = fwd()
        if mode == "fwd+bwd":
            out.backward(dy)

    return call


def _leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).requires_grad_()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [0.0, 0.05], ids=lambda p: f"p{p}")
def test_lora_linear(benchmark, mode, p):
    torch.manual_seed(0)
    M, K, N, r = 256, 512, 512, 16
    x, A, B = _leaf(M, K), _leaf(r, K, scale=K**-0.5), _leaf(N, r, scale=r**-0.5)
    W = torch.randn(N, K) * K**-0.5
    benchmark(_call(lambda: fa.ops.lora_linear(x, W, None, A, B, 2.0, dropout_p=p), [x, A, B], mode))


@pytest.mark.parametrize("mode", MODES)
def test_bottleneck_adapter(benchmark, mode):
    torch.manual_seed(0)
    M, d, b = 256, 512, 64
    h, down, up = _leaf(M, d), _leaf(b, d, scale=d**-0.5), _leaf(d, b, scale=b**-0.5)
    fwd = lambda: fa.ops.bottleneck_adapter(h, down, up, activation="tanh", scaling=1.0, residual=h)  # noqa: E731
    benchmark(_call(fwd, [h, down, up], mode))


@pytest.mark.parametrize("mode", MODES)
def test_prefix_attention(benchmark, mode):
    torch.manual_seed(0)
    B, H, L, D, P = 2, 4, 128, 32, 10
    q, k, v = _leaf(B, H, L, D), _leaf(B, H, L, D), _leaf(B, H, L, D)
    pk, pv = _leaf(H, P, D), _leaf(H, P, D)
    fwd = lambda: fa.ops.prefix_attention(q, k, v, pk, pv, causal=True)  # noqa: E731
    benchmark(_call(fwd, [q, k, v, pk, pv], mode))


@pytest.mark.parametrize("setup", ["lora_qv_r16", "series", "prefix_p10", "prompt_p20"])
def test_tiny_model_train_step(benchmark, setup):
    from benchmarks import bench_model, models

    base = models.llama("tiny", 2, torch.device("cpu"), torch.float32).requires_grad_(False)
    chosen = next(s for s in models.SETUPS if s.name == setup)
    model, backend = models.wrap(base, chosen, "reference", bottleneck=16)
    step, _ = bench_model.step_fn(model, models.random_ids(2, 32, base.config.vocab_size, torch.device("cpu")),
                                  backend)
    benchmark(step)


@pytest.mark.parametrize("method", ["trick", "trick_cold", "dense", "peft"])
def test_dora_norm(benchmark, method):
    """DoRA's row norm ||W + s B A|| at one 7B projection (4096 x 4096, r = 16), float32, once per training step:
    trick       ||W||^2 (cached per frozen W) + 2s B.(W A^T) + s^2 B (A A^T) B^T  (fastadapters)
    trick_cold  the same with ||W||^2 recomputed (the first step, or after W changes)
    dense       ||W + s B A|| with the (N, K) delta formed
    peft        PEFT 0.21's DoraLinearLayer: lora_B(lora_A(eye(K))).T, then W + s * that, then the norm."""
    from fastadapters.kernels.dora_ref import dora_norm_dense_ref, dora_norm_ref, dora_weight_sq_ref

    torch.manual_seed(0)
    N = K = 4096
    r, s = 16, 2.0
    W = torch.randn(N, K) * K**-0.5
    A, B = torch.randn(r, K) * K**-0.5, torch.randn(N, r) * r**-0.5
    if method == "peft":
        from peft.tuners.lora.dora import DoraLinearLayer

        dora = DoraLinearLayer(fan_in_fan_out=False)
        lin_A, lin_B = torch.nn.Linear(K, r, bias=False), torch.nn.Linear(r, N, bias=False)
        with torch.no_grad():
            lin_A.weight.copy_(A)
            lin_B.weight.copy_(B)

        def norm() -> torch.Tensor:
            return dora.get_weight_norm(W, dora.get_lora_weight(lin_A, lin_B).detach(), s)
    elif method == "dense":
        norm = lambda: dora_norm_dense_ref(W, A, B, s)  # noqa: E731
    elif method == "trick_cold":
        norm = lambda: dora_norm_ref(W, A, B, s)  # noqa: E731
    else:
        wsq = dora_weight_sq_ref(W)
        norm = lambda: dora_norm_ref(W, A, B, s, wsq)  # noqa: E731
    torch.testing.assert_close(norm(), dora_norm_dense_ref(W, A, B, s), rtol=1e-5, atol=0)

    def call() -> None:
        with torch.no_grad():
            norm()

    benchmark(call)
