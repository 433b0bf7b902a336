"""FSDP2 (`fully_shard` on every decoder layer and the model) with 2 gloo processes on CPU: train a LoRA adapter,
save it adapter-only (gathered on rank 0: the same bytes as a one-process save of the same state), checkpoint
with torch.distributed.checkpoint (adapter-only, since AdapterModel.state_dict() is the adapter) and resume
exactly. The workers are this file run under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

STEPS, SPLIT, GLOBAL_BATCH, LENGTH = 4, 2, 4, 12


def build():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_models import tiny_model

    import fastadapters as fa

    model = tiny_model("llama", seed=0)
    torch.manual_seed(1)
    am = fa.get_adapter_model(model, fa.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]))
    return am.train()


def batch(step: int) -> torch.Tensor:
    from tiny_models import VOCAB

    return torch.randint(3, VOCAB, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(100 + step))


def optimizer(am):
    return torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-2)


def train_steps(am, opt, steps, rank=0, world=1):
    per = GLOBAL_BATCH // world
    for step in steps:
        ids = batch(step)[rank * per:(rank + 1) * per]
        am(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def worker(out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    main = rank == 0
    mesh = init_device_mesh("cpu", (world,))

    def sharded():
        am = build()
        for layer in am.base_model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(am, mesh=mesh)
        return am, optimizer(am)

    am, opt = sharded()
    am.save_pretrained(os.path.join(out, "step0"), is_main_process=main)  # gathered on rank 0
    train_steps(am, opt, range(SPLIT), rank, world)
    dcp.save({"model": am.state_dict(), "optim": get_optimizer_state_dict(am, opt)},
             checkpoint_id=os.path.join(out, "ckpt"))
    train_steps(am, opt, range(SPLIT, STEPS), rank, world)
    am.save_pretrained(os.path.join(out, "final"), is_main_process=main)

    # resume a fresh sharded model from the DCP checkpoint written at step SPLIT
    am, opt = sharded()
    state = {"model": am.state_dict(), "optim": get_optimizer_state_dict(am, opt)}
    dcp.load(state, checkpoint_id=os.path.join(out, "ckpt"))
    am.load_state_dict(state["model"])
    set_optimizer_state_dict(am, opt, state["optim"])
    train_steps(am, opt, range(SPLIT, STEPS), rank, world)
    am.save_pretrained(os.path.join(out, "resumed"), is_main_process=main)
    dist.barrier()
    dist.destroy_process_group()


def _torchrun(out) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTADAPTERS_BACKEND": "torch"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.usefixtures("one_thread")
def test_fsdp2_train_save_resume_two_cpu_processes(tmp_path):
    import torch.distributed.checkpoint as dcp

    from fastadapters.checkpoint import WEIGHTS_NAME, load_weights

    _torchrun(tmp_path)

    # the gathered save equals a one-process save of the same state, byte for byte
    single = build()
    single.save_pretrained(str(tmp_path / "single0"))
    assert (tmp_path / "step0" / WEIGHTS_NAME).read_bytes() == (tmp_path / "single0" / WEIGHTS_NAME).read_bytes()
    # ... and a one-process run on the whole batches reaches the same adapter (gradients averaged over 2 halves)
    train_steps(single, optimizer(single), range(STEPS))
    single.save_pretrained(str(tmp_path / "single"))
    ours, fsdp = load_weights(tmp_path / "single"), load_weights(tmp_path / "final")
    assert ours.keys() == fsdp.keys() and all("lora_" in k for k in ours)
    for k in ours:
        torch.testing.assert_close(fsdp[k], ours[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(ours[k], load_weights(tmp_path / "step0")[k]) for k in ours)  # it trained

    # the DCP checkpoint holds the adapter (and its optimizer state) only
    keys = set(dcp.FileSystemReader(str(tmp_path / "ckpt")).read_metadata().state_dict_metadata)
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and all("lora_" in k for k in model_keys), sorted(keys)[:5]
    # resuming from it gives the uninterrupted run's adapter exactly
    resumed = load_weights(tmp_path / "resumed")
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)


if __name__ == "__main__":
    worker(sys.argv[1])
