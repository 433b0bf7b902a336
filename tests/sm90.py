"""Ahead-of-time compile checks of Triton kernels for every GPU architecture people own, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs code that the GPU compiler rejects or makes slow: tl.dot tiles under
16, shared memory past an arch's limit, register spills, dots that fall off tensor cores. Triton compiles for a
`GPUTarget("cuda", cap, 32)` without a device, so a CPU test can catch those, for sm_80 (A100), sm_86 (A10, 3090),
sm_89 (L4, L40S, 4090), sm_90 (H100, H200) and sm_100 (B200: Triton 3.6 targets it, with ptxas-blackwell):

    from sm90 import compile_many, spec_from_launch
    [report] = compile_many([spec_from_launch(launch.kernel, launch.kwargs, 8, 3, "lora/gemm_fwd")], arch="sm_86")
    report.check()          # AssertionError on a compile error, spills, shared memory or registers over sm_86's limits
    report.mma_loop         # MMA instructions in the kernel's loops: ["wgmma.m64n128k16.bf16", ...], [] for none

`compile_sm90` / `compile_sm90_many` / `compile_space` are the sm_90 forms of the same (the sm_90 tests use them).

What a `CompileReport` holds, read from the compiled code:
  * n_regs, stack, n_spills (spill-store bytes), spill_loads: from `ptxas -v` run (here, on Triton's PTX, with the
    wheel's own ptxas for the arch) -- the same numbers the driver would see; shared: Triton's metadata.shared;
  * ptxas_warnings: every "warning" line of that ptxas run (C7515 "wgmma.mma_async instructions are serialized"
    is the one the CI gate looks for: ptxas gave up on overlapping the wgmmas);
  * mma_loop / mma_all: the distinct MMA instructions inside the kernel's loops (PTX basic blocks that LLVM
    marks "Loop Header" or "in Loop") / anywhere, as "wgmma.m64n128k16.bf16",
    "mma.sync.m16n8k16.bf16", "tcgen05.mma.f16"; n_fma_loop: fma.rn.f32 inside loops (a dot on CUDA cores);
  * wait_depths: the N of every `wgmma.wait_group N` inside loops (N >= 1: the next wgmma overlaps the current
    one's tail, i.e. pipelined; all 0: every matmul waits for the previous one);
  * tma: cp.async.bulk.tensor instructions (TMA loads/stores); cp_async: cp.async (Ampere-style async copies);
  * num_warps, num_stages and the arch's limits (kernels/_configs.py: shared memory per block, 255 registers).

Divisibility: Triton specialises pointer arguments that are 16-byte aligned and integer arguments divisible by 16
(the runtime marks them "tt.divisibility" = 16, which lets it vectorise loads and pipeline them). A signature
type may carry ":16" ("*bf16:16", "i32:16") for that mark. `spec_from_launch(kernel, kwargs, ...)` derives the
signature the way the runtime would from the launch's actual arguments (tensors may be on the "meta" device:
they are taken as 16-byte aligned, as fresh allocations are), so a test can compile exactly what a launcher
launches.

Importing this module imports triton: set TRITON_INTERPRET before it where the process runs the interpreter.
A process running the interpreter holds interpreted (not compilable) kernels, so there the compile runs in a
worker subprocess without TRITON_INTERPRET, which imports the kernel by its module and name. Workers: at most 2
by default (the CI machine has 2 cores, shared).
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
from dataclasses import asdict, dataclass, field
from typing import Any

import triton
import triton.language as tl

# Per-arch limits: opt-in shared memory per block (bytes), registers per thread, compute capability. The sm_80..sm_90
# values are kernels/_configs.py's ARCHS (read from there when the package imports; these are the same numbers, kept
# here so the harness also runs against a checkout that predates _configs.py).
ARCH_LIMITS: dict[str, dict[str, int]] = {
    "sm_80": {"cap": 80, "max_shared": 166912, "max_regs": 255},
    "sm_86": {"cap": 86, "max_shared": 101376, "max_regs": 255},
    "sm_89": {"cap": 89, "max_shared": 101376, "max_regs": 255},
    "sm_90": {"cap": 90, "max_shared": 232448, "max_regs": 255},
    "sm_100": {"cap": 100, "max_shared": 232448, "max_regs": 255},
    "sm_120": {"cap": 120, "max_shared": 101376, "max_regs": 255},
}


def _shared_limits() -> None:
    """Take the limits from kernels/_configs.py (loaded from its file: importing the package would pull in
    transformers in every compile worker) where it exists."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "kernels", "_configs.py")
    if not os.path.exists(path):
        return
    spec = importlib.util.spec_from_file_location("_sm90_configs", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_sm90_configs"] = mod
    spec.loader.exec_module(mod)
    for arch, t in mod.ARCHS.items():
        ARCH_LIMITS.setdefault(arch, {"cap": t.capability[0] * 10 + t.capability[1]})
        ARCH_LIMITS[arch].update(max_shared=t.max_shared, max_regs=t.max_regs)


_shared_limits()
ALL_ARCHS = tuple(ARCH_LIMITS)

SM90_MAX_SHARED = ARCH_LIMITS["sm_90"]["max_shared"]  # 227 KiB: the opt-in shared memory per block on sm_90
MAX_REGS = 255
C7515 = "C7515"  # ptxas: "wgmma.mma_async instructions are serialized"


@dataclass(frozen=True)
class CompileReport:
    """One compile for one arch: resources, MMA instructions, pipelining, TMA, ptxas warnings, or the error."""

    label: str
    n_regs: int = -1
    n_spills: int = -1  # spill-store bytes (ptxas -v)
    stack: int = -1
    shared: int = -1
    seconds: float = 0.0
    error: str | None = None
    arch: str = "sm_90"
    num_warps: int = 0
    num_stages: int = 0
    spill_loads: int = -1
    mma_loop: list = field(default_factory=list)
    mma_all: list = field(default_factory=list)
    n_mma_loop: int = 0
    n_fma_loop: int = 0
    wait_depths: list = field(default_factory=list)
    tma: int = 0
    cp_async: int = 0
    ptxas_warnings: list = field(default_factory=list)

    @property
    def limits(self) -> dict[str, int]:
        return ARCH_LIMITS[self.arch]

    def problems(self, max_shared: int | None = None) -> list[str]:
        """What is wrong with this compile for its arch (compile error, spills, shared memory or registers over the
        arch's limit), empty when it is fine. MMA / C7515 gates live in benchmarks/static.py (`gate_problems`)."""
        if self.error is not None:
            return [f"compile failed: {self.error}"]
        max_shared = self.limits["max_shared"] if max_shared is None else max_shared
        out = []
        if self.n_spills > 0 or self.stack > 0:
            out.append(f"{self.n_spills} spill stores, {self.stack} bytes of stack (registers: {self.n_regs})")
        if self.shared > max_shared:
            out.append(f"shared memory {self.shared} bytes > {max_shared} ({max_shared // 1024} KiB on "
                       f"{self.arch}): fewer stages or smaller tiles")
        if self.n_regs > self.limits["max_regs"]:
            out.append(f"{self.n_regs} registers > {self.limits['max_regs']}")
        return out

    def check(self, max_shared: int | None = None) -> tuple[int, int, int]:
        """(n_regs, n_spills, shared), or AssertionError naming the problems."""
        problems = self.problems(max_shared)
        assert not problems, f"{self.label} [{self.arch}]: " + "; ".join(problems)
        return self.n_regs, self.n_spills, self.shared

    @property
    def serialized(self) -> bool:
        """ptxas warned C7515: the wgmmas of this kernel run one after another."""
        return any(C7515 in w for w in self.ptxas_warnings)

    @property
    def wgmma_n(self) -> list[int]:
        """The N of every distinct wgmma in the loops (m64nNk16 -> N)."""
        return sorted({int(m.group(1)) for k in self.mma_loop for m in [re.match(r"wgmma\.m\d+n(\d+)", k)] if m})

    @property
    def mma_summary(self) -> str:
        """"wgmma.m64n128k16.bf16 x4", "mma.sync.m16n8k16.bf16 x32", "none (768 fma.rn.f32)"."""
        if self.error is not None:
            return "error"
        if not self.mma_loop:
            return f"none ({self.n_fma_loop} fma.rn.f32)" if self.n_fma_loop else "none"
        return ", ".join(self.mma_loop) + f" x{self.n_mma_loop}"


Sm90Report = CompileReport  # the sm_90 tests' name


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



_MMA = re.compile(r"^\s*(?:@%p\d+\s+)?(wgmma\.mma_async|mma\.sync|tcgen05\.mma)(\.[\w:.]+)")
_BLOCK = re.compile(r"^(\$L__BB\d+_\d+:|// %bb\.\d+:)")


def _mma_kind(op: str, suffix: str) -> str:
    """'wgmma.mma_async' '.sync.aligned.m64n128k16.f32.bf16.bf16' -> 'wgmma.m64n128k16.bf16'."""
    parts = suffix.strip(".").split(".")
    shape = next((p for p in parts if re.fullmatch(r"m\d+n\d+k\d+", p)), "")
    types = [p for p in parts if p in ("bf16", "f16", "tf32", "e4m3", "e5m2", "s8", "f64") or p.startswith("kind::")]
    ty = types[0].replace("kind::", "") if types else ""
    name = {"wgmma.mma_async": "wgmma", "mma.sync": "mma.sync", "tcgen05.mma": "tcgen05.mma"}[op]
    return ".".join(p for p in (name, shape, ty) if p)


def analyse_ptx(ptx: str) -> dict[str, Any]:
    """MMA kinds (in loops / anywhere), fma.rn.f32 and wgmma.wait_group depths in loops, TMA and cp.async counts."""
    lines = ptx.splitlines()
    in_loop, inside = [False] * len(lines), False
    for i, line in enumerate(lines):  # a block starts at a label or "// %bb.N:"; LLVM marks loop blocks (the
        if _BLOCK.match(line):        # mark wraps to the next line, alone, after a long label)
            mark = line + (lines[i + 1] if i + 1 < len(lines) and lines[i + 1].lstrip().startswith("//") else "")
            inside = "Loop Header" in mark or "in Loop:" in mark
        in_loop[i] = inside
    mma_loop, mma_all, n_mma_loop, n_fma, waits = set(), set(), 0, 0, []
    for i, line in enumerate(lines):
        m = _MMA.match(line)
        if m:
            kind = _mma_kind(m.group(1), m.group(2))
            mma_all.add(kind)
            if in_loop[i]:
                mma_loop.add(kind)
                n_mma_loop += 1
        if in_loop[i]:
            if re.match(r"^\s*(?:@%p\d+\s+)?fma\.rn\.f32\b", line):
                n_fma += 1
            w = re.match(r"^\s*wgmma\.wait_group\.sync\.aligned\s+(\d+)", line)
            if w:
                waits.append(int(w.group(1)))
    return {"mma_loop": sorted(mma_loop), "mma_all": sorted(mma_all), "n_mma_loop": n_mma_loop, "n_fma_loop": n_fma,
            "wait_depths": sorted(set(waits)), "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
            "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\b", ptx))}


def ptxas_verbose(ptx: str, cap: int) -> dict[str, Any]:
    """Run the wheel's ptxas -v for the arch on `ptx`: registers, stack, spills and every warning line."""
    import hashlib

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    cache = os.path.join(os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache"),
                         "fastadapters_ptxas")
    key = os.path.join(cache, hashlib.sha256(f"{cap}\n{ptx}".encode()).hexdigest() + ".json")
    if os.path.exists(key):  # ptxas -v of this exact PTX ran before (a Triton cache hit skips ptxas: we do not)
        with open(key) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(cap).path, "-v", f"--gpu-name={sm_arch_from_capability(cap)}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or frame is None:
        raise RuntimeError(f"cannot read ptxas -v output:\n{log[-2000:]}")
    warnings = [line.strip() for line in log.splitlines() if "warning" in line.lower()]
    out = {"n_regs": int(regs.group(1)), "stack": int(frame.group(1)), "n_spills": int(frame.group(2)),
           "spill_loads": int(frame.group(3)), "ptxas_warnings": warnings}
    os.makedirs(cache, exist_ok=True)
    with open(key + f".{os.getpid()}", "w") as f:
        json.dump(out, f)
    os.replace(key + f".{os.getpid()}", key)
    return out


def _compile_here(spec: dict) -> CompileReport:
    import triton
    from triton.backends.compiler import GPUTarget

    label = spec.get("label") or spec["name"]
    arch = spec.get("arch", "sm_90")
    base = {"arch": arch, "num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
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
        cap = ARCH_LIMITS[arch]["cap"]
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                           options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        ptx = k.asm["ptx"]
        info = {**analyse_ptx(ptx), **ptxas_verbose(ptx, cap)}
        return CompileReport(label, shared=int(k.metadata.shared), seconds=time.perf_counter() - t0, **base, **info)
    except Exception as e:  # reported, not raised: the caller's check turns it into a failure with the label
        msg = f"{type(e).__name__}: {e}"
        return CompileReport(label, seconds=time.perf_counter() - t0, error=msg[-4000:], **base)


def _spec(fn: Any, signature: dict, constexprs: dict, num_warps: int, num_stages: int, label: str | None,
          arch: str = "sm_90") -> dict:
    import inspect

    if arch not in ARCH_LIMITS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCH_LIMITS)}")
    module, name = _kernel_ref(fn)
    file = None if isinstance(fn, str) else inspect.getfile(getattr(fn, "fn", fn))
    return {"module": module, "name": name, "file": file, "signature": dict(signature), "constexprs": dict(constexprs),
            "num_warps": int(num_warps), "num_stages": int(num_stages), "label": label or name, "arch": arch,
            **({"fn": fn} if not isinstance(fn, str) and _is_compilable(fn) else {})}


def compile_many(specs: list[dict], arch: str | None = None, workers: int | None = None,
                 timeout: float = 1800.0) -> list[CompileReport]:
    """Compile each spec for its arch (spec["arch"], else `arch`, else sm_90) and report; never raises for a
    kernel's own errors (see CompileReport.check).

    A spec: {"fn": jit function or "module:name", "signature": {...}, "constexprs": {...}, "num_warps": 4,
    "num_stages": 3, "label": "...", "arch": "sm_86"}. Runs in this process when every fn is compilable here and
    workers == 1, else in `workers` subprocesses (default 2: the CI machine's cores) without TRITON_INTERPRET.
    """
    norm = [_spec(s["fn"], s["signature"], s["constexprs"], s.get("num_warps", 4), s.get("num_stages", 3),
                  s.get("label"), s.get("arch") or arch or "sm_90") for s in specs]
    if not norm:
        return []
    workers = max(1, min(workers or 2, len(norm)))
    if workers == 1 and all("fn" in s for s in norm):
        return [_compile_here(s) for s in norm]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    chunks = [norm[i::workers] for i in range(workers)]

    def run(chunk: list[dict]) -> list[CompileReport]:
        payload = json.dumps([{k: v for k, v in s.items() if k != "fn"} for s in chunk])
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            out, err = p.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        if p.returncode != 0:
            return [CompileReport(s["label"], arch=s["arch"], error=f"worker exited {p.returncode}: {err[-2000:]}")
                    for s in chunk]
        return [CompileReport(**r) for r in json.loads(out.strip().splitlines()[-1])]

    with ThreadPoolExecutor(workers) as pool:  # the workers compile side by side
        results = list(pool.map(run, chunks))
    by_index: dict[int, CompileReport] = {}
    for i, reports in enumerate(results):
        for j, r in enumerate(reports):
            by_index[j * workers + i] = r
    return [by_index[i] for i in range(len(norm))]


def compile_sm90_many(specs: list[dict], workers: int | None = None, timeout: float = 1800.0) -> list[CompileReport]:
    """compile_many for sm_90 (specs that name no arch)."""
    return compile_many(specs, "sm_90", workers, timeout)


def as_spec(label: str, item: Any) -> dict:
    """A compile spec from a dispatch-space entry: a `Launch` (kernel, grid, kwargs, num_warps, num_stages) or an
    already-built spec dict (prefix attention's space lists those)."""
    if isinstance(item, dict):
        return {**item, "label": label}
    return spec_from_launch(item.kernel, item.kwargs, item.num_warps, item.num_stages, label)


def compile_space(space: list, arch: str = "sm_90", workers: int | None = None) -> dict[str, CompileReport]:
    """Compile every (label, launch) of a kernel module's dispatch space (or spec dicts with a "label") for
    `arch`; the reports by label."""
    specs = [as_spec(s["label"], s) if isinstance(s, dict) else as_spec(*s) for s in space]
    return {r.label: r for r in compile_many(specs, arch, workers)}


def compile_sm90(fn: Any, signature: dict, constexprs: dict | None = None, *, num_warps: int = 4,
                 num_stages: int = 3, max_shared: int | None = None, arch: str = "sm_90") -> tuple[int, int, int]:
    """Compile `fn` for `arch` (sm_90 by default) with `signature` ({arg: "*bf16:16" | "i32" | "fp32" |
    "constexpr"}) and `constexprs`.

    Returns (n_regs, n_spills, shared_bytes); AssertionError on a compile error, spills or shared > max_shared
    (default: the arch's limit).
    """
    [report] = compile_many([{"fn": fn, "signature": signature, "constexprs": constexprs or {},
                              "num_warps": num_warps, "num_stages": num_stages}], arch, workers=1)
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


@triton.jit
def selftest_matmul_kernel(p_a, p_b, p_c, M, N, K,  # p_a: (M, K), p_b: (K, N), p_c: (M, N) fp32, all row-major
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           DOT_PREC: tl.constexpr):
    """A plain tiled matmul (the gates' self-test: bf16 at BLOCK_N >= 64 is a clean wgmma loop on sm_90, BLOCK_N = 16
    a narrow one, fp32 with DOT_PREC "ieee" has no MMA at all)."""
    i_m = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b_a = tl.load(p_a + o_m[:, None] * K + (k0 + o_k)[None, :], mask=(o_m < M)[:, None], other=0.0)
        b_b = tl.load(p_b + (k0 + o_k)[:, None] * N + o_n[None, :], mask=(o_n < N)[None, :], other=0.0)
        # bf16 x fp32: widened, as the old bottleneck did
        b_acc = tl.dot(b_a.to(b_b.dtype), b_b, b_acc, input_precision=DOT_PREC)
    tl.store(p_c + o_m[:, None] * N + o_n[None, :], b_acc, mask=(o_m < M)[:, None] & (o_n < N)[None, :])


def _worker() -> None:
    # the checkout this harness belongs to first: a kernel imported by name must be this checkout's (a git worktree
    # of another commit, not the installed package's)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    specs = json.loads(sys.stdin.read())
    reports = [asdict(_compile_here(s)) for s in specs]
    sys.stdout.write("\n" + json.dumps(reports) + "\n")


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
