"""Prefix tuning: learned per-layer key/value prefixes that every token attends to.

Each attention layer l attends over [prefix_l ; tokens]: prefix_l holds num_virtual_tokens learned keys and values
per kv head. They come from PEFT's PrefixEncoder layout (facts from PEFT 0.21, not code):
  - without prefix_projection the parameters are the table itself, `embedding.weight` (P, num_layers*2*token_dim);
  - with prefix_projection, embedding (P, token_dim) -> Linear(token_dim, encoder_hidden_size) -> Tanh ->
    Linear(encoder_hidden_size, num_layers*2*token_dim) gives the table;
  - the table's row p is viewed as (num_layers*2, heads, head_dim); row 2l of the first axis is layer l's keys,
    2l+1 its values (prefix_hf.split_prefix_table);
  - token_dim / num_layers / num_attention_heads are filled from the model config as PEFT's
    `_prepare_prompt_learning_config` does; with num_key_value_heads (GQA) token_dim = head_dim * kv_heads and
    num_attention_heads = kv_heads, so the prefix has one key/value per kv head;
  - the prefix is a past cache in PEFT: it is not rotated by RoPE and the tokens' positions start at P (PEFT adds
    P to explicit position_ids; without them the model counts from its cache length, P);
  - saved weights: `prompt_embeddings` = the table (the projected table with prefix_projection: the MLP itself is
    not saved). A projected adapter loads back as its table (PEFT only loads it in inference mode).

How it enters the model: the attention implementation is switched to the registered prefix attention
(prefix_hf.ATTN_NAME) while the adapter is active, and a forward pre-hook on the base model computes the prefix once
per call, passes it down as a keyword argument and offsets the positions by P. So forward, generate (with its KV
cache: the cache holds only the tokens, the prefix is added by the attention), gradient checkpointing and direct
calls of `base_model` all see the prefix. Disabling restores the original attention implementation.

Deliberate differences from PEFT:
  - PEFT 0.21 drops the prefix in generate() on transformers >= 5.24 (it injects it under a renamed argument);
    here generate uses the prefix on every transformers version.
  - PEFT refuses gradient checkpointing for prefix tuning; here it works (non-reentrant, transformers' default).
  - loading a projected checkpoint with is_trainable=True turns the adapter into its table (PEFT raises).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from . import register
from .base import AdapterMethod
from .prefix_hf import (
    ATTN_NAME,
    STATE_KWARG,
    PrefixState,
    split_prefix_table,
    supported_families,
    uses_attention_interface,
)
from .prefix_hf import register as register_attention

if TYPE_CHECKING:
    from ..config import AdapterConfig, PrefixTuningConfig
    from ..model import AdapterModel

# Families whose forward numbers positions from the attention mask (PEFT's mask carries P ones for the prefix).
MASK_POSITION_FAMILIES = frozenset({"opt"})



def _own_configs(model: nn.Module) -> None:
    """Give `model` private copies of the config objects its modules share with the caller.

    transformers models keep a reference to the config they were built from, and the attention implementation is
    a field of it: switching it on a shared config would switch every other model built from that config object
    (they would call the prefix attention without a prefix). Copied once per model (one deepcopy memo, so configs
    nested in one another stay nested); later activations reuse the copies.
    """
    if getattr(model, "_fastadapters_own_config", False):
        return
    memo: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            m.config = copy.deepcopy(cfg, memo)
    model._fastadapters_own_config = True

class PrefixEncoder(nn.Module):
    """PEFT's PrefixEncoder: the prefix table (P, num_layers * 2 * token_dim) from learned parameters.

    prefix_projection=False: `embedding.weight` (P, num_layers*2*token_dim) is the table.
    prefix_projection=True: `embedding.weight` (P, token_dim) -> `transform` = Linear(token_dim, encoder_hidden_size),
    Tanh, Linear(encoder_hidden_size, num_layers*2*token_dim). Parameter names match PEFT's, initialisation is
    PEFT's default (nn.Embedding / nn.Linear defaults).
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_layers: int, encoder_hidden_size: int,
                 prefix_projection: bool, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.prefix_projection = prefix_projection
        self.num_virtual_tokens = num_virtual_tokens
        self.out_dim = num_layers * 2 * token_dim
        kw = dict(dtype=dtype, device=device)
        if prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **kw)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, encoder_hidden_size, **kw),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, self.out_dim, **kw),
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, self.out_dim, **kw)

    def forward(self) -> torch.Tensor:
        """The prefix table: (P, num_layers * 2 * token_dim)."""
        weight = self.embedding.weight
        return self.transform(weight) if self.prefix_projection else weight


def fill_prefix_config(config: PrefixTuningConfig, model_config: Any) -> PrefixTuningConfig:
    """Fill num_layers / token_dim / num_attention_heads / encoder_hidden_size from the model config with PEFT
    0.21's rules (its `_prepare_prompt_learning_config`), so PEFT's prefix tables map 1:1. Mutates, returns config."""
    d = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    d = d.get("text_config") or d

    def first(keys: tuple[str, ...], what: str) -> Any:
        for k in keys:
            if k in d:
                return d[k]
        raise ValueError(f"cannot read {what} from the model config (none of {keys}): set {what} in "
                         "PrefixTuningConfig")

    if config.num_layers is None:
        if hasattr(model_config, "num_hidden_layers"):
            config.num_layers = model_config.num_hidden_layers
        else:
            config.num_layers = first(("num_hidden_layers", "num_layers", "n_layer"), "num_layers")
    if config.token_dim is None:
        config.token_dim = first(("hidden_size", "n_embd", "d_model"), "token_dim")
    if config.num_attention_heads is None:
        config.num_attention_heads = first(("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
                                           "num_attention_heads")
    if "num_key_value_heads" in d:  # GQA: one prefix per kv head (PEFT #1901)
        if d.get("global_head_dim") is not None:
            head_dim = d["global_head_dim"]
            kv_heads = d.get("num_global_key_value_heads") or d["num_key_value_heads"]
        elif d.get("per_layer_config") is not None:
            base_dim = d.get("head_dim", config.token_dim // config.num_attention_heads)
            head_dim, kv_heads = base_dim, d["num_key_value_heads"]
            for layer_cfg in d["per_layer_config"].values():
                if layer_cfg.get("head_dim", base_dim) > head_dim:
                    head_dim = layer_cfg.get("head_dim", base_dim)
                    kv_heads = layer_cfg.get("num_key_value_heads", d["num_key_value_heads"])
        elif d.get("head_dim") is not None:
            head_dim, kv_heads = d["head_dim"], d["num_key_value_heads"]
        else:
            head_dim, kv_heads = config.token_dim // config.num_attention_heads, d["num_key_value_heads"]
        config.token_dim = head_dim * kv_heads
        config.num_attention_heads = kv_heads
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return config


@register
class PrefixTuningMethod(AdapterMethod):
    """Prefix tuning through a registered transformers attention function (see the module docstring)."""

    peft_type = "PREFIX_TUNING"

    def __init__(self) -> None:
        self._active: str | None = None
        self._saved_attn: list[tuple[Any, Any]] | None = None  # (config, its _attn_implementation) to restore
        self._hooks: list[Any] = []
        self._signature: inspect.Signature | None = None

    # -- lifecycle
    def add(self, am: AdapterModel, name: str, config: AdapterConfig) -> None:
        model = am.base_model
        model_config = getattr(model, "config", None)
        if model_config is None:
            raise TypeError(f"prefix tuning needs a transformers model; {type(model).__name__} has no .config")
        if getattr(model_config, "is_encoder_decoder", False) or (config.num_transformer_submodules or 1) != 1:
            raise NotImplementedError("prefix tuning here supports decoder-only causal LMs (num_transformer_submodules"
                                      f"=1); {type(model).__name__} is an encoder-decoder model")
        if not uses_attention_interface(model):
            raise ValueError(
                f"prefix tuning needs a model whose attention goes through transformers' AttentionInterface; "
                f"{type(model).__name__} (model_type={getattr(model_config, 'model_type', None)!r}) does not in the "
                f"installed transformers. Supported families here: {', '.join(supported_families())} "
                "(or use LoRA / bottleneck adapters with this model)"
            )
        register_attention()
        fill_prefix_config(config, model_config)
        if config.token_dim % config.num_attention_heads:
            raise ValueError(f"token_dim={config.token_dim} is not a multiple of num_attention_heads="
                             f"{config.num_attention_heads}: fix them in PrefixTuningConfig")
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        dtype = param.dtype if param is not None and param.dtype in (torch.float32, torch.float64) else torch.float32
        table_only = config.inference_mode  # PEFT's inference mode keeps only the (projected) table
        am.prompt_encoder[name] = self._new_encoder(config, projection=config.prefix_projection and not table_only,
                                                    dtype=dtype, device=device)
        if not self._hooks:
            self._hooks = [
                model.register_forward_pre_hook(self._make_pre_hook(am), with_kwargs=True),
                model.register_forward_hook(self._post_hook, with_kwargs=True),
            ]

    @staticmethod
    def _new_encoder(config: PrefixTuningConfig, projection: bool, dtype: torch.dtype | None,
                     device: torch.device | None) -> PrefixEncoder:
        return PrefixEncoder(config.num_virtual_tokens, config.token_dim, config.num_layers,
                             config.encoder_hidden_size, projection, dtype=dtype, device=device)

    def delete(self, am: AdapterModel, name: str) -> None:
        if self._active == name:
            self._deactivate(am)
        if name in am.prompt_encoder:
            del am.prompt_encoder[name]
        if not any(n in am.prompt_encoder for n in self._names(am, exclude=name)):
            self._remove_hooks()

    def set_active(self, am: AdapterModel, names: list[str]) -> None:
        mine = [n for n in names if n in am.prompt_encoder and self._is_mine(am, n)]
        if len(mine) > 1:
            raise ValueError(f"only one prefix-tuning adapter can be active at a time, got {mine}")
        if not mine:
            self._deactivate(am)
            return
        self._activate(am)
        self._active = mine[0]

    def unload(self, am: AdapterModel) -> nn.Module:
        self._deactivate(am)
        self._remove_hooks()
        for n in self._names(am):
            if n in am.prompt_encoder:
                del am.prompt_encoder[n]
        return am.base_model

    def parameters(self, am: AdapterModel, name: str) -> Iterator[nn.Parameter]:
        yield from am.prompt_encoder[name].parameters()

    def unmerge(self, am: AdapterModel) -> None:
        """Nothing is ever merged (merge raises), so there is nothing to undo."""

    # -- checkpoints (PEFT format)
    def state_dict(self, am: AdapterModel, name: str) -> dict[str, torch.Tensor]:
        """{"prompt_embeddings": (P, num_layers*2*token_dim)}: the (projected) prefix table, as PEFT saves it."""
        with torch.no_grad():
            table = am.prompt_encoder[name]()
        return {"prompt_embeddings": table.detach().clone()}

    def load_state_dict(self, am: AdapterModel, name: str, state: dict[str, torch.Tensor]) -> None:
        config = am.peft_config[name]
        if "prompt_embeddings" not in state:
            raise ValueError(f"the checkpoint for prefix adapter {name!r} has no 'prompt_embeddings' tensor (it holds "
                             f"{sorted(state)}): is it a PREFIX_TUNING checkpoint?")
        extra = sorted(k for k in state if k != "prompt_embeddings")
        if extra:
            raise ValueError(f"the checkpoint for prefix adapter {name!r} has unexpected tensors {extra}; a "
                             "PREFIX_TUNING checkpoint holds only 'prompt_embeddings'")
        table = state["prompt_embeddings"]
        expected = (config.num_virtual_tokens, config.num_layers * 2 * config.token_dim)
        if tuple(table.shape) != expected:
            raise ValueError(
                f"prompt_embeddings has shape {tuple(table.shape)} in the checkpoint but adapter {name!r} expects "
                f"(num_virtual_tokens, num_layers*2*token_dim) = {expected}: was it saved for another base model or "
                "another num_virtual_tokens?"
            )
        encoder = am.prompt_encoder[name]
        if encoder.prefix_projection:  # only the projected table is saved: it becomes the parameter
            if not config.inference_mode:
                warnings.warn(f"prefix adapter {name!r} uses prefix_projection, whose checkpoint holds only the "
                              "projected prefix table: it continues training as that table (the MLP is dropped)",
                              UserWarning, stacklevel=3)
            w = encoder.embedding.weight
            encoder = self._new_encoder(config, projection=False, dtype=w.dtype, device=w.device)
            encoder.requires_grad_(not config.inference_mode)
            am.prompt_encoder[name] = encoder
        with torch.no_grad():
            encoder.embedding.weight.copy_(table.to(encoder.embedding.weight))

    # -- the attention implementation
    def _activate(self, am: AdapterModel) -> None:
        model = am.base_model
        if self._saved_attn is not None:
            return
        _own_configs(model)
        saved, seen = [], set()
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation_internal") and id(cfg) not in seen:
                seen.add(id(cfg))
                saved.append((cfg, cfg._attn_implementation_internal))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.set_attn_implementation(ATTN_NAME)
        self._saved_attn = saved
        if model.config._attn_implementation != ATTN_NAME:
            self._deactivate(am)
            raise ValueError(f"{type(model).__name__} refused the prefix attention implementation; supported "
                             f"families: {', '.join(supported_families())}")

    def _deactivate(self, am: AdapterModel) -> None:
        self._active = None
        if self._saved_attn is None:
            return
        for cfg, impl in self._saved_attn:
            cfg._attn_implementation_internal = impl
        self._saved_attn = None

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _names(self, am: AdapterModel, exclude: str | None = None) -> list[str]:
        return [n for n in am.peft_config if n != exclude and self._is_mine(am, n)]

    def _is_mine(self, am: AdapterModel, name: str) -> bool:
        return getattr(am.peft_config.get(name), "peft_type", None) == self.peft_type

    # -- per-call state
    def prefix_state(self, am: AdapterModel, name: str, dtype: torch.dtype | None = None) -> PrefixState:
        """The prefix of adapter `name` for one forward: per layer (Hkv, P, D) keys and values."""
        config = am.peft_config[name]
        table = am.prompt_encoder[name]()
        if dtype is not None and table.dtype != dtype:
            table = table.to(dtype)  # PEFT casts the prefix to the base model's dtype
        keys, values = split_prefix_table(table, config.num_layers, config.num_attention_heads)
        return PrefixState(keys, values, config.num_virtual_tokens)

    def _make_pre_hook(self, am: AdapterModel) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            name = self._active
            if name is None or STATE_KWARG in kwargs:
                return None
            if module.training and torch.is_grad_enabled():
                _check_checkpointing(module)
            if self._signature is None:
                self._signature = inspect.signature(module.forward)
            kwargs = {**self._signature.bind_partial(*args).arguments, **kwargs}
            model_dtype = getattr(module, "dtype", None)
            state = self.prefix_state(am, name, dtype=model_dtype)
            P = state.num_virtual_tokens
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + P  # as PEFT: explicit positions shift by P
            elif "position_ids" in self._signature.parameters:
                kwargs["position_ids"] = _default_positions(module, kwargs, P)
            kwargs[STATE_KWARG] = state
            return (), kwargs

        return hook

    @staticmethod
    def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = kwargs.get(STATE_KWARG)
        if isinstance(state, PrefixState) and not state.applied:
            raise RuntimeError(
                f"the prefix was not applied: no attention layer of {type(module).__name__} called the prefix "
                "attention; this model's attention bypasses transformers' AttentionInterface. Supported families: "
                f"{', '.join(supported_families())}"
            )


def _default_positions(model: nn.Module, kwargs: dict, P: int) -> torch.Tensor:
    """The positions PEFT's run gives the tokens when the caller passes none: the model counts from its cache
    length, which with PEFT includes the P prefix slots; mask-numbered families (OPT) count the mask's P ones."""
    ref = kwargs.get("input_ids")
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    if ref is None:
        raise ValueError("pass input_ids or inputs_embeds")
    B, L = ref.shape[0], ref.shape[1]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = 0
    if cache is not None and hasattr(cache, "get_seq_length"):
        past = int(cache.get_seq_length())
    device = ref.device
    if getattr(model.config, "model_type", None) in MASK_POSITION_FAMILIES:
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            mask = torch.ones(B, past + L, dtype=torch.long, device=device)
        full = torch.cat([torch.ones(B, P, dtype=torch.long, device=device), mask.to(device).long()], dim=1)
        return (torch.cumsum(full, dim=1) * full - 1)[:, P + past:]
    return (torch.arange(L, device=device) + (P + past)).unsqueeze(0)


def _check_checkpointing(model: nn.Module) -> None:
    """Reentrant checkpointing only gives gradients to positional tensor inputs: the prefix would get none."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            func = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(func, "keywords", {}).get("use_reentrant", False):
                raise ValueError(
                    "gradient checkpointing with use_reentrant=True gives the prefix no gradient: call "
                    "gradient_checkpointing_enable() without use_reentrant (transformers' default is False)"
                )
            return


with contextlib.suppress(Exception):  # register at import so a model whose config names it can be built
    register_attention()
