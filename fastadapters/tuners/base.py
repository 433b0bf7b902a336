"""The seam between AdapterModel and each adapter type.

An `AdapterMethod` says how one peft_type enters a transformers model. AdapterModel keeps one instance per
peft_type it holds and calls it for every adapter of that type. Layer methods (LoRA, bottleneck) swap target
modules for wrapper layers; prompt-learning methods (prefix, prompt) keep their parameters in
`adapter_model.prompt_encoder[name]` and change how the model is called.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..model import AdapterModel


class AdapterMethod:
    peft_type: str = ""

    def add(self, am: AdapterModel, name: str, config: AdapterConfig) -> None:
        """Create adapter `name` on `am.base_model` (parameters initialised as the config says)."""
        raise NotImplementedError

    def delete(self, am: AdapterModel, name: str) -> None:
        """Remove adapter `name` and its parameters."""
        raise NotImplementedError

    def set_active(self, am: AdapterModel, names: list[str]) -> None:
        """Make exactly `names` (all of this method's type) the active adapters; [] deactivates all."""
        raise NotImplementedError

    def parameters(self, am: AdapterModel, name: str) -> Iterator[nn.Parameter]:
        """The trainable parameters of adapter `name` (prompt methods: its prompt encoder)."""
        yield from am.prompt_encoder[name].parameters()

    def state_dict(self, am: AdapterModel, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors under PEFT's saved key names (adapter name stripped)."""
        raise NotImplementedError

    def load_state_dict(self, am: AdapterModel, name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` (PEFT key names) into adapter `name`; a missing key or wrong shape names the tensor."""
        raise NotImplementedError

    def forward(self, am: AdapterModel, *args: Any, **kwargs: Any) -> Any:
        """Call the model with the active adapters (prompt methods change inputs here)."""
        return am.base_model(*args, **kwargs)

    def generate(self, am: AdapterModel, *args: Any, **kwargs: Any) -> Any:
        return am.base_model.generate(*args, **kwargs)

    def merge(self, am: AdapterModel, names: list[str]) -> None:
        raise ValueError(f"{self.peft_type} adapters cannot be merged into the base weights")

    def unmerge(self, am: AdapterModel) -> None:
        raise ValueError(f"{self.peft_type} adapters cannot be merged into the base weights")

    def unload(self, am: AdapterModel) -> nn.Module:
        """Remove every adapter of this type (merged weights stay merged); return the plain base model."""
        raise NotImplementedError
