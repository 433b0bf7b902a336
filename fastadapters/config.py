"""Adapter configurations: what each adapter is, validated on construction, saved as PEFT's adapter_config.json."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

ACTIVATIONS = ("tanh", "relu", "gelu", "gelu_tanh", "silu", "sigmoid")


def _check_dropout(name: str, p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"{name}={p!r} is outside [0, 1): use a probability such as 0.05, or 0.0 to disable dropout")


def _normalize_targets(targets: Any) -> list[str] | str | None:
    if targets is None or isinstance(targets, str):
        return targets
    targets = list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"target_modules={targets!r} must be a non-empty list of module names, a regex string, or None"
        )
    return targets


@dataclass
class AdapterConfig:
    """Fields every adapter config shares (the names PEFT writes into adapter_config.json)."""

    peft_type: ClassVar[str] = ""
    is_prompt_learning: ClassVar[bool] = False

    task_type: str = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """Build from a (possibly PEFT-written) dict; unknown fields at their default value are ignored."""
        peft_type = d.get("peft_type", cls.peft_type)
        target = CONFIG_CLASSES.get(peft_type) if cls is AdapterConfig else cls
        if target is None:
            raise ValueError(
                f"adapter_config.json has peft_type={peft_type!r}; fastadapters reads {sorted(CONFIG_CLASSES)}"
            )
        names = {f.name for f in dataclasses.fields(target)}
        kwargs = {k: v for k, v in d.items() if k in names}
        target.check_peft_dict(d)
        unsupported = {
            k: v
            for k, v in d.items()
            if k not in names and k in target.unsupported_fields and v not in target.unsupported_fields[k]
        }
        if unsupported:
            raise ValueError(
                f"this {peft_type} checkpoint uses features fastadapters does not implement: {unsupported}"
            )
        return target(**kwargs)

    unsupported_fields: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def check_peft_dict(cls, d: dict[str, Any]) -> None:
        """Refuse a (PEFT-written) config dict that PEFT itself refuses, with PEFT's reason (default: nothing)."""

    def save(self, directory: str | os.PathLike) -> None:
        from .checkpoint import atomic_write_bytes

        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(os.path.join(directory, "adapter_config.json"), text.encode())

    @staticmethod
    def load(directory: str | os.PathLike) -> AdapterConfig:
        path = os.path.join(directory, "adapter_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no adapter_config.json in {directory!s}: is this an adapter checkpoint folder?")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint may be truncated: save it again") from e
        return AdapterConfig.from_dict(d)


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: y = x W^T + b + s * dropout(x) A^T B^T with s = lora_alpha / r (or / sqrt(r) with rslora).

    use_dora=True: DoRA (weight-decomposed LoRA, PEFT's semantics): y = c * (x W^T + s x A^T B^T) + b with a
    trainable magnitude m per output feature and c = m / ||W + s B A|| (row norms, no gradient).
    """

    peft_type: ClassVar[str] = "LORA"
    unsupported_fields: ClassVar[dict[str, tuple]] = {
        "lora_bias": (False, None),
        "layers_to_transform": (None,),
        "rank_pattern": ({}, None),
        "alpha_pattern": ({}, None),
        "modules_to_save": (None, []),
        "exclude_modules": (None,),
        "layers_pattern": (None,),
        "layer_replication": (None,),
        "target_parameters": (None,),
        "trainable_token_indices": (None,),
        "use_qalora": (False,),
        "alora_invocation_tokens": (None,),
        "arrow_config": (None,),
        "use_bdlora": (None, False),
        "megatron_config": (None,),
        "kasa_config": (None,),
        "monteclora_config": (None,),
        "velora_config": (None,),
    }

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    bias: str = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: bool = True
    use_dora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r={self.r!r} must be a positive integer (8 or 16 are common)")
        if self.use_dora is None:  # PEFT writes null for "off" in some versions
            self.use_dora = False
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora={self.use_dora!r} must be True (DoRA) or False (plain LoRA)")
        _check_dropout("lora_dropout", self.lora_dropout)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={self.bias!r}: use 'none', 'all' or 'lora_only'")
        self.target_modules = _normalize_targets(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def check_peft_dict(cls, d: dict[str, Any]) -> None:
        if d.get("use_dora") and d.get("lora_bias"):
            raise ValueError(
                "this LoRA checkpoint sets both use_dora=True and lora_bias=True, which PEFT refuses too "
                "(lora_bias is not supported for DoRA): set one of them to False"
            )


@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters of LLM-Adapters: f(z) = up(act(down(dropout(z)))), series (AdapterH/AdapterP) or parallel."""

    peft_type: ClassVar[str] = "BOTTLENECK"
    unsupported_fields: ClassVar[dict[str, tuple]] = {"bias": ("none", None)}

    bottleneck_size: int = 256
    non_linearity: str = "tanh"
    adapter_dropout: float = 0.0
    use_parallel_adapter: bool = False
    use_adapterp: bool = False
    scaling: float | str = 1.0
    target_modules: list[str] | str | None = None
    init_weights: str = "zero"

    def __post_init__(self) -> None:
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0:
            raise ValueError(
                f"bottleneck_size={self.bottleneck_size!r} must be a positive integer (LLM-Adapters uses 256)"
            )
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"unknown non_linearity={self.non_linearity!r}: choose one of {ACTIVATIONS}")
        _check_dropout("adapter_dropout", self.adapter_dropout)
        if isinstance(self.scaling, str) and self.scaling != "learned":
            raise ValueError(f"scaling={self.scaling!r}: give a float or the string 'learned'")
        if self.init_weights == "mam_adapter":  # LLM-Adapters' name for the same init
            self.init_weights = "zero"
        if self.init_weights not in ("zero", "bert"):
            raise ValueError(f"init_weights={self.init_weights!r}: use 'zero' (output unchanged at step 0) or 'bert'")
        if self.use_parallel_adapter and self.use_adapterp:
            raise ValueError("use_parallel_adapter and use_adapterp are exclusive: pick one placement")
        self.target_modules = _normalize_targets(self.target_modules)


@dataclass
class PromptLearningConfig(AdapterConfig):
    is_prompt_learning: ClassVar[bool] = True

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens={self.num_virtual_tokens!r} must be a positive integer")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned per-layer key/value prefixes, optionally reparameterised through an MLP."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    num_virtual_tokens: int = 30
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: learned virtual-token embeddings prepended to the input embeddings."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_tuning_init not in ("RANDOM", "TEXT"):
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init!r}: use 'RANDOM' or 'TEXT'")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (and a tokenizer)")


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    c.peft_type: c for c in (LoraConfig, BottleneckConfig, PrefixTuningConfig, PromptTuningConfig)
}
