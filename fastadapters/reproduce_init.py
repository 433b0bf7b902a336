"""Real-word initialisation of prompt and prefix tuning for `fastadapters reproduce` (see the docstring of
`_real_word_init_callback` and /work/notes/prefix_bug.md for why PEFT's N(0, 1) init is not used there)."""

from __future__ import annotations

from typing import Any

INIT_TEXT = "Please choose the correct answer to the question. Answer format: the correct answer is"


def _real_word_init_callback(tokenizer: Any) -> Any:
    """Start prompt and prefix tuning from real words instead of PEFT's N(0, 1) tables.

    PEFT (and so `fastadapters train`) draws the virtual tokens from N(0, 1): for SmolLM2 that is 7x the rms of its
    word embeddings (0.14) and, for prefix tuning, 25x the rms of layer 0's values (0.04), in every layer, so the
    untrained adapter already wrecks the model (it answers "199.9/199/12" or "1. 1. 1.") and a few dozen Adam steps
    cannot undo it. Prompt tuning starts from the word embeddings of INIT_TEXT (PEFT's TEXT init, Lester et al.
    2021); prefix tuning from the keys and values the frozen model computes for INIT_TEXT in every layer (Li & Liang
    2021, "real word" initialisation). Applied when training begins (the optimizer holds the same tensors).
    """
    import torch
    import transformers as tf

    class RealWordInit(tf.TrainerCallback):
        kind = ""

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001 - Trainer's signature
            if state.global_step or model is None or not hasattr(model, "prompt_encoder"):
                return
            for name, enc in model.prompt_encoder.items():
                peft_type = getattr(model.peft_config.get(name), "peft_type", "")
                with torch.no_grad():
                    if peft_type == "PROMPT_TUNING":
                        self.kind = "prompt"
                        _init_prompt(model, enc, tokenizer)
                    elif peft_type == "PREFIX_TUNING" and not enc.prefix_projection:
                        self.kind = "prefix"
                        _init_prefix(model, name, enc, tokenizer)

    return RealWordInit()


def _init_ids(tokenizer: Any, n: int) -> Any:
    import torch

    ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    ids = (ids * (n // len(ids) + 1))[:n]
    return torch.tensor([ids])


def _init_prompt(model: Any, enc: Any, tokenizer: Any) -> None:
    w = enc.embedding.weight
    emb = model.base_model.get_input_embeddings()
    w.copy_(emb(_init_ids(tokenizer, w.shape[0]).to(emb.weight.device))[0].to(w))


def _init_prefix(model: Any, name: str, enc: Any, tokenizer: Any) -> None:
    """Prefix table row p = [k_0(p), v_0(p), k_1(p), v_1(p), ...]: the frozen model's key / value projections of
    INIT_TEXT's p-th token in every layer (PEFT's layout; keys before RoPE, as the prefix is never rotated)."""
    import re

    w = enc.embedding.weight
    cfg = model.peft_config[name]
    found: dict[tuple[int, str], Any] = {}
    hooks = []
    for mod_name, mod in model.base_model.named_modules():
        m = re.search(r"layers\.(\d+)\.self_attn\.([kv])_proj$", mod_name)
        if m:
            key = (int(m.group(1)), m.group(2))
            hooks.append(mod.register_forward_hook(lambda _m, _i, out, key=key: found.__setitem__(key, out[0])))
    if len(hooks) != 2 * cfg.num_layers:
        for h in hooks:
            h.remove()
        print("[reproduce] prefix: no k_proj/v_proj per layer in this model family; keeping PEFT's random init")
        return
    try:
        with model.disable_adapter():
            model.base_model(input_ids=_init_ids(tokenizer, w.shape[0]).to(w.device))
    finally:
        for h in hooks:
            h.remove()
    parts = [found[(layer, kv)] for layer in range(cfg.num_layers) for kv in "kv"]
    import torch

    table = torch.cat(parts, dim=-1)
    if tuple(table.shape) == tuple(w.shape):
        w.copy_(table.to(w))
