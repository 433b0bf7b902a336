"""Prefix attention inside transformers: a registered attention function and its mask function.

transformers picks both from `config._attn_implementation`: the model's attention layers call
`ALL_ATTENTION_FUNCTIONS[impl](module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)` and
`create_causal_mask` calls `ALL_MASK_ATTENTION_FUNCTIONS[impl](...)` once per forward to build `attention_mask`.
Registering both under ATTN_NAME and switching a model's implementation to it routes every attention layer of that
model through `fa.ops.prefix_attention`; switching back restores the model exactly.

The prefix reaches the attention function through the forward's keyword arguments: transformers passes unknown
keyword arguments of the top-level forward down to every attention call (the `TransformersKwargs` path that carries
flash-attention's varlen arguments). PrefixTuningMethod's forward pre-hook computes the prefix keys/values once per
forward and adds them as `STATE_KWARG`, so the state is per call (thread-safe, several models at once) and is
captured by gradient checkpointing's recomputation like any other layer argument.

The mask function returns what the attention needs: the (B, Lk) key padding mask (True = real token), or None when
nothing is padded, as flash attention's mask function does. With a KV cache Lq < Lk and the queries are the last Lq
positions (bottom-right causal alignment, which is `fa.ops.prefix_attention`'s convention). With a static cache
(keys allocated to max_cache_len) the mask is shorter than the keys and the attention reads only the filled part.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_NAME = "fastadapters_prefix"
STATE_KWARG = "fastadapters_prefix_state"
# Families checked against transformers; the error for an unsupported model lists those that work in the
# installed version (found by the same source check transformers uses).
KNOWN_FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gptj", "gpt_neox", "opt", "bloom")


@dataclasses.dataclass(eq=False)
class PrefixState:
    """The prefix of one forward call.

    keys, values: one (Hkv, P, D) tensor per layer (index = the attention module's `layer_idx`), in the model's
    dtype, still attached to the prefix encoder's autograd graph. `applied` collects the layer indices whose
    attention used them (a check that the model's attention really goes through the registered function).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    num_virtual_tokens: int
    applied: set[int] = dataclasses.field(default_factory=set)


def split_prefix_table(
    table: torch.Tensor, num_layers: int, num_heads: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """PEFT's layout of the prefix table: per-layer keys and values.

    table: (P, num_layers * 2 * num_heads * D), one row per virtual token. PEFT views each row as
    (num_layers * 2, num_heads, D) and, after permuting to (num_layers * 2, heads, P, D), splits it into pairs:
    row 2*l is layer l's keys, row 2*l + 1 its values. Returns (keys, values), lists of num_layers (heads, P, D).
    """
    P, width = table.shape
    if width % (num_layers * 2 * num_heads):
        raise ValueError(f"the prefix table has {width} columns, not a multiple of num_layers * 2 * num_heads = "
                         f"{num_layers} * 2 * {num_heads}: token_dim / num_attention_heads in the config are wrong")
    head_dim = width // (num_layers * 2 * num_heads)
    kv = table.view(P, num_layers * 2, num_heads, head_dim).permute(1, 2, 0, 3).contiguous()  # (2L, H, P, D)
    return list(kv[0::2].unbind(0)), list(kv[1::2].unbind(0))


def prefix_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: attention over [prefix ; tokens] for `module.layer_idx`.

    query: (B, Hq, Lq, D); key, value: (B, Hkv, Lk, D) (the cache already appended, RoPE already applied; the
    prefix is not rotated, as in PEFT where it is a past cache). attention_mask: what `prefix_mask` made, i.e. None
    or a (B, Lm) bool key padding mask with Lm <= Lk. Returns (out (B, Lq, Hq, D), None).
    """
    from .. import ops

    state = kwargs.get(STATE_KWARG)
    if not isinstance(state, PrefixState):
        raise RuntimeError(
            f"the attention implementation {ATTN_NAME!r} was called without a prefix: a prefix-tuning adapter is "
            "active on this model, so call the AdapterModel (or its base_model's top-level forward/generate), "
            "not an inner submodule; or disable the adapter (set_adapter / disable_adapter) first"
        )
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx, so its prefix cannot be chosen; prefix "
                           "tuning needs attention modules that know their layer index (as transformers' do)")
    if not 0 <= layer < len(state.keys):
        raise ValueError(f"attention layer {layer} has no prefix: the adapter has num_layers={len(state.keys)}; "
                         "set num_layers in PrefixTuningConfig to the model's number of layers")
    prefix_k, prefix_v = state.keys[layer], state.values[layer]
    B, Hkv, Lk, D = key.shape
    if prefix_k.shape[0] != Hkv or prefix_k.shape[2] != D:
        raise ValueError(
            f"the prefix of layer {layer} has shape {tuple(prefix_k.shape)} (heads, P, head_dim) but the layer's keys "
            f"have {Hkv} heads of dim {D}: set num_attention_heads={Hkv} and token_dim={Hkv * D} in PrefixTuningConfig"
        )
    window = kwargs.get("sliding_window")
    if window is not None and state.num_virtual_tokens + Lk > window:
        raise NotImplementedError(
            f"layer {layer} uses a sliding window of {window} tokens and the prefix ({state.num_virtual_tokens}) plus "
            f"the sequence ({Lk}) exceed it; prefix tuning supports sliding-window models only while the whole "
            "sequence fits inside the window"
        )
    mask = attention_mask
    if mask is not None:
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.dtype == torch.bool):
            raise ValueError(
                f"prefix attention got a {getattr(mask, 'dim', lambda: '?')()}-D attention mask; pass a 2-D (batch, "
                "length) padding mask (1 = token, 0 = padding) to the model: custom 4-D masks are not supported"
            )
        if mask.shape[1] < Lk:  # static cache: only the first mask.shape[1] slots are filled
            Lk = mask.shape[1]
            key, value = key[:, :, :Lk], value[:, :, :Lk]
        elif mask.shape[1] > Lk:
            mask = mask[:, -Lk:]
    prefix_k = prefix_k.to(device=query.device, dtype=query.dtype)
    prefix_v = prefix_v.to(device=query.device, dtype=query.dtype)
    key, value = key.to(query.dtype), value.to(query.dtype)
    state.applied.add(layer)

    if dropout and module.training:
        out = _prefix_attention_dropout(query, key, value, prefix_k, prefix_v, scaling, mask, dropout)
    else:
        out = ops.prefix_attention(query, key, value, prefix_k, prefix_v, causal=True, scale=scaling,
                                   key_padding_mask=mask)
    return out.transpose(1, 2).contiguous(), None


def _prefix_attention_dropout(q, k, v, prefix_k, prefix_v, scale, mask, p):
    """Training with attention dropout (e.g. GPT-2's attn_pdrop): dropout on the probabilities over
    [prefix ; tokens], as the model's own attention does. Shapes as prefix_attention_forward."""
    B, Hq, Lq, _ = q.shape
    Lk, P = k.shape[2], prefix_k.shape[1]
    kk = torch.cat([prefix_k.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
    vv = torch.cat([prefix_v.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
    if k.shape[1] != Hq:
        kk = kk.repeat_interleave(Hq // k.shape[1], dim=1)
        vv = vv.repeat_interleave(Hq // k.shape[1], dim=1)
    q_pos = torch.arange(Lk - Lq, Lk, device=q.device).unsqueeze(1)
    visible = torch.arange(Lk, device=q.device).unsqueeze(0) <= q_pos  # (Lq, Lk)
    visible = visible.expand(B, 1, Lq, Lk)
    if mask is not None:
        visible = visible & mask[:, None, None, :]
    visible = torch.cat([visible.new_ones(B, 1, Lq, P), visible], dim=-1)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=visible, dropout_p=p, scale=scale)


def prefix_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers mask function for ATTN_NAME: the key padding mask the prefix attention needs.

    attention_mask: the 2-D (B, seen + q_length) bool padding mask or None. Returns None when nothing is padded
    and the keys are all filled, else a (B, Lm) bool mask, True = real token, Lm = kv_length or, with a static cache
    whose keys are longer than what is filled, Lm = seen + q_length (the attention then reads only those keys).
    """
    from transformers.masking_utils import causal_mask_function

    config = kwargs.get("config")
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if mask_function is not None and mask_function is not causal_mask_function and not sliding:
        raise NotImplementedError(
            "prefix attention supports plain causal masks (with padding); this forward asked for another mask "
            "pattern (packed sequences in one row, or a model-specific mask): pass an attention_mask and unpacked "
            "sequences"
        )
    if kv_offset:
        raise NotImplementedError(
            "the KV cache dropped tokens (sliding window): prefix tuning supports sliding-window models only while "
            "the whole sequence fits inside the window"
        )
    if isinstance(q_offset, torch.Tensor):
        q_offset = int(q_offset.max())
    filled = q_offset + q_length
    if attention_mask is None:
        if filled >= kv_length:
            return None
        return torch.ones(batch_size, filled, dtype=torch.bool, device=kwargs.get("device"))
    mask = attention_mask.to(torch.bool)
    if mask.shape[-1] < kv_length:  # static cache
        return mask
    mask = mask[:, -kv_length:]
    return None if bool(mask.all()) else mask


_registered = False


def register() -> None:
    """Register ATTN_NAME with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, prefix_mask)
    _registered = True


def uses_attention_interface(model: nn.Module) -> bool:
    """Whether `model`'s attention goes through transformers' AttentionInterface (so it can take the prefix)."""
    check = getattr(type(model), "_can_set_attn_implementation", None)
    if check is None:
        return bool(getattr(model, "_supports_attention_backend", False))
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - a failing heuristic means "cannot tell": treat as unsupported
        return False


def supported_families() -> list[str]:
    """The KNOWN_FAMILIES whose transformers modeling code calls the AttentionInterface (installed version)."""
    out = []
    for fam in KNOWN_FAMILIES:
        try:
            mod = importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")
            if "ALL_ATTENTION_FUNCTIONS.get_interface(" in inspect.getsource(mod):
                out.append(fam)
        except Exception:  # noqa: BLE001, S112 - a family missing from this transformers is simply not listed
            continue
    return out
