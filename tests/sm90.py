"""Ahead-of-time sm_90 (H100/H200) compile checks for Triton kernels, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs code that the GPU compiler rejects or makes slow: tl.dot tiles under
16, shared memory past 227 KiB, register spills. Triton compiles for a `GPUTarget("cuda", 90, 32)` without a
device, so a CPU test can catch those:

    from sm90 import compile_sm90
    n_regs, n_spills, shared = compile_sm90(my_kernel, {"p_x": "*bf16", "n": "i32", "BLOCK": "constexpr"},
                                            {"BLOCK": 128}, num_warps=4, num_stages=3)

fails (AssertionError) on a compile error, any spill, or shared memory above 227 KiB. For many configs at
once, `compile_sm90_many(specs)` compiles them in parallel and returns reports to check one by one.

Specialisation matters: at run time Triton turns integer arguments equal to 1 into constants and marks
pointers and integers divisible by 16 (that is what lets it vectorise loads and pipeline them). A signature
type may carry ":16" ("*bf16:16", "i32:16") for that mark. `spec_from_launch(kernel, kwargs, ...)` derives the
signature the way the runtime would from the launch's actual arguments (tensors may be on the "meta" device:
they are taken as 16-byte aligned, as fresh allocations are), so a test can compile exactly what a launcher
launches.

Numbers: n_regs and the stack frame from the cubin's resource usage (cuobjdump); n_spills = spill stores (STL
instructions in the SASS, counted only when the stack frame is not empty: Triton kernels keep no local arrays, so
an empty frame means no spills); shared = the compiled kernel's metadata.shared bytes. Importing this module
imports triton: set TRITON_INTERPRET before it where the process runs the interpreter.
A process running the interpreter holds interpreted (not compilable) kernels, so there the compile runs in a
worker subprocess without TRITON_INTERPRET, which imports the kernel by its module and name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import triton
import triton.language as tl

SM90_MAX_SHARED = 232448  # 227 KiB: the opt-in shared memory per block on sm_90
MAX_REGS = 255


@dataclass(frozen=True)
class Sm90Report:
    """Result of one compile: registers per thread, spill stores, stack bytes, shared bytes, or the error."""

    label: str
    n_regs: int = -1
    n_spills: int = -1
    stack: int = -1
    shared: int = -1
    seconds: float = 0.0
    error: str | None = None

    def problems(self, max_shared: int = SM90_MAX_SHARED) -> list[str]:
        """What is wrong with this compile for sm_90, empty when it is fine."""
        if self.error is not None:
            return [f"compile failed: {self.error}"]
        out = []
        if self.n_spills > 0 or self.stack > 0:
            out.append(f"{self.n_spills} spill stores, {self.stack} bytes of stack (registers: {self.n_regs})")
        if self.shared > max_shared:
            out.append(f"shared memory {self.shared} bytes > {max_shared} (227 KiB): fewer stages or smaller tiles")
        return out

    def check(self, max_shared: int = SM90_MAX_SHARED) -> tuple[int, int, int]:
        """(n_regs, n_spills, shared), or AssertionError naming the problems."""
        problems = self.problems(max_shared)
        assert not problems, f"{self.label}: " + "; ".join(problems)
        return self.n_regs, self.n_spills, self.shared


def _kernel_ref(fn: Any) -> tuple[str, str]:
    """(module, name) of a @triton.jit function (JITFunction or InterpretedFunction) or a 'module:name' string."""
    if isinstance(fn, str):
        module, _, name = fn.partition(":")
        return module, name
    inner = getattr(fn, "fn", fn)
    return inner.__module__, inner.__name__


_TORCH_TY = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int8": "i8",
             "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1"}


def _constexpr_names(fn: Any) -> set[str]:
    params = getattr(fn, "params", None)
    if params is not None:  # JITFunction
        return {p.name for p in params if p.is_constexpr}
    import inspect

    sig = inspect.signature(getattr(fn, "fn", fn))
    return {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}


def _no_specialize(fn: Any) -> set[str]:
    names = getattr(fn, "do_not_specialize", None)
    if names is None:
        names = (getattr(fn, "kwargs", None) or {}).get("do_not_specialize")
    arg_names = list(fn.arg_names)
    return {arg_names[n] if isinstance(n, int) else n for n in (names or ())}


def signature_from_args(fn: Any, kwargs: dict) -> tuple[dict, dict]:
    """(signature, constexprs) for `fn` launched with `kwargs`, specialised as Triton's runtime does."""
    consts, plain = _constexpr_names(fn), _no_specialize(fn)
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    for name in fn.arg_names:
        v = kwargs[name]
        if name in consts or v is None:
            signature[name], constexprs[name] = "constexpr", v
        elif hasattr(v, "dtype") and hasattr(v, "stride"):
            signature[name] = f"*{_TORCH_TY[str(v.dtype).replace('torch.', '')]}:16"
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1 and name not in plain:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            ty = "i32" if -(2**31) <= v < 2**31 else "i64"
            signature[name] = ty + (":16" if v % 16 == 0 and name not in plain else "")
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name}={v!r} of {fn.arg_names}: no Triton type for {type(v).__name__}")
    return signature, constexprs


def spec_from_launch(fn: Any, kwargs: dict, num_warps: int = 4, num_stages: int = 3, label: str | None = None) -> dict:
    """A compile spec for `compile_sm90_many` from a launch's keyword arguments (runtime specialisation)."""
    signature, constexprs = signature_from_args(fn, kwargs)
    return {"fn": fn, "signature": signature, "constexprs": constexprs, "num_warps": num_warps,
            "num_stages": num_stages, "label": label}


def _is_compilable(fn: Any) -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(fn, JITFunction)


def _tool(name: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return os.path.join(os.path.dirname(get_ptxas(90).path), name)


def _resources(cubin: bytes, kernel_name: str) -> tuple[int, int, int]:
    """(registers, stack bytes, spill stores) of `kernel_name` in `cubin`, via cuobjdump.

    Spill stores are counted (STL instructions in the SASS, a slow disassembly) only when the stack frame is not
    empty: Triton kernels keep no local arrays, so an empty stack frame means no spills.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = ""
        if not re.search(r"STACK:0\b", usage):
            sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                                  check=True).stdout
    finally:
        os.remove(path)
    m = re.search(r"Function " + re.escape(kernel_name) + r":\s*\n\s*REG:(\d+) STACK:(\d+)", usage)
    if m is None:
        m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"cannot read the resource usage of {kernel_name}:\n{usage}")
    n_stl = len(re.findall(r"\bSTL(\.\w+)*\b", sass))
    return int(m.group(1)), int(m.group(2)), n_stl


_loaded: dict[str, Any] = {}


def _load_module(module: str, file: str | None) -> Any:
    """The kernel's module, loaded from its file alone when it can be (kernel files import torch and triton, not
    their package: that skips e.g. transformers in the worker), else imported by name."""
    import importlib
    import importlib.util

    if module in _loaded:
        return _loaded[module]
    mod = None
    if file and os.path.exists(file) and module != "__main__":
        name = "_sm90_" + module.replace(".", "_")
        try:
            spec = importlib.util.spec_from_file_location(name, file)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        except ImportError:  # relative imports: needs its package
            sys.modules.pop(name, None)
            mod = None
    if mod is None:
        mod = importlib.import_module(module)
    _loaded[module] = mod
    return mod


def _compile_here(spec: dict) -> Sm90Report:
    import triton
    from triton.backends.compiler import GPUTarget

    label = spec.get("label") or spec["name"]
    t0 = time.perf_counter()
    try:
        fn = spec.get("fn") or getattr(_load_module(spec["module"], spec.get("file")), spec["name"])
        signature, attrs = {}, {}
        names = list(fn.arg_names)
        for name, ty in spec["signature"].items():
            ty, _, div = ty.partition(":")
            signature[name] = ty
            if div:
                attrs[(names.index(name),)] = [["tt.divisibility", int(div)]]
        src = triton.compiler.ASTSource(fn, signature, spec["constexprs"], attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        n_regs, stack, n_spills = _resources(k.asm["cubin"], k.metadata.name)
        return Sm90Report(label, n_regs, n_spills, stack, int(k.metadata.shared), time.perf_counter() - t0)
    except Exception as e:  # reported, not raised: the caller's check turns it into a failure with the label
        msg = f"{type(e).__name__}: {e}"
        return Sm90Report(label, seconds=time.perf_counter() - t0, error=msg[-4000:])


def _spec(fn: Any, signature: dict, constexprs: dict, num_warps: int, num_stages: int, label: str | None) -> dict:
    import inspect

    module, name = _kernel_ref(fn)
    file = None if isinstance(fn, str) else inspect.getfile(getattr(fn, "fn", fn))
    return {"module": module, "name": name, "file": file, "signature": dict(signature), "constexprs": dict(constexprs),
            "num_warps": int(num_warps), "num_stages": int(num_stages), "label": label or name,
            **({"fn": fn} if not isinstance(fn, str) and _is_compilable(fn) else {})}


def compile_sm90_many(specs: list[dict], workers: int | None = None, timeout: float = 900.0) -> list[Sm90Report]:
    """Compile each spec for sm_90 and report; never raises for a kernel's own errors (see Sm90Report.check).

    A spec: {"fn": jit function or "module:name", "signature": {...}, "constexprs": {...}, "num_warps": 4,
    "num_stages": 3, "label": "..."}. Runs in this process when every fn is compilable here, else in
    `workers` subprocesses (default: the CPU count, at most 4) without TRITON_INTERPRET.
    """
    norm = [_spec(s["fn"], s["signature"], s["constexprs"], s.get("num_warps", 4), s.get("num_stages", 3),
                  s.get("label")) for s in specs]
    if all("fn" in s for s in norm):
        return [_compile_here(s) for s in norm]
    workers = max(1, min(workers or min(os.cpu_count() or 1, 4), len(norm)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    chunks = [norm[i::workers] for i in range(workers)]

    def run(chunk: list[dict]) -> list[Sm90Report]:
        payload = json.dumps([{k: v for k, v in s.items() if k != "fn"} for s in chunk])
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            out, err = p.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        if p.returncode != 0:
            return [Sm90Report(s["label"], error=f"worker exited {p.returncode}: {err[-2000:]}") for s in chunk]
        return [Sm90Report(**r) for r in json.loads(out.strip().splitlines()[-1])]

    with ThreadPoolExecutor(workers) as pool:  # the workers compile side by side
        results = list(pool.map(run, chunks))
    by_index: dict[int, Sm90Report] = {}
    for i, reports in enumerate(results):
        for j, r in enumerate(reports):
            by_index[j * workers + i] = r
    return [by_index[i] for i in range(len(norm))]


def compile_space(space: list[tuple[str, Any]]) -> dict[str, Sm90Report]:
    """Compile every (label, launch) of a kernel module's sm90_dispatch_space(); the reports by label."""
    specs = [spec_from_launch(launch.kernel, launch.kwargs, launch.num_warps, launch.num_stages, label)
             for label, launch in space]
    return {r.label: r for r in compile_sm90_many(specs)}


def compile_sm90(fn: Any, signature: dict, constexprs: dict | None = None, *, num_warps: int = 4,
                 num_stages: int = 3, max_shared: int = SM90_MAX_SHARED) -> tuple[int, int, int]:
    """Compile `fn` for sm_90 with `signature` ({arg: "*bf16:16" | "i32" | "fp32" | "constexpr"}) and `constexprs`.

    Returns (n_regs, n_spills, shared_bytes); AssertionError on a compile error, spills or shared > max_shared.
    """
    [report] = compile_sm90_many([{"fn": fn, "signature": signature, "constexprs": constexprs or {},
                                   "num_warps": num_warps, "num_stages": num_stages}], workers=1)
    return report.check(max_shared)


# -- two tiny kernels to check this helper itself: the first compiles cleanly, the GPU compiler rejects the second
# (tl.dot needs tiles of at least 16) although the interpreter runs it.
@triton.jit
def selftest_copy_kernel(p_x, p_y, n, BLOCK: tl.constexpr):  # p_x: input, p_y: output
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(p_y + o, tl.load(p_x + o, mask=o < n), mask=o < n)


@triton.jit
def selftest_tiny_dot_kernel(p_a, p_c, BLOCK: tl.constexpr):  # p_a: (BLOCK, BLOCK) input, p_c: output
    o = tl.arange(0, BLOCK)
    b_a = tl.load(p_a + o[:, None] * BLOCK + o[None, :])
    tl.store(p_c + o[:, None] * BLOCK + o[None, :], tl.dot(b_a, b_a))


def _worker() -> None:
    specs = json.loads(sys.stdin.read())
    reports = [asdict(_compile_here(s)) for s in specs]
    sys.stdout.write("\n" + json.dumps(reports) + "\n")


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
