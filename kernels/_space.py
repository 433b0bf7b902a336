"""Helpers shared by every op's dispatch space (kernels/<op>_launch.py `dispatch_space(arch, full)`): the target of
an arch, what makes two launches one binary, and the label convention of benchmarks/static.py.

Labels read `<op>/<role>[#main]@<shape>:<config>`; `#main` marks a GEMM-sized main loop whose N is a model
dimension (held to the wgmma N >= 64 gate on sm_90).
"""

from __future__ import annotations

import inspect

import torch

from ._common import Launch
from ._configs import ARCHS, Target, forced_target


def arch_target(arch: str) -> Target:
    """The Target of `arch`: kernels._configs.ARCHS, or the forced target when it names an arch not in that table
    (benchmarks/static.py builds one for sm_100)."""
    if arch in ARCHS:
        return ARCHS[arch]
    forced = forced_target()
    if forced is not None and forced.arch == arch:
        return forced
    raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")


def _constexprs(kernel) -> set[str]:
    params = getattr(kernel, "params", None)
    if params is not None:  # JITFunction
        return {p.name for p in params if p.is_constexpr}
    sig = inspect.signature(getattr(kernel, "fn", kernel))  # InterpretedFunction
    return {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}


def compile_key(launch: Launch) -> tuple:
    """What makes two launches compile to the same binary (Triton's runtime specialisation: constexprs, dtypes,
    integers equal to 1 or divisible by 16 or past int32, the launch's warps and stages; not the dropout seed)."""
    consts = _constexprs(launch.kernel)
    key: list = [getattr(getattr(launch.kernel, "fn", launch.kernel), "__name__", str(launch.kernel)),
                 launch.num_warps, launch.num_stages]
    for name, v in sorted(launch.kwargs.items()):
        if isinstance(v, torch.Tensor):
            key.append((name, str(v.dtype)))
        elif name in consts or isinstance(v, bool):
            key.append((name, v))
        elif isinstance(v, int) and name != "seed":
            key.append((name, v == 1, v % 16 == 0, -(2**31) <= v < 2**31))
        else:
            key.append((name, type(v).__name__))
    return tuple(key)


def distinct_compiles(space: list[tuple[str, Launch]]) -> list[tuple[str, Launch]]:
    """The entries of a dispatch space that compile to distinct binaries (the first label of each)."""
    seen: set[tuple] = set()
    out = []
    for label, launch in space:
        key = compile_key(launch)
        if key not in seen:
            seen.add(key)
            out.append((label, launch))
    return out


def is_main_loop(label: str) -> bool:
    """Whether a dispatch_space label is a GEMM-sized main loop with N a model dimension (the wgmma N >= 64 gate)."""
    return "#main" in label.split("@", 1)[0]
