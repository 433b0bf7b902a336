"""The benchmark driver: every op, kernel and model level, side by side with the peers and the floor, in one CSV.

    python -m benchmarks [--preset smoke|quick|full] [--ops lora,model,...] [--out DIR|FILE.csv] [--plots DIR]
                         [--device auto|cpu|cuda] [--dtype bfloat16|float16|float32] [--layers N] [--list]

It measures the device's ceilings first (a large device copy, GB/s, and a large matmul, TFLOP/s: rows of op
"ceiling", and the bound the bottleneck floor divides by), then runs each op of REGISTRY in order, appending its
rows to --out (default benchmarks/results/results.csv) as they are measured, prints one table per op and, with
--plots, draws the PNG charts (benchmarks/plot.py). Exit status 1 when any provider failed (its error is
printed; the other providers still ran), 0 otherwise. Providers that cannot run here (no fused kernel registered,
a kernel that refuses the inputs, FlexAttention on a CPU) are skipped with a note, not an error.

A benchmark module exposes OP (the op column), PRESETS (preset -> shape config) and bench(rec, ctx, cfg).
A module with only the older `run(argv)` entry (--smoke / --quick / --out / --device / --dtype) runs through it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from benchmarks import common

REGISTRY: dict[str, str] = {  # name for --ops -> module; the driver runs them in this order
    "lora": "benchmarks.bench_lora",
    "dora": "benchmarks.bench_dora",
    "bottleneck": "benchmarks.bench_bottleneck",
    "multi_lora": "benchmarks.bench_multi_lora",
    "prefix_attention": "benchmarks.bench_prefix_attention",  # last of the kernel level: FlexAttention compiles
    "model": "benchmarks.bench_model",
    "decode": "benchmarks.bench_decode",
}
OPTIONAL = frozenset({"multi_lora"})  # written under another issue: a note, not an error, while it is missing


def parser():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--ops", default="all", help=f"comma-separated subset of {','.join(REGISTRY)} (default all)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of the model-level and decode benchmarks (default: 2, tiny for smoke)")
    p.add_argument("--plots", default=None, help="draw the PNG charts of this run's CSV into this folder")
    p.add_argument("--list", action="store_true", help="print the registry and the presets, run nothing")
    return p


def select(spec: str) -> list[str]:
    """The op names of a comma-separated --ops value ("all" for every op), in registry order."""
    names = list(REGISTRY) if spec.strip() in ("", "all") else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"--ops {','.join(unknown)}: unknown; choose from {','.join(REGISTRY)} or all")
    return [n for n in REGISTRY if n in names]


def load(name: str) -> ModuleType | None:
    """The module of op `name`, or None when an OPTIONAL one is not there (yet)."""
    try:
        return importlib.import_module(REGISTRY[name])
    except ModuleNotFoundError as e:
        if name in OPTIONAL and e.name == REGISTRY[name]:
            return None
        raise


def legacy_argv(preset: str, args) -> list[str]:
    """Arguments for a module that only has run(argv) (common.base_parser's older flags)."""
    argv = {"smoke": ["--smoke"], "quick": ["--quick"], "full": []}[preset]
    argv += ["--device", args.device, "--out", str(common.results_path(args.out, preset))]
    return argv + (["--dtype", args.dtype] if args.dtype else [])


def run_op(name: str, ctx: common.Context, meta: dict[str, str], path: Path, args) -> int:
    """Run one op's benchmark at ctx.preset; 0 when every provider ran or was skipped on purpose, else 1."""
    mod = load(name)
    if mod is None:
        print(f"note: {name}: skipped, {REGISTRY[name]} is not there yet", flush=True)
        return 0
    if hasattr(mod, "bench") and hasattr(mod, "PRESETS"):
        rec = common.Recorder(mod.OP, ctx.device, meta, path=path)
        with common.quiet():
            rec.run(name, lambda: mod.bench(rec, ctx, mod.PRESETS[ctx.preset]))
        common.free_memory(ctx.device)
        return rec.finish()
    if hasattr(mod, "run"):
        try:
            return int(mod.run(legacy_argv(ctx.preset, args)) or 0)
        except Exception as e:  # the other ops still run
            print(f"ERROR: {name}: {type(e).__name__}: {e}", flush=True)
            return 1
    print(f"ERROR: {name}: {REGISTRY[name]} has neither bench(rec, ctx, cfg) with PRESETS nor run(argv)", flush=True)
    return 1


def describe() -> str:
    lines = ["ops (python -m benchmarks --ops NAME,...):"]
    for name, module in REGISTRY.items():
        mod = load(name)
        doc = (mod.__doc__ or "").strip().splitlines()[0] if mod is not None else "(not there yet)"
        lines.append(f"  {name:18s} {module}: {doc}")
    lines.append(f"presets: {', '.join(common.PRESETS)} (timing budget ms: "
                 + "; ".join(f"{k} {v['warmup_ms']:g}/{v['rep_ms']:g}" for k, v in common.BUDGETS.items()) + ")")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        print(describe())
        return 0
    names = select(args.ops)
    device = common.resolve_device(args.device)
    args.preset = common.preset_of(args, default="quick" if device.type == "cuda" else "smoke")
    device, dtype, budget = common.setup(args)
    ctx = common.Context(device, dtype, args.preset, budget, layers=args.layers)
    meta = common.env_meta(device)  # one gpu / versions / date / commit stamp for every row of this run
    path = common.results_path(args.out, ctx.preset)
    print(f"benchmarks: preset {ctx.preset}, {meta['gpu']}, {dtype}, ops {','.join(names)} -> {path}", flush=True)

    ceilings = common.Recorder("ceiling", device, meta, path=path)
    ceilings.run("ceilings", lambda: common.measure_ceilings(ceilings, ctx))
    rc = ceilings.finish()
    for name in names:
        rc |= run_op(name, ctx, meta, path, args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if args.plots:
        from benchmarks import plot

        plot.main([str(path), "--out", args.plots])
    print(f"benchmarks: {'some providers FAILED (see ERROR lines)' if rc else 'done'}; rows in {path}", flush=True)
    return rc


def main_for(name: str, argv: Sequence[str] | None = None) -> int:
    """The driver with op `name` only: what `python -m benchmarks.bench_<name> [options]` runs."""
    return main(["--ops", name, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
