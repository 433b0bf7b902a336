"""Config validation and adapter_config.json round trips."""

import json

import pytest

import fastadapters as fa
from fastadapters.config import AdapterConfig


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: fa.LoraConfig(r=0), "rank r=0"),
        (lambda: fa.LoraConfig(r=-4), "rank r=-4"),
        (lambda: fa.LoraConfig(lora_dropout=1.0), r"outside \[0, 1\)"),
        (lambda: fa.LoraConfig(lora_dropout=-0.1), r"outside \[0, 1\)"),
        (lambda: fa.LoraConfig(bias="some"), "bias='some'"),
        (lambda: fa.LoraConfig(target_modules=[]), "non-empty list"),
        (lambda: fa.BottleneckConfig(non_linearity="swish"), "unknown non_linearity='swish'"),
        (lambda: fa.BottleneckConfig(bottleneck_size=0), "bottleneck_size=0"),
        (lambda: fa.BottleneckConfig(adapter_dropout=1.5), r"outside \[0, 1\)"),
        (lambda: fa.BottleneckConfig(scaling="auto"), "'learned'"),
        (lambda: fa.BottleneckConfig(init_weights="xavier"), "init_weights='xavier'"),
        (lambda: fa.BottleneckConfig(use_parallel_adapter=True, use_adapterp=True), "exclusive"),
        (lambda: fa.PrefixTuningConfig(num_virtual_tokens=0), "num_virtual_tokens=0"),
        (lambda: fa.PromptTuningConfig(num_virtual_tokens=-1), "num_virtual_tokens=-1"),
        (lambda: fa.PromptTuningConfig(prompt_tuning_init="TEXT"), "prompt_tuning_init_text"),
        (lambda: fa.PromptTuningConfig(prompt_tuning_init="VOCAB"), "'RANDOM' or 'TEXT'"),
    ],
    ids=[
        "r0",
        "r_neg",
        "dropout1",
        "dropout_neg",
        "bias",
        "empty_targets",
        "activation",
        "bottleneck0",
        "adapter_dropout",
        "scaling_str",
        "init",
        "parallel_and_p",
        "prefix_tokens0",
        "prompt_tokens_neg",
        "text_without_text",
        "prompt_init",
    ],
)
def test_bad_config_raises_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_lora_scaling():
    assert fa.LoraConfig(r=8, lora_alpha=16).scaling == 2.0
    assert fa.LoraConfig(r=16, lora_alpha=16, use_rslora=True).scaling == 4.0


@pytest.mark.parametrize(
    "cfg",
    [
        fa.LoraConfig(r=4, target_modules=["q_proj"]),
        fa.BottleneckConfig(scaling="learned"),
        fa.PrefixTuningConfig(num_virtual_tokens=5),
        fa.PromptTuningConfig(num_virtual_tokens=3),
    ],
    ids=lambda c: c.peft_type,
)
def test_config_round_trip(tmp_path, cfg):
    cfg.save(tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["peft_type"] == cfg.peft_type
    back = AdapterConfig.load(tmp_path)
    assert type(back) is type(cfg) and back == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_peft_config_with_unsupported_feature_is_refused():
    with pytest.raises(ValueError, match="use_qalora"):
        AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "use_qalora": True})
    cfg = AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "use_dora": False, "megatron_core": "x"})
    assert cfg.r == 4


def test_unknown_peft_type_and_missing_or_broken_config(tmp_path):
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        AdapterConfig.from_dict({"peft_type": "IA3"})
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        AdapterConfig.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LO')
    with pytest.raises(ValueError, match="truncated"):
        AdapterConfig.load(tmp_path)
