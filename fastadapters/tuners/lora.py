"""LoRA as a drop-in layer: y = x W^T + b + sum over active adapters of s * dropout(x) A^T B^T.

`LoraLayer` mirrors PEFT's module tree so parameter paths (and saved keys) match PEFT's:

    <target>.base_layer               the original nn.Linear / transformers Conv1D (frozen)
    <target>.lora_A[<adapter>]        nn.Linear(K, r, bias=False)   weight (r, K)
    <target>.lora_B[<adapter>]        nn.Linear(r, N, bias=False)   weight (N, r)
    <target>.lora_dropout[<adapter>]  nn.Dropout(p) or nn.Identity (no parameters)
    <target>.scaling[<adapter>]       lora_alpha / r  (lora_alpha / sqrt(r) with rsLoRA)

The first active, unmerged adapter runs through `fastadapters.ops.lora_linear` together with the base GEMM (so a
fused kernel covers the whole layer); further active adapters add their deltas in plain torch. When the input,
base weight and adapter do not share one dtype (a bf16 model with fp32 adapters, PEFT's default), the layer casts
the way PEFT does: base output in the input's dtype, the LoRA branch in the adapter's dtype, the sum cast back to
the base output's dtype.

Merging is exact: the first merge keeps a copy of the original base weight; every merge recomputes
W = round(W_orig + sum of merged deltas, computed in fp32) and unmerge puts the copy back bit for bit. The copy
costs one extra weight per merged layer until unmerge / unload.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import LoraConfig
from ..targets import LORA_TARGETS, default_targets
from . import register
from .layers import PEFT_PREFIX, AdapterLayer, LayerMethod, is_conv1d

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..model import AdapterModel


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT's default (autocast_adapter_dtype=True): fp16/bf16 bases get fp32 adapters, others their own dtype."""
    if base_dtype in (torch.float16, torch.bfloat16) or not base_dtype.is_floating_point:
        return torch.float32
    return base_dtype


class LoraLayer(AdapterLayer):
    """One frozen linear layer (nn.Linear or transformers Conv1D) with any number of named LoRA adapters.

    x: (..., K) -> (..., N) with N, K the base layer's out/in features. Conv1D layers (GPT-2) store their weight
    (K, N); the layer reads it as (N, K) and merges the transposed delta (PEFT's fan_in_fan_out).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.training = base_layer.training  # a drop-in replacement keeps the train/eval mode of what it replaces
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.fan_in_fan_out = is_conv1d(base_layer)
        self._orig_weight: torch.Tensor | None = None  # the base weight before any merge (see module docstring)

    # PEFT's tuner layers expose the base layer's tensors; some model code reads `module.weight`.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def update_layer(self, name: str, config: AdapterConfig, module_name: str) -> None:
        """Create adapter `name`: A (r, K) kaiming-uniform(a=sqrt(5)), B (N, r) zero, so the output is unchanged.

        `init_lora_weights=False` leaves both at nn.Linear's random init (for tests); "gaussian" draws A ~ N(0, 1/r).
        """
        if not isinstance(config, LoraConfig):
            raise TypeError(f"LoraLayer needs a LoraConfig, got {type(config).__name__}")
        r = config.r
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r={r!r} for {module_name!r} must be a positive integer")
        if not 0.0 <= config.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={config.lora_dropout!r} is outside [0, 1)")
        init = config.init_lora_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init.lower() == "gaussian")):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported by fastadapters: use True, False or "
                "'gaussian' (PiSSA/OLoRA/LoftQ-style inits change the base weights)"
            )
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": _adapter_dtype(weight.dtype)}
        lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        if init is True:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
        elif isinstance(init, str):
            nn.init.normal_(lora_A.weight, std=1 / r)
            nn.init.zeros_(lora_B.weight)
        self.lora_A[name] = lora_A.train(self.training)
        self.lora_B[name] = lora_B.train(self.training)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)
        self.r[name] = r
        self.lora_alpha[name] = config.lora_alpha
        self.use_rslora[name] = config.use_rslora
        self.scaling[name] = config.lora_alpha / (math.sqrt(r) if config.use_rslora else r)

    # -- adapters
    def set_active(self, names: list[str]) -> None:
        """Make `names` the active adapters; a merged adapter that stops being active is unmerged."""
        super().set_active(names)
        if any(n not in self.active_adapters for n in self.merged_adapters):
            self._set_merged([n for n in self.merged_adapters if n in self.active_adapters])

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self._set_merged([n for n in self.merged_adapters if n != name])
        super().delete_adapter(name)
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            d.pop(name, None)

    def _dropout_p(self, name: str) -> float:
        drop = self.lora_dropout[name]
        return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0

    # -- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., K) -> (..., N): base output plus each active, unmerged adapter's s * dropout(x) A^T B^T."""
        names = [n for n in self.active_adapters if n not in self.merged_adapters and n in self.lora_A]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        first = names[0]
        A, B = self.lora_A[first].weight, self.lora_B[first].weight
        weight, bias = self.base_weight(), self.base_layer.bias
        same = x.dtype == weight.dtype == A.dtype and (bias is None or bias.dtype == x.dtype)
        if same and not args and not kwargs:
            # One op call for the base GEMM and the first adapter; further adapters add their delta.
            result = ops.lora_linear(
                x, weight, bias, A, B, self.scaling[first], dropout_p=self._dropout_p(first), training=self.training
            )
            for n in names[1:]:
                result = result + self._delta(n, x)
            return result
        # PEFT's cast: base in x's dtype, each LoRA branch in its adapter's dtype, the sum back to the base dtype.
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for n in names:
            result = result + self._delta(n, x.to(self.lora_A[n].weight.dtype))
        return result.to(out_dtype)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s * dropout(x) A^T B^T for adapter `name`; x: (..., K) in the adapter's dtype -> (..., N)."""
        h = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight)
        return F.linear(h, self.lora_B[name].weight) * self.scaling[name]

    # -- merging
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in fp32, laid out like the stored base weight: (N, K), or (K, N) for Conv1D."""
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        return delta.t() if self.fan_in_fan_out else delta

    def merge(self, names: list[str]) -> None:
        """Fold adapters `names` into the base weight (computed in fp32 from the original weight, then cast)."""
        new = [n for n in names if n not in self.merged_adapters]
        if new:
            self._set_merged(self.merged_adapters + new)

    def unmerge(self) -> None:
        """Restore the exact original base weight."""
        if self.merged_adapters:
            self._set_merged([])

    def _set_merged(self, names: list[str]) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            if not names:
                if self._orig_weight is not None:
                    w.copy_(self._orig_weight)
                self._orig_weight = None
            else:
                if self._orig_weight is None:
                    self._orig_weight = w.detach().clone()
                total = self._orig_weight.float()
                for n in names:
                    total = total + self.delta_weight(n).to(total.device)
                if not torch.isfinite(total).all():
                    raise ValueError(f"merging adapters {names} gives non-finite weights: an adapter holds NaN/inf")
                w.copy_(total.to(w.dtype))
        self.merged_adapters = list(names)


@register
class LoraMethod(LayerMethod):
    """LoRA on the linear layers named by `target_modules` (default: the family's attention projections)."""

    peft_type = "LORA"
    layer_cls = LoraLayer

    def default_targets(self, am: AdapterModel, config: AdapterConfig) -> list[str] | str:
        model_type = getattr(getattr(am.base_model, "config", None), "model_type", None)
        return default_targets(LORA_TARGETS, model_type, "LoRA")

    def add(self, am: AdapterModel, name: str, config: AdapterConfig) -> None:
        super().add(am, name, config)
        layers = [layer for _, layer in self.layers(am) if name in layer.adapter_names]
        conv = any(layer.fan_in_fan_out for layer in layers)
        if conv and not config.fan_in_fan_out:
            warnings.warn(
                "the LoRA targets include transformers Conv1D layers (weight stored (in, out)): "
                "setting fan_in_fan_out=True in the adapter config, as PEFT does",
                UserWarning,
                stacklevel=3,
            )
            config.fan_in_fan_out = True
        elif not conv and config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out=True but the LoRA targets are nn.Linear layers: setting it to False",
                UserWarning,
                stacklevel=3,
            )
            config.fan_in_fan_out = False

    # -- trainable biases (bias="all" | "lora_only"), as PEFT: they train and are saved with the adapter
    def _bias_params(self, am: AdapterModel, name: str) -> dict[str, nn.Parameter]:
        """model path -> base bias parameter that adapter `name`'s `bias` setting makes trainable."""
        bias = getattr(am.peft_config.get(name), "bias", "none")
        if bias == "all":
            return {n: p for n, p in am.base_model.named_parameters() if n == "bias" or n.endswith(".bias")}
        if bias == "lora_only":
            return {
                f"{path}.base_layer.bias": layer.base_layer.bias
                for path, layer in self.layers(am)
                if layer.base_layer.bias is not None
            }
        return {}

    def parameters(self, am: AdapterModel, name: str) -> Iterator[nn.Parameter]:
        """Adapter `name`'s lora_A / lora_B weights, plus the base biases its `bias` setting trains."""
        yield from super().parameters(am, name)
        yield from self._bias_params(am, name).values()

    def state_dict(self, am: AdapterModel, name: str) -> dict[str, torch.Tensor]:
        out = super().state_dict(am, name)
        for path, p in self._bias_params(am, name).items():
            out[PEFT_PREFIX + path] = p.detach()
        return out

    def load_extra(self, am: AdapterModel, key: str, tensor: torch.Tensor) -> None:
        """Base biases saved with bias="all" / "lora_only" (by us or PEFT) are copied into the base model."""
        path = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else None
        if path is None or not (path == "bias" or path.endswith(".bias")):
            super().load_extra(am, key, tensor)
            return
        try:
            p = am.base_model.get_parameter(path)
        except AttributeError:
            raise ValueError(
                f"the checkpoint has bias {key!r} but the model has no parameter {path!r}: "
                "was the adapter saved for another base model?"
            ) from None
        if p.shape != tensor.shape:
            raise ValueError(
                f"{key} has shape {tuple(tensor.shape)} in the checkpoint but the model expects "
                f"{tuple(p.shape)}: was the adapter saved for another base model?"
            )
        with torch.no_grad():
            p.copy_(tensor.to(dtype=p.dtype, device=p.device))

    def merge(self, am: AdapterModel, names: list[str]) -> None:
        inactive = [n for n in names if n not in am.active_adapters]
        if inactive:
            raise ValueError(
                f"adapters {inactive} are not active; only active adapters can be merged: "
                f"call set_adapter({names!r}) first"
            )
        super().merge(am, names)
