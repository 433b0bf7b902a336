"""The fused kernels at model level (tiny models; on CPU the Triton interpreter): kernel vs reference with several
active adapters on a half-precision model, gradient checkpointing x backend, and the convergence test of STYLE.md
(the same loss curve trained on the fused path and on the reference path)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import in this process

import pytest
from tiny_models import tiny_batch, tiny_model

import fastadapters as fa

pytest.importorskip("triton")

KERNEL = "triton"
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")  # the interpreter's own code


def lora(**kw) -> fa.LoraConfig:
    return fa.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw)


def two_adapter_model(dtype: torch.dtype) -> fa.AdapterModel:
    am = fa.get_adapter_model(tiny_model("llama", dtype=dtype), lora(), adapter_name="a")
    am.add_adapter("b", fa.LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    am.set_adapter(["a", "b"])
    return am


def run(am: fa.AdapterModel, backend: str, ids: torch.Tensor, mask: torch.Tensor):
    am.zero_grad(set_to_none=True)
    with fa.use_backend(backend):
        out = am(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in am.named_parameters() if p.requires_grad}
    return out.logits.detach().double(), grads


def test_two_active_adapters_on_a_bf16_model_kernel_vs_reference():
    """Both adapters reach the kernel cast to bf16 (the second crashed with 'expected m1 and m2 to have the same
    dtype'); logits and every adapter gradient within the three-way tolerance of the fp32 model."""
    ids, mask = tiny_batch(length=7)
    am = two_adapter_model(torch.bfloat16)
    assert am.base_model.model.layers[0].self_attn.q_proj.lora_A["b"].weight.dtype == torch.float32
    y_k, g_k = run(am, KERNEL, ids, mask)
    y_lo, g_lo = run(am, "torch", ids, mask)  # the reference on the same bf16 model
    hi = two_adapter_model(torch.float32)
    hi.load_state_dict({k: v.float() for k, v in am.state_dict().items()})
    y_hi, g_hi = run(hi, "torch", ids, mask)
    assert torch.isfinite(y_k).all()
    bound = 2 * (y_lo - y_hi).abs() + 0.05
    assert ((y_k - y_hi).abs() <= bound).all(), (y_k - y_hi).abs().max()
    assert set(g_k) == set(g_hi) and any(".b." in n or '"b"' in n or "lora_A.b" in n for n in g_k)
    for n in g_hi:
        scale = g_hi[n].abs().max() + 1e-6
        err_k, err_lo = (g_k[n] - g_hi[n]).abs().max() / scale, (g_lo[n] - g_hi[n]).abs().max() / scale
        assert err_k <= 2 * err_lo + 0.05, (n, float(err_k), float(err_lo))


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointing_recomputes_on_the_forward_backend(use_reentrant):
    """Forward under use_backend("triton"), backward after the block, dropout 0.5: the recompute must draw the
    kernel's Philox mask again (before: reentrant gave wrong gradients, non-reentrant raised CheckpointError)."""
    ids, mask = tiny_batch(length=6)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        am = fa.get_adapter_model(tiny_model("llama"), lora(lora_dropout=0.5))
        if checkpointing:
            am.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        am.train()
        torch.manual_seed(7)
        with fa.use_backend(KERNEL):
            loss = am(input_ids=ids, attention_mask=mask, labels=ids).loss
            if not checkpointing:
                loss.backward()
        if checkpointing:
            loss.backward()  # outside the block, as a Trainer's backward would be
        return {n: p.grad for n, p in am.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert set(plain) == set(ckpt) and len(plain) == 8
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-5, rtol=1e-4, msg=n)


def train_curve(config: fa.AdapterConfig, backend: str, steps: int = 5) -> list[float]:
    am = fa.get_adapter_model(tiny_model("llama", seed=3), config)
    am.train()
    opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=2e-2)
    ids, mask = tiny_batch(batch=2, length=8, seed=5)
    losses = []
    for _ in range(steps):
        with fa.use_backend(backend):
            loss = am(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("config", [
    pytest.param(lambda: lora(lora_dropout=0.0), id="lora"),
    pytest.param(lambda: fa.BottleneckConfig(bottleneck_size=16, non_linearity="tanh", init_weights="bert"),
                 id="bottleneck"),
])
def test_convergence_fused_equals_reference(config):
    """A few AdamW steps of a tiny model: the loss curve on the fused kernels equals the reference's."""
    fused, ref = train_curve(config(), KERNEL), train_curve(config(), "torch")
    assert ref[-1] < ref[0] - 0.05, f"the reference did not learn: {ref}"
    for step, (a, b) in enumerate(zip(fused, ref, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b) + 1e-5, f"step {step}: fused {fused} vs reference {ref}"
