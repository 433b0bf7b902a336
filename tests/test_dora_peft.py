"""Parity with HF PEFT 0.21's DoRA (LoraConfig(use_dora=True)): same weights -> same logits and gradients (eval,
and training with dropout under one seed), checkpoints both ways, merge / unmerge, several adapters, refusals.

Two tolerances. With PEFT's dense norm swapped in (`dense_norm`) the layer does PEFT's arithmetic op for op and the
results are bitwise equal. With our norm (||W||^2 + 2s B.(WA^T) + s^2 B(AA^T)B^T, another summation order) fp32
results differ by a few ulps: DORA_TOL allows that and nothing more (logits are O(1); observed max 3e-7).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from tiny_models import tiny_batch, tiny_model

import fastadapters as fa
import fastadapters.tuners.lora as lora_tuner
from fastadapters.kernels.dora_ref import dora_norm_dense_ref
from fastadapters.targets import LORA_TARGETS

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore:the LoRA targets include transformers Conv1D"),
              pytest.mark.usefixtures("one_thread")]

FAMILIES = ("llama", "gpt2", "bloom", "opt")  # gpt2: Conv1D (fan_in_fan_out); bloom/opt: biased projections
VARIANTS = {
    "dropout0": {"lora_dropout": 0.0},
    "dropout_eval": {"lora_dropout": 0.1},
    "dropout_train": {"lora_dropout": 0.1, "train": True},  # PEFT's x_d W^T form; same seed -> same masks
    "rslora_bias_all": {"lora_dropout": 0.0, "use_rslora": True, "bias": "all"},
}
EXACT = {"atol": 0.0, "rtol": 0.0}
DORA_TOL = {"atol": 2e-6, "rtol": 1e-5}


@pytest.fixture
def dense_norm(monkeypatch):
    """The layer computes its norm with PEFT's dense formula (W + s B A), to show the rest is PEFT's arithmetic."""
    monkeypatch.setattr(lora_tuner, "dora_norm_ref", lambda w, a, b, s, wsq=None: dora_norm_dense_ref(w, a, b, s))


def ours(family: str, **kw) -> fa.AdapterModel:
    cfg = fa.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True, **kw)
    return fa.get_adapter_model(tiny_model(family), cfg)


def theirs(family: str, **kw) -> nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                             fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM", **kw)
    return peft.get_peft_model(tiny_model(family), config)


def copy_into_peft(am: fa.AdapterModel, pm: nn.Module) -> tuple[dict, dict]:
    mine = dict(am.base_model.named_parameters())
    peft_params = dict(pm.base_model.model.named_parameters())
    assert set(mine) == set(peft_params), "parameter paths differ from PEFT's"
    assert {n for n, p in mine.items() if p.requires_grad} == {n for n, p in peft_params.items() if p.requires_grad}
    with torch.no_grad():
        for n, p in mine.items():
            peft_params[n].copy_(p)
    return mine, peft_params


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def saved_keys(path) -> list[str]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def run_both(family: str, variant: str):
    kw = dict(VARIANTS[variant])
    train = kw.pop("train", False)
    ids, mask = tiny_batch(left_pad=2)
    am, pm = ours(family, **kw).train(train), theirs(family, **kw).train(train)
    assert set(pm.peft_config["default"].target_modules) == set(LORA_TARGETS[family]), "default targets differ"
    mine, peft_params = copy_into_peft(am, pm)
    outs = []
    for m in (am, pm):
        torch.manual_seed(7)  # training with dropout: both draw the same masks in the same order
        out = m(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        outs.append(out)
    trainable = [n for n, p in mine.items() if p.requires_grad]
    assert any(".lora_magnitude_vector." in n for n in trainable)
    return outs, [(n, mine[n].grad, peft_params[n].grad) for n in trainable]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_same_weights_same_logits_and_grads(family, variant):
    (out, ref), grads = run_both(family, variant)
    torch.testing.assert_close(out.logits, ref.logits, **DORA_TOL)
    for n, g, g_ref in grads:
        torch.testing.assert_close(g, g_ref, **DORA_TOL, msg=n)


@pytest.mark.parametrize("variant", ["dropout0", "dropout_train"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bitwise_with_peft_norm(family, variant, dense_norm):
    (out, ref), grads = run_both(family, variant)
    torch.testing.assert_close(out.logits, ref.logits, **EXACT)
    for n, g, g_ref in grads:
        torch.testing.assert_close(g, g_ref, **EXACT, msg=n)


@pytest.mark.parametrize("norm", ["ours", "peft_dense"])
@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_bf16_model_fp32_adapters_match_peft(family, norm, request):
    """PEFT's default dtype mix: a bf16 model with fp32 adapters (and magnitude). With PEFT's dense norm the
    logits and gradients are bitwise PEFT's; with ours the bf16 logits within one bf16 ulp (observed: equal) and
    the fp32 gradients within DORA_TOL."""
    if norm == "peft_dense":
        request.getfixturevalue("dense_norm")
    ids, mask = tiny_batch()
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=0.0, use_dora=True)
    am = fa.get_adapter_model(tiny_model(family, dtype=torch.bfloat16), fa.LoraConfig(**kw))
    pm = peft.get_peft_model(tiny_model(family, dtype=torch.bfloat16),
                             peft.LoraConfig(**kw, fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM"))
    mine, peft_params = copy_into_peft(am, pm)
    assert {p.dtype for n, p in mine.items() if p.requires_grad} == {torch.float32}
    out, ref = (m(input_ids=ids, attention_mask=mask, labels=ids) for m in (am, pm))
    tol = EXACT if norm == "peft_dense" else {"atol": 2.0**-6, "rtol": 2.0**-7}  # ours: 1 bf16 ulp of the logits
    torch.testing.assert_close(out.logits, ref.logits, **tol)
    out.loss.backward()
    ref.loss.backward()
    tol = EXACT if norm == "peft_dense" else DORA_TOL
    for n, p in mine.items():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, peft_params[n].grad, **tol, msg=n)


def test_magnitude_init_matches_peft_and_keeps_the_output():
    """init_lora_weights=True (B = 0): m = ||W|| row-wise, so the model's output is the base model's; bf16 too."""
    ids, mask = tiny_batch()
    for dtype in (torch.float32, torch.bfloat16):
        base = logits(tiny_model("opt", dtype=dtype), ids, mask)
        am = fa.get_adapter_model(tiny_model("opt", dtype=dtype), fa.LoraConfig(r=4, use_dora=True))
        pm = peft.get_peft_model(tiny_model("opt", dtype=dtype),
                                 peft.LoraConfig(r=4, use_dora=True, task_type="CAUSAL_LM"))
        mine = {n: p for n, p in am.base_model.named_parameters() if "magnitude" in n}
        theirs = {n: p for n, p in pm.base_model.model.named_parameters() if "magnitude" in n}
        assert set(mine) == set(theirs) and mine
        for n, p in mine.items():
            assert p.dtype == theirs[n].dtype == torch.float32, n
            torch.testing.assert_close(p, theirs[n], **EXACT, msg=n)
        tol = EXACT if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}  # bf16 output rounding
        torch.testing.assert_close(logits(am, ids, mask), logits(pm, ids, mask), **DORA_TOL)
        torch.testing.assert_close(logits(am, ids, mask), base, **(DORA_TOL if dtype == torch.float32 else tol))


CHECKPOINT_CASES = [(f, "dropout0") for f in FAMILIES] + [("gpt2", "rslora_bias_all")]


@pytest.mark.parametrize("family, variant", CHECKPOINT_CASES, ids=[f"{f}-{v}" for f, v in CHECKPOINT_CASES])
def test_checkpoints_load_both_ways(family, variant, tmp_path):
    kw = {k: v for k, v in VARIANTS[variant].items() if k != "train"}
    ids, mask = tiny_batch()

    # ours -> PEFT
    torch.manual_seed(1)
    am = ours(family, **kw)
    with torch.no_grad():  # a trained-looking magnitude, not the init value
        for n, p in am.base_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    expected = logits(am, ids, mask)
    am.save_pretrained(tmp_path / "ours")
    pc = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert isinstance(pc, peft.LoraConfig) and pc.use_dora is True
    assert (pc.r, set(pc.target_modules), pc.fan_in_fan_out) == (4, set(LORA_TARGETS[family]), family == "gpt2")
    pm = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(pm, ids, mask), expected, **DORA_TOL)

    # PEFT -> ours
    torch.manual_seed(3)
    pm = theirs(family, **kw)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    expected = logits(pm, ids, mask)
    pm.save_pretrained(str(tmp_path / "peft"))
    keys = saved_keys(tmp_path / "peft")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert saved_keys(tmp_path / "ours") == keys, "saved key names differ from PEFT's"
    loaded = fa.AdapterModel.from_pretrained(tiny_model(family), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, ids, mask), expected, **DORA_TOL)
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_json["use_dora"] is True and loaded.peft_config["default"].use_dora is True


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merge_and_unload_matches_peft(family):
    ids, mask = tiny_batch()
    am, pm = ours(family), theirs(family)
    copy_into_peft(am, pm)
    expected = logits(am, ids, mask)
    mine, ref = am.merge_and_unload(), pm.merge_and_unload()
    assert list(mine.state_dict()) == list(ref.state_dict())
    for (n, a), b in zip(mine.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, **DORA_TOL, msg=n)
    torch.testing.assert_close(logits(mine, ids, mask), logits(ref, ids, mask), **DORA_TOL)
    torch.testing.assert_close(logits(mine, ids, mask), expected, **DORA_TOL)


def test_merge_unmerge_round_trip_is_exact():
    ids, mask = tiny_batch()
    am = ours("bloom")
    before = {n: p.detach().clone() for n, p in am.base_model.named_parameters() if "base_layer" in n}
    expected = logits(am, ids, mask)
    am.merge_adapter()
    merged = logits(am, ids, mask)
    assert any(not torch.equal(p, before[n]) for n, p in am.base_model.named_parameters() if n in before)
    torch.testing.assert_close(merged, expected, **DORA_TOL)
    am.unmerge_adapter()
    for n, p in am.base_model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    torch.testing.assert_close(logits(am, ids, mask), expected, **EXACT)


def test_several_adapters_active_and_merged_match_peft():
    """DoRA, LoRA, DoRA active together: each DoRA adapter rescales the running result (PEFT's order); merging
    them folds in the same order."""
    ids, mask = tiny_batch()
    names = ("d1", "l2", "d3")
    kws = {"d1": {"r": 4, "use_dora": True}, "l2": {"r": 3}, "d3": {"r": 2, "use_dora": True}}
    common = {"lora_alpha": 8, "init_lora_weights": False, "lora_dropout": 0.0}
    torch.manual_seed(11)
    am = fa.get_adapter_model(tiny_model("opt"), fa.LoraConfig(**kws["d1"], **common), adapter_name="d1")
    pm = peft.get_peft_model(tiny_model("opt"), peft.LoraConfig(**kws["d1"], **common, task_type="CAUSAL_LM"), "d1")
    for n in names[1:]:
        am.add_adapter(n, fa.LoraConfig(**kws[n], **common))
        pm.add_adapter(n, peft.LoraConfig(**kws[n], **common, task_type="CAUSAL_LM"))
    am.set_adapter(list(names))
    pm.base_model.set_adapter(list(names))
    copy_into_peft(am, pm)
    expected = logits(pm, ids, mask)
    torch.testing.assert_close(logits(am, ids, mask), expected, **DORA_TOL)
    am.merge_adapter()
    pm.merge_adapter()
    torch.testing.assert_close(logits(am, ids, mask), logits(pm, ids, mask), **DORA_TOL)
    torch.testing.assert_close(logits(am, ids, mask), expected, **DORA_TOL)


def test_refusals_where_peft_refuses():
    am = ours("llama").eval()
    ids, mask = tiny_batch()
    with pytest.raises(ValueError, match="DoRA"):
        am(input_ids=ids, attention_mask=mask, adapter_names=["default", "__base__"])
    am(input_ids=ids, attention_mask=mask, adapter_names=["__base__", "__base__"])  # no DoRA adapter named: fine
    pm = theirs("llama").eval()
    with pytest.raises(ValueError, match="DoRA"):
        pm(input_ids=ids, attention_mask=mask, adapter_names=["default", "__base__"])

    with pytest.raises(ValueError, match="lora_bias"):
        peft.LoraConfig(use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="use_dora=True and lora_bias=True"):
        fa.AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "use_dora": True, "lora_bias": True})
    with pytest.raises(ValueError, match="use_dora"):
        fa.LoraConfig(use_dora="yes")


def test_fastadapters_train_use_dora_saves_a_peft_loadable_adapter(tmp_path):
    """`fastadapters train --use_dora` on a tiny Llama: the magnitude trains, the saved adapter is PEFT's DoRA layout
    and PEFT loads it to the same logits as fastadapters."""
    from fastadapters.data import iter_texts, make_arithmetic_data, save_records
    from fastadapters.demo_pipeline import write_tiny_llama
    from fastadapters.train import build_parser, train

    train_recs, test_recs = make_arithmetic_data(12, 2, seed=1)
    save_records(train_recs, tmp_path / "train.json")
    model = write_tiny_llama(str(tmp_path / "model"), list(iter_texts(train_recs + test_recs)), vocab_size=300)
    out = tmp_path / "run"
    argv = ["--base_model", model, "--data_path", str(tmp_path / "train.json"), "--output_dir", str(out),
            "--batch_size", "2", "--micro_batch_size", "2", "--max_steps", "1", "--save_step", "10",
            "--val_set_size", "0", "--warmup_steps", "0", "--learning_rate", "1e-2", "--cutoff_len", "64",
            "--progress", "false", "--adapter_name", "lora", "--lora_r", "4", "--lora_target_modules",
            "[q_proj,v_proj]", "--use_dora"]
    train(build_parser().parse_args(argv))
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    mags = [k for k in saved_keys(out) if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == 4  # 2 layers x (q_proj, v_proj)

    import transformers as tf

    base = tf.AutoModelForCausalLM.from_pretrained(model).eval()
    fresh = fa.get_adapter_model(tf.AutoModelForCausalLM.from_pretrained(model),
                                 fa.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    ours_loaded = fa.AdapterModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(model), out).eval()
    trained = dict(ours_loaded.base_model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.base_model.named_parameters()
               if "lora_magnitude_vector" in n), "the magnitude did not train"
    peft_loaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(logits(ours_loaded, ids, mask), logits(peft_loaded, ids, mask), **DORA_TOL)
