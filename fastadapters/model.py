"""AdapterModel: a transformers model with named adapters, PEFT's API and on-disk format."""

from __future__ import annotations

import contextlib
import inspect
import os
import types
from collections import OrderedDict
from collections.abc import Iterator, Mapping
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


_FORWARD_FUNCTIONS: dict[Any, types.FunctionType] = {}


def _forward_with_signature(base_forward: Any) -> types.FunctionType:
    """AdapterModel._forward as a function whose inspect.signature is `base_forward`'s (plus adapter_names), one per
    base model class. transformers' Trainer keeps only the dataset columns that the forward signature names, and
    TRL reads it too: they must see input_ids, labels, ... and not (*args, **kwargs)."""
    key = getattr(base_forward, "__func__", base_forward)
    fn = _FORWARD_FUNCTIONS.get(key)
    if fn is None:
        src = AdapterModel._forward
        fn = types.FunctionType(src.__code__, src.__globals__, "forward", src.__defaults__, src.__closure__)
        fn.__qualname__, fn.__doc__, fn.__module__ = "AdapterModel.forward", src.__doc__, src.__module__
        try:  # the class's function: drop its `self`
            params = list(inspect.signature(base_forward).parameters.values())[1:]
        except (TypeError, ValueError):
            params = list(inspect.signature(src).parameters.values())[1:]
        if fn.__dict__.get("__signature__") is not None:
            del fn.__signature__
        names = {p.name for p in params}
        if "adapter_names" not in names:
            extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
            at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                params.insert(at, extra)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        fn.__signature__ = inspect.Signature([self_param, *params])
        _FORWARD_FUNCTIONS[key] = fn
    return fn


def _is_causal_lm_patch(value: Any, obj: Any) -> bool:
    """Whether `value`, assigned to `obj.forward`, is a forward patch written for a transformers causal LM (it uses
    `self.base_model` as the backbone): TRL's fused LM head, which SFTTrainer and DPOTrainer install on the model they
    train (on `get_base_model()` for a PeftModel)."""
    func = getattr(value, "__func__", None)
    return (getattr(value, "__self__", None) is obj and func is not None
            and str(getattr(func, "__globals__", {}).get("__name__", "")).startswith("trl."))


class _BaseSignatureForward:
    """`AdapterModel.forward`: bound to an instance it is an ordinary bound method (accelerate and torch.compile
    wrap it as usual) whose signature is the wrapped model's forward signature.

    Assigning `model.forward = ...` works as on any module (accelerate's autocast wrapper does it), with one
    exception: a patch written for a transformers causal LM (TRL's fused LM head, see _is_causal_lm_patch) is
    installed on the wrapped model, where `self.base_model` is the backbone and the adapters still run, as TRL does
    for a PeftModel."""

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return AdapterModel._forward
        patched = obj.__dict__.get("forward")
        if patched is not None:
            return patched
        base = obj.__dict__.get("_modules", {}).get("base_model")
        if base is None:
            return types.MethodType(AdapterModel._forward, obj)
        return types.MethodType(_forward_with_signature(type(base).forward), obj)

    def __set__(self, obj: Any, value: Any) -> None:
        if _is_causal_lm_patch(value, obj):
            base = obj.base_model
            base.forward = types.MethodType(value.__func__, base)
            return
        obj.__dict__["forward"] = value

    def __delete__(self, obj: Any) -> None:
        if obj.__dict__.pop("forward", None) is None:
            raise AttributeError("forward")


class AdapterModel(nn.Module):
    """A transformers model carrying one or more named adapters; only adapter parameters train.

    `base_model` is the wrapped transformers model; `peft_config` maps adapter names to configs.
    """

    # transformers' marker for "trainable adapters are attached to this model": its Trainer refuses to train a
    # quantized (QLoRA) base without it. Read by transformers, never set on transformers' objects.
    _hf_peft_config_loaded = True

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

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward with the active adapters (same arguments and outputs); `adapter_names=`
        (LoRA) picks one adapter per sequence."""
        base = self.base_model
        patched = "forward" in base.__dict__
        if patched and self.__dict__.get("_in_forward"):
            # a causal-LM patch on the wrapped model (see _BaseSignatureForward) calls the forward it replaced, which
            # is ours: the adapters already ran on the way in, continue into the wrapped model's own forward
            return type(base).forward(base, *args, **kwargs)
        method = self._call_method(kwargs)
        if not patched:
            return base(*args, **kwargs) if method is None else method.forward(self, *args, **kwargs)
        self.__dict__["_in_forward"] = True
        try:
            if method is None:
                return base(*args, **kwargs)
            return method.forward(self, *args, **kwargs)
        finally:
            self.__dict__["_in_forward"] = False

    # What inspect.signature(AdapterModel.forward) shows at class level (transformers' find_labels reads the class
    # to find the label columns, as for PEFT's PeftModelForCausalLM.forward); instances show the wrapped model's.
    _forward.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *(inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
          for n in ("input_ids", "attention_mask", "inputs_embeds", "labels")),
        inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ])
    forward = _BaseSignatureForward()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        method = self._call_method(kwargs)
        if method is None:
            return self.base_model.generate(*args, **kwargs)
        return method.generate(self, *args, **kwargs)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute activations in backward, with transformers' arguments (`every_n_layers` and `offload` as
        transformers >= 5.24 takes them; Trainer passes both). Inputs get requires_grad so that reentrant
        checkpointing reaches the adapters."""
        # transformers >= 5.24's default, made explicit: passing {} would leave torch's checkpoint without
        # use_reentrant (a deprecation warning, an error in later torch)
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        extra: dict[str, Any] = {}
        if every_n_layers != 1:
            extra["every_n_layers"] = every_n_layers
        if offload:
            extra["offload"] = offload
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs, **extra)
        else:  # transformers before the rename
            if extra:
                raise TypeError(f"this transformers version has no every_n_layers/offload ({sorted(extra)})")
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"] and hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """The older name of activation_checkpointing_enable (same arguments)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        disable = getattr(self.base_model, "activation_checkpointing_disable", None)
        (disable or self.base_model.gradient_checkpointing_disable)()

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

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
        """Remove every adapter without merging; return the plain transformers model (any adapter type)."""
        for m in self._methods.values():
            if type(m).unmerge is not AdapterMethod.unmerge:  # methods that cannot merge have nothing to undo
                m.unmerge(self)
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

    # -- nn.Module state: the adapters (what trains), not the frozen base
    def _state_names(self) -> set[str]:
        """Parameter paths that make up this model's state: every adapter's parameters and anything else that
        trains. The frozen base model is not state: it comes from its own checkpoint."""
        ids = {id(p) for p in self.adapter_parameters()}
        return {n for n, p in self.named_parameters() if id(p) in ids or p.requires_grad}

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The adapter tensors only (every adapter, plus any other trainable parameter), under their module paths.

        This is what transformers' Trainer, accelerate, TRL and FSDP save and load for a model that is not a
        PreTrainedModel, so their checkpoints hold the adapter (megabytes), not a copy of the base model.
        `model.base_model.state_dict()` gives the whole model; save_pretrained writes PEFT's layout."""
        if args:  # nn.Module's deprecated positional form (destination, prefix, keep_vars)
            destination, prefix, keep_vars = (list(args) + [destination, prefix, keep_vars][len(args):])[:3]
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + n for n in self._state_names()}
        out = destination if destination is not None else OrderedDict()
        for k, v in full.items():
            if k in keep:
                out[k] = v
        if hasattr(full, "_metadata") and not hasattr(out, "_metadata"):
            out._metadata = full._metadata  # type: ignore[attr-defined]
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load what state_dict() returns (adapter tensors; base tensors too when present). strict: every adapter
        tensor must be there and nothing unknown; the frozen base may be absent."""
        from torch.nn.modules.module import _IncompatibleKeys

        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        needed = self._state_names()
        missing = [k for k in result.missing_keys if k in needed]
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(f"error loading the adapter state of {type(self).__name__}: missing {missing}, "
                               f"unexpected {unexpected}; was it saved from a model with the same adapters?")
        return _IncompatibleKeys(missing, unexpected)

    # -- checkpoints
    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """Adapter `adapter_name`'s tensors under PEFT's saved key names (sharded DTensors are gathered: under
        FSDP call this on every process)."""
        state = self._method(adapter_name).state_dict(self, adapter_name)
        return {k: _full_tensor(v) for k, v in state.items()}

    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
        is_main_process: bool = True, **_: Any
    ) -> None:
        """Write adapter_config.json + adapter_model.safetensors per adapter ("default" at the top, others in
        sub-folders named after them, as PEFT does). Each file is written atomically.

        Sharded (FSDP2) adapters: call it on every process with is_main_process=(rank == 0), as with
        transformers' save_pretrained; the tensors are gathered and only the main process writes. Other keyword
        arguments transformers passes (state_dict, safe_serialization, ...) are accepted and ignored: the adapter
        tensors are read from the model."""
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a folder path")
        for name in selected_adapters or list(self.peft_config):
            tensors = self.adapter_state_dict(name)
            if not is_main_process:
                continue
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(directory, exist_ok=True)
            save_weights(tensors, directory)
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


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered to a plain tensor (a collective: every process must call it); others as is."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def get_adapter_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdapterModel:
    """Inject adapter `adapter_name` into a transformers model; the base is frozen, the adapter trains."""
    return AdapterModel(model, config, adapter_name)
