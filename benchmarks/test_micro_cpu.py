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
