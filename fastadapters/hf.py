"""fastadapters in the Hugging Face training stack: transformers' Trainer, TRL, accelerate, FSDP.

What an AdapterModel does so that these tools need no special case (they special-case PEFT's PeftModel):

- `model.forward` reports the wrapped model's signature, so Trainer's `remove_unused_columns` keeps input_ids,
  labels, ...; `activation_checkpointing_enable(..., every_n_layers=, offload=)` takes Trainer's arguments.
- `model.state_dict()` is the adapter state (adapter tensors under their module paths) and `load_state_dict`
  reads it back: every tool that saves "the model's state dict" for a model that is not a PreTrainedModel
  (Trainer's checkpoint-N/model.safetensors, resume_from_checkpoint, load_best_model_at_end, accelerate's
  save_state, FSDP's state-dict API) therefore writes and reads the adapter only, kilobytes to megabytes.
- `model.save_pretrained(dir, is_main_process=...)` writes PEFT's layout (adapter_config.json +
  adapter_model.safetensors) and gathers FSDP2-sharded adapters first (call it on every process).

What this module adds:

- `AdapterTrainer`: transformers.Trainer whose `save_model` (public; also what writes checkpoint-N) writes PEFT's
  layout too; the final `save_model()` writes only PEFT's layout (plus tokenizer and training_args.bin).
- `AdapterCheckpointCallback`: the same PEFT-layout files in every checkpoint-N for any Trainer subclass you do
  not control (TRL's SFTTrainer / DPOTrainer): `callbacks=[AdapterCheckpointCallback()]`.
- `reference_model(model)`: the base model without its adapters, sharing its weights (no copy): the reference
  model of DPO "with the adapter disabled", as PEFT users get it.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn as nn
import transformers as tf

from .model import AdapterModel

__all__ = ["AdapterCheckpointCallback", "AdapterTrainer", "reference_model", "unwrap_adapter_model"]

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name for the pickled TrainingArguments


def unwrap_adapter_model(model: Any) -> AdapterModel:
    """The AdapterModel inside DDP / torch.compile / accelerate wrappers."""
    seen = 0
    while not isinstance(model, AdapterModel) and seen < 8:
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        seen += 1
    if not isinstance(model, AdapterModel):
        raise TypeError(f"expected a fastadapters AdapterModel (or a wrapper of one), got {type(model).__name__}")
    return model


def _is_main_process(args: Any) -> bool:
    return bool(getattr(args, "should_save", True))


class AdapterCheckpointCallback(tf.TrainerCallback):
    """Writes the adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors) into every
    checkpoint-N that a Trainer saves, beside Trainer's own files. Runs on every process (FSDP2 gathers), the main
    process writes."""

    def on_save(self, args, state, control, model=None, **kwargs):  # noqa: ANN001 - TrainerCallback's signature
        if model is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if _is_main_process(args) and not os.path.isdir(folder):
            return  # a checkpoint written elsewhere (hyperparameter search run folders): nothing to add to
        unwrap_adapter_model(model).save_pretrained(folder, is_main_process=_is_main_process(args))


class AdapterTrainer(tf.Trainer):
    """transformers.Trainer for an AdapterModel; only the public `save_model` differs.

    checkpoint-N: Trainer's own files (its model.safetensors holds the adapter state only, which is what
    `resume_from_checkpoint` and `load_best_model_at_end` read back) plus PEFT's layout. The final
    `save_model(dir)`: PEFT's layout (what `AdapterModel.from_pretrained` and `peft.PeftModel.from_pretrained`
    load), the tokenizer and training_args.bin.
    """

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _internal_call:  # checkpoint-N: keep Trainer's files, resume reads them
            super().save_model(output_dir, _internal_call=True)
        main = _is_main_process(self.args)
        unwrap_adapter_model(self.model).save_pretrained(output_dir, is_main_process=main)
        if _internal_call or not main:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


def reference_model(model: AdapterModel) -> nn.Module:
    """The wrapped transformers model without the adapters, sharing every weight with `model` (no copy).

    For DPO with the reference model = the adapter disabled: `DPOTrainer(model=am, ref_model=reference_model(am))`.
    Works for layer adapters (LoRA, bottleneck); prefix and prompt tuning change the attention / the inputs, for
    them use `with model.disable_adapter():` in your own loop."""
    model = unwrap_adapter_model(model)
    kinds = {c.peft_type for c in model.peft_config.values()}
    if kinds - {"LORA", "BOTTLENECK"}:
        raise ValueError(f"reference_model works for LoRA and bottleneck adapters; this model holds {sorted(kinds)}")
    layers = {id(layer) for m in model._methods.values() for _, layer in m.layers(model)}
    return _share(model.base_model, layers)


def _share(module: nn.Module, adapter_layers: set[int]) -> nn.Module:
    """A structural copy of `module` whose parameters and buffers are the same tensors; adapter layers are
    replaced by the layer they wrap."""
    while id(module) in adapter_layers:
        module = module.base_layer
    new = copy.copy(module)
    for key, value in list(new.__dict__.items()):  # hooks registered later on one must not fire on the other
        if key.startswith("_") and "hooks" in key and isinstance(value, dict):
            new.__dict__[key] = type(value)(value)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {name: None if child is None else _share(child, adapter_layers)
                    for name, child in module._modules.items()}
    new.__dict__.pop("forward", None)  # an instance-level patch (TRL's) belongs to the original
    return new
