"""Layer methods (LoRA, bottleneck): swap each target module for a wrapper that owns the adapters of that module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..checkpoint import strip_adapter_name
from ..targets import find_targets
from .base import AdapterMethod

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..model import AdapterModel

PEFT_PREFIX = "base_model.model."


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    raise TypeError(f"{type(module).__name__} is not a linear layer")


class AdapterLayer(nn.Module):
    """Wraps one frozen linear layer (`base_layer`) and holds named adapters on it.

    Subclasses keep each adapter's parameters in nn.ModuleDict / nn.ParameterDict attributes keyed by adapter name,
    so the adapter name is one component of every parameter path, as in PEFT.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = linear_shape(base_layer)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapter_names: list[str] = []

    def base_weight(self) -> torch.Tensor:
        """The base weight as (N, K), whatever the layer stores."""
        w = self.base_layer.weight
        return w.t() if is_conv1d(self.base_layer) else w

    def update_layer(self, name: str, config: AdapterConfig, module_name: str) -> None:
        raise NotImplementedError

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(path inside this layer, parameter) of adapter `name`."""
        for path, p in self.named_parameters():
            if not path.startswith("base_layer.") and name in path.split("."):
                yield path, p

    def delete_adapter(self, name: str) -> None:
        for attr in list(vars(self)["_modules"].values()):
            if isinstance(attr, (nn.ModuleDict, nn.ParameterDict)) and name in attr:
                del attr[name]
        self.adapter_names.remove(name)
        self.set_active([n for n in self.active_adapters if n != name])

    def merge(self, names: list[str]) -> None:
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weight")

    def unmerge(self) -> None:
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weight")


class LayerMethod(AdapterMethod):
    """Injection shared by LoRA and bottleneck adapters. Subclasses set `layer_cls` and `default_targets`."""

    layer_cls: type[AdapterLayer] = AdapterLayer

    def default_targets(self, am: AdapterModel, config: AdapterConfig) -> list[str] | str:
        raise NotImplementedError

    def check_module(self, module_name: str, module: nn.Module, config: AdapterConfig) -> None:
        """Raise a clear error when `module` cannot carry this adapter."""
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ValueError(
                f"target module {module_name!r} is a {type(module).__name__}; {self.peft_type} adapters wrap "
                "nn.Linear or transformers Conv1D layers only: pick linear layers in target_modules"
            )

    def layers(self, am: AdapterModel) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in am.base_model.named_modules():
            if isinstance(module, self.layer_cls):
                yield name, module

    def add(self, am: AdapterModel, name: str, config: AdapterConfig) -> None:
        targets = config.target_modules or self.default_targets(am, config)
        config.target_modules = targets
        names = [n for n in find_targets(am.base_model, targets) if ".base_layer" not in n]
        names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
        for module_name in names:
            module = am.base_model.get_submodule(module_name)
            if isinstance(module, AdapterLayer) and not isinstance(module, self.layer_cls):
                raise ValueError(
                    f"{module_name!r} already carries a {type(module).__name__}; one module takes one adapter type"
                )
            if not isinstance(module, self.layer_cls):
                self.check_module(module_name, module, config)
                wrapper = self.layer_cls(module)
                wrapper.train(module.training)
                parent_name, _, child = module_name.rpartition(".")
                setattr(am.base_model.get_submodule(parent_name) if parent_name else am.base_model, child, wrapper)
                module = wrapper
            module.update_layer(name, config, module_name)
            module.adapter_names.append(name)
            module.to(device=module.base_weight().device)
            module.train(module.base_layer.training)  # new adapter modules follow the model's train/eval mode

    def delete(self, am: AdapterModel, name: str) -> None:
        for _, layer in self.layers(am):
            if name in layer.adapter_names:
                layer.delete_adapter(name)

    def set_active(self, am: AdapterModel, names: list[str]) -> None:
        for _, layer in self.layers(am):
            layer.set_active(names)

    def parameters(self, am: AdapterModel, name: str) -> Iterator[nn.Parameter]:
        for _, layer in self.layers(am):
            for _, p in layer.adapter_parameters(name):
                yield p

    def state_dict(self, am: AdapterModel, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for path, layer in self.layers(am):
            for sub, p in layer.adapter_parameters(name):
                out[PEFT_PREFIX + path + "." + strip_adapter_name(sub, name)] = p.detach()
        return out

    def load_state_dict(self, am: AdapterModel, name: str, state: dict[str, torch.Tensor]) -> None:
        own = {}
        for path, layer in self.layers(am):
            for sub, p in layer.adapter_parameters(name):
                own[PEFT_PREFIX + path + "." + strip_adapter_name(sub, name)] = p
        # PEFT may also save non-adapter keys (e.g. biases with bias="all"): they live on the base layer.
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(
                f"the checkpoint has no tensor for {len(missing)} adapter parameters, e.g. {missing[0]!r}: "
                "it was saved for another model or other target_modules"
            )
        for key, p in own.items():
            t = state[key]
            if t.shape != p.shape:
                raise ValueError(
                    f"{key} has shape {tuple(t.shape)} in the checkpoint but the model expects "
                    f"{tuple(p.shape)}: was the adapter saved for another base model or rank?"
                )
            with torch.no_grad():
                p.copy_(t.to(dtype=p.dtype, device=p.device))
        for key, t in state.items():
            if key not in own:
                self.load_extra(am, key, t)

    def load_extra(self, am: AdapterModel, key: str, tensor: torch.Tensor) -> None:
        """A saved key that is not an adapter parameter (default: an error naming it)."""
        raise ValueError(f"unexpected tensor {key!r} in the checkpoint: it does not belong to this model's adapters")

    def merge(self, am: AdapterModel, names: list[str]) -> None:
        for _, layer in self.layers(am):
            layer.merge([n for n in names if n in layer.adapter_names])

    def unmerge(self, am: AdapterModel) -> None:
        for _, layer in self.layers(am):
            layer.unmerge()

    def unload(self, am: AdapterModel) -> nn.Module:
        for path, layer in list(self.layers(am)):
            parent_name, _, child = path.rpartition(".")
            setattr(am.base_model.get_submodule(parent_name) if parent_name else am.base_model, child, layer.base_layer)
        return am.base_model
