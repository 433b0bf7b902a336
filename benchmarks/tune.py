"""Offline config tuner: times candidate configs of each op's kernels at the benchmark shape buckets on THIS GPU and
writes kernels/configs/<device slug>.json, the table `kernels._configs.tuned(...)` reads (vLLM keeps its fused-MoE
configs this way). Nothing is timed at run time: launchers read the table, else their built-in pure function.

    python -m benchmarks.tune [--ops lora,bottleneck,prefix,multi_lora] [--preset full] [--out kernels/configs]
                              [--dry-run]

Needs a CUDA GPU (on a CPU it exits with one line, code 2). How a candidate is timed: the candidate is written into
a scratch copy of the table (FASTADAPTERS_CONFIG_DIR), the launchers' caches are cleared, and the op's whole
launcher call (forward + backward at the benchmark shape) is timed with triton.testing.do_bench -- the launchers
pick the candidate through the same `tuned()` lookup they use in production, so the tuner needs no per-op override
hooks and tunes exactly the key the launcher will look up. Candidates: the built-in config and its neighbours
(num_stages +-1, num_warps 4/8, each block_* halved / doubled); one that fails to compile or launch is skipped. The
winner must beat the built-in config by more than 3 % to be written (noise). The table records the device, Triton
version and date beside the entries ("_meta").

Table format (kernels/_configs.py): {op: {kernel: {key: {config field: value}}}, "_meta": {...}}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OPS = ("lora", "bottleneck", "prefix", "multi_lora")
OP_NAMES = {"lora": "lora", "bottleneck": "bottleneck", "prefix": "prefix_attention", "multi_lora": "multi_lora"}
MIN_GAIN = 0.03  # a tuned entry must beat the built-in config by more than this fraction


@dataclass
class Task:
    """One table entry to tune: table[op][kernel][key], starting from the built-in `default` config (a dict of the
    config dataclass's fields); `make_call()` builds the call to time (tensors on the GPU, allocated once)."""

    op: str
    kernel: str
    key: str
    default: dict
    make_call: Callable[[], Callable[[], Any]] | None = None


def neighbours(default: dict, limit: int = 16) -> list[dict]:
    """The default first, then its neighbours: num_stages +-1, num_warps 4 / 8, each block_* field x2 and /2 (>= 16)."""
    out = [dict(default)]

    def add(**change):
        c = {**default, **change}
        if c not in out:
            out.append(c)

    if "num_stages" in default:
        for s in (default["num_stages"] - 1, default["num_stages"] + 1):
            if s >= 1:
                add(num_stages=s)
    if "num_warps" in default:
        for w in (4, 8):
            add(num_warps=w)
    for f, v in default.items():
        if f.startswith("block_") and isinstance(v, int):
            for nv in (v // 2, v * 2):
                if nv >= 16:
                    add(**{f: nv})
    return out[:limit]


# ------------------------------------------------------------------------------------------------ table
def load_table(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def set_entry(table: dict, op: str, kernel: str, key: str, cfg: dict) -> None:
    table.setdefault(op, {}).setdefault(kernel, {})[key] = dict(cfg)


def write_table(path: Path, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def scratch_table(table: dict, device_name: str) -> Iterator[Path]:
    """A scratch FASTADAPTERS_CONFIG_DIR holding `table` as the device's file; the launchers' table cache cleared
    on the way in and out."""
    from fastadapters.kernels import _configs

    old = os.environ.get("FASTADAPTERS_CONFIG_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{_configs.device_slug(device_name)}.json"
        write_table(path, table)
        os.environ["FASTADAPTERS_CONFIG_DIR"] = tmp
        _configs.clear_cache()
        try:
            yield path
        finally:
            if old is None:
                os.environ.pop("FASTADAPTERS_CONFIG_DIR", None)
            else:
                os.environ["FASTADAPTERS_CONFIG_DIR"] = old
            _configs.clear_cache()


def tune(tasks: list[Task], device_name: str, timer: Callable[[Callable[[], Any]], float],
         base: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Time every candidate of every task (`timer(call) -> ms`); returns the table: `base` plus each task's winner
    where it beats the built-in config by more than MIN_GAIN (an entry equal to the default is left out)."""
    table = json.loads(json.dumps(base or {}))
    for task in tasks:
        call = task.make_call() if task.make_call else (lambda: None)
        results = []
        for cand in neighbours(task.default):
            trial = json.loads(json.dumps(table))
            set_entry(trial, task.op, task.kernel, task.key, cand)
            with scratch_table(trial, device_name):
                try:
                    ms = float(timer(call))
                except Exception as e:  # noqa: BLE001 -- a candidate that does not compile / launch is skipped
                    log(f"  {task.op}/{task.kernel} {task.key} {cand}: skipped ({type(e).__name__}: {str(e)[:120]})")
                    continue
            results.append((ms, cand))
        if not results:
            continue
        default_ms = next((ms for ms, c in results if c == task.default), float("inf"))
        best_ms, best = min(results, key=lambda r: r[0])
        gain = 1.0 - best_ms / default_ms if default_ms < float("inf") else 1.0
        log(f"{task.op}/{task.kernel} {task.key}: built-in {default_ms:.4g} ms, best {best_ms:.4g} ms {best}")
        if best != task.default and gain > MIN_GAIN:
            set_entry(table, task.op, task.kernel, task.key, best)
    return table


# ------------------------------------------------------------------------------------------------ tasks per op
def _asdict(cfg: Any) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


def _mod(name: str):
    import importlib

    return importlib.import_module(f"fastadapters.kernels.{name}")


def tasks_for(op: str, tgt: Any, preset: str = "full", device: str = "cuda") -> list[Task]:
    """The table entries the launchers look up at `op`'s benchmark shapes on target `tgt`, with their built-in
    configs and (for a GPU `device`) the call to time. Builds on CPU too (keys and defaults only)."""
    import torch

    from fastadapters.kernels._configs import shape_bucket

    bf16 = torch.bfloat16
    tasks: list[Task] = []
    if op == "bottleneck":
        from benchmarks.bench_bottleneck import PRESETS

        C, L = _mod("bottleneck_configs"), _mod("bottleneck_launch")
        c = PRESETS[preset]
        for M in c["Ms"]:
            B = C.bottleneck_pad(c["b"])
            key = C.config_key(bf16, shape_bucket(M), c["d"], c["d"], B, True)

            def make(M=M):
                h = torch.randn(M, c["d"], device=device, dtype=bf16, requires_grad=True)
                wd = torch.randn(c["b"], c["d"], device=device) * 0.02
                wu = torch.randn(c["d"], c["b"], device=device) * 0.02
                dy = torch.randn_like(h)

                def call():
                    y, pre, a = L.bottleneck_fwd(h, wd, wu, None, None, None, None, 1.0, "silu")
                    L.bottleneck_bwd(dy, h, wd, wu, None, pre, a, None, 1.0, "silu", add_dy=True)
                return call

            for kind in ("fwd", "dx", "wgrad"):
                default = C.bottleneck_config(tgt, kind, bf16, B, True)
                tasks.append(Task("bottleneck", kind, key, _asdict(default), make))
    elif op == "lora":
        from benchmarks.bench_lora import PRESETS

        C, L = _mod("lora_configs"), _mod("lora_launch")
        c = PRESETS[preset]
        K, N, r = c["K"], c["N"], c["r"]
        r_pad = C.rank_pad(r)
        for M in c["Ms"]:
            def make(M=M):
                x = torch.randn(M, K, device=device, dtype=bf16)
                W = torch.randn(N, K, device=device, dtype=bf16) * 0.02
                A = torch.randn(r, K, device=device, dtype=bf16) * 0.02
                Bm = torch.randn(N, r, device=device, dtype=bf16) * 0.02
                dy = torch.randn(M, N, device=device, dtype=bf16)

                def call():
                    _, xa = L.lora_linear_fwd(x, W, None, A, Bm, 2.0, 0.05, seed=1)
                    L.lora_linear_bwd(dy, x, W, A, Bm, xa, 2.0, 0.05, 1)
                return call

            # the shrink's four uses: xa (rows M, reduce K), dxa (M, N), dA (K, M), dB (N, M)
            for rows, red in ((M, K), (M, N), (K, M), (N, M)):
                rb, redb = shape_bucket(rows), shape_bucket(red)
                default = C.shrink_config(tgt, bf16, r_pad, rb)
                task = Task("lora", "shrink", C.shrink_key(bf16, r_pad, rb, redb), _asdict(default), make)
                if all(t.key != task.key for t in tasks):
                    tasks.append(task)
            for dropout in (True, False):
                default = C.gemm_config(tgt, bf16, shape_bucket(M), dropout=dropout)
                tasks.append(Task("lora", "gemm", C.gemm_key(bf16, shape_bucket(M), N, K, dropout), _asdict(default),
                                  make))
    elif op == "prefix":
        from benchmarks.bench_prefix_attention import PRESETS

        C, L = _mod("prefix_attention_configs"), _mod("prefix_attention_launch")
        for B, H, Ls, D, P in PRESETS[preset]["shapes"]:
            bucket = C.seq_bucket(Ls, Ls, P)
            cfgs = C.prefix_config(tgt, bf16, D, bucket)

            def make(B=B, H=H, Ls=Ls, D=D, P=P):
                q, k, v = (torch.randn(B, H, Ls, D, device=device, dtype=bf16) for _ in range(3))
                pk, pv = (torch.randn(H, P, D, device=device, dtype=bf16) for _ in range(2))

                def call():
                    out, lse = L.prefix_attention_fwd(q, k, v, pk, pv, None, True, D**-0.5)
                    L.prefix_attention_bwd(out, None, q, k, v, pk, pv, None, out, lse, True, D**-0.5)
                return call

            key = C.config_key(bf16, D, bucket)
            for kernel, cfg in (("fwd", cfgs.fwd), ("bwd_kv", cfgs.kv), ("bwd_dq", cfgs.dq)):
                tasks.append(Task("prefix_attention", kernel, key, _asdict(cfg), make))
    elif op == "multi_lora":
        from benchmarks.bench_multi_lora import PRESETS

        C, L = _mod("multi_lora_configs"), _mod("multi_lora_launch")
        c = PRESETS[preset]
        r_pad = C.rank_pad(c["r"])
        for M in (c["batch"], c["batch"] * c["prefill"]):
            def make(M=M, n=8, K=4096, N=4096):
                x = torch.randn(M, K, device=device, dtype=bf16)
                A = torch.randn(n, r_pad, K, device=device, dtype=bf16) * 0.02
                Bs = torch.randn(n, N, r_pad, device=device, dtype=bf16) * 0.02
                s = torch.ones(n, device=device)
                idx = torch.randint(0, n, (M,), device=device)
                out = torch.zeros(M, N, device=device, dtype=bf16)
                return lambda: L.multi_lora_fwd(x, A, Bs, s, idx, out)

            m_b = shape_bucket(M)
            default = C.multi_lora_config(tgt, bf16, m_b, r_pad)
            tasks.append(Task("multi_lora", "tiles", C.tiles_key(bf16, m_b, r_pad), _asdict(default), make))
    else:
        raise ValueError(f"unknown op {op!r}: choose from {', '.join(OPS)}")
    return tasks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--preset", default="full", choices=("quick", "full"))
    p.add_argument("--out", default=None, help="folder for <device slug>.json (default kernels/configs)")
    p.add_argument("--dry-run", action="store_true", help="time, print, write nothing")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.tune needs a CUDA GPU: run it on the GPU whose table you want "
              "(it writes kernels/configs/<device>.json)", file=sys.stderr)
        return 2
    ops = a.ops.split(",")
    bad = [o for o in ops if o not in OPS]
    if bad:
        print(f"unknown op {bad[0]!r}: choose from {', '.join(OPS)}", file=sys.stderr)
        return 2
    import triton

    from fastadapters.kernels import _configs

    dev = torch.device("cuda", torch.cuda.current_device())
    tgt = _configs.target(dev)
    out_dir = Path(a.out) if a.out else _configs.TABLE_DIR
    path = out_dir / f"{_configs.device_slug(tgt.name)}.json"
    table = load_table(path)
    table.pop("_meta", None)

    def timer(call: Callable[[], Any]) -> float:
        return triton.testing.do_bench(call, warmup=25, rep=100, quantiles=None)

    tasks = [t for op in ops for t in tasks_for(op, tgt, a.preset, "cuda")]
    print(f"tuning {len(tasks)} table entries on {tgt.name} ({tgt.arch})", flush=True)
    table = tune(tasks, tgt.name, timer, base=table)
    table["_meta"] = {"device": tgt.name, "arch": tgt.arch, "triton": triton.__version__, "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset": a.preset}
    if a.dry_run:
        print(json.dumps(table, indent=1, sort_keys=True))
    else:
        write_table(path, table)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
