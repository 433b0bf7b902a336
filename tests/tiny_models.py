"""Tiny random transformers models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gptj", "gpt_neox", "opt", "bloom")
VOCAB = 128


def tiny_config(family: str, **overrides) -> tf.PretrainedConfig:
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        kw = dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            head_dim=16,
        )
    elif family == "gpt2":
        cls, kw = tf.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)
    elif family == "gptj":
        cls, kw = tf.GPTJConfig, dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8)
    elif family == "gpt_neox":
        cls, kw = (
            tf.GPTNeoXConfig,
            dict(
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=256,
            ),
        )
    elif family == "opt":
        cls, kw = (
            tf.OPTConfig,
            dict(
                hidden_size=64,
                ffn_dim=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=256,
                word_embed_proj_dim=64,
            ),
        )
    elif family == "bloom":
        cls, kw = tf.BloomConfig, dict(hidden_size=64, n_layer=2, n_head=4)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    kw.update(common)
    kw.update(overrides)
    return cls(**kw)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised causal LM of `family`, in eval mode, deterministic for a given seed."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    return model.eval()


def tiny_batch(batch: int = 2, length: int = 9, seed: int = 1, left_pad: int = 0):
    """input_ids and attention_mask; the first row is left-padded by `left_pad` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if left_pad:
        ids[0, :left_pad] = 0
        mask[0, :left_pad] = 0
    return ids, mask
