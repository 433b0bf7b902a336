"""Default target modules per model family, and where a series bottleneck adapter sits (LLM-Adapters' tables)."""

from __future__ import annotations

import re

import torch.nn as nn

# model_type -> modules that LoRA targets when the config names none (as PEFT / LLM-Adapters).
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
}
# Series adapters (AdapterH): before the MLP's input projections, after its output projection.
SERIES_TARGETS: dict[str, list[str]] = {
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "mistral": ["gate_proj", "up_proj", "down_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"],
    "gpt2": ["mlp.c_fc", "mlp.c_proj"],
    "gptj": ["fc_in", "fc_out"],
    "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["fc1", "fc2"],
    "bloom": ["dense_h_to_4h", "dense_4h_to_h"],
}
# AdapterP: one series adapter after the MLP's output projection.
ADAPTERP_TARGETS: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "gpt2": ["mlp.c_proj"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "opt": ["fc2"],
    "bloom": ["dense_4h_to_h"],
}
# Parallel adapters: beside the attention input projections.
PARALLEL_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gptj": ["q_proj", "k_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj"],
    "bloom": ["query_key_value"],
}
# Last name component -> series placement: "before" wraps the input (mh_adapter), "after" the output.
SERIES_PLACEMENT: dict[str, str] = {
    "gate_proj": "before",
    "up_proj": "before",
    "down_proj": "after",
    "fc_in": "before",
    "fc_out": "after",
    "dense_h_to_4h": "before",
    "dense_4h_to_h": "after",
    "fc1": "before",
    "fc2": "after",
    "c_fc": "before",
    "c_proj": "after",
}
SUPPORTED_FAMILIES = sorted(LORA_TARGETS)


def default_targets(table: dict[str, list[str]], model_type: str, what: str) -> list[str]:
    """The default target list for `model_type`, or a clear error telling the user to name targets."""
    if model_type not in table:
        raise ValueError(
            f"no default target_modules for {what} on model_type={model_type!r} (known: {sorted(table)}); "
            "pass target_modules=[...] naming the linear layers to adapt"
        )
    return list(table[model_type])


def is_target(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole module name; a list entry matches the name or its suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the modules of `model` that `targets` selects; errors name what matched nothing."""
    names = [n for n, _ in model.named_modules() if n and is_target(n, targets)]
    if not names:
        raise ValueError(
            f"target_modules={targets!r} matched no module of {type(model).__name__}; "
            f"its linear layers include: {_linear_names(model)}"
        )
    if not isinstance(targets, str):
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            raise ValueError(
                f"target_modules {unmatched} matched no module of {type(model).__name__}; "
                f"its linear layers include: {_linear_names(model)}"
            )
    return names


def _linear_names(model: nn.Module, limit: int = 12) -> list[str]:
    leaves = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
        }
    )
    return leaves[:limit]
