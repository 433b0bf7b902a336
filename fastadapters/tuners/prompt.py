"""Prompt tuning (Lester et al. 2021): learned virtual-token embeddings prepended to the input embeddings.

Behaviour and on-disk format follow HF PEFT 0.21 (`PeftModelForCausalLM` with a `PromptTuningConfig`):

- forward: `inputs_embeds = cat(prompt (B, P, D), embed(input_ids) (B, L, D))`; the attention mask gets P leading
  ones, labels get P leading -100; logits come back for all P + L positions, as PEFT returns them. position_ids
  and token_type_ids are dropped with a warning (the model then numbers positions itself), as PEFT does.
- generate: the prompt is applied once, at prefill, by handing `base_model.generate` the prompted `inputs_embeds`
  together with `input_ids`; decoding then runs on the KV cache. The result is `input_ids` followed by the new
  tokens, PEFT's convention. (PEFT 0.21 itself re-inserts the prompt at every decoding step on transformers
  >= 5.2x, where the cache argument was renamed; we do not copy that.)
- checkpoint: one tensor, `prompt_embeddings` (P, D), as PEFT saves it.

One deliberate difference: a forward call that passes a non-empty KV cache (manual decoding) does not prepend the
prompt again (it is in the cache already); only the attention mask gets its P leading ones. PEFT would insert the
prompt a second time in the middle of the sequence.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from . import register
from .base import AdapterMethod

if TYPE_CHECKING:
    from ..config import AdapterConfig, PromptTuningConfig
    from ..model import AdapterModel

WEIGHT_KEY = "prompt_embeddings"


class PromptEmbedding(nn.Module):
    """The virtual tokens of one prompt-tuning adapter.

    `embedding.weight`: (num_virtual_tokens, token_dim), float32. Created as an nn.Embedding, so RANDOM init draws
    N(0, 1) exactly as PEFT's PromptEmbedding does (same values for the same RNG state).
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, dtype=torch.float32)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prompt for a batch: (batch_size, num_virtual_tokens, token_dim), a broadcast view of the weight."""
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)


# -- config filling, as PEFT's _prepare_prompt_learning_config does it (so PEFT reads our adapter_config.json)


def _model_config_dict(base_model: nn.Module) -> tuple[Any, dict[str, Any]]:
    config = getattr(base_model, "config", None)
    if config is None:
        raise ValueError("the base model has no `.config`; prompt tuning needs a transformers model")
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    if isinstance(d.get("text_config"), dict):  # VLMs: the language model part
        d = d["text_config"]
    return config, d


def _fill_config(config: PromptTuningConfig, base_model: nn.Module) -> None:
    """Set token_dim / num_layers / num_attention_heads / num_transformer_submodules where None, as PEFT does."""
    model_config, d = _model_config_dict(base_model)

    def first(*keys: str) -> Any:
        for k in keys:
            if k in d:
                return d[k]
        return None

    if config.num_layers is None:
        n = getattr(model_config, "num_hidden_layers", None)
        config.num_layers = n if n is not None else first("num_hidden_layers", "num_layers", "n_layer")
    if config.token_dim is None:
        config.token_dim = first("hidden_size", "n_embd", "d_model")
    if config.num_attention_heads is None:
        config.num_attention_heads = first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    for field_name in ("num_layers", "token_dim", "num_attention_heads"):
        if getattr(config, field_name) is None:
            raise ValueError(
                f"cannot read {field_name} from the model config ({type(model_config).__name__}): "
                f"pass PromptTuningConfig({field_name}=...)"
            )
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    if config.num_transformer_submodules != 1:
        raise ValueError(
            f"num_transformer_submodules={config.num_transformer_submodules}: fastadapters prompt tuning "
            "supports decoder-only models (1); encoder-decoder prompts are not implemented"
        )


# -- TEXT init


def _load_tokenizer(config: PromptTuningConfig) -> Any:
    source = config.tokenizer_name_or_path
    if source is None or (isinstance(source, str) and not source):
        raise ValueError(
            "prompt_tuning_init='TEXT' needs a tokenizer: pass PromptTuningConfig(tokenizer_name_or_path="
            "<model name or local folder>) or a tokenizer object as tokenizer_name_or_path"
        )
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # as PEFT: loading an adapter must not run remote code
        try:
            return AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"cannot load the tokenizer {os.fspath(source)!r} for prompt_tuning_init='TEXT' ({e}); "
                "pass a local tokenizer folder or a tokenizer object as tokenizer_name_or_path"
            ) from e
    if not callable(source):
        raise TypeError(f"tokenizer_name_or_path must be a name, a folder or a tokenizer, got {type(source).__name__}")
    return source


def text_init_ids(config: PromptTuningConfig, total_virtual_tokens: int) -> list[int]:
    """Token ids of prompt_tuning_init_text, repeated or cut to `total_virtual_tokens` (PEFT's rule).

    The tokenizer's own special tokens (a BOS, say) are kept, as PEFT keeps them. If tokenizer_name_or_path held a
    tokenizer object, it is replaced by the tokenizer's name_or_path so the config can be saved as JSON.
    """
    if not config.prompt_tuning_init_text:
        raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the words to start the prompt from")
    tokenizer = _load_tokenizer(config)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    ids = [int(i) for i in torch.as_tensor(ids).flatten().tolist()]
    if not ids:
        raise ValueError(
            f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to no tokens: give a longer text"
        )
    if not isinstance(config.tokenizer_name_or_path, str):
        if isinstance(config.tokenizer_name_or_path, os.PathLike):
            config.tokenizer_name_or_path = os.fspath(config.tokenizer_name_or_path)
        else:
            name = getattr(tokenizer, "name_or_path", None) or None
            if name is None:
                warnings.warn(
                    "the tokenizer object given as tokenizer_name_or_path has no name_or_path, so "
                    "adapter_config.json will have tokenizer_name_or_path=None, which HF PEFT rejects for "
                    "prompt_tuning_init='TEXT': save the tokenizer and pass its folder instead",
                    stacklevel=3,
                )
            config.tokenizer_name_or_path = name
    ids = ids * math.ceil(total_virtual_tokens / len(ids))
    return ids[:total_virtual_tokens]


# -- generation helpers


@contextlib.contextmanager
def _no_position_ids(model: nn.Module) -> Iterator[None]:
    """Inside the block, generation steps reach the model without position_ids (the model numbers positions from
    its cache, or from the attention mask for OPT/BLOOM), as PEFT arranges it for prompt tuning."""
    had_own = "prepare_inputs_for_generation" in vars(model)
    original = model.prepare_inputs_for_generation

    @functools.wraps(original)  # keeps the signature that generate() inspects to validate kwargs
    def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = original(*args, **kwargs)
        inputs.pop("position_ids", None)
        return inputs

    model.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if had_own:
            model.prepare_inputs_for_generation = original
        else:
            del model.prepare_inputs_for_generation


def _lengths_as_new_tokens(model: nn.Module, kwargs: dict[str, Any], n_input: int) -> None:
    """Turn max_length / min_length (counted over the user's n_input tokens, without the virtual ones) into
    max_new_tokens / min_new_tokens, since generate() counts lengths over the prompted inputs_embeds."""
    configs = [kwargs.get("generation_config"), getattr(model, "generation_config", None)]

    def resolve(key: str) -> Any:
        if kwargs.get(key) is not None:
            return kwargs[key]
        for c in configs:
            if getattr(c, key, None) is not None:
                return getattr(c, key)
        return None

    for total_key, new_key in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        total = resolve(total_key)
        if resolve(new_key) is None and total is not None:
            if total_key == "max_length" and total <= n_input:
                raise ValueError(
                    f"max_length={total} leaves no room to generate after the {n_input} input tokens: "
                    "raise max_length or pass max_new_tokens"
                )
            kwargs[new_key] = max(total - n_input, 0)
        kwargs.pop(total_key, None)


def _default_attention_mask(model: nn.Module, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The mask generate() would infer from input_ids: pad tokens masked when a pad token is set and is not EOS."""
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    pad = kwargs.get("pad_token_id", getattr(gc, "pad_token_id", None))
    eos = kwargs.get("eos_token_id", getattr(gc, "eos_token_id", None))
    eos = [] if eos is None else torch.as_tensor(eos).flatten().tolist()
    if pad is not None and pad not in eos and bool((input_ids == pad).any()):
        return input_ids.ne(pad).long()
    return torch.ones_like(input_ids, dtype=torch.long)


def _cache_length(kwargs: dict[str, Any]) -> int:
    for key in ("past_key_values", "cache"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and len(cache) and len(cache[0]):
            return int(cache[0][0].shape[-2])
    return 0


def _drop_unsupported(kwargs: dict[str, Any]) -> None:
    if kwargs.pop("position_ids", None) is not None:
        warnings.warn(
            "Position ids are not supported for prompt tuning (the virtual tokens shift every position): "
            "ignoring position_ids, as PEFT does",
            stacklevel=4,
        )
    if kwargs.pop("token_type_ids", None) is not None:
        warnings.warn(
            "Token type ids are not supported for prompt tuning: ignoring token_type_ids, as PEFT does", stacklevel=4
        )


@register
class PromptTuningMethod(AdapterMethod):
    """Prompt tuning on a decoder-only transformers model; parameters live in `am.prompt_encoder[name]`."""

    peft_type = "PROMPT_TUNING"

    def __init__(self) -> None:
        self.active: str | None = None

    # -- adapters
    def add(self, am: AdapterModel, name: str, config: AdapterConfig) -> None:
        """Create `am.prompt_encoder[name]`: (num_virtual_tokens, token_dim) float32, RANDOM N(0, 1) or the word
        embeddings of prompt_tuning_init_text (skipped in inference_mode, where weights are loaded next)."""
        _fill_config(config, am.base_model)
        words = am.base_model.get_input_embeddings()
        if words is None or not hasattr(words, "weight"):
            raise ValueError(
                f"{type(am.base_model).__name__} has no input embedding layer; prompt tuning prepends "
                "to the input embeddings, so the model's forward must accept inputs_embeds"
            )
        if words.weight.shape[-1] != config.token_dim:
            raise ValueError(
                f"token_dim={config.token_dim} but the model's input embeddings have width "
                f"{words.weight.shape[-1]}: pass PromptTuningConfig(token_dim={words.weight.shape[-1]})"
            )
        total = config.num_virtual_tokens * config.num_transformer_submodules
        encoder = PromptEmbedding(total, config.token_dim)  # on CPU first: same RNG draw as PEFT
        if config.prompt_tuning_init == "TEXT" and not config.inference_mode:
            ids = torch.tensor(text_init_ids(config, total), dtype=torch.long)
            vocab = words.weight.shape[0]
            if int(ids.max()) >= vocab:
                raise ValueError(
                    f"prompt_tuning_init_text gives token id {int(ids.max())} but the model's vocabulary "
                    f"has {vocab} entries: the tokenizer {config.tokenizer_name_or_path!r} does not "
                    "belong to this model"
                )
            with torch.no_grad():
                encoder.embedding.weight.copy_(words.weight.detach()[ids.to(words.weight.device)].float().cpu())
        device = words.weight.device if words.weight.device.type != "meta" else torch.device("cpu")
        am.prompt_encoder[name] = encoder.to(device)

    def delete(self, am: AdapterModel, name: str) -> None:
        if name in am.prompt_encoder:
            del am.prompt_encoder[name]
        if self.active == name:
            self.active = None

    def set_active(self, am: AdapterModel, names: list[str]) -> None:
        """Activate one adapter (prompts cannot be stacked) or none ([]: the base model runs alone)."""
        names = [n for n in names if n in am.prompt_encoder]
        if len(names) > 1:
            raise ValueError(f"only one prompt-tuning adapter can be active at a time, got {names}")
        self.active = names[0] if names else None

    def parameters(self, am: AdapterModel, name: str) -> Iterator[nn.Parameter]:
        yield from am.prompt_encoder[name].parameters()

    def unload(self, am: AdapterModel) -> nn.Module:
        for name in [n for n, c in am.peft_config.items() if c.peft_type == self.peft_type]:
            self.delete(am, name)
        return am.base_model

    # -- checkpoints
    def state_dict(self, am: AdapterModel, name: str) -> dict[str, torch.Tensor]:
        """{"prompt_embeddings": (num_virtual_tokens, token_dim)}, PEFT's saved key."""
        return {WEIGHT_KEY: am.prompt_encoder[name].embedding.weight.detach()}

    def load_state_dict(self, am: AdapterModel, name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy a PEFT-format state ({"prompt_embeddings": (P, D)}) into adapter `name`."""
        weight = am.prompt_encoder[name].embedding.weight
        if WEIGHT_KEY not in state:
            raise ValueError(
                f"the checkpoint has no {WEIGHT_KEY!r} tensor (it has {sorted(state)}): "
                "it is not a prompt-tuning adapter"
            )
        extra = sorted(k for k in state if k != WEIGHT_KEY)
        if extra:
            raise ValueError(
                f"the prompt-tuning checkpoint has tensors fastadapters does not know: {extra}; "
                f"a prompt-tuning adapter holds only {WEIGHT_KEY!r}"
            )
        tensor = state[WEIGHT_KEY]
        if tuple(tensor.shape) != tuple(weight.shape):
            raise ValueError(
                f"{WEIGHT_KEY} has shape {tuple(tensor.shape)} but adapter {name!r} expects "
                f"(num_virtual_tokens, token_dim) = {tuple(weight.shape)}: the checkpoint was saved "
                "for another model or another num_virtual_tokens"
            )
        with torch.no_grad():
            weight.copy_(tensor.to(device=weight.device, dtype=weight.dtype))

    # -- calling
    def _prompt(self, am: AdapterModel, batch_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return am.prompt_encoder[self.active](batch_size).to(device=device, dtype=dtype)

    def forward(
        self,
        am: AdapterModel,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model on `cat(prompt, embed(input_ids))`.

        input_ids: (B, L) or inputs_embeds: (B, L, D); attention_mask: (B, L); labels: (B, L).
        The model sees (B, P + L) positions; logits come back as (B, P + L, V), labels are padded with -100 so the
        loss covers the real tokens only.
        """
        base = am.base_model
        if self.active is None:
            return base(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels, **kwargs
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, L) and inputs_embeds (B, L, D)")
        _drop_unsupported(kwargs)
        if inputs_embeds is None:
            inputs_embeds = base.get_input_embeddings()(input_ids)
        batch, n_virtual = inputs_embeds.shape[0], am.prompt_encoder[self.active].num_virtual_tokens
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, n_virtual)
            attention_mask = torch.cat((ones, attention_mask), dim=1)
        if _cache_length(kwargs) == 0:  # prefill / training: the prompt enters here
            prompt = self._prompt(am, batch, inputs_embeds.dtype, inputs_embeds.device)
            inputs_embeds = torch.cat((prompt, inputs_embeds), dim=1)
            if labels is not None:
                labels = torch.cat((labels.new_full((batch, n_virtual), -100), labels), dim=1)
        return base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, am: AdapterModel, *args: Any, **kwargs: Any) -> Any:
        """Generate with the prompt applied at prefill and the KV cache after.

        input_ids: (B, L) (positionally or by name) and/or inputs_embeds: (B, L, D); attention_mask: (B, L).
        Returns what `base_model.generate` returns: sequences (B, L + new) that start with input_ids, or only the
        new tokens when only inputs_embeds was given. max_length / min_length count the user's L tokens, not the
        virtual ones.
        """
        base = am.base_model
        if self.active is None:
            return base.generate(*args, **kwargs)
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids, args = args[0], args[1:]
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        if input_ids is None and inputs_embeds is None:
            raise ValueError("prompt-tuning generate needs input_ids (B, L) or inputs_embeds (B, L, D)")
        _drop_unsupported(kwargs)
        attention_mask = kwargs.pop("attention_mask", None)
        with torch.no_grad():
            if inputs_embeds is None:
                inputs_embeds = base.get_input_embeddings()(input_ids)
            batch, length = inputs_embeds.shape[:2]
            if attention_mask is None:
                attention_mask = (
                    _default_attention_mask(base, input_ids, kwargs)
                    if input_ids is not None
                    else torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
                )
            prompt = self._prompt(am, batch, inputs_embeds.dtype, inputs_embeds.device)
            n_virtual = prompt.shape[1]
            inputs_embeds = torch.cat((prompt, inputs_embeds), dim=1)
            attention_mask = torch.cat((attention_mask.new_ones(batch, n_virtual), attention_mask), dim=1)
        _lengths_as_new_tokens(base, kwargs, length)
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        with _no_position_ids(base):
            return base.generate(*args, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
