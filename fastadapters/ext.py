"""The optional C++/CUDA extension (csrc/): built with ninja through torch.utils.cpp_extension on first use.

    from fastadapters import ext
    mod = ext.load()          # the module, or None (after one warning) when it cannot be built or loaded
    ext.status()              # dict: built? loaded? CUDA code? build time, error, which path each op takes

    python -m fastadapters.ext          builds now (e.g. at install time on a GPU machine) and prints status()

The build lands in a user cache folder, one sub-folder per (sources, torch, python, CPU/CUDA) combination, so
later processes import the compiled library without compiling (and without running ninja): on this CPU
machine that is the difference between tens of seconds and a few milliseconds. The CUDA sources are compiled
only when torch has CUDA, a GPU is visible and the CUDA toolkit (nvcc) is found; otherwise the CPU C++ code
alone is built (it keeps the binding layer tested on every CI run).

Strictly optional: if csrc/ is missing (a non-editable install), the compiler or ninja is missing, or the build
or the import fails, `load()` warns once, remembers why, and returns None; the ops then run their Triton or
torch paths and `status()` / `python -m fastadapters.env` say so.

Environment: FASTADAPTERS_EXT=0 disables the extension; FASTADAPTERS_EXT_CUDA=0 builds the CPU code only;
FASTADAPTERS_CACHE sets the cache root (default $XDG_CACHE_HOME/fastadapters or ~/.cache/fastadapters);
FASTADAPTERS_EXT_VERBOSE=1 prints the compiler output.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

NAME = "fastadapters_ext"
ABI_VERSION = 2  # bump with csrc/fastadapters_ext.cpp's ABI_VERSION when the bound functions change
CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("fastadapters_ext.cpp", "multi_lora_cpu.cpp")
CUDA_SOURCES = ("multi_lora_cuda.cu",)
STALE_LOCK_S = 1800.0  # a build lock older than this was left by a killed build

_lock = threading.RLock()
_module: ModuleType | None = None
_error: str | None = None  # why the extension is unavailable, once that is known
_warned = False
_info: dict[str, Any] = {}  # what the last load did: build seconds, cached, folder, ...


class ExtensionUnavailable(RuntimeError):
    """The C++/CUDA extension cannot be built or loaded here (the message says why)."""


def cache_root() -> Path:
    """Folder under which builds are cached: $FASTADAPTERS_CACHE, else $XDG_CACHE_HOME/fastadapters, else
    ~/.cache/fastadapters."""
    if os.environ.get("FASTADAPTERS_CACHE"):
        return Path(os.environ["FASTADAPTERS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fastadapters"


def enabled() -> bool:
    return os.environ.get("FASTADAPTERS_EXT", "1").strip().lower() not in ("0", "false", "no", "off")


def cuda_buildable() -> tuple[bool, str]:
    """(whether the CUDA sources will be compiled, why not)."""
    if os.environ.get("FASTADAPTERS_EXT_CUDA", "1").strip().lower() in ("0", "false", "no", "off"):
        return False, "FASTADAPTERS_EXT_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found: set CUDA_HOME"
    return True, ""


def sources(with_cuda: bool) -> list[Path]:
    return [CSRC / s for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]


def build_tag(with_cuda: bool) -> str:
    """Folder name for one build: changes with the sources, torch, python and the CPU/CUDA choice."""
    h = hashlib.sha256()
    for p in sources(with_cuda):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version}|{ABI_VERSION}|{_flags(with_cuda)}".encode())
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if with_cuda:
        arch = arch or "sm_{}{}".format(*torch.cuda.get_device_capability())
        h.update(arch.encode())
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    kind = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    return f"{py}-torch{torch.__version__.split('+')[0]}-{kind}-{h.hexdigest()[:12]}"


def _flags(with_cuda: bool) -> dict[str, list[str]]:
    cflags = ["-O3"] + (["-DFASTADAPTERS_WITH_CUDA"] if with_cuda else [])
    return {"extra_cflags": cflags, "extra_cuda_cflags": ["-O3"] if with_cuda else []}


def _library_path(folder: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES + [".so"]:
        p = folder / f"{NAME}{suffix}"
        if p.exists():
            return p
    return None


_imported: dict[str, ModuleType] = {}  # a library is imported once per process (reset() keeps it)


def _import_library(path: Path) -> ModuleType:
    if str(path) in _imported:
        return _imported[str(path)]
    spec = importlib.util.spec_from_file_location(NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if getattr(mod, "ABI_VERSION", None) != ABI_VERSION:
        raise ImportError(f"{path} has ABI_VERSION {getattr(mod, 'ABI_VERSION', None)}, expected {ABI_VERSION}")
    _imported[str(path)] = mod
    return mod


def _clear_stale_lock(folder: Path) -> None:
    lock = folder / "lock"
    try:
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    except OSError:
        pass


def _build(folder: Path, with_cuda: bool, verbose: bool) -> ModuleType:
    """Compile csrc/ into `folder` with ninja (torch.utils.cpp_extension.load) and import it."""
    import shutil

    from torch.utils.cpp_extension import load, verify_ninja_availability

    if shutil.which("ninja") is None:  # the pip `ninja` package's binary, when its bin folder is not on PATH
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    verify_ninja_availability()
    _clear_stale_lock(folder)
    return load(name=NAME, sources=[str(p) for p in sources(with_cuda)], build_directory=str(folder),
                with_cuda=with_cuda, verbose=verbose, **_flags(with_cuda))


def _fail(msg: str) -> None:
    global _error, _warned
    _error = msg
    if not _warned:
        _warned = True
        warnings.warn(
            f"fastadapters: the optional C++/CUDA extension is unavailable ({msg}); the ops use their Triton or "
            "torch paths. `python -m fastadapters.ext` shows the details.",
            RuntimeWarning,
            stacklevel=3,
        )


def load(build: bool = True) -> ModuleType | None:
    """The extension module, building it on first use when `build`; None (after one warning) when unavailable.

    With build=False a build already in the cache is imported, but nothing is compiled.
    """
    global _module
    if _module is not None:
        return _module
    if _error is not None:
        return None
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if not enabled():
            _fail("disabled by FASTADAPTERS_EXT=0")
            return None
        try:
            with_cuda, _ = cuda_buildable()
            missing = [str(p) for p in sources(with_cuda) if not p.exists()]
            if missing:
                raise ExtensionUnavailable(f"sources not found: {missing[0]} (csrc/ ships with a source checkout)")
            tag = build_tag(with_cuda)
            folder = cache_root() / "ext" / tag
            lib = _library_path(folder)
            t0 = time.perf_counter()
            if lib is not None:
                mod = _import_library(lib)
                _info.update(cached=True, load_seconds=time.perf_counter() - t0)
            elif not build:
                return None
            else:
                folder.mkdir(parents=True, exist_ok=True)
                verbose = os.environ.get("FASTADAPTERS_EXT_VERBOSE", "0") not in ("", "0")
                print(f"fastadapters: building the optional C++{'/CUDA' if with_cuda else ''} extension once, into "
                      f"{folder} (cached for later runs)", file=sys.stderr, flush=True)
                mod = _build(folder, with_cuda, verbose)
                seconds = time.perf_counter() - t0
                record = {"build_seconds": round(seconds, 2), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                          "with_cuda": with_cuda, "torch": torch.__version__, "python": platform.python_version(),
                          "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
                (folder / "build_info.json").write_text(json.dumps(record, indent=1))
                _info.update(cached=False, load_seconds=seconds)
            _info.update(folder=str(folder), with_cuda=bool(mod.has_cuda()))
            _register_fake()
            _module = mod
            return mod
        except Exception as e:  # anything: the extension is optional
            first = str(e).strip().splitlines()
            _fail(f"{type(e).__name__}: {first[0] if first else ''}"[:500])
            return None


OP = "fastadapters::multi_lora_bgmv_"  # the dispatcher's name of the C++ op (csrc/fastadapters_ext.cpp)
_fake_registered = False


def _register_fake() -> None:
    """The op's fake (meta) implementation, so torch.compile traces through it: it mutates `out` in place and
    returns nothing. Once per process."""
    global _fake_registered
    if _fake_registered:
        return
    torch.library.register_fake(OP)(lambda out, x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx: None)
    _fake_registered = True


def bgmv_op() -> Any:
    """The C++ BGMV op through the dispatcher (torch.ops.fastadapters.multi_lora_bgmv_), loading the extension
    first; None when it is unavailable. Call it as op(out, x, lora_A_stack, lora_B_stack, scalings, idx)."""
    if load() is None:
        return None
    return torch.ops.fastadapters.multi_lora_bgmv_


def loaded() -> ModuleType | None:
    """The module if an earlier `load` succeeded in this process, else None (never builds, never warns)."""
    return _module


def unavailable_reason() -> str | None:
    """Why `load` returned None in this process, or None."""
    return _error


def reset() -> None:
    """Forget this process's load result and warning (tests). A module already imported stays imported."""
    global _module, _error, _warned
    with _lock:
        _module, _error, _warned = None, None, False
        _info.clear()


def status(load_cached: bool = True) -> dict[str, Any]:
    """What the extension does here, as a dict (printed by `python -m fastadapters.env` and `-m fastadapters.ext`).

    Keys: enabled, loaded, with_cuda (CUDA kernels in the loaded build), cuda_buildable (+ why not), folder,
    build_seconds (when this build was compiled, from its build_info.json), cached, error, ops (op -> device ->
    the path that runs under backend "auto" and under "cuda"). With load_cached, a build already in the cache
    is imported (cheap); nothing is ever compiled here.
    """
    if load_cached and _module is None and _error is None and enabled():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                load(build=False)
            except Exception:  # status must not raise
                pass
    cuda_ok, why = cuda_buildable()
    out: dict[str, Any] = {
        "enabled": enabled(), "loaded": _module is not None,
        "with_cuda": bool(_module is not None and _module.has_cuda()),
        "cuda_buildable": cuda_ok, "cuda_not_buildable_because": why or None,
        "sources": str(CSRC), "cache": str(cache_root() / "ext"),
        "folder": _info.get("folder"), "cached": _info.get("cached"), "load_seconds": _info.get("load_seconds"),
        "build_seconds": None, "built": None, "error": _error,
    }
    if out["folder"]:
        info = Path(out["folder"]) / "build_info.json"
        if info.exists():
            with contextlib.suppress(Exception):
                rec = json.loads(info.read_text())
                out["build_seconds"], out["built"] = rec.get("build_seconds"), rec.get("date")
    out["ops"] = {"multi_lora_delta": _multi_lora_paths(out)}
    return out


def _multi_lora_paths(st: dict[str, Any]) -> dict[str, str]:
    from .ops import multi_lora as ml

    ext_cpu = "C++ extension (CPU code)" if st["loaded"] else "unavailable: " + (
        st["error"] or "extension not built yet (builds on first use)")
    if st["with_cuda"]:
        gpu_auto = (f"CUDA extension (BGMV decode kernel) up to {ml.CUDA_MAX_TOKENS} tokens, "
                    "Triton grouped kernels above")
    elif st["loaded"] or not st["cuda_buildable"]:
        gpu_auto = "Triton grouped kernels (extension without CUDA code)"
    else:
        gpu_auto = "CUDA extension once built on first use (decode), Triton grouped kernels otherwise"
    return {
        "cpu auto": "torch reference",
        "cpu cuda": ext_cpu,
        "gpu auto": gpu_auto if torch.cuda.is_available() else "no GPU",
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m fastadapters.ext`: build (or import the cached build) now and print status() as JSON."""
    os.environ.setdefault("FASTADAPTERS_EXT_VERBOSE", "1")
    mod = load()
    print(json.dumps(status(), indent=1, default=str))
    return 0 if mod is not None else 1


if __name__ == "__main__":
    sys.exit(main())
