"""The `fastadapters` command. One sub-command per function below; `train` and `evaluate` slot in the same way.

    fastadapters demo [--fast] [--out DIR]    LoRA end to end on a tiny random Llama (seconds, CPU, no download)
    fastadapters env                          versions, GPU, and which backend each op runs

Each sub-command is an `add_<name>(subparsers)` function that declares its arguments and sets `func`, a
callable taking the parsed arguments and returning the exit code. Heavy imports happen inside `func`, so
`fastadapters --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

SubParsers = Any  # argparse._SubParsersAction is private


def add_demo(sub: SubParsers) -> None:
    p = sub.add_parser("demo", help="train, save, reload and merge a LoRA adapter on a tiny random Llama",
                       description="Train a LoRA adapter on a tiny random Llama to continue a token pattern, save "
                                   "it, reload it and merge it; runs in seconds on a CPU with no download.")
    p.add_argument("--out", default="out/demo", help="folder for the saved adapter (default: out/demo)")
    p.add_argument("--fast", action="store_true", help="fewer steps and a smaller batch (for tests)")
    p.add_argument("--steps", type=int, default=None, help="AdamW steps (default 30, or 12 with --fast)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", default=None, help="also write the measured numbers to this JSON file")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo import result_dict, run_demo

    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps {args.steps}: give at least 1 training step")
    result = run_demo(args.out, fast=args.fast, steps=args.steps, lr=args.lr, seed=args.seed, device=args.device,
                      progress=not args.no_progress)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result_dict(result), f, indent=2)
    ok = result.last_loss < result.first_loss and result.reload_max_diff < 1e-4 and result.merge_max_diff < 1e-3
    if not ok:
        print("demo FAILED: the loss did not go down, or the reloaded/merged model gave other logits",
              file=sys.stderr)
    return 0 if ok else 1


def add_env(sub: SubParsers) -> None:
    p = sub.add_parser("env", help="print versions, the GPU, and which backend each op would run",
                       description="Same report as `python -m fastadapters.env`.")
    p.set_defaults(func=run_env_command)


def run_env_command(args: argparse.Namespace) -> int:
    from .env import main as env_main

    return env_main([])


def delegate(name: str, module: str, help: str) -> Callable[[SubParsers], None]:
    """A sub-command that hands all its arguments to `module.main(argv) -> int`, a module with its own parser.

    For commands such as `train` and `evaluate`: `delegate("train", "fastadapters.train", "fine-tune ...")` in
    COMMANDS makes `fastadapters train --help` print that module's help.
    """

    def add(sub: SubParsers) -> None:
        p = sub.add_parser(name, help=help, add_help=False, prefix_chars="\0")
        p.set_defaults(func=lambda args: int(importlib.import_module(module).main(list(args.passthrough))),
                       passthrough=())

    return add


# train / evaluate (a later issue) slot in here, e.g. delegate("train", "fastadapters.train", "...").
COMMANDS: list[Callable[[SubParsers], None]] = [add_demo, add_env]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastadapters",
                                     description="LoRA, bottleneck, prefix and prompt adapters for transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastadapters` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if hasattr(args, "passthrough"):  # a delegated command: its module parses the rest
        args.passthrough = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
