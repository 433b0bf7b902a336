"""QLoRA: LoRA on a 4-bit (NF4) / 8-bit bitsandbytes base equals PEFT on the same quantized base (logits, loss,
adapter gradients), and trains and saves adapter-only through AdapterTrainer. bitsandbytes runs on CPU here.

Decision: on a quantized base the LoRA layer runs the reference path, the base layer's own bitsandbytes matmul
plus the LoRA delta (ops), not dequantize-then-fused-kernel: the fused kernel needs a dense W, and dequantizing it
on every call writes and reads the N x K matrix that the 4-bit format exists to avoid, while the delta (r << K)
is cheap."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny_models import VOCAB, tiny_config

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import fastadapters as fa  # noqa: E402
from fastadapters.hf import AdapterTrainer  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlora") / "model"
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(path)
    return str(path)


def quantized(model_dir, bits):
    qc = tf.BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
    return tf.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qc, device_map={"": "cpu"})


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_lora_on_a_quantized_base_matches_peft(model_dir, bits):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    am = fa.get_adapter_model(quantized(model_dir, bits), fa.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                        init_lora_weights=False))
    pm = peft.get_peft_model(quantized(model_dir, bits), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    peft.set_peft_model_state_dict(pm, am.adapter_state_dict())
    layer = am.base_model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    ours, theirs = am(input_ids=ids, labels=ids), pm(input_ids=ids, labels=ids)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours.logits, quantized(model_dir, bits)(input_ids=ids).logits)  # the adapter acts
    ours.loss.backward()
    theirs.loss.backward()
    mine = {n: p.grad for n, p in am.named_parameters() if p.requires_grad}
    ref = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert len(mine) == len(ref) == 8
    for (n, a), b in zip(sorted(mine.items()), [ref[k] for k in sorted(ref)], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("adapter", ["lora", "bottleneck"])
def test_trainer_on_a_4bit_base_saves_the_adapter_only(model_dir, tmp_path, adapter):
    cfg = (fa.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS) if adapter == "lora"
           else fa.BottleneckConfig(bottleneck_size=8, init_weights="bert"))
    am = fa.get_adapter_model(quantized(model_dir, 4), cfg)
    before = {k: v.clone() for k, v in am.state_dict().items()}
    ids = torch.randint(3, VOCAB, (8, 10), generator=torch.Generator().manual_seed(3))
    rows = [{"input_ids": r, "labels": r} for r in ids]
    args = tf.TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                                save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True)
    AdapterTrainer(model=am, args=args, train_dataset=rows).train()  # Trainer accepts a quantized base with adapters
    assert any(not torch.equal(before[k], v) for k, v in am.state_dict().items())
    saved = fa.checkpoint.load_weights(tmp_path / "checkpoint-2")
    assert saved.keys() == am.adapter_state_dict().keys()
    size = (tmp_path / "checkpoint-2" / "model.safetensors").stat().st_size
    assert size < sum(v.numel() * v.element_size() for v in am.state_dict().values()) + 16_384
