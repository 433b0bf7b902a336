"""TRL with an AdapterModel: SFTTrainer (TRL installs its fused LM head; the loss must equal the plain model's),
DPOTrainer with the reference model = the adapter disabled (fastadapters.hf.reference_model, no weight copy).
Tiny Llama with a tiny tokenizer written to disk, CPU, a few steps. Skipped where trl is not installed."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import transformers as tf  # noqa: E402

import fastadapters as fa  # noqa: E402
from fastadapters.demo_pipeline import write_tiny_llama  # noqa: E402
from fastadapters.hf import AdapterCheckpointCallback, reference_model  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

TEXTS = [f"{a} plus {b} is {a + b}." for a in range(12) for b in range(6)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(str(tmp_path_factory.mktemp("trl") / "model"), TEXTS, vocab_size=300)


def load(model_dir, adapter=None):
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = adapter or fa.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return fa.get_adapter_model(base, cfg), tok


def common(out, **kw):
    return dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                save_steps=3, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, **kw)


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_sft_trainer_with_an_adapter_model(model_dir, tmp_path, kind):
    adapter = None if kind == "lora" else fa.BottleneckConfig(bottleneck_size=8, init_weights="bert")
    am, tok = load(model_dir, adapter)
    before = {k: v.clone() for k, v in am.state_dict().items()}
    ds = datasets.Dataset.from_dict({"text": TEXTS[:16]})
    # SFTConfig's defaults: gradient checkpointing on, TRL's fused LM head installed on the model
    trainer = trl.SFTTrainer(model=am, args=trl.SFTConfig(**common(tmp_path), max_length=32), train_dataset=ds,
                             processing_class=tok, callbacks=[AdapterCheckpointCallback()])
    out = trainer.train()
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in am.state_dict().items())
    state = am.state_dict()
    assert [n for n, p in am.named_parameters() if p.requires_grad and n not in state] == []  # the base stays frozen

    # SFTConfig trains in bf16 autocast, which accelerate wraps around am.forward; unwrapping removes it again
    assert trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False) is am
    # the fused head's loss is the model's own loss (the adapters ran in both)
    batch = tok(TEXTS[:4], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    am.eval()
    with torch.no_grad():
        plain = am(**batch, labels=labels).loss
        fused = am(**batch, labels=labels, fused_lm_head=True).loss
        with am.disable_adapter():
            base = am(**batch, labels=labels).loss
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(base, plain)  # the adapter is in the computed loss

    ckpt = tmp_path / "checkpoint-3"
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= {p.name for p in ckpt.iterdir()}
    loaded = fa.AdapterModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(model_dir), str(ckpt))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, labels=labels).loss, plain, rtol=1e-6, atol=1e-6)


def test_sft_trainer_refuses_our_config_as_peft_config(model_dir, tmp_path):
    """TRL takes `peft_config` only as a peft.PeftConfig (it builds a PeftModel): pass the AdapterModel instead."""
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises((TypeError, ValueError), match="PeftConfig|peft"):
        trl.SFTTrainer(model=base, args=trl.SFTConfig(**common(tmp_path)), processing_class=
                       tf.AutoTokenizer.from_pretrained(model_dir), train_dataset=datasets.Dataset.from_dict(
                           {"text": TEXTS[:4]}), peft_config=fa.LoraConfig(r=4))


def test_dpo_with_the_adapter_disabled_as_reference(model_dir, tmp_path):
    am, tok = load(model_dir)
    ref = reference_model(am)
    assert all(p is q for p, q in zip(ref.parameters(), [p for n, p in am.base_model.named_parameters()
                                                          if "lora_" not in n], strict=True))  # shared, no copy
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad(), am.disable_adapter():
        torch.testing.assert_close(ref(**ids).logits, am(**ids).logits, rtol=0, atol=0)

    ds = datasets.Dataset.from_dict({"prompt": [f"{a} plus 1 is" for a in range(8)],
                                     "chosen": [f" {a + 1}." for a in range(8)],
                                     "rejected": [f" {a + 2}." for a in range(8)]})
    trainer = trl.DPOTrainer(model=am, ref_model=ref, args=trl.DPOConfig(**common(tmp_path), max_length=32),
                             train_dataset=ds, processing_class=tok, callbacks=[AdapterCheckpointCallback()])
    out = trainer.train()
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # step 1: the adapter (LoRA, B = 0) is the reference, so the DPO loss is log 2 exactly
    assert abs(logs[0]["loss"] - 0.6931) < 1e-3, logs[0]
    with torch.no_grad(), am.disable_adapter():  # the reference did not move with the policy
        torch.testing.assert_close(ref(**ids).logits, am(**ids).logits, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(ref(**ids).logits, am(**ids).logits)
    assert (tmp_path / "checkpoint-3" / "adapter_model.safetensors").exists()
