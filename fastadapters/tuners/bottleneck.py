"""Bottleneck adapters of LLM-Adapters: AdapterH (series), AdapterP (series after the MLP) and parallel adapters.

Each adapter is f(z) = s * up(act(down(dropout(z)))) with down: (b, d_in), up: (d_out, b), no biases, and sits
around one linear layer y = W x + c (nn.Linear, or transformers' Conv1D for GPT-2) in one of three places:

    before   (LLM-Adapters' "mh_adapter", MLP input projections)   y = W (x + f(x)) + c            d_in = d_out = K
    after    (LLM-Adapters' "output_adapter", MLP output proj.)    z = W x + c;  y = z + f(z)      d_in = d_out = N
    parallel (use_parallel_adapter=True, any linear layer)          y = W x + c + f(x)              d_in = K, d_out = N

The series placement of a module comes from the last component of its name (targets.SERIES_PLACEMENT: gate/up/
fc_in/fc1/c_fc/dense_h_to_4h before, down/fc_out/fc2/c_proj/dense_4h_to_h after); use_adapterp=True puts the
adapter after every targeted layer (AdapterP: after the MLP output, targets.ADAPTERP_TARGETS by default).
All adapter math runs through fastadapters.ops.bottleneck_adapter (fp32 inside, result in the input's dtype).

Matches LLM-Adapters' peft/tuners/bottleneck.py (facts, not code):
  - adapter_down / adapter_up are bias-free linears; saved keys are
    base_model.model.<module path>.adapter_down.weight / .adapter_up.weight (+ .adapter_scaling when learned),
    exactly the keys LLM-Adapters' checkpoints hold, so those load here too.
  - scaling="learned" is a trainable (1,)-shaped parameter `adapter_scaling` initialised to 1.0.
  - init "bert": both weights N(0, 0.02); init "zero" (upstream "mam_adapter"): down kaiming-uniform(a=sqrt(5))
    (nn.Linear's default), up zero, so the model's output is unchanged at step 0.
Deliberate differences (upstream bugs or gaps):
  - upstream only accepts a float scaling (`isinstance(scaling, float)`): an int such as 1 left adapter_scaling
    unset and crashed in forward. Any real number is accepted here.
  - upstream runs the adapter in the base dtype (fp16 for half models) except on its 8-bit path; here it always
    runs in fp32, and its weights are kept in fp32 on fp16/bf16 models (as PEFT's autocast_adapter_dtype does).
  - upstream's mapping fails with a bare KeyError for a model type or module it has no placement for; here a
    ValueError says what to name instead. Every target is checked (linear layer, known placement) before any
    module is wrapped, so a bad target leaves the model untouched.
  - upstream cannot hold several adapters on one layer; here several named adapters can be active together:
    series-before adapters run in order on the input, then the layer, then parallel adapters (each on the
    layer's input), then series-after adapters in order.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .. import ops
from ..config import BottleneckConfig
from ..targets import (
    ADAPTERP_TARGETS,
    PARALLEL_TARGETS,
    SERIES_PLACEMENT,
    SERIES_TARGETS,
    default_targets,
    find_targets,
)
from . import register
from .layers import AdapterLayer, LayerMethod

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..model import AdapterModel

PLACEMENTS = ("before", "after", "parallel")
_BEFORE = sorted(k for k, v in SERIES_PLACEMENT.items() if v == "before")
_AFTER = sorted(k for k, v in SERIES_PLACEMENT.items() if v == "after")


def placement_for(module_name: str, config: BottleneckConfig) -> str | None:
    """Where the adapter of `config` sits on the module called `module_name`: "before", "after", "parallel",
    or None when a series adapter has no defined place there."""
    if config.use_parallel_adapter:
        return "parallel"
    if config.use_adapterp:
        return "after"
    return SERIES_PLACEMENT.get(module_name.rsplit(".", 1)[-1])


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp32 adapter weights on half-precision bases (the op computes in fp32 anyway), else the base dtype."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class BottleneckLayer(AdapterLayer):
    """A linear layer (`base_layer`) with named bottleneck adapters before, after or beside it.

    Per adapter `name`: adapter_down[name] (Linear d_in -> b, no bias), adapter_up[name] (Linear b -> d_out, no
    bias), adapter_scaling[name] ((1,) parameter) when scaling is "learned", else a float in `scaling[name]`.
    forward(x: (..., K)) -> (..., N), like the base layer.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_scaling = nn.ParameterDict()
        self.placement: dict[str, str] = {}
        self.non_linearity: dict[str, str] = {}
        self.dropout_p: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.train(base_layer.training)  # a fresh nn.Module is in training mode; follow the (often eval) model

    def update_layer(self, name: str, config: AdapterConfig, module_name: str) -> None:
        """Create adapter `name` as `config` says, placed by `module_name` (see placement_for)."""
        assert isinstance(config, BottleneckConfig)
        placement = placement_for(module_name, config)
        if placement is None:
            raise ValueError(_series_error(module_name))
        d_in, d_out = {"before": (self.in_features, self.in_features),
                       "after": (self.out_features, self.out_features),
                       "parallel": (self.in_features, self.out_features)}[placement]
        weight = self.base_weight()
        kw = dict(bias=False, device=weight.device, dtype=_adapter_dtype(weight))
        down = nn.Linear(d_in, config.bottleneck_size, **kw)
        up = nn.Linear(config.bottleneck_size, d_out, **kw)
        with torch.no_grad():
            if config.init_weights == "bert":
                nn.init.normal_(down.weight, mean=0.0, std=0.02)
                nn.init.normal_(up.weight, mean=0.0, std=0.02)
            else:  # "zero" (LLM-Adapters' "mam_adapter"): the adapter adds exactly 0 at step 0
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(up.weight)
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        if config.scaling == "learned":
            self.adapter_scaling[name] = nn.Parameter(torch.ones(1, device=weight.device, dtype=torch.float32))
        else:
            self.scaling[name] = float(config.scaling)
        self.placement[name] = placement
        self.non_linearity[name] = config.non_linearity
        self.dropout_p[name] = float(config.adapter_dropout)
        self.train(self.training)  # the new adapter's modules follow this layer's train/eval mode

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for d in (self.placement, self.non_linearity, self.dropout_p, self.scaling):
            d.pop(name, None)

    def _adapt(self, name: str, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        scaling = self.adapter_scaling[name] if name in self.adapter_scaling else self.scaling[name]
        return ops.bottleneck_adapter(
            h, self.adapter_down[name].weight, self.adapter_up[name].weight,
            activation=self.non_linearity[name], scaling=scaling, residual=residual,
            dropout_p=self.dropout_p[name], training=self.training,
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., K) -> (..., N): series-before adapters, the base layer, parallel adapters, series-after."""
        if not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        h = x
        for name in self.active_adapters:
            if self.placement[name] == "before":
                h = self._adapt(name, h)
        y = self.base_layer(h, *args, **kwargs)
        for name in self.active_adapters:
            if self.placement[name] == "parallel":
                # the op returns h's dtype and wants the residual in it; under autocast the layer's output may
                # differ from its input (bf16 vs fp32), so convert both ways (no-ops otherwise).
                y = self._adapt(name, x, residual=y.to(x.dtype)).to(y.dtype)
        for name in self.active_adapters:
            if self.placement[name] == "after":
                y = self._adapt(name, y)
        return y

    def merge(self, names: list[str]) -> None:
        if names:
            raise ValueError(_MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing is ever merged: a no-op, so AdapterModel.unload() works."""

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {self.placement[n]}" for n in self.adapter_names if n in self.placement)


_MERGE_ERROR = ("bottleneck adapters cannot be merged into the base weights: up(act(down(x))) is nonlinear, so no "
                "weight matrix equals it. Keep the AdapterModel for inference, or call model.unload() to drop the "
                "adapters and get the original transformers model back")


def _series_error(module_name: str) -> str:
    return (f"series bottleneck adapters go before an MLP input projection ({', '.join(_BEFORE)}) or after an MLP "
            f"output projection ({', '.join(_AFTER)}), but target {module_name!r} is neither: use "
            "use_parallel_adapter=True to put a parallel adapter beside any linear layer (e.g. attention "
            "projections), use_adapterp=True for a series adapter after it, or name MLP projections in "
            "target_modules")


@register
class BottleneckMethod(LayerMethod):
    """BOTTLENECK adapters: wraps each target linear layer in a BottleneckLayer."""

    peft_type = "BOTTLENECK"
    layer_cls = BottleneckLayer

    def default_targets(self, am: AdapterModel, config: AdapterConfig) -> list[str] | str:
        assert isinstance(config, BottleneckConfig)
        model_type = getattr(getattr(am.base_model, "config", None), "model_type", None)
        if config.use_parallel_adapter:
            return default_targets(PARALLEL_TARGETS, model_type, "parallel bottleneck adapters")
        if config.use_adapterp:
            return default_targets(ADAPTERP_TARGETS, model_type, "AdapterP (use_adapterp=True)")
        return default_targets(SERIES_TARGETS, model_type, "series bottleneck adapters")

    def check_module(self, module_name: str, module: nn.Module, config: AdapterConfig) -> None:
        super().check_module(module_name, module, config)
        assert isinstance(config, BottleneckConfig)
        if placement_for(module_name, config) is None:
            raise ValueError(_series_error(module_name))

    def add(self, am: AdapterModel, name: str, config: AdapterConfig) -> None:
        """Check every target before wrapping any, so a bad target leaves the model untouched."""
        if not isinstance(config, BottleneckConfig):
            raise TypeError(f"BottleneckMethod needs a BottleneckConfig, got {type(config).__name__}")
        targets = config.target_modules or self.default_targets(am, config)
        names = [n for n in find_targets(am.base_model, targets) if ".base_layer" not in n]
        names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]  # as LayerMethod.add
        for module_name in names:
            module = am.base_model.get_submodule(module_name)
            self.check_module(module_name, module.base_layer if isinstance(module, AdapterLayer) else module, config)
        super().add(am, name, config)

    def merge(self, am: AdapterModel, names: list[str]) -> None:
        raise ValueError(_MERGE_ERROR)

    def unmerge(self, am: AdapterModel) -> None:
        """Nothing is ever merged."""

