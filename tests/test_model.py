"""AdapterModel-level behaviour that the Hugging Face training stack relies on: unload() for every adapter type."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import fastadapters as fa

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "lora": lambda: fa.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "bottleneck": lambda: fa.BottleneckConfig(bottleneck_size=8, init_weights="bert"),
    "bottleneck-parallel": lambda: fa.BottleneckConfig(bottleneck_size=8, use_parallel_adapter=True,
                                                       target_modules=["q_proj"], init_weights="bert"),
    "prefix": lambda: fa.PrefixTuningConfig(num_virtual_tokens=3),
    "prompt": lambda: fa.PromptTuningConfig(num_virtual_tokens=3),
}


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_unload_returns_the_plain_base_model_for_every_adapter_type(kind):
    ids, mask = tiny_batch()
    model = tiny_model("llama")
    base = _logits(model, ids, mask)
    modules = dict(model.named_modules())
    keys = list(model.state_dict())
    am = fa.get_adapter_model(model, CONFIGS[kind]())
    if kind != "prompt":  # a prompt changes the output length; the others must change the values
        assert not torch.allclose(_logits(am, ids, mask), base)
    plain = am.unload()
    assert plain is model
    assert dict(plain.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in plain.named_modules())
    assert list(plain.state_dict()) == keys
    assert torch.equal(_logits(plain, ids, mask), base)
