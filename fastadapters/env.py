"""`python -m fastadapters.env`: what this machine has and which implementation each op would run.

Prints the versions of python/torch/triton/transformers/peft/safetensors, the GPU (if any), whether
TRITON_INTERPRET is set, for every op of fastadapters.ops the backend each choice ("torch", "triton",
"cuda", "auto") resolves to, and whether the optional C++/CUDA extension is built. Paste it into bug reports.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Any

OPS = ("lora_linear", "bottleneck_adapter", "prefix_attention", "multi_lora_delta")
CHOICES = ("torch", "triton", "cuda", "auto")
PACKAGES = ("torch", "triton", "transformers", "peft", "safetensors")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _registry() -> Any | None:
    """fastadapters.ops._registry after fastadapters.ops is imported (kernels register on import), or None."""
    try:
        importlib.import_module("fastadapters.ops")
        return importlib.import_module("fastadapters.ops._registry")
    except ImportError:
        return None


def registered_backends(op: str) -> list[str] | None:
    """Backends with an implementation of `op` (always "torch" first), or None when there is no op registry."""
    reg = _registry()
    if reg is None or not hasattr(reg, "registered_backends"):
        return None
    return list(reg.registered_backends(op))


def _sample_args(op: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Small inputs in the reference signature of `op`, on the GPU when there is one (kernels may refuse CPU)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32

    def t(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, device=dev, dtype=dt)

    if op == "lora_linear":  # x, weight, bias, lora_A, lora_B, scaling, dropout_mask
        return (t(4, 64), t(64, 64), None, t(8, 64), t(64, 8), 2.0, None), {}
    if op == "bottleneck_adapter":  # h, down_weight, up_weight, activation, scaling, residual
        return (t(4, 64), t(16, 64), t(64, 16), "silu", 1.0, None), {}
    if op == "prefix_attention":  # q, k, v, prefix_k, prefix_v, causal, scale, key_padding_mask
        return (t(1, 2, 16, 64), t(1, 2, 16, 64), t(1, 2, 16, 64), t(2, 4, 64), t(2, 4, 64), True, None, None), {}
    if op == "multi_lora_delta":  # x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx, out
        idx = torch.zeros(4, device=dev, dtype=torch.int32)
        return (t(4, 64), t(2, 16, 64), t(2, 64, 16), torch.ones(2, device=dev), idx, t(4, 64)), {}
    raise ValueError(f"unknown op {op!r}: choose one of {OPS}")


def resolved_backends(op: str) -> dict[str, str]:
    """For each backend choice, the backend `op` would run on small sample inputs, or why it cannot.

    Uses `fastadapters.ops._registry.resolve` under `fastadapters.use_backend(choice)`; without a registry every
    choice reads "unknown (no op registry)".
    """
    reg = _registry()
    if reg is None or not hasattr(reg, "resolve"):
        return {c: "unknown (no op registry)" for c in CHOICES}
    from fastadapters.backend import use_backend

    out: dict[str, str] = {}
    try:
        args, kwargs = _sample_args(op)
    except Exception as e:  # a broken torch install still deserves a report
        return {c: f"unknown ({type(e).__name__}: {e})" for c in CHOICES}
    for choice in CHOICES:
        try:
            with use_backend(choice):
                name, _ = reg.resolve(op, *args, **kwargs)
            out[choice] = name
        except Exception as e:  # KernelUnavailableError, or a kernel's `supports` failing
            out[choice] = _why_unavailable(e)
    return out


def _why_unavailable(e: Exception) -> str:
    msg = str(e)
    if "has no" in msg:
        return "none (no kernel registered)"
    if "cannot run" in msg:
        return "none (kernel refuses these inputs: " + msg.split(":", 1)[-1].split(";")[0].strip() + ")"
    if isinstance(e, KeyError):
        return "none (no reference registered)"
    return f"error ({type(e).__name__}: {msg})"


def extension_status() -> str:
    """Whether the optional C++/CUDA extension (csrc/) is built and loads (never compiles anything)."""
    try:
        from fastadapters import ext

        st = ext.status()
    except Exception as e:  # a broken install still deserves a report
        return f"unknown ({type(e).__name__}: {e})"
    if not st["enabled"]:
        return "disabled (FASTADAPTERS_EXT=0)"
    if not st["loaded"]:
        why = st["error"] or "not built yet: `python -m fastadapters.ext` builds it (optional)"
        return f"not loaded ({why}); the torch/Triton paths are used"
    cuda = "with CUDA kernels" if st["with_cuda"] else f"CPU code only ({st['cuda_not_buildable_because']})"
    paths = "; ".join(f"{op}: " + ", ".join(f"{k} -> {v}" for k, v in d.items()) for op, d in st["ops"].items())
    return f"built, {cuda}, build {st['build_seconds']} s, in {st['folder']}\n  {paths}"


def collect() -> dict[str, Any]:
    """Everything the report prints, as a dict (for tests and for scripts/gpu_check.sh's summary)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in PACKAGES},
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "fastadapters_backend": os.environ.get("FASTADAPTERS_BACKEND", ""),
        "cuda_available": False,
        "gpu": None,
        "capability": None,
        "cuda_version": None,
    }
    try:
        import torch

        info["versions"]["torch"] = torch.__version__
        info["cuda_version"] = torch.version.cuda
        if torch.cuda.is_available():
            info["cuda_available"] = True
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(0))
    except ImportError:
        pass
    info["ops"] = {op: resolved_backends(op) for op in OPS}
    info["registered"] = {op: registered_backends(op) for op in OPS}
    info["extension"] = extension_status()
    return info


def format_report(info: dict[str, Any]) -> str:
    lines = [f"python        {info['python']} ({info['platform']})"]
    for p, v in info["versions"].items():
        lines.append(f"{p:<13} {v}")
    if info["cuda_available"]:
        lines.append(f"CUDA          available: {info['gpu']} ({info['capability']}), CUDA {info['cuda_version']}")
    else:
        lines.append(f"CUDA          not available (torch built with CUDA {info['cuda_version']})")
    interp = info["triton_interpret"]
    lines.append(f"TRITON_INTERPRET  {'set (' + interp + ')' if interp else 'not set'}")
    backend = info["fastadapters_backend"]
    lines.append(f"FASTADAPTERS_BACKEND  {backend if backend else 'not set (auto)'}")
    lines.append("")
    lines.append("ops (backend choice -> what runs)")
    for op in OPS:
        reg = info["registered"][op]
        lines.append(f"  {op:<19} registered: {', '.join(reg) if reg else 'no op registry'}")
        for c in CHOICES:
            lines.append(f"    {c:<7} -> {info['ops'][op][c]}")
    lines.append("")
    lines.append(f"C++/CUDA extension  {info['extension']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    print(format_report(collect()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
