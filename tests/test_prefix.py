"""Prefix tuning: parity with HF PEFT (logits, gradients, generate, checkpoints), KV-cache decoding, gradient
checkpointing, disable/unload, unsupported families and errors. Tiny random models, CPU, float32."""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
from tiny_models import FAMILIES, tiny_batch, tiny_model

import fastadapters as fa
from fastadapters.tuners.prefix import PrefixTuningMethod
from fastadapters.tuners.prefix_hf import ATTN_NAME, _prefix_attention_dropout, supported_families

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

SUPPORTED = supported_families()
UNSUPPORTED = [f for f in FAMILIES if f not in SUPPORTED]
P = 4
ATOL = 2e-5  # float32 logits of a 2-layer model: the two attention implementations differ by ~2e-7


def _peft_can_generate() -> bool:
    """PEFT 0.21 injects the prefix in generate() under `past_key_values`; transformers >= 5.24 renamed it to
    `cache`, so PEFT's generate silently runs without the prefix there."""
    from transformers.generation.utils import GenerationMixin

    return "past_key_values" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


def make_pair(family: str, projection: bool = False, **overrides):
    """(ours, PEFT's) prefix-tuned copies of the same tiny model with the same prefix parameters."""
    kw = dict(num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=24 if projection else None)
    pm = peft.get_peft_model(tiny_model(family, **overrides), peft.PrefixTuningConfig(task_type="CAUSAL_LM", **kw))
    am = fa.get_adapter_model(tiny_model(family, **overrides), fa.PrefixTuningConfig(**kw))
    am.prompt_encoder["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    return am, pm


def padded_batch(padding: str, length: int = 9):
    ids, mask = tiny_batch(2, length, left_pad=3 if padding == "left" else 0)
    if padding == "right":
        ids[1, -2:], mask[1, -2:] = 0, 0
    return ids, mask


def encoder_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.prompt_encoder["default"].named_parameters()}


def loss_of(model, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels)


def greedy_no_cache(model, ids, mask, steps: int):
    """Greedy decoding that recomputes the whole sequence each step (no KV cache), with generate's positions."""
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def generate(model, ids, mask, steps: int = 6, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                          pad_token_id=0, **kw)


# -- config and layout ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", SUPPORTED)
def test_config_filled_like_peft(family):
    am, pm = make_pair(family, projection=True)
    ours, theirs = am.peft_config["default"], pm.peft_config["default"]
    fields = ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size")
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    shapes = {n: tuple(p.shape) for n, p in am.prompt_encoder["default"].named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in pm.prompt_encoder["default"].named_parameters()}


def test_gqa_prefix_has_one_head_per_kv_head():
    am = fa.get_adapter_model(tiny_model("llama"), fa.PrefixTuningConfig(num_virtual_tokens=P))
    cfg = am.peft_config["default"]
    assert (cfg.num_attention_heads, cfg.token_dim) == (2, 32)  # 2 kv heads of dim 16, not 4 query heads
    state = am._method("default").prefix_state(am, "default")
    assert len(state.keys) == 2 and tuple(state.keys[0].shape) == (2, P, 16)


def test_layout_matches_peft_past_key_values():
    """Layer l's prefix keys/values are what PEFT puts into its cache for layer l."""
    am, pm = make_pair("llama")
    state = am._method("default").prefix_state(am, "default")
    cache = pm.get_prompt(batch_size=1)
    for layer in range(2):
        k, v = cache.layers[layer].keys[0], cache.layers[layer].values[0]
        torch.testing.assert_close(state.keys[layer], k, rtol=0, atol=0)
        torch.testing.assert_close(state.values[layer], v, rtol=0, atol=0)


# -- parity with PEFT: logits and gradients ------------------------------------------------------------------------

CASES = [(f, "left", False) for f in SUPPORTED] + [
    ("llama", "none", False), ("llama", "right", False), ("llama", "left", True), ("gpt2", "right", True),
    ("opt", "right", False),
]


@pytest.mark.parametrize("family,padding,projection", CASES,
                         ids=[f"{f}-{p}{'-proj' if j else ''}" for f, p, j in CASES])
def test_logits_and_grads_match_peft(family, padding, projection):
    am, pm = make_pair(family, projection)
    ids, mask = padded_batch(padding)
    with fa.use_backend("torch"):
        ours = loss_of(am, ids, mask)
        ours.loss.backward()
    theirs = loss_of(pm, ids, mask)
    theirs.loss.backward()
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], rtol=0, atol=ATOL)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=ATOL)
    g_ours, g_theirs = encoder_grads(am), encoder_grads(pm)
    assert g_ours.keys() == g_theirs.keys()
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], rtol=1e-4, atol=1e-5, msg=n)
    with am.disable_adapter():  # the prefix matters: without it the logits are far off
        base = am(input_ids=ids, attention_mask=mask).logits
    assert (base[real] - ours.logits[real]).abs().max() > 1e-2


def test_explicit_position_ids_shift_by_prefix_like_peft():
    am, pm = make_pair("llama")
    ids, mask = padded_batch("left")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = am(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    theirs = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=ATOL)


def test_auto_backend_matches_torch_backend():
    am, _ = make_pair("llama")
    ids, mask = padded_batch("left")
    with fa.use_backend("torch"):
        ref = am(input_ids=ids, attention_mask=mask).logits
    with fa.use_backend("auto"):
        out = am(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


# -- generate ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", SUPPORTED)
def test_generate_with_cache_equals_no_cache_decoding(family):
    am = fa.get_adapter_model(tiny_model(family), fa.PrefixTuningConfig(num_virtual_tokens=P))
    ids, mask = padded_batch("left", length=7)
    with torch.no_grad():
        cached = generate(am, ids, mask)
        recomputed = greedy_no_cache(am, ids, mask, 6)
        with am.disable_adapter():
            base = generate(am, ids, mask)
    assert torch.equal(cached, recomputed)
    assert not torch.equal(cached, base)  # the prefix steers the decoding


@pytest.mark.parametrize("cache", ["static", "dynamic-unpadded"])
def test_generate_static_cache_and_no_mask(cache):
    am = fa.get_adapter_model(tiny_model("llama"), fa.PrefixTuningConfig(num_virtual_tokens=P))
    if cache == "static":
        ids, mask = padded_batch("left", length=7)
        out = generate(am, ids, mask, cache_implementation="static")
    else:
        ids, mask = tiny_batch(2, 7)
        out = am.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy_no_cache(am, ids, mask, 6))


@pytest.mark.skipif(not _peft_can_generate(), reason="PEFT 0.21's prefix generate drops the prefix here")
@pytest.mark.parametrize("family", [f for f in ("llama", "gpt2", "opt") if f in SUPPORTED])
def test_generate_equals_peft_generate(family):
    am, pm = make_pair(family)
    ids, mask = padded_batch("left", length=7)
    with torch.no_grad():
        assert torch.equal(generate(am, ids, mask), generate(pm, ids, mask))


# -- training ------------------------------------------------------------------------------------------------------

NO_DROPOUT = {"llama": {}, "gpt2": dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)}


@pytest.mark.parametrize("family", list(NO_DROPOUT))
def test_gradient_checkpointing_gives_same_grads(family):
    ids, mask = padded_batch("left")
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(family, **NO_DROPOUT[family])
        if checkpointing:
            model.gradient_checkpointing_enable()
        am = fa.get_adapter_model(model, fa.PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True))
        torch.manual_seed(0)
        for p in am.prompt_encoder["default"].parameters():
            torch.nn.init.normal_(p, std=0.5)
        am.train()
        loss_of(am, ids, mask).loss.backward()
        grads.append(encoder_grads(am))
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_reentrant_checkpointing_is_refused():
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    am = fa.get_adapter_model(model, fa.PrefixTuningConfig(num_virtual_tokens=P))
    am.train()
    ids, mask = padded_batch("none")
    with pytest.raises(ValueError, match="use_reentrant"):
        loss_of(am, ids, mask)


def test_only_prefix_trains():
    am = fa.get_adapter_model(tiny_model("llama"), fa.PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True))
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.default.") for n in trainable)


def test_attention_dropout_path_without_dropout_equals_op():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g),
               torch.randn(2, 2, 7, 8, generator=g))
    pk, pv = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    ref = fa.ops.prefix_attention(q, k, v, pk, pv, causal=True, scale=0.3, key_padding_mask=mask)
    out = _prefix_attention_dropout(q, k, v, pk, pv, 0.3, mask, 0.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# -- enable / disable / unload -------------------------------------------------------------------------------------

def test_disable_and_unload_restore_the_base_model_exactly():
    model = tiny_model("llama")
    impl = model.config._attn_implementation
    ids, mask = padded_batch("left")
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        am = fa.get_adapter_model(model, fa.PrefixTuningConfig(num_virtual_tokens=P))
        assert model.config._attn_implementation == ATTN_NAME
        adapted = am(input_ids=ids, attention_mask=mask).logits
        with am.disable_adapter():
            assert model.config._attn_implementation == impl
            assert torch.equal(am(input_ids=ids, attention_mask=mask).logits, base)
        assert torch.equal(am(input_ids=ids, attention_mask=mask).logits, adapted)
        plain = am.unload()
        assert plain is model and model.config._attn_implementation == impl
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, base)
        assert not model._forward_pre_hooks and not model._forward_hooks


def test_two_adapters_switch_and_delete():
    model = tiny_model("llama")
    am = fa.get_adapter_model(model, fa.PrefixTuningConfig(num_virtual_tokens=P))
    am.add_adapter("other", fa.PrefixTuningConfig(num_virtual_tokens=2))
    ids, mask = padded_batch("none")
    with torch.no_grad():
        first = am(input_ids=ids, attention_mask=mask).logits
        am.set_adapter("other")
        second = am(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(first, second)
        am.set_adapter("default")
        assert torch.equal(am(input_ids=ids, attention_mask=mask).logits, first)
        am.delete_adapter("default")
        am.set_adapter("other")
        assert torch.equal(am(input_ids=ids, attention_mask=mask).logits, second)


def test_several_models_in_threads_keep_their_own_prefix():
    ams = [fa.get_adapter_model(tiny_model("llama"), fa.PrefixTuningConfig(num_virtual_tokens=n)) for n in (2, 5)]
    ids, mask = padded_batch("left")
    with torch.no_grad():
        expected = [am(input_ids=ids, attention_mask=mask).logits for am in ams]
    results: dict[int, list[bool]] = {0: [], 1: []}

    def work(i):
        with torch.no_grad():
            for _ in range(8):
                results[i].append(torch.equal(ams[i](input_ids=ids, attention_mask=mask).logits, expected[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: [True] * 8, 1: [True] * 8}
    assert not torch.allclose(expected[0], expected[1])


# -- unsupported models and bad inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", UNSUPPORTED or ["bloom"])
def test_unsupported_family_names_the_supported_ones(family):
    with pytest.raises(ValueError, match="AttentionInterface") as e:
        fa.get_adapter_model(tiny_model(family), fa.PrefixTuningConfig(num_virtual_tokens=P))
    assert "llama" in str(e.value) and family not in str(e.value).split("Supported families here:")[1]


def test_4d_mask_is_refused():
    am = fa.get_adapter_model(tiny_model("llama"), fa.PrefixTuningConfig(num_virtual_tokens=P))
    ids, _ = padded_batch("none")
    mask4d = torch.zeros(2, 1, 9, 9)
    with pytest.raises(ValueError, match="2-D"):
        am(input_ids=ids, attention_mask=mask4d)


# -- checkpoints ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", [False, True], ids=["table", "proj"])
def test_save_load_round_trip(tmp_path, projection):
    am, _ = make_pair("llama", projection)
    ids, mask = padded_batch("left")
    with torch.no_grad():
        before = am(input_ids=ids, attention_mask=mask).logits
    am.save_pretrained(tmp_path)
    loaded = fa.AdapterModel.from_pretrained(tiny_model("llama"), tmp_path)
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert loaded.peft_config["default"].prefix_projection == projection


@pytest.mark.parametrize("projection", [False, True], ids=["table", "proj"])
def test_peft_checkpoint_loads_here(tmp_path, projection):
    _, pm = make_pair("gpt2", projection)
    pm.save_pretrained(tmp_path)
    ids, mask = padded_batch("left")
    loaded = fa.AdapterModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    with torch.no_grad():
        ours = loaded(input_ids=ids, attention_mask=mask).logits
        theirs = pm(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=ATOL)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "proj"])
def test_peft_loads_our_checkpoint(tmp_path, projection):
    am, _ = make_pair("llama", projection)
    am.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    ids, mask = padded_batch("left")
    with torch.no_grad():
        ours = am(input_ids=ids, attention_mask=mask).logits
        theirs = pm(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=ATOL)


def test_trainable_load_of_projected_checkpoint_trains_the_table(tmp_path):
    am, _ = make_pair("llama", projection=True)
    am.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="projected prefix table"):
        loaded = fa.AdapterModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    params = dict(loaded.prompt_encoder["default"].named_parameters())
    assert list(params) == ["embedding.weight"] and params["embedding.weight"].requires_grad


def test_wrong_checkpoint_shape_names_the_tensor():
    am = fa.get_adapter_model(tiny_model("llama"), fa.PrefixTuningConfig(num_virtual_tokens=P))
    method = am._method("default")
    assert isinstance(method, PrefixTuningMethod)
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(3, 128\).*\(4, 128\)"):
        method.load_state_dict(am, "default", {"prompt_embeddings": torch.zeros(3, 128)})
    with pytest.raises(ValueError, match="no 'prompt_embeddings'"):
        method.load_state_dict(am, "default", {"embedding.weight": torch.zeros(4, 128)})


def test_attaching_a_prefix_does_not_change_the_callers_config():
    """A second model built from the same config object after attaching a prefix adapter to the first runs plain
    attention: the adapter changes only the adapted model's own (private) config."""
    import transformers as tf
    from tiny_models import tiny_config

    cfg = tiny_config("llama")
    torch.manual_seed(0)
    first = tf.LlamaForCausalLM(cfg).eval()
    impl = cfg._attn_implementation  # what building the model chose ("sdpa" or "eager")
    am = fa.get_adapter_model(first, fa.PrefixTuningConfig(num_virtual_tokens=3))
    assert cfg._attn_implementation == impl and am.base_model.config._attn_implementation == ATTN_NAME
    torch.manual_seed(0)
    second = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 100, (2, 6))
    out = second(input_ids=ids).logits  # raised "'fastadapters_prefix' was called without a prefix" before
    with am.disable_adapter():
        assert torch.allclose(am(input_ids=ids).logits, out, atol=1e-5)
    plain = am.unload()
    assert plain.config._attn_implementation == impl
