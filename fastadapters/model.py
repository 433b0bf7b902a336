"""AdapterModel: a transformers model with named adapters, PEFT's API and on-disk format."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import load_weights, save_weights
from .config import AdapterConfig
from .tuners import METHODS
from .tuners.base import AdapterMethod

# Names that appear as components of parameter paths: an adapter named like one would be ambiguous in checkpoints.
RESERVED_NAMES = frozenset(
    {
        "weight",
        "bias",
        "base_layer",
        "lora_A",
        "lora_B",
        "lora_dropout",
        "adapter_down",
        "adapter_up",
        "adapter_scaling",
        "embedding",
        "transform",
        "model",
        "base_model",
    }
)


class AdapterModel(nn.Module):
    """A transformers model carrying one or more named adapters; only adapter parameters train.

    `base_model` is the wrapped transformers model; `peft_config` maps adapter names to configs.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a transformers model (nn.Module), got {type(model).__name__}")
        if isinstance(model, AdapterModel):
            raise TypeError("the model already is an AdapterModel: use model.add_adapter(name, config) instead")
        self.base_model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.prompt_encoder = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self._methods: dict[str, AdapterMethod] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)
        self.train(model.training)

    # -- attribute access falls through to the wrapped model (config, device, generation_config, ...)
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters
    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0] if self.active_adapters else ""

    def _method(self, name: str) -> AdapterMethod:
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; this model has {sorted(self.peft_config)}")
        return self._methods[self.peft_config[name].peft_type]

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Add a new (inactive) adapter `adapter_name` described by `config`."""
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config must be a fastadapters config (LoraConfig, ...), got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} must be a non-empty string without dots")
        if adapter_name in RESERVED_NAMES:
            raise ValueError(f"adapter name {adapter_name!r} is also a parameter path component; pick another name")
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} exists already; pick another name or delete_adapter it"
            )
        kinds = {c.peft_type for c in self.peft_config.values()}
        if kinds and config.peft_type not in kinds:
            raise ValueError(
                f"this model holds {sorted(kinds)} adapters; adding a {config.peft_type} adapter is not "
                "supported: wrap a fresh base model for another adapter type"
            )
        if config.peft_type not in METHODS:
            raise ValueError(f"no implementation for peft_type={config.peft_type!r}; known: {sorted(METHODS)}")
        method = self._methods.setdefault(config.peft_type, METHODS[config.peft_type]())
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
        self.peft_config[adapter_name] = config
        try:
            method.add(self, adapter_name, config)
        except BaseException:
            del self.peft_config[adapter_name]
            with contextlib.suppress(Exception):
                method.delete(self, adapter_name)
            raise
        method.set_active(self, self.active_adapters)
        for p in method.parameters(self, adapter_name):
            p.requires_grad_(not config.inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        method = self._method(adapter_name)
        method.delete(self, adapter_name)
        del self.peft_config[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        method.set_active(self, self.active_adapters)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make `adapter_name` (or several, for layer adapters) the active adapters."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ValueError("set_adapter needs at least one adapter name; use disable_adapter() to run without")
        for n in names:
            self._method(n)
        if len({self.peft_config[n].peft_type for n in names}) > 1:
            raise ValueError(f"adapters {names} are of different types and cannot be active together")
        if len(names) > 1 and self.peft_config[names[0]].is_prompt_learning:
            raise ValueError("only one prompt-learning adapter can be active at a time")
        self.active_adapters = names
        self._method(names[0]).set_active(self, names)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside this block."""
        saved = list(self.active_adapters)
        methods = list(self._methods.values())
        for m in methods:
            m.set_active(self, [])
        self.active_adapters = []
        try:
            yield
        finally:
            self.active_adapters = saved
            if saved:
                self._method(saved[0]).set_active(self, saved)

    # -- calling
    def _call_method(self, kwargs: dict[str, Any]) -> AdapterMethod | None:
        """The method that runs a call: the active adapters'. With adapter_names= (a mixed batch, one adapter per
        sequence) the method of the model's adapters, also inside disable_adapter(), so the names get checked."""
        if "adapter_names" in kwargs and kwargs["adapter_names"] is None:
            del kwargs["adapter_names"]
        if "adapter_names" not in kwargs:
            return self._method(self.active_adapters[0]) if self.active_adapters else None
        method = self._method(self.active_adapters[0] if self.active_adapters else next(iter(self.peft_config), ""))
        if not getattr(method, "supports_mixed_batch", False):
            raise ValueError(
                f"adapter_names (one adapter per sequence) works with LoRA adapters; this model holds "
                f"{method.peft_type} adapters: call set_adapter(name) and run one adapter at a time"
            )
        return method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        method = self._call_method(kwargs)
        if method is None:
            return self.base_model(*args, **kwargs)
        return method.forward(self, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        method = self._call_method(kwargs)
        if method is None:
            return self.base_model.generate(*args, **kwargs)
        return method.generate(self, *args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute activations in backward. Works on transformers 5.17 and on 5.24 (which renamed the API to
        activation_checkpointing_enable); inputs get requires_grad so reentrant checkpointing reaches the adapters."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs.get("use_reentrant", True) and hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # -- merging (LoRA)
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or self.active_adapters
        if names:
            self._method(names[0]).merge(self, names)

    def unmerge_adapter(self) -> None:
        for m in self._methods.values():
            m.unmerge(self)

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapters into the base weights and return the plain transformers model."""
        if self.active_adapters:
            self._method(self.active_adapters[0]).merge(self, self.active_adapters)
        return self._unload()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the plain transformers model."""
        self.unmerge_adapter()
        return self._unload()

    def _unload(self) -> nn.Module:
        model = self.base_model
        for m in self._methods.values():
            model = m.unload(self)
        return model

    # -- parameters
    def adapter_parameters(self, adapter_name: str | None = None) -> Iterator[nn.Parameter]:
        names = [adapter_name] if adapter_name else list(self.peft_config)
        for n in names:
            yield from self._method(n).parameters(self, n)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- checkpoints
    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """Adapter `adapter_name`'s tensors under PEFT's saved key names."""
        return self._method(adapter_name).state_dict(self, adapter_name)

    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None, **_: Any
    ) -> None:
        """Write adapter_config.json + adapter_model.safetensors per adapter ("default" at the top, others in
        sub-folders named after them, as PEFT does). Each file is written atomically."""
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a folder path")
        for name in selected_adapters or list(self.peft_config):
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(directory, exist_ok=True)
            save_weights(self.adapter_state_dict(name), directory)
            self.peft_config[name].save(directory)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add adapter `adapter_name` from a checkpoint folder (ours or HF PEFT's)."""
        config = AdapterConfig.load(model_id)
        config.inference_mode = not is_trainable
        state = load_weights(model_id)
        self.add_adapter(adapter_name, config)
        try:
            self._method(adapter_name).load_state_dict(self, adapter_name, state)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self.eval()

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **_: Any,
    ) -> AdapterModel:
        """Wrap `model` with the adapter saved in `model_id` (ours or HF PEFT's); frozen unless is_trainable."""
        config = AdapterConfig.load(model_id)
        config.inference_mode = not is_trainable
        state = load_weights(model_id)
        am = cls(model, config, adapter_name)
        am._method(adapter_name).load_state_dict(am, adapter_name, state)
        if not is_trainable:
            am.eval()  # as PEFT: a frozen adapter is for inference, so dropout is off
        return am


def get_adapter_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdapterModel:
    """Inject adapter `adapter_name` into a transformers model; the base is frozen, the adapter trains."""
    return AdapterModel(model, config, adapter_name)
