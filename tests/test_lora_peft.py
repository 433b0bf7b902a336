"""Parity with HF PEFT 0.21.0's LoRA: same weights -> same logits and gradients; checkpoints load both ways."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from tiny_models import tiny_batch, tiny_model

import fastadapters as fa
from fastadapters.targets import LORA_TARGETS

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:the LoRA targets include transformers Conv1D")

FAMILIES = ("llama", "gpt2", "bloom", "opt")  # gpt2: Conv1D; bloom/opt: biased projections
VARIANTS = {
    "dropout0": {"lora_dropout": 0.0},
    "dropout_eval": {"lora_dropout": 0.1},  # the models are in eval mode: dropout is the identity
    "rslora_bias_all": {"lora_dropout": 0.0, "use_rslora": True, "bias": "all"},
    "bias_lora_only": {"lora_dropout": 0.0, "bias": "lora_only"},
}
TIGHT = {"atol": 1e-6, "rtol": 1e-6}  # same ops in fp32: the differences are 0 today; this only allows reordering


def ours(family: str, **kw) -> fa.AdapterModel:
    return fa.get_adapter_model(tiny_model(family), fa.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))


def theirs(family: str, **kw) -> nn.Module:
    """A PEFT LoRA model on the same tiny base, with PEFT's own default target modules."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM", **kw
    )
    return peft.get_peft_model(tiny_model(family), config)


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def saved_keys(path) -> list[str]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def perturb_biases(model: nn.Module, bias: str, seed: int) -> None:
    """Make the saved base biases differ from a fresh model's, so loading them (bias="all"/"lora_only") is checked."""
    suffix = ".base_layer.bias" if bias == "lora_only" else ".bias"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(suffix):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_same_weights_same_logits_and_grads(family, variant):
    kw = VARIANTS[variant]
    ids, mask = tiny_batch(left_pad=2)
    am, pm = ours(family, **kw).eval(), theirs(family, **kw).eval()
    assert set(pm.peft_config["default"].target_modules) == set(LORA_TARGETS[family]), "default targets differ"
    mine = dict(am.base_model.named_parameters())
    peft_params = dict(pm.base_model.model.named_parameters())
    assert set(mine) == set(peft_params), "parameter paths differ from PEFT's"
    assert {n for n, p in mine.items() if p.requires_grad} == {n for n, p in peft_params.items() if p.requires_grad}
    with torch.no_grad():
        for n, p in mine.items():
            peft_params[n].copy_(p)
    out, ref = (m(input_ids=ids, attention_mask=mask, labels=ids) for m in (am, pm))
    torch.testing.assert_close(out.logits, ref.logits, **TIGHT)
    out.loss.backward()
    ref.loss.backward()
    trainable = [n for n, p in mine.items() if p.requires_grad]
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    for n in trainable:
        torch.testing.assert_close(mine[n].grad, peft_params[n].grad, **TIGHT, msg=n)


CHECKPOINT_CASES = [(f, "dropout0") for f in FAMILIES] + [
    ("gpt2", "rslora_bias_all"),
    ("opt", "rslora_bias_all"),
    ("bloom", "bias_lora_only"),
]


@pytest.mark.parametrize("family, variant", CHECKPOINT_CASES, ids=[f"{f}-{v}" for f, v in CHECKPOINT_CASES])
def test_checkpoints_load_both_ways(family, variant, tmp_path):
    kw = VARIANTS[variant]
    ids, mask = tiny_batch()

    # ours -> PEFT
    torch.manual_seed(1)
    am = ours(family, **kw)
    if "bias" in kw:
        perturb_biases(am.base_model, kw["bias"], seed=2)
    expected = logits(am, ids, mask)
    am.save_pretrained(tmp_path / "ours")
    pc = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert isinstance(pc, peft.LoraConfig) and pc.peft_type == peft.PeftType.LORA
    assert (pc.r, pc.lora_alpha, set(pc.target_modules), pc.use_rslora, pc.bias, pc.fan_in_fan_out) == (
        4,
        8,
        set(LORA_TARGETS[family]),
        kw.get("use_rslora", False),
        kw.get("bias", "none"),
        family == "gpt2",
    )
    pm = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(pm, ids, mask), expected, **TIGHT)

    # PEFT -> ours
    torch.manual_seed(3)
    pm = theirs(family, **kw)
    if "bias" in kw:
        perturb_biases(pm.base_model.model, kw["bias"], seed=4)
    expected = logits(pm, ids, mask)
    assert not torch.allclose(expected, logits(tiny_model(family), ids, mask)), "the PEFT adapter must do something"
    pm.save_pretrained(str(tmp_path / "peft"))
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft"), "saved key names differ from PEFT's"
    loaded = fa.AdapterModel.from_pretrained(tiny_model(family), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, ids, mask), expected, **TIGHT)
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_json["peft_type"] == "LORA" and loaded.peft_config["default"].r == peft_json["r"]


def test_merge_and_unload_matches_peft():
    ids, mask = tiny_batch()
    am, pm = ours("gpt2"), theirs("gpt2")
    peft_params = dict(pm.base_model.model.named_parameters())
    with torch.no_grad():
        for n, p in am.base_model.named_parameters():
            peft_params[n].copy_(p)
    mine, ref = am.merge_and_unload(), pm.merge_and_unload()
    assert list(mine.state_dict()) == list(ref.state_dict())
    for (n, a), b in zip(mine.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, **TIGHT, msg=n)
    torch.testing.assert_close(logits(mine, ids, mask), logits(ref, ids, mask), **TIGHT)
