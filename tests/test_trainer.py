"""An AdapterModel in transformers' Trainer with default TrainingArguments: the forward signature Trainer reads,
adapter-only checkpoints (bytes asserted) in Trainer's and PEFT's layout, exact resume, load_best_model_at_end,
activation checkpointing (Trainer's every_n_layers call) and torch_compile. Tiny Llama, CPU, a few steps."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from tiny_models import VOCAB, tiny_model

import fastadapters as fa
from fastadapters.hf import AdapterCheckpointCallback, AdapterTrainer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]


class Rows(torch.utils.data.Dataset):
    """Causal-LM rows with an extra text column that Trainer must drop (remove_unused_columns, the default)."""

    def __init__(self, n: int = 16, length: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "text": "a row"}


def lora_model(seed: int = 0) -> fa.AdapterModel:
    torch.manual_seed(seed)
    return fa.get_adapter_model(tiny_model("llama"), fa.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                  target_modules=["q_proj", "v_proj"]))


def args(out, **kw) -> tf.TrainingArguments:
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, save_steps=2, report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    base.update(kw)
    return tf.TrainingArguments(**base)


def adapter_keys(model: fa.AdapterModel) -> set[str]:
    return {n for n, _ in model.named_parameters() if "lora_" in n}


def adapter_bytes(model: fa.AdapterModel) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


def file_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- the model as Trainer sees it

def test_forward_signature_is_the_base_models():
    am = lora_model()
    params = inspect.signature(am.forward).parameters
    assert {"input_ids", "attention_mask", "labels"} <= set(params)
    assert "args" not in params and "adapter_names" in params
    assert set(am.state_dict()) == adapter_keys(am)  # the model's state is its adapter


def test_state_dict_round_trip_is_strict_about_adapters():
    am, other = lora_model(0), lora_model(1)
    with torch.no_grad():
        for p in am.adapter_parameters():
            p.add_(0.5)
    other.load_state_dict(am.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(am.state_dict().values(), other.state_dict().values(), strict=True))
    partial = dict(am.state_dict())
    partial.pop(next(iter(partial)))
    with pytest.raises(RuntimeError, match="missing"):
        other.load_state_dict(partial)
    assert other.load_state_dict(partial, strict=False).missing_keys == [next(iter(am.state_dict()))]


# ---------------------------------------------------------------- plain Trainer, default arguments

def test_plain_trainer_default_arguments_trains_with_adapter_only_checkpoints(tmp_path):
    am = lora_model()
    full_bytes = sum(p.numel() * p.element_size() for p in am.base_model.parameters())
    before = adapter_state(am)
    trainer = tf.Trainer(model=am, args=args(tmp_path), train_dataset=Rows())
    out = trainer.train()
    assert out.global_step == 4 and torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in am.state_dict().items())
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        weights = tmp_path / ckpt / "model.safetensors"
        assert file_keys(weights) == adapter_keys(am)  # no base tensor
        assert weights.stat().st_size < adapter_bytes(am) + 16_384 < full_bytes / 10
    trainer.save_model(str(tmp_path / "final"))
    assert file_keys(tmp_path / "final" / "model.safetensors") == adapter_keys(am)


# ---------------------------------------------------------------- AdapterTrainer: PEFT's layout

def test_adapter_trainer_writes_peft_layout_that_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    am = lora_model()
    trainer = AdapterTrainer(model=am, args=args(tmp_path), train_dataset=Rows())
    trainer.train()
    trainer.save_model()
    ckpt, final = tmp_path / "checkpoint-4", tmp_path
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "optimizer.pt"} <= {
        p.name for p in ckpt.iterdir()}
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    assert (final / "adapter_model.safetensors").stat().st_size < adapter_bytes(am) + 16_384
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ids = Rows()[0]["input_ids"][None]
    am.eval()
    with torch.no_grad():
        ours = am(input_ids=ids).logits
        for folder in (ckpt, final):
            theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(folder))(input_ids=ids).logits
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
            again = fa.AdapterModel.from_pretrained(tiny_model("llama"), str(folder))(input_ids=ids).logits
            torch.testing.assert_close(again, ours, rtol=0, atol=0)


def test_callback_adds_peft_layout_to_any_trainer(tmp_path):
    am = lora_model()
    tf.Trainer(model=am, args=args(tmp_path, max_steps=2), train_dataset=Rows(),
               callbacks=[AdapterCheckpointCallback()]).train()
    keys = file_keys(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert keys == {"base_model.model." + k.removeprefix("base_model.").replace(".default", "")
                    for k in adapter_keys(am)}  # PEFT's key names
    assert keys == set(am.adapter_state_dict())


# ---------------------------------------------------------------- resume, best model

def test_resume_from_checkpoint_is_exact(tmp_path):
    full = lora_model()
    AdapterTrainer(model=full, args=args(tmp_path / "full"), train_dataset=Rows()).train()

    class Stop(tf.TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    first = lora_model()
    AdapterTrainer(model=first, args=args(tmp_path / "cut"), train_dataset=Rows(), callbacks=[Stop()]).train()
    resumed = lora_model(seed=5)  # another initial adapter: resume must overwrite it
    trainer = AdapterTrainer(model=resumed, args=args(tmp_path / "cut"), train_dataset=Rows())
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    am = lora_model()

    class PickStep2(tf.TrainerCallback):  # an eval metric that makes step 2 the best, so best != last
        def on_evaluate(self, a, state, control, metrics=None, **kw):
            metrics["eval_pick"] = float(state.global_step == 2)

    trainer = AdapterTrainer(
        model=am, train_dataset=Rows(), eval_dataset=Rows(8, seed=1), callbacks=[PickStep2()],
        args=args(tmp_path, eval_strategy="steps", eval_steps=1, save_steps=1, load_best_model_at_end=True,
                  metric_for_best_model="pick", greater_is_better=True))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    assert trainer.state.log_history[-2]["eval_loss"] > 0  # Trainer found the labels: eval computes a loss
    from fastadapters.checkpoint import load_weights

    saved = load_weights(best)
    now = am.adapter_state_dict()
    assert saved.keys() == now.keys()
    assert all(torch.equal(saved[k], now[k]) for k in saved)
    last = load_weights(os.path.join(str(tmp_path), "checkpoint-4"))
    assert any(not torch.equal(last[k], now[k]) for k in saved)


# ---------------------------------------------------------------- activation checkpointing, torch.compile

def _trained(tmp_path, name, model=None, **kw):
    am = model if model is not None else lora_model()
    tf.Trainer(model=am, args=args(tmp_path / name, max_steps=2, save_strategy="no", **kw),
               train_dataset=Rows()).train()
    return am


def test_activation_checkpointing_through_trainer_gives_the_same_adapter(tmp_path):
    key = "activation_checkpointing" if "activation_checkpointing" in inspect.signature(
        tf.TrainingArguments).parameters else "gradient_checkpointing"
    plain = _trained(tmp_path, "plain")
    ckpt = _trained(tmp_path, "ckpt", **{key: True, f"{key}_kwargs": {"use_reentrant": False, "every_n_layers": 1}})
    assert ckpt.base_model.is_activation_checkpointing if hasattr(ckpt.base_model, "is_activation_checkpointing") \
        else ckpt.base_model.is_gradient_checkpointing
    for (k, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)


def test_every_n_layers_reaches_the_base_model():
    am = lora_model()
    am.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=2)
    flags = [getattr(layer, "gradient_checkpointing", False) for layer in am.base_model.model.layers]
    assert flags == [True, False]


def prompt_model() -> fa.AdapterModel:
    torch.manual_seed(0)
    return fa.get_adapter_model(tiny_model("llama"), fa.PromptTuningConfig(num_virtual_tokens=3))


def test_torch_compile_through_trainer(tmp_path):
    # prompt tuning: dynamo traces AdapterModel's forward path only. (LoRA compiles too, but today the op backend
    # lookup graph-breaks in every layer and the first step takes 70-90 s on this CPU: a case for the kernels' tests.)
    plain = _trained(tmp_path, "plain", prompt_model())
    compiled = _trained(tmp_path, "compiled", prompt_model(), torch_compile=True, torch_compile_backend="eager")
    for (k, a), b in zip(plain.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
