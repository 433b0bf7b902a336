"""Llama-7B-shaped decoder layers with random weights, and the adapter setups the model-level benchmarks share.

`llama(...)` builds the model from a config (no download): hidden 4096, intermediate 11008, 32 heads, vocab 32000,
`layers` decoder layers (2 by default in the presets), in the dtype asked for. `SETUPS` lists the adapters of
LLM-Adapters' recipes; `wrap` puts one on a model with our library ("fastadapters": backend "auto", fused where a
kernel is registered; "reference": backend "torch") or with HF PEFT ("peft"), and returns the model and the
backend its calls must run under.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import fastadapters as fa

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
            max_position_embeddings=512, rms_norm_eps=1e-5)
SIZES = {"llama7b": LLAMA_7B, "tiny": TINY}


def llama(size: str, layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A LlamaForCausalLM of `size` ("llama7b" or "tiny") with `layers` decoder layers and random weights."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(**SIZES[size], num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.to(device)


@dataclass(frozen=True)
class Setup:
    """One adapter as LLM-Adapters trains it: our config, and HF PEFT's when PEFT has the method."""

    name: str  # the `adapter=` of the shape column
    ours: Callable[[int], fa.AdapterConfig]  # bottleneck size -> config
    peft: Callable[[], Any] | None = None  # -> peft config; None: PEFT has no such method
    decode: bool = False  # one per adapter type is also timed in generate()


def _peft(kind: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        import peft

        return getattr(peft, kind)(task_type="CAUSAL_LM", **kw)

    return make


SETUPS: tuple[Setup, ...] = (
    Setup("lora_qv_r16", lambda b: fa.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]),
          _peft("LoraConfig", r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
          decode=True),
    Setup("lora_qkvud_r32", lambda b: fa.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "up_proj",
                                                                    "down_proj"]),
          _peft("LoraConfig", r=32, lora_alpha=64, lora_dropout=0.05,
                target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])),
    Setup("series", lambda b: fa.BottleneckConfig(bottleneck_size=b, non_linearity="tanh"), decode=True),
    Setup("parallel", lambda b: fa.BottleneckConfig(bottleneck_size=b, non_linearity="tanh",
                                                    use_parallel_adapter=True), decode=True),
    Setup("prefix_p10", lambda b: fa.PrefixTuningConfig(num_virtual_tokens=10),
          _peft("PrefixTuningConfig", num_virtual_tokens=10)),
    Setup("prefix_p30", lambda b: fa.PrefixTuningConfig(num_virtual_tokens=30),
          _peft("PrefixTuningConfig", num_virtual_tokens=30), decode=True),
    Setup("prompt_p20", lambda b: fa.PromptTuningConfig(num_virtual_tokens=20),
          _peft("PromptTuningConfig", num_virtual_tokens=20), decode=True),
)
BACKENDS = {"fastadapters": "auto", "reference": "torch"}  # our providers -> fastadapters backend


def providers(setup: Setup) -> list[str]:
    """Ours, then the peer: HF PEFT where it has the method, else our torch reference."""
    return ["fastadapters", "peft" if setup.peft is not None else "reference"]


def wrap(base: nn.Module, setup: Setup, provider: str, bottleneck: int) -> tuple[nn.Module, Callable[[], Any]]:
    """A deep copy of `base` with `setup`'s adapter from `provider`, and a context factory its calls run under.

    provider: "fastadapters" (backend auto), "reference" (backend torch) or "peft". Only adapter parameters train.
    """
    model = copy.deepcopy(base)
    if provider == "peft":
        import peft

        wrapped = peft.get_peft_model(model, setup.peft())
        return wrapped, contextlib.nullcontext
    if provider not in BACKENDS:
        raise ValueError(f"unknown provider {provider!r}: use 'fastadapters', 'reference' or 'peft'")
    wrapped = fa.get_adapter_model(model, setup.ours(bottleneck))
    backend = BACKENDS[provider]
    return wrapped, lambda: fa.use_backend(backend)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def random_ids(batch: int, length: int, vocab: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """(batch, length) token ids in [3, vocab): no pad / bos / eos."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)
