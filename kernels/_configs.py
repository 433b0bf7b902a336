"""Where every Triton launch config comes from: a pure function of (GPU target, dtype, shape bucket), never a
timing race at run time.

No kernel autotunes inside forward or backward (that syncs the host, breaks CUDA-graph capture and makes the
rounding of a reduction depend on which config won). Each launcher asks `target(device)` for the GPU it runs on
(architecture family, shared-memory and register limits, SM count) and picks its config from a table written in
its own `<op>_configs.py`, first looking up `tuned(op, kernel, key)`: a per-device JSON table written offline by
`python -m benchmarks.tune` on that GPU (kernels/configs/<device slug>.json, the way vLLM keeps its fused-MoE
configs). A missing table or key falls back to the built-in pure function.

`use_target("sm_86")` makes launchers pick configs as they would on that GPU (used with meta tensors and the
launch recorder to compile, for every arch, exactly what a user's GPU would run).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Target:
    """What a launcher may assume about the GPU: arch family, opt-in shared memory per block, SMs, registers."""

    arch: str  # "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", or "interpreter" (CPU)
    capability: tuple[int, int]
    max_shared: int  # bytes per block (opt-in)
    num_sms: int
    name: str = ""  # the device name (the tuned table's key), "" when not a real device
    max_regs: int = 255

    @property
    def is_gpu(self) -> bool:
        return self.arch != "interpreter"

    @property
    def hopper(self) -> bool:
        """A datacenter part with Hopper-class tensor cores (wgmma on sm_90, tcgen05 on sm_100) and 227 KiB of shared
        memory. Not sm_120 (RTX 50xx, RTX PRO Blackwell): newer, but mma.sync and 99 KiB like sm_89."""
        return self.capability[0] in (9, 10)


# Opt-in shared memory per block and a typical SM count per architecture (the SM count only sizes split-K grids
# while recording: a real device reports its own).
ARCHS: dict[str, Target] = {
    "sm_80": Target("sm_80", (8, 0), 166912, 108),  # A100: 163 KiB
    "sm_86": Target("sm_86", (8, 6), 101376, 84),  # A10, RTX 3090: 99 KiB
    "sm_89": Target("sm_89", (8, 9), 101376, 128),  # L4, L40S, RTX 4090: 99 KiB
    "sm_90": Target("sm_90", (9, 0), 232448, 132),  # H100, H200: 227 KiB
    "sm_100": Target("sm_100", (10, 0), 232448, 148),  # B200: 227 KiB
    "sm_120": Target("sm_120", (12, 0), 101376, 170),  # RTX 5090, RTX PRO 6000 Blackwell: 99 KiB
}
INTERPRETER = Target("interpreter", (0, 0), 1 << 30, 4)

_forced: Target | None = None


@contextlib.contextmanager
def use_target(arch: str | Target) -> Iterator[Target]:
    """Inside the block, `target()` answers `arch` for every device (meta tensors included)."""
    global _forced
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
        arch = ARCHS[arch]
    old, _forced = _forced, arch
    try:
        yield arch
    finally:
        _forced = old


def forced_target() -> Target | None:
    return _forced


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    cap = (props.major, props.minor)
    arch = f"sm_{props.major}{props.minor}"
    base = ARCHS.get(arch) or max((t for t in ARCHS.values() if t.capability <= cap), key=lambda t: t.capability,
                                  default=ARCHS["sm_80"])
    shared = int(getattr(props, "shared_memory_per_block_optin", base.max_shared))
    return Target(arch, cap, shared, props.multi_processor_count, props.name)


def target(device: torch.device | None = None) -> Target:
    """The target for a launch on `device`: the forced one, a CUDA device's own, else the interpreter."""
    if _forced is not None:
        return _forced
    if device is not None and device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


def shape_bucket(n: int) -> int:
    """The power of two at or above n (at least 16): configs are chosen per bucket, never per exact size."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


TABLE_DIR = Path(__file__).resolve().parent / "configs"


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia_h200': the table file's name for a device."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@functools.cache
def _table(name: str) -> dict[str, Any]:
    path = Path(os.environ.get("FASTADAPTERS_CONFIG_DIR", TABLE_DIR)) / f"{device_slug(name)}.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def tuned(tgt: Target, op: str, kernel: str, key: str) -> dict[str, Any] | None:
    """The offline tuner's config for (op, kernel, key) on this device, or None (use the built-in choice).

    The table file maps op -> kernel -> key -> {config fields}; `key` is the launcher's own bucket string
    (e.g. "bf16/M4096/K4096/N4096/r16")."""
    if not tgt.name:
        return None
    return _table(tgt.name).get(op, {}).get(kernel, {}).get(key)


def clear_cache() -> None:
    """Forget loaded tables and device targets (tests, or after writing a new table)."""
    _table.cache_clear()
    _cuda_target.cache_clear()
