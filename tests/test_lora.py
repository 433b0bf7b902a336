"""LoRA layers injected into tiny transformers models: identity at init, training, merge/unmerge, several adapters,
save/load, errors, atomic saves, gradient checkpointing, generate, bf16 merging."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tiny_models import FAMILIES, tiny_batch, tiny_model
from transformers.pytorch_utils import Conv1D

import fastadapters as fa
from fastadapters.targets import LORA_TARGETS
from fastadapters.tuners.lora import LoraLayer

pytestmark = pytest.mark.filterwarnings("ignore:the LoRA targets include transformers Conv1D")


def cfg(**kw) -> fa.LoraConfig:
    kw = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **kw}
    return fa.LoraConfig(**kw)


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def target_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the base weights of every LoRA-wrapped module."""
    return {n: m.base_layer.weight.detach().clone() for n, m in lora_layers(model)}


def sgd_steps(am: fa.AdapterModel, ids: torch.Tensor, mask: torch.Tensor, steps: int = 3, lr: float = 0.5) -> None:
    opt = torch.optim.SGD([p for p in am.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        am(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()


# ---------------------------------------------------------------------------------------------------- injection
@pytest.mark.parametrize("family", FAMILIES)
def test_inject_identity_at_init_and_trainable_count(family, nan_poison):
    ids, mask = tiny_batch(left_pad=2)
    base_logits = logits(tiny_model(family), ids, mask)
    am = fa.get_adapter_model(tiny_model(family), cfg())
    layers = lora_layers(am.base_model)
    leaves = {n.rsplit(".", 1)[-1] for n, _ in layers}
    assert leaves == set(LORA_TARGETS[family]) and len(layers) == 2 * len(LORA_TARGETS[family])
    # B = 0: the output is the base output bit for bit
    assert torch.equal(logits(am, ids, mask), base_logits)
    trainable = {n: p for n, p in am.named_parameters() if p.requires_grad}
    assert all((".lora_A.default." in n) or (".lora_B.default." in n) for n in trainable), sorted(trainable)
    expected = sum(4 * (m.in_features + m.out_features) for _, m in layers)
    assert am.get_nb_trainable_parameters()[0] == expected == sum(p.numel() for p in trainable.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_train_merge_unmerge_and_merge_and_unload(family):
    ids, mask = tiny_batch()
    base_logits = logits(tiny_model(family), ids, mask)
    am = fa.get_adapter_model(tiny_model(family), cfg())
    orig = target_weights(am.base_model)
    sgd_steps(am, ids, mask)
    trained = logits(am, ids, mask)
    assert (trained - base_logits).abs().max() > 1e-3, "a few SGD steps must change the output"
    for n, w in target_weights(am.base_model).items():
        assert torch.equal(w, orig[n]), f"base weight {n} changed during training: it must stay frozen"

    am.merge_adapter()
    torch.testing.assert_close(logits(am, ids, mask), trained, atol=2e-5, rtol=1e-5)
    assert any(not torch.equal(w, orig[n]) for n, w in target_weights(am.base_model).items())
    am.unmerge_adapter()
    for n, w in target_weights(am.base_model).items():
        assert torch.equal(w, orig[n]), f"unmerge must restore {n} exactly"
    assert torch.equal(logits(am, ids, mask), trained)

    plain = am.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    assert type(plain).__name__ == type(tiny_model(family)).__name__
    torch.testing.assert_close(logits(plain, ids, mask), trained, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    ids, mask = tiny_batch()
    am = fa.get_adapter_model(tiny_model(family), cfg(init_lora_weights=False))
    before = logits(am, ids, mask)
    assert (before - logits(tiny_model(family), ids, mask)).abs().max() > 1e-3  # the adapter does something
    am.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = fa.AdapterModel.from_pretrained(tiny_model(family), tmp_path)
    assert torch.equal(logits(loaded, ids, mask), before)
    assert not any(p.requires_grad for p in loaded.parameters()), "from_pretrained loads frozen unless is_trainable"
    trainable = fa.AdapterModel.from_pretrained(tiny_model(family), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == am.get_nb_trainable_parameters()[0]


# ------------------------------------------------------------------------------------------------ the layer itself
def _manual(layer: LoraLayer, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    w = layer.base_layer.weight
    y = x @ w + layer.base_layer.bias if isinstance(layer.base_layer, Conv1D) else F.linear(x, w, layer.base_layer.bias)
    for n in names:
        y = y + layer.scaling[n] * (x @ layer.lora_A[n].weight.t() @ layer.lora_B[n].weight.t())
    return y


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_two_adapters_sum_of_deltas(kind, nan_poison):
    torch.manual_seed(0)
    base = nn.Linear(72, 40) if kind == "linear" else Conv1D(40, 72)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    layer = LoraLayer(base)
    layer.update_layer("a", cfg(r=5, lora_alpha=10, init_lora_weights=False), "m")
    layer.update_layer("b", cfg(r=3, lora_alpha=6, use_rslora=True, init_lora_weights=False), "m")
    layer.adapter_names += ["a", "b"]
    assert layer.scaling == {"a": 2.0, "b": 6 / 3**0.5}
    x = torch.randn(2, 7, 72)
    for names in (["a"], ["b"], ["a", "b"], ["b", "a"]):
        layer.set_active(names)
        torch.testing.assert_close(layer(x), _manual(layer, x, names), atol=1e-5, rtol=1e-5)
    layer.set_active([])
    assert torch.equal(layer(x), base(x))
    layer.set_active(["a", "b"])
    w0 = base.weight.detach().clone()
    layer.merge(["a", "b"])
    torch.testing.assert_close(layer(x), _manual(layer, x, []), atol=1e-5, rtol=1e-5)  # merged: the plain layer
    torch.testing.assert_close(base(x), _manual(layer, x, []), atol=0, rtol=0)
    layer.set_active([])  # deactivating merged adapters unmerges them: the output is the base again
    assert layer.merged_adapters == [] and torch.equal(base.weight, w0)


def test_layer_runs_the_op_once_with_the_base_gemm(monkeypatch):
    calls = []
    real = fa.ops.lora_linear

    def spy(x, weight, bias, *args, **kwargs):
        calls.append((weight, bias, kwargs))
        return real(x, weight, bias, *args, **kwargs)

    monkeypatch.setattr(fa.ops, "lora_linear", spy)
    base = nn.Linear(16, 24)
    layer = LoraLayer(base)
    for n in ("a", "b"):
        layer.update_layer(n, cfg(lora_dropout=0.1), "m")
        layer.adapter_names.append(n)
    layer.set_active(["a", "b"])
    layer.eval()
    layer(torch.randn(3, 16))
    assert len(calls) == 1 and calls[0][0] is base.weight and calls[0][1] is base.bias
    assert calls[0][2] == {"dropout_p": 0.1, "training": False}


def test_layer_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(32, 32))
    layer.update_layer("a", cfg(lora_dropout=0.5, init_lora_weights=False), "m")
    layer.adapter_names.append("a")
    layer.set_active(["a"])
    x = torch.randn(4, 32)
    layer.train()
    assert not torch.equal(layer(x), layer(x)), "dropout must draw a new mask each call in training"
    layer.eval()
    torch.testing.assert_close(layer(x), _manual(layer, x, ["a"]), atol=1e-5, rtol=1e-5)


def test_wrapped_layers_keep_the_models_train_eval_mode():
    ids, mask = tiny_batch()
    am = fa.get_adapter_model(tiny_model("llama"), cfg(lora_dropout=0.5, init_lora_weights=False))  # an eval model
    assert not any(m.training for _, m in lora_layers(am.base_model))
    assert torch.equal(logits(am, ids, mask), logits(am, ids, mask))
    am.train()
    assert all(m.training and m.lora_dropout["default"].training for _, m in lora_layers(am.base_model))
    assert not torch.equal(logits(am, ids, mask), logits(am, ids, mask)), "LoRA dropout is on in training mode"


def test_layer_mixed_dtype_casts_like_peft():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(32, 24, dtype=torch.bfloat16))
    layer.update_layer("a", cfg(init_lora_weights=False), "m")
    layer.adapter_names.append("a")
    layer.set_active(["a"])
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert A.dtype == B.dtype == torch.float32, "bf16 base layers get fp32 adapters (PEFT's autocast_adapter_dtype)"
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    y = layer(x)
    expected = (layer.base_layer(x) + F.linear(F.linear(x.float(), A), B) * layer.scaling["a"]).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)


# -------------------------------------------------------------------------------------------- several adapters
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_two_active_adapters_equal_merging_both(family):
    ids, mask = tiny_batch()
    am = fa.get_adapter_model(tiny_model(family), cfg(init_lora_weights=False), "a")
    am.add_adapter("b", cfg(r=2, lora_alpha=4, init_lora_weights=False))
    only_a = logits(am, ids, mask)
    am.set_adapter(["a", "b"])
    both = logits(am, ids, mask)
    assert (both - only_a).abs().max() > 1e-3
    # the layer output is W x + delta_a + delta_b, so merging both (W + s_a B_a A_a + s_b B_b A_b) gives the same
    am.merge_adapter(["a", "b"])
    torch.testing.assert_close(logits(am, ids, mask), both, atol=2e-5, rtol=1e-5)
    am.unmerge_adapter()
    torch.testing.assert_close(logits(am, ids, mask), both, atol=0, rtol=0)


def test_set_adapter_disable_adapter_and_delete():
    ids, mask = tiny_batch()
    base = logits(tiny_model("llama"), ids, mask)
    am = fa.get_adapter_model(tiny_model("llama"), cfg(init_lora_weights=False), "a")
    am.add_adapter("b", cfg(init_lora_weights=False))
    with_a = logits(am, ids, mask)
    am.set_adapter("b")
    with_b = logits(am, ids, mask)
    assert (with_a - with_b).abs().max() > 1e-3
    with am.disable_adapter():
        assert torch.equal(logits(am, ids, mask), base)
    assert torch.equal(logits(am, ids, mask), with_b)

    am.merge_adapter()  # disabling a merged adapter unmerges it: the output is the exact base
    with am.disable_adapter():
        assert torch.equal(logits(am, ids, mask), base)
    torch.testing.assert_close(logits(am, ids, mask), with_b, atol=2e-5, rtol=1e-5)

    am.set_adapter("a")
    am.delete_adapter("b")
    assert "b" not in am.peft_config
    assert not any(".b." in n for n, _ in am.named_parameters())
    assert all(set(m.lora_A) == {"a"} and "b" not in m.scaling for _, m in lora_layers(am.base_model))
    assert torch.equal(logits(am, ids, mask), with_a)
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        am.set_adapter("b")


def test_merging_an_inactive_adapter_is_refused():
    am = fa.get_adapter_model(tiny_model("llama"), cfg(), "a")
    am.add_adapter("b", cfg())
    with pytest.raises(ValueError, match=r"adapters \['b'\] are not active"):
        am.merge_adapter(["b"])


def test_unload_restores_original_modules():
    ids, mask = tiny_batch()
    model = tiny_model("llama")
    base = logits(model, ids, mask)
    originals = {n: m for n, m in model.named_modules()}
    keys = list(model.state_dict())
    am = fa.get_adapter_model(model, cfg(init_lora_weights=False))
    am.merge_adapter()
    plain = am.unload()
    assert plain is model
    assert all(m is originals[n] for n, m in plain.named_modules())
    assert list(plain.state_dict()) == keys
    assert torch.equal(logits(plain, ids, mask), base)  # unload unmerges exactly


# ----------------------------------------------------------------------------------------------- bias / conv1d
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_trains_and_is_saved(bias, tmp_path):
    ids, mask = tiny_batch()
    am = fa.get_adapter_model(tiny_model("opt"), cfg(bias=bias))
    trainable = {n for n, p in am.base_model.named_parameters() if p.requires_grad}
    biases = {n for n in trainable if n.endswith(".bias")}
    if bias == "all":
        assert biases == {n for n, _ in am.base_model.named_parameters() if n.endswith(".bias")}
        assert any("layer_norm" in n for n in biases)
    else:
        assert biases == {f"{n}.base_layer.bias" for n, _ in lora_layers(am.base_model)}
    sgd_steps(am, ids, mask)
    trained = logits(am, ids, mask)
    am.save_pretrained(tmp_path)
    saved = am.adapter_state_dict()
    assert {k.removeprefix("base_model.model.") for k in saved if k.endswith(".bias")} == biases
    loaded = fa.AdapterModel.from_pretrained(tiny_model("opt"), tmp_path)
    assert torch.equal(logits(loaded, ids, mask), trained)


def test_conv1d_sets_fan_in_fan_out_with_a_warning():
    config = cfg()
    with pytest.warns(UserWarning, match="setting fan_in_fan_out=True"):
        am = fa.get_adapter_model(tiny_model("gpt2"), config)
    assert config.fan_in_fan_out is True and am.peft_config["default"].fan_in_fan_out is True
    layer = lora_layers(am.base_model)[0][1]
    assert layer.fan_in_fan_out and layer.delta_weight("default").shape == layer.base_layer.weight.shape


# -------------------------------------------------------------------------------------------------------- errors
def _bad_target(model_cfg):
    return lambda: fa.get_adapter_model(tiny_model("llama"), model_cfg)


def _mutated(**kw):
    c = cfg()
    for k, v in kw.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (_bad_target(cfg(target_modules=["nonexistent"])), ValueError, r"matched no module of LlamaForCausalLM"),
        (_bad_target(cfg(target_modules=["q_proj", "qq_proj"])), ValueError, r"\['qq_proj'\] matched no module"),
        (_bad_target(cfg(target_modules=["input_layernorm"])), ValueError, r"is a LlamaRMSNorm.*nn.Linear"),
        (lambda: cfg(r=0), ValueError, r"rank r=0 must be a positive integer"),
        (_bad_target(_mutated(r=-2)), ValueError, r"rank r=-2 .* must be a positive integer"),
        (lambda: cfg(lora_dropout=1.0), ValueError, r"lora_dropout=1.0 is outside \[0, 1\)"),
        (_bad_target(_mutated(lora_dropout=-0.5)), ValueError, r"lora_dropout=-0.5 is outside \[0, 1\)"),
        (_bad_target(_mutated(init_lora_weights="pissa")), ValueError, r"init_lora_weights='pissa' is not supported"),
    ],
    ids=[
        "unknown_target",
        "unmatched_target",
        "non_linear_target",
        "r0_config",
        "r_negative_layer",
        "dropout_1_config",
        "dropout_negative_layer",
        "unsupported_init",
    ],
)
def test_bad_adapter_raises_clear_error(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_failed_injection_leaves_model_untouched():
    model = tiny_model("llama")
    originals = {n: m for n, m in model.named_modules()}
    am = fa.get_adapter_model(model, cfg(), "a")
    with pytest.raises(ValueError, match="matched no module"):
        am.add_adapter("b", cfg(target_modules=["q_proj", "nope"]))
    assert "b" not in am.peft_config
    assert all(set(m.lora_A) == {"a"} for _, m in lora_layers(model))
    assert {n for n, _ in lora_layers(model)} == {n for n in originals if n.endswith(("q_proj", "v_proj"))}


def test_adapter_name_clash():
    am = fa.get_adapter_model(tiny_model("llama"), cfg(), "a")
    with pytest.raises(ValueError, match="an adapter named 'a' exists already"):
        am.add_adapter("a", cfg())


@pytest.fixture
def saved_llama(tmp_path):
    am = fa.get_adapter_model(tiny_model("llama"), cfg(init_lora_weights=False))
    am.save_pretrained(tmp_path)
    return am, tmp_path


def test_load_for_another_base_model_names_the_tensor(saved_llama):
    _, path = saved_llama
    narrower = tiny_model("llama", hidden_size=32, head_dim=8)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    match = rf"{key} has shape \(4, 64\) in the checkpoint but the model expects \(4, 32\)"
    with pytest.raises(ValueError, match=match):
        fa.AdapterModel.from_pretrained(narrower, path)
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj', 'v_proj'\] matched no module of GPT2LMHeadModel"):
        fa.AdapterModel.from_pretrained(tiny_model("gpt2"), path)


def test_load_missing_or_truncated_checkpoint(saved_llama, tmp_path_factory):
    _, path = saved_llama
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        fa.AdapterModel.from_pretrained(tiny_model("llama"), path / "does-not-exist")
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        fa.AdapterModel.from_pretrained(tiny_model("llama"), path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        fa.AdapterModel.from_pretrained(tiny_model("llama"), path)


@pytest.mark.parametrize("fail_at", ["replace", "fsync"])
def test_atomic_save_keeps_old_checkpoint(saved_llama, monkeypatch, fail_at):
    am, path = saved_llama
    ids, mask = tiny_batch()
    old = logits(am, ids, mask)
    with torch.no_grad():
        for p in am.adapter_parameters():
            p.add_(1.0)
    assert not torch.equal(logits(am, ids, mask), old)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, fail_at, boom)
    with pytest.raises(OSError, match="disk full"):
        am.save_pretrained(path)
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"], "a temp file was left"
    assert torch.equal(logits(fa.AdapterModel.from_pretrained(tiny_model("llama"), path), ids, mask), old)


# --------------------------------------------------------------------------------- training features, generate
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_same_grads(use_reentrant):
    ids, mask = tiny_batch()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        am = fa.get_adapter_model(tiny_model("llama"), cfg(init_lora_weights=False))
        if checkpointing:
            am.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        am.train()
        am(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return {n: p.grad for n, p in am.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert set(plain) == set(ckpt) and all(g is not None for g in ckpt.values())
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_generate_matches_merged_model():
    ids, mask = tiny_batch(batch=1)
    am = fa.get_adapter_model(tiny_model("llama"), cfg(init_lora_weights=False))
    out = am.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    plain = am.merge_and_unload()
    assert torch.equal(plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), out)


def test_merge_in_bf16():
    ids, mask = tiny_batch()
    am = fa.get_adapter_model(tiny_model("llama", dtype=torch.bfloat16), cfg(init_lora_weights=False))
    layer = lora_layers(am.base_model)[0][1]
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    w0 = layer.base_layer.weight.detach().clone()
    expected = (w0.float() + layer.delta_weight("default")).to(torch.bfloat16)
    unmerged = logits(am, ids, mask)
    assert unmerged.dtype == torch.bfloat16
    am.merge_adapter()
    assert torch.equal(layer.base_layer.weight, expected), "merge = round(W + s B A in fp32) once"
    am.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, w0)
    plain = am.merge_and_unload()
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    merged = logits(plain, ids, mask).float()
    # bf16 rounding of the merged weight vs the unmerged fp32 branch: a few bf16 ulps of the logits
    torch.testing.assert_close(merged, unmerged.float(), atol=6e-2, rtol=2e-2)
