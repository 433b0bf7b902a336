"""The offline tuner (benchmarks/tune.py) without a GPU: a fake timer picks the winners, the table it writes is the one
`kernels._configs.tuned()` reads, and the launchers look up exactly the keys the tuner writes (checked by recording a
launch on meta tensors under a fake device whose table holds a distinctive config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the kernel tests share the process)

import pytest

pytest.importorskip("triton")

from benchmarks import tune  # noqa: E402
from fastadapters.kernels import _configs  # noqa: E402

FAKE = _configs.Target("sm_90", (9, 0), 232448, 132, name="Fake H100 80GB")


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTADAPTERS_CONFIG_DIR", str(tmp_path))
    _configs.clear_cache()
    yield tmp_path
    _configs.clear_cache()


def test_neighbours_start_with_the_default_and_stay_distinct():
    d = {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3}
    c = tune.neighbours(d)
    assert c[0] == d and len(c) == len({json.dumps(x, sort_keys=True) for x in c}) > 4
    assert {"block_m": 32, "block_n": 128, "num_warps": 4, "num_stages": 3} in c
    assert all(x["block_m"] >= 16 and x["num_stages"] >= 1 for x in c)


def test_tune_writes_what_tuned_reads(config_dir):
    """Fake timer: a candidate's time is its num_stages (fewer is faster) plus a penalty on block_m != 32; the
    table gets the fastest neighbour (one field changed: block_m 64 -> 32), `tuned()` returns it; a candidate that
    raises is skipped; a task whose default wins writes no entry."""
    def timer_for(task_of_call):
        def timer(call):
            cfg = _configs.tuned(FAKE, *task_of_call[call])
            assert cfg is not None, "the candidate must be visible to tuned() while it is timed"
            if cfg.get("num_warps") == 8:
                raise RuntimeError("out of resources")  # skipped, not fatal
            return cfg["num_stages"] + (0 if cfg["block_m"] == 32 else 10)
        return timer

    t1 = tune.Task("bottleneck", "fwd", "bf16/M4096/x", {"block_m": 64, "block_n": 64, "num_warps": 4,
                                                        "num_stages": 3})
    t2 = tune.Task("lora", "gemm", "bf16/M256/y", {"block_m": 32, "block_n": 64, "num_warps": 4, "num_stages": 1})
    calls = {}
    for t in (t1, t2):
        def call():
            return None
        t.make_call = (lambda c=call: c)
        calls[call] = (t.op, t.kernel, t.key)
    table = tune.tune([t1, t2], FAKE.name, timer_for(calls), log=lambda s: None)
    path = config_dir / f"{_configs.device_slug(FAKE.name)}.json"
    tune.write_table(path, table)
    _configs.clear_cache()
    assert _configs.tuned(FAKE, "bottleneck", "fwd", "bf16/M4096/x") == {"block_m": 32, "block_n": 64, "num_warps": 4,
                                                                          "num_stages": 3}
    assert _configs.tuned(FAKE, "lora", "gemm", "bf16/M256/y") is None  # the default won: no entry
    assert _configs.tuned(_configs.ARCHS["sm_90"], "bottleneck", "fwd", "bf16/M4096/x") is None  # no device name
    assert json.loads(path.read_text())["bottleneck"]["fwd"]["bf16/M4096/x"]["block_m"] == 32


def test_launchers_read_the_keys_the_tuner_writes(config_dir):
    """For each op, the tuner's first task (built on CPU for the fake device) written with a distinctive config:
    the launcher, recording on meta tensors for that device, launches with it."""
    from fastadapters.kernels import bottleneck_launch as BL
    from fastadapters.kernels import multi_lora_launch as ML

    path = config_dir / f"{_configs.device_slug(FAKE.name)}.json"
    [fwd] = [t for t in tune.tasks_for("bottleneck", FAKE, "quick", "meta") if t.kernel == "fwd"]
    [tiles, _] = tune.tasks_for("multi_lora", FAKE, "quick", "meta")
    table = {}
    odd_fwd = {**fwd.default, "num_stages": fwd.default["num_stages"] + 1}
    odd_tiles = {**tiles.default, "shrink_warps": 8 if tiles.default["shrink_warps"] != 8 else 4}
    tune.set_entry(table, fwd.op, fwd.kernel, fwd.key, odd_fwd)
    tune.set_entry(table, tiles.op, tiles.kernel, tiles.key, odd_tiles)
    tune.write_table(path, table)
    _configs.clear_cache()
    m = torch.device("meta")
    with _configs.use_target(FAKE), BL.record_launches() as rec:
        h = torch.empty(4096, 4096, device=m, dtype=torch.bfloat16)
        w = torch.empty(256, 4096, device=m, dtype=torch.float32)
        BL.bottleneck_fwd(h, w, w.t().contiguous(), None, None, None, None, 1.0, "silu")
    [launch] = [r for r in rec if "fwd" in r.kernel.fn.__name__]
    assert launch.num_stages == odd_fwd["num_stages"]
    with _configs.use_target(FAKE), ML.record_launches() as rec:
        M, n = 32, 8
        ML.multi_lora_fwd(torch.empty(M, 4096, device=m, dtype=torch.bfloat16),
                          torch.empty(n, 16, 4096, device=m, dtype=torch.bfloat16),
                          torch.empty(n, 4096, 16, device=m, dtype=torch.bfloat16),
                          torch.empty(n, device=m), torch.empty(M, device=m, dtype=torch.int64),
                          torch.empty(M, 4096, device=m, dtype=torch.bfloat16))
    [shrink] = [r for r in rec if "shrink" in r.kernel.fn.__name__]
    assert shrink.num_warps == odd_tiles["shrink_warps"]


@pytest.mark.parametrize("op", tune.OPS)
def test_tasks_build_on_cpu(op):
    tasks = tune.tasks_for(op, FAKE, "full", "meta")
    assert tasks and all(t.key and t.default for t in tasks)


def test_cli_on_cpu_exits_2_with_one_line():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    p = subprocess.run([sys.executable, "-m", "benchmarks.tune"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "GPU" in p.stderr
