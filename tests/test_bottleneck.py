"""Bottleneck adapters (AdapterH series, AdapterP, parallel) injected into tiny models of every family."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tiny_models import FAMILIES, tiny_batch, tiny_model

import fastadapters as fa
from fastadapters.config import ACTIVATIONS
from fastadapters.targets import ADAPTERP_TARGETS, PARALLEL_TARGETS, SERIES_PLACEMENT, SERIES_TARGETS
from fastadapters.tuners import METHODS
from fastadapters.tuners.bottleneck import BottleneckLayer, BottleneckMethod

PLACEMENTS = {  # id -> (config kwargs, default-target table)
    "series": ({}, SERIES_TARGETS),
    "adapterp": ({"use_adapterp": True}, ADAPTERP_TARGETS),
    "parallel": ({"use_parallel_adapter": True}, PARALLEL_TARGETS),
}


def cfg(placement: str = "series", **kw) -> fa.BottleneckConfig:
    base = dict(bottleneck_size=8, **PLACEMENTS[placement][0])
    base.update(kw)
    return fa.BottleneckConfig(**base)


def wrapped(model: nn.Module) -> dict[str, BottleneckLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# Hand-written activations (independent of the op and of kernels/bottleneck_ref.py).
MANUAL_ACT = {
    "tanh": lambda z: (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z)),
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "sigmoid": lambda z: 1 / (1 + torch.exp(-z)),
}


def manual_layer(layer: BottleneckLayer, name: str, x: torch.Tensor, placement: str, act: str,
                 scaling: float) -> torch.Tensor:
    """The placement's formula in float64 with plain matmuls: W (x + f(x)) + c, z + f(z), W x + c + f(x)."""
    base = layer.base_layer
    w = (base.weight.t() if type(base).__name__ == "Conv1D" else base.weight).double()  # (N, K)
    c = 0.0 if base.bias is None else base.bias.double()
    d = layer.adapter_down[name].weight.double()
    u = layer.adapter_up[name].weight.double()

    def f(z):
        return scaling * (MANUAL_ACT[act](z @ d.T) @ u.T)

    x = x.double()
    if placement == "before":
        return (x + f(x)) @ w.T + c
    if placement == "after":
        z = x @ w.T + c
        return z + f(z)
    return x @ w.T + c + f(x)


# -- injection on every family and placement


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_inject_defaults_zero_init_is_identity_bert_init_is_not(family, placement):
    ids, mask = tiny_batch()
    model = tiny_model(family)
    ref = logits(model, ids, mask)
    am = fa.get_adapter_model(model, cfg(placement))
    layers = wrapped(am.base_model)
    table = PLACEMENTS[placement][1][family]
    n_layers = 2
    assert len(layers) == len(table) * n_layers
    for path, layer in layers.items():
        assert any(path.endswith("." + t) for t in table), path
        expect = {"series": SERIES_PLACEMENT.get(path.rsplit(".", 1)[-1]), "adapterp": "after",
                  "parallel": "parallel"}[placement]
        assert layer.placement == {"default": expect}
    torch.testing.assert_close(logits(am, ids, mask), ref, rtol=0, atol=0)

    bert = fa.get_adapter_model(tiny_model(family), cfg(placement, init_weights="bert"))
    assert (logits(bert, ids, mask) - ref).abs().max() > 1e-5


@pytest.mark.parametrize("init", ["zero", "bert"])
def test_init_statistics(init):
    am = fa.get_adapter_model(tiny_model("llama"), cfg(bottleneck_size=64, init_weights=init))
    layer = am.base_model.model.layers[0].mlp.gate_proj
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    assert down.bias is None and up.bias is None  # as LLM-Adapters: bias-free adapter linears
    if init == "zero":
        assert torch.count_nonzero(up.weight) == 0
        bound = 1 / math.sqrt(down.in_features)  # kaiming_uniform(a=sqrt(5)) = nn.Linear's default
        assert down.weight.abs().max() <= bound and down.weight.std() > bound / 3
    else:
        for w in (down.weight, up.weight):
            assert abs(w.std().item() - 0.02) < 0.004 and abs(w.mean().item()) < 0.004


# -- formulas against a hand computation on one wrapped module

FORMULA_CASES = [  # (family, module path, config kwargs, expected placement)
    ("llama", "model.layers.0.mlp.gate_proj", {}, "before"),
    ("llama", "model.layers.1.mlp.down_proj", {}, "after"),
    ("llama", "model.layers.0.mlp.up_proj", {"use_adapterp": True, "target_modules": ["up_proj"]}, "after"),
    ("llama", "model.layers.0.self_attn.k_proj", {"use_parallel_adapter": True}, "parallel"),  # 64 -> 32
    ("gpt2", "transformer.h.0.mlp.c_fc", {}, "before"),  # Conv1D 64 -> 256
    ("gpt2", "transformer.h.1.mlp.c_proj", {}, "after"),  # Conv1D 256 -> 64
    ("gpt2", "transformer.h.0.attn.c_attn", {"use_parallel_adapter": True}, "parallel"),  # Conv1D 64 -> 192
]


@pytest.mark.parametrize("scaling", [0.7, 2, "learned"], ids=["s0.7", "s2int", "learned"])
@pytest.mark.parametrize("family, path, kw, placement", FORMULA_CASES,
                         ids=[f"{c[0]}-{c[1].rsplit('.', 1)[-1]}-{c[3]}" for c in FORMULA_CASES])
def test_placement_formula(family, path, kw, placement, scaling):
    am = fa.get_adapter_model(tiny_model(family), cfg(scaling=scaling, non_linearity="gelu", **kw))
    layer = am.base_model.get_submodule(path)
    assert isinstance(layer, BottleneckLayer) and layer.placement["default"] == placement
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # weights large enough that a wrong placement or a dropped scale shows
        for p in (layer.adapter_down["default"].weight, layer.adapter_up["default"].weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        s = 1.3 if scaling == "learned" else float(scaling)
        if scaling == "learned":
            layer.adapter_scaling["default"].fill_(s)
    x = torch.randn(2, 5, layer.in_features, generator=g)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (2, 5, layer.out_features) and out.dtype == torch.float32
    want = manual_layer(layer, "default", x, placement, "gelu", s)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    with fa.use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation(act):
    am = fa.get_adapter_model(tiny_model("llama"), cfg(non_linearity=act, init_weights="bert", scaling=1.5))
    for path, placement in [("model.layers.0.mlp.up_proj", "before"), ("model.layers.0.mlp.down_proj", "after")]:
        layer = am.base_model.get_submodule(path)
        with torch.no_grad():
            layer.adapter_down["default"].weight.mul_(40)  # pre-activations over a wide range
        x = torch.randn(3, 4, layer.in_features, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            out = layer(x)
        torch.testing.assert_close(out.double(), manual_layer(layer, "default", x, placement, act, 1.5),
                                   rtol=1e-5, atol=1e-5)


def test_backend_torch_explicit_matches_default():
    ids, mask = tiny_batch()
    am = fa.get_adapter_model(tiny_model("qwen2"), cfg("parallel", init_weights="bert"))
    auto = logits(am, ids, mask)
    with fa.use_backend("torch"):
        torch.testing.assert_close(logits(am, ids, mask), auto, rtol=0, atol=0)


# -- training


def test_learned_scaling_gets_gradient_and_only_adapters_train():
    ids, mask = tiny_batch()
    am = fa.get_adapter_model(tiny_model("opt"), cfg(scaling="learned", init_weights="bert"))
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_" in n for n in trainable)
    assert {id(p) for p in am.adapter_parameters()} == {id(p) for p in am.parameters() if p.requires_grad}
    scales = [m.adapter_scaling["default"] for m in wrapped(am.base_model).values()]
    assert len(scales) == 4 and all(s.shape == (1,) and s.item() == 1.0 for s in scales)  # LLM-Adapters: ones(1)
    am.train()
    out = am(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert all(s.grad is not None and s.grad.abs().item() > 0 for s in scales)
    for n, p in am.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_gradient_checkpointing_same_grads(family):
    ids, mask = tiny_batch()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        am = fa.get_adapter_model(tiny_model(family), cfg(init_weights="bert", scaling="learned"))
        if checkpointing:
            enable = getattr(am, "activation_checkpointing_enable", None) or am.gradient_checkpointing_enable
            enable()
            on = getattr(am.base_model, "is_activation_checkpointing", None)  # transformers >= 5.24's name
            assert on if on is not None else am.base_model.is_gradient_checkpointing
        am.train()
        am(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad for n, p in am.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        assert ckpt[n] is not None, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


def test_dropout_only_in_training():
    ids, mask = tiny_batch()
    am = fa.get_adapter_model(tiny_model("llama"), cfg(adapter_dropout=0.3, init_weights="bert"))
    no_drop = fa.get_adapter_model(tiny_model("llama"), cfg(init_weights="bert"))
    no_drop.load_state_dict(am.state_dict())
    torch.testing.assert_close(logits(am, ids, mask), logits(no_drop, ids, mask), rtol=0, atol=0)
    am.train()
    torch.manual_seed(0)
    a = logits(am, ids, mask)
    torch.manual_seed(1)
    assert not torch.equal(a, logits(am, ids, mask))


def test_half_precision_base_keeps_fp32_adapters():
    ids, mask = tiny_batch()
    am = fa.get_adapter_model(tiny_model("llama", dtype=torch.bfloat16), cfg("parallel", init_weights="bert"))
    layer = am.base_model.model.layers[0].self_attn.q_proj
    assert layer.adapter_down["default"].weight.dtype == torch.float32
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert layer(x).dtype == torch.bfloat16
    assert torch.isfinite(logits(am, ids, mask).float()).all()


# -- checkpoints


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(tmp_path, family):
    ids, mask = tiny_batch()
    am = fa.get_adapter_model(tiny_model(family), cfg(init_weights="bert", scaling="learned"))
    with torch.no_grad():
        for m in wrapped(am.base_model).values():
            m.adapter_scaling["default"].fill_(0.8)
    want = logits(am, ids, mask)
    am.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    own = set(am.adapter_state_dict())
    assert keys == own and all(k.startswith("base_model.model.") and "default" not in k for k in keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in keys} == {
        "adapter_down", "adapter_up", "adapter_scaling"}

    back = fa.AdapterModel.from_pretrained(tiny_model(family), tmp_path)
    torch.testing.assert_close(logits(back, ids, mask), want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in back.parameters())  # inference unless is_trainable


def test_llm_adapters_checkpoint_keys_load(tmp_path):
    """LLM-Adapters saves adapter_model.bin with keys <path>.adapter_down.weight / .adapter_up.weight."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(7)
    state = {}
    for i in range(2):
        for proj, d in (("gate_proj", 64), ("up_proj", 64), ("down_proj", 64)):
            key = f"base_model.model.model.layers.{i}.mlp.{proj}"
            state[f"{key}.adapter_down.weight"] = torch.randn(16, d, generator=g) * 0.1
            state[f"{key}.adapter_up.weight"] = torch.randn(d, 16, generator=g) * 0.1
    torch.save(state, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "BOTTLENECK", "bottleneck_size": 16, "non_linearity": "tanh", "adapter_dropout": 0.0,
        "use_parallel_adapter": False, "use_adapterp": False, "scaling": 1.0, "bias": "none",
        "init_weights": "bert", "modules_to_save": None, "task_type": "CAUSAL_LM",
        "target_modules": ["gate_proj", "up_proj", "down_proj"], "base_model_name_or_path": "x",
        "inference_mode": True}))
    am = fa.AdapterModel.from_pretrained(model, tmp_path)
    layer = am.base_model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(layer.adapter_up["default"].weight,
                               state["base_model.model.model.layers.1.mlp.down_proj.adapter_up.weight"])


def test_load_wrong_bottleneck_size_names_tensor(tmp_path):
    am = fa.get_adapter_model(tiny_model("gptj"), cfg())
    am.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    d["bottleneck_size"] = 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"adapter_down\.weight has shape \(8, 64\)"):
        fa.AdapterModel.from_pretrained(tiny_model("gptj"), tmp_path)


# -- named adapters


def test_named_adapters_set_disable_delete_unload(tmp_path):
    ids, mask = tiny_batch()
    model = tiny_model("llama")
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ref = logits(model, ids, mask)
    am = fa.get_adapter_model(model, cfg(init_weights="bert"), adapter_name="a")
    am.add_adapter("b", cfg("parallel", init_weights="bert", non_linearity="relu"))
    out_a = logits(am, ids, mask)
    am.set_adapter("b")
    out_b = logits(am, ids, mask)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, ref)

    # both active on one layer: series-before adapter feeds the base layer, the parallel one sees the input
    am.add_adapter("c", cfg(init_weights="bert", target_modules=["gate_proj"]))
    am.set_adapter(["c", "b"])
    q = am.base_model.model.layers[0].self_attn.q_proj
    gate = am.base_model.model.layers[0].mlp.gate_proj
    assert gate.active_adapters == ["c"] and q.active_adapters == ["b"]
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2))
    am.add_adapter("d", cfg("parallel", init_weights="bert", target_modules=["gate_proj"]))
    am.set_adapter(["c", "d"])
    with torch.no_grad():
        got = gate(x)
    d_c, u_c = gate.adapter_down["c"].weight.double(), gate.adapter_up["c"].weight.double()
    h = x.double() + torch.tanh(x.double() @ d_c.T) @ u_c.T
    d_d, u_d = gate.adapter_down["d"].weight.double(), gate.adapter_up["d"].weight.double()
    want = h @ gate.base_layer.weight.double().T + torch.tanh(x.double() @ d_d.T) @ u_d.T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    am.delete_adapter("c")
    am.delete_adapter("d")
    assert "c" not in gate.adapter_down and "c" not in gate.placement

    am.set_adapter("a")
    with am.disable_adapter():
        torch.testing.assert_close(logits(am, ids, mask), ref, rtol=0, atol=0)
    torch.testing.assert_close(logits(am, ids, mask), out_a, rtol=0, atol=0)

    am.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()
    am.delete_adapter("b")
    assert not [n for n, _ in am.named_parameters() if ".b." in n]
    am.load_adapter(tmp_path / "b", "b")
    am.set_adapter("b")
    torch.testing.assert_close(logits(am, ids, mask), out_b, rtol=0, atol=0)

    with pytest.raises(ValueError, match="nonlinear"):
        am.merge_and_unload()
    torch.testing.assert_close(logits(am, ids, mask), out_b, rtol=0, atol=0)  # untouched by the failed merge
    base = am.unload()
    assert not wrapped(base)
    for n, m in base.named_modules():
        if n in originals:
            assert m is originals[n]
    torch.testing.assert_close(logits(base, ids, mask), ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_runs(family):
    ids, mask = tiny_batch()
    am = fa.get_adapter_model(tiny_model(family), cfg(init_weights="bert"))
    out = am.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 4)
    with am.disable_adapter():
        base = am.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert base.shape == out.shape


# -- errors


def _no_wrappers(model: nn.Module) -> bool:
    return not wrapped(model)


@pytest.mark.parametrize(
    "family, kw, match",
    [
        ("llama", {"target_modules": ["q_proj"]}, r"series bottleneck adapters go before .* 'model\.layers\.0\.self_"
                                                 r"attn\.q_proj' is neither: use use_parallel_adapter=True"),
        ("gpt2", {"target_modules": ["c_attn"]}, "series bottleneck adapters go before"),
        ("llama", {"target_modules": ["mlp"], "use_parallel_adapter": True},
         "'model.layers.0.mlp' is a LlamaMLP; BOTTLENECK adapters wrap nn.Linear"),
        ("opt", {"target_modules": ["embed_tokens"], "use_adapterp": True}, "is a .*Embedding"),
        ("llama", {"target_modules": ["up_proj", "nope_proj"]}, r"target_modules \['nope_proj'\] matched no module"),
        ("llama", {"target_modules": r".*\.mlp\.nothing"}, "matched no module"),
    ],
    ids=["series_on_q_proj", "series_on_gpt2_c_attn", "non_linear_module", "embedding", "unmatched_name",
         "unmatched_regex"],
)
def test_bad_targets_raise_and_leave_model_untouched(family, kw, match):
    model = tiny_model(family)
    with pytest.raises(ValueError, match=match):
        fa.get_adapter_model(model, cfg(**kw))
    assert _no_wrappers(model)


def test_mixed_targets_fail_before_wrapping_anything():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="series bottleneck adapters"):
        fa.get_adapter_model(model, cfg(target_modules=["gate_proj", "o_proj"]))
    assert _no_wrappers(model)
    am = fa.get_adapter_model(model, cfg("parallel", target_modules=["q_proj"]), adapter_name="p")
    with pytest.raises(ValueError, match="series bottleneck adapters"):  # a module wrapped already is checked too
        am.add_adapter("s", cfg(target_modules=["q_proj"]))
    assert "s" not in am.peft_config and all(m.adapter_names == ["p"] for m in wrapped(am.base_model).values())


def test_unknown_activation_and_model_type():
    with pytest.raises(ValueError, match="unknown non_linearity='swish'"):
        fa.BottleneckConfig(non_linearity="swish")
    model = tiny_model("llama")
    model.config.model_type = "mamba"
    with pytest.raises(ValueError, match="no default target_modules for series bottleneck adapters on "
                                         "model_type='mamba'.*pass target_modules"):
        fa.get_adapter_model(model, cfg())


def test_merge_is_refused_clearly():
    am = fa.get_adapter_model(tiny_model("bloom"), cfg())
    with pytest.raises(ValueError, match=r"cannot be merged .* is nonlinear.*model\.unload\(\)"):
        am.merge_adapter()
    assert METHODS["BOTTLENECK"] is BottleneckMethod


def test_layer_forward_without_active_adapter_is_base_layer():
    am = fa.get_adapter_model(tiny_model("llama"), cfg(init_weights="bert"))
    layer = am.base_model.model.layers[0].mlp.down_proj
    x = torch.randn(4, 96)
    with am.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.base_layer.weight), rtol=0, atol=0)
