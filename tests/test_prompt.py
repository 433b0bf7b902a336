"""Prompt tuning: parity with HF PEFT 0.21 (logits, loss, gradients, init, generate, checkpoints both ways)."""

from __future__ import annotations

import copy
import inspect
import json
import os
import warnings

import peft
import pytest
import torch
import transformers
from tiny_models import FAMILIES, VOCAB, tiny_batch, tiny_model

import fastadapters as fa
from fastadapters.tuners.prompt import PromptEmbedding, PromptTuningMethod

P = 4  # virtual tokens
HIDDEN = 64  # tiny_models' hidden size
ATOL = 1e-5

# PEFT 0.21's prepare_inputs_for_generation looks for `past_key_values`; transformers that renamed it to `cache`
# make PEFT re-insert the prompt at every decoding step, so only its first generated token is right there.
_PREPARE = transformers.GenerationMixin.prepare_inputs_for_generation
PEFT_GENERATE_BROKEN = "cache" in inspect.signature(_PREPARE).parameters

WORDS = "classify the sentiment of this review as positive or negative".split()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def peft_cfg(**kw) -> peft.PromptTuningConfig:
    return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=kw.pop("num_virtual_tokens", P), **kw)


def pair(family: str, dtype: torch.dtype = torch.float32, seed: int = 3):
    """(ours, PEFT's) on identical copies of one tiny model, sharing one prompt of word-embedding scale."""
    base = tiny_model(family, dtype=dtype)
    ref = peft.get_peft_model(copy.deepcopy(base), peft_cfg())
    ours = fa.get_adapter_model(base, fa.PromptTuningConfig(num_virtual_tokens=P))
    g = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(P, HIDDEN, generator=g)
    with torch.no_grad():
        ours.prompt_encoder["default"].embedding.weight.copy_(w)
        ref.prompt_encoder["default"].embedding.weight.copy_(w)
    return ours, ref


def prompt_weight(model) -> torch.nn.Parameter:
    return model.prompt_encoder["default"].embedding.weight


def padded_batch(length: int = 7):
    ids, mask = tiny_batch(2, length, left_pad=2)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


# -- forward

FORWARD_CASES = [(f, torch.float32) for f in FAMILIES] + [("llama", torch.bfloat16), ("gpt2", torch.bfloat16)]


@pytest.mark.parametrize("family,dtype", FORWARD_CASES, ids=[f"{f}-{str(d)[6:]}" for f, d in FORWARD_CASES])
def test_forward_matches_peft(family, dtype):
    ours, ref = pair(family, dtype)
    ids, mask, labels = padded_batch()
    out, want = (
        ours(input_ids=ids, attention_mask=mask, labels=labels),
        ref(input_ids=ids, attention_mask=mask, labels=labels),
    )
    assert out.logits.shape == (2, P + ids.shape[1], VOCAB)  # PEFT keeps the virtual positions in the logits
    atol = ATOL if dtype == torch.float32 else 0.0  # same ops in the same order: bitwise equal in bf16 too
    torch.testing.assert_close(out.logits, want.logits, atol=atol, rtol=0)
    torch.testing.assert_close(out.loss, want.loss, atol=atol, rtol=0)
    out.loss.backward()
    want.loss.backward()
    assert prompt_weight(ours).dtype == torch.float32
    assert prompt_weight(ours).grad.abs().sum() > 0
    torch.testing.assert_close(prompt_weight(ours).grad, prompt_weight(ref).grad, atol=atol, rtol=0)
    assert all(p.grad is None for p in ours.base_model.parameters())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_inputs_embeds_equal_input_ids(family):
    ours, _ = pair(family)
    ids, mask, _ = padded_batch()
    embeds = ours.base_model.get_input_embeddings()(ids)
    a = ours(input_ids=ids, attention_mask=mask).logits
    b = ours(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        ours(input_ids=ids, inputs_embeds=embeds)


def test_position_ids_are_ignored_with_a_warning():
    ours, ref = pair("llama")
    ids, mask, _ = padded_batch()
    pos = torch.arange(ids.shape[1]).expand(2, -1) + 5
    with pytest.warns(UserWarning, match="ignoring position_ids"):
        out = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out, ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, ours(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_with_cache_does_not_insert_the_prompt_again(family):
    ours, _ = pair(family)
    ids, mask, _ = padded_batch()
    full = ours(input_ids=ids, attention_mask=mask).logits
    head = ours(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
    cache = head.get("cache", head.get("past_key_values"))
    key = "cache" if "cache" in inspect.signature(ours.base_model.forward).parameters else "past_key_values"
    step = ours(input_ids=ids[:, -1:], attention_mask=mask, **{key: cache}).logits
    assert step.shape == (2, 1, VOCAB)
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=ATOL, rtol=0)


def test_only_the_prompt_trains():
    ours, _ = pair("llama")
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    assert ours.get_nb_trainable_parameters()[0] == P * HIDDEN


# -- init and config


def test_random_init_draws_what_peft_draws():
    base = tiny_model("gpt2")
    torch.manual_seed(11)
    want = prompt_weight(peft.get_peft_model(copy.deepcopy(base), peft_cfg())).detach().clone()
    torch.manual_seed(11)
    got = prompt_weight(fa.get_adapter_model(base, fa.PromptTuningConfig(num_virtual_tokens=P)))
    assert got.dtype == torch.float32 and got.shape == (P, HIDDEN)
    torch.testing.assert_close(got.detach(), want, atol=0, rtol=0)
    assert 0.5 < got.std().item() < 1.5  # N(0, 1), not word-embedding scale


@pytest.mark.parametrize("family", FAMILIES)
def test_config_filled_as_peft_fills_it(family):
    base = tiny_model(family)
    ref = peft.get_peft_model(copy.deepcopy(base), peft_cfg()).peft_config["default"]
    cfg = fa.get_adapter_model(base, fa.PromptTuningConfig(num_virtual_tokens=P)).peft_config["default"]
    for name in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        assert getattr(cfg, name) == getattr(ref, name), name


@pytest.mark.parametrize("n", [0, -2], ids=["zero", "negative"])
def test_num_virtual_tokens_must_be_positive(n):
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        fa.PromptTuningConfig(num_virtual_tokens=n)


def test_token_dim_must_match_the_embeddings():
    with pytest.raises(ValueError, match="token_dim=64"):
        fa.get_adapter_model(tiny_model("llama"), fa.PromptTuningConfig(num_virtual_tokens=P, token_dim=32))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer saved as a transformers folder: "[UNK]"=0, "[BOS]"=1, "[EOS]"=2, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    path = tmp_path_factory.mktemp("tokenizer")
    hf.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("n_virtual,want_ids", [(2, [3, 4]), (7, [3, 4, 8, 3, 4, 8, 3])], ids=["cut", "repeat"])
def test_text_init(tokenizer_dir, n_virtual, want_ids):
    text = "classify the review"  # -> ids 3, 4, 8
    base = tiny_model("llama")
    ref = peft.get_peft_model(
        copy.deepcopy(base),
        peft_cfg(
            num_virtual_tokens=n_virtual,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=tokenizer_dir,
        ),
    )
    cfg = fa.PromptTuningConfig(
        num_virtual_tokens=n_virtual,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=tokenizer_dir,
    )
    got = prompt_weight(fa.get_adapter_model(base, cfg)).detach()
    words = base.get_input_embeddings().weight.detach()
    torch.testing.assert_close(got, words[want_ids], atol=0, rtol=0)
    torch.testing.assert_close(got, prompt_weight(ref).detach(), atol=0, rtol=0)

    # a tokenizer object works too; the config keeps its name so it still saves as JSON
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg2 = fa.PromptTuningConfig(
        num_virtual_tokens=n_virtual,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=tok,
    )
    got2 = prompt_weight(fa.get_adapter_model(tiny_model("llama"), cfg2)).detach()
    torch.testing.assert_close(got2, got, atol=0, rtol=0)
    assert cfg2.tokenizer_name_or_path == tok.name_or_path
    json.dumps(cfg2.to_dict())


def test_text_init_errors(tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        fa.PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        fa.get_adapter_model(
            tiny_model("llama"), fa.PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="classify")
        )
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        fa.get_adapter_model(
            tiny_model("llama"),
            fa.PromptTuningConfig(
                prompt_tuning_init="TEXT", prompt_tuning_init_text="classify", tokenizer_name_or_path=str(tmp_path)
            ),
        )
    small = tiny_model("llama", vocab_size=6)  # the tokenizer's ids run to 12
    with pytest.raises(ValueError, match="vocabulary has 6"):
        fa.get_adapter_model(
            small,
            fa.PromptTuningConfig(
                prompt_tuning_init="TEXT", prompt_tuning_init_text="review", tokenizer_name_or_path=tokenizer_dir
            ),
        )


# -- generate


def greedy_logits_without_cache(model, ids, mask, steps):
    """Step logits of greedy decoding that re-runs the whole sequence each step (no KV cache)."""
    seq, m, out = ids, mask, []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seq, attention_mask=m).logits[:, -1]
            out.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return seq, out


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_greedy_without_cache(family):
    ours, _ = pair(family)
    ids, mask, _ = padded_batch()
    steps = 4
    res = ours.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    seq, logits = greedy_logits_without_cache(ours, ids, mask, steps)
    assert res.sequences.shape == (2, ids.shape[1] + steps)
    assert torch.equal(res.sequences[:, : ids.shape[1]], ids)  # PEFT's convention: input_ids, then new tokens
    assert torch.equal(res.sequences, seq)
    for got, want in zip(res.logits, logits, strict=True):  # positions and mask as in forward, step by step
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "new_tokens",
    [
        1,
        pytest.param(
            5,
            marks=pytest.mark.skipif(
                PEFT_GENERATE_BROKEN,
                reason="PEFT 0.21 re-inserts the prompt at every step on this transformers (cache kwarg renamed)",
            ),
        ),
    ],
    ids=lambda n: f"new{n}",
)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_peft(family, new_tokens):
    ours, ref = pair(family)
    ids, mask, _ = padded_batch()
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(got, want)


def test_generate_lengths_count_user_tokens():
    ours, _ = pair("llama")
    ids, mask, _ = padded_batch()
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=None)
    b = ours.generate(
        input_ids=ids, attention_mask=mask, max_length=ids.shape[1] + 3, do_sample=False, eos_token_id=None
    )
    assert a.shape == (2, ids.shape[1] + 3)
    assert torch.equal(a, b)
    # only inputs_embeds: the new tokens alone come back, as transformers does it
    c = ours.generate(
        inputs_embeds=ours.base_model.get_input_embeddings()(ids),
        attention_mask=mask,
        max_new_tokens=3,
        do_sample=False,
        eos_token_id=None,
    )
    assert torch.equal(c, a[:, ids.shape[1] :])
    with pytest.raises(ValueError, match="max_length"):
        ours.generate(input_ids=ids, attention_mask=mask, max_length=ids.shape[1])
    # no attention_mask: inferred from the pad tokens (id 0) as generate() infers it
    kw = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True)
    inferred, given = ours.generate(ids, **kw), ours.generate(ids, attention_mask=mask, **kw)
    for got, want in zip(inferred.logits, given.logits, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# -- disable


def test_disable_passes_through():
    ours, _ = pair("llama")
    plain = copy.deepcopy(ours.base_model)
    ids, mask, _ = padded_batch()
    with_prompt = ours(input_ids=ids, attention_mask=mask).logits
    with ours.disable_adapter():
        off = ours(input_ids=ids, attention_mask=mask).logits
        gen_off = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(off, plain(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    assert torch.equal(gen_off, plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False))
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, with_prompt, atol=0, rtol=0)
    assert with_prompt.shape[1] == off.shape[1] + P


def test_only_one_prompt_active():
    am = fa.get_adapter_model(tiny_model("llama"), fa.PromptTuningConfig(num_virtual_tokens=P))
    am.add_adapter("other", fa.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="one prompt"):
        PromptTuningMethod().set_active(am, ["default", "other"])
    am.set_adapter("other")
    assert am(input_ids=tiny_batch(1, 5)[0]).logits.shape == (1, 2 + 5, VOCAB)


# -- checkpoints


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ours_saved_loads_in_peft(family, tmp_path):
    ours, _ = pair(family)
    fresh = copy.deepcopy(ours.base_model)
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    assert list(load_file(tmp_path / "adapter_model.safetensors")) == ["prompt_embeddings"]
    cfg = peft.PeftConfig.from_pretrained(tmp_path)
    assert cfg.peft_type == "PROMPT_TUNING" and cfg.token_dim == HIDDEN and cfg.num_layers == 2
    ref = peft.PeftModel.from_pretrained(fresh, tmp_path)
    ids, mask, _ = padded_batch()
    torch.testing.assert_close(
        ref(input_ids=ids, attention_mask=mask).logits,
        ours(input_ids=ids, attention_mask=mask).logits,
        atol=ATOL,
        rtol=0,
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_saved_loads_in_ours(family, tmp_path):
    _, ref = pair(family)
    fresh = tiny_model(family)
    ref.save_pretrained(tmp_path)
    ours = fa.AdapterModel.from_pretrained(fresh, tmp_path)
    ids, mask, _ = padded_batch()
    torch.testing.assert_close(
        ours(input_ids=ids, attention_mask=mask).logits,
        ref(input_ids=ids, attention_mask=mask).logits,
        atol=ATOL,
        rtol=0,
    )
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference unless is_trainable


def test_text_adapter_loads_without_its_tokenizer(tokenizer_dir, tmp_path):
    cfg = fa.PromptTuningConfig(
        num_virtual_tokens=P,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="review",
        tokenizer_name_or_path=tokenizer_dir,
    )
    ours = fa.get_adapter_model(tiny_model("llama"), cfg)
    ours.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        saved = json.load(f)
    saved["tokenizer_name_or_path"] = str(tmp_path / "gone")  # inference loading must not need the tokenizer
    with open(tmp_path / "adapter_config.json", "w") as f:
        json.dump(saved, f)
    back = fa.AdapterModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(prompt_weight(back), prompt_weight(ours), atol=0, rtol=0)


def test_load_errors_name_the_tensor():
    am = fa.get_adapter_model(tiny_model("llama"), fa.PromptTuningConfig(num_virtual_tokens=P))
    method = PromptTuningMethod()
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(5, 64\).*\(4, 64\)"):
        method.load_state_dict(am, "default", {"prompt_embeddings": torch.zeros(5, HIDDEN)})
    with pytest.raises(ValueError, match="no 'prompt_embeddings'"):
        method.load_state_dict(am, "default", {"prefix_embeddings": torch.zeros(P, HIDDEN)})
    method.load_state_dict(am, "default", {"prompt_embeddings": torch.ones(P, HIDDEN, dtype=torch.bfloat16)})
    assert prompt_weight(am).dtype == torch.float32 and bool((prompt_weight(am) == 1).all())


def test_prompt_embedding_module_shapes():
    enc = PromptEmbedding(3, 8)
    assert enc(batch_size=2).shape == (2, 3, 8)
    assert enc.num_virtual_tokens == 3
