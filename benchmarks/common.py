"""Shared benchmark plumbing: timing, peak memory, the device ceilings, the results CSV and the printed table.

Every benchmark times its providers with `bench` (triton.testing.do_bench on CUDA with quantiles (median, 20th,
80th); a loop of a fixed number of calls when `reps` is given, for whole training steps and generate(); a
perf_counter loop on the CPU, for smoke runs only), measures peak memory with `peak_memory` (CUDA only), collects
rows in a `Recorder`, prints them as a table and appends them to a CSV whose columns are `COLUMNS`. The driver
(benchmarks/run.py) hands every benchmark a `Context`: device, dtype, preset, timing budget and the ceilings it
measured at start (`measure_ceilings`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import importlib.metadata
import math
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

COLUMNS = ("op", "provider", "mode", "shape", "dtype", "metric", "p50", "p20", "p80",
           "gpu", "torch", "triton", "transformers", "peft", "date", "commit")
QUANTILES = (0.5, 0.2, 0.8)
MODES = ("fwd", "bwd", "fwd+bwd")
PRESETS = ("smoke", "quick", "full")
FLOOR_PROVIDERS = ("floor", "no_adapter")  # drawn dashed in the plots, the denominator of x_floor
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
RESULTS_NAME = "results.csv"
MiB = 1024 * 1024
BUDGETS = {  # do_bench warm-up / repetition budget in ms per preset
    "smoke": {"warmup_ms": 1, "rep_ms": 10},
    "quick": {"warmup_ms": 10, "rep_ms": 50},
    "full": {"warmup_ms": 25, "rep_ms": 100},
}


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call at the median, 20th and 80th percentile."""

    p50: float
    p20: float
    p80: float

    def map(self, f: Callable[[float], float]) -> Timing:
        """Apply a monotone increasing `f` to each quantile (per-token time from a whole-call time, ...)."""
        return Timing(f(self.p50), f(self.p20), f(self.p80))


@dataclass
class Context:
    """What the driver hands every benchmark: where and how to run, and the measured ceilings."""

    device: torch.device
    dtype: torch.dtype
    preset: str = "quick"
    budget: dict[str, float] = field(default_factory=lambda: dict(BUDGETS["quick"]))
    copy_bytes_per_s: float | None = None  # large device-to-device copy, bytes moved (read + write) per second
    matmul_flops_per_s: float | None = None  # large matmul in `dtype`
    layers: int | None = None  # model-level depth override (--layers)


# --------------------------------------------------------------------------------------------- timing + memory
def _clear_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], Any], device: torch.device | str, *, warmup_ms: float = 25, rep_ms: float = 100,
          grad_to_none: Sequence[torch.Tensor] | None = None, reps: int | None = None, warmup: int = 1) -> Timing:
    """Time `fn()` in milliseconds: p50/p20/p80 over repeated calls.

    reps given: `warmup` untimed calls, then `reps` timed ones (synchronising the GPU around each), for calls
    long enough that launch overhead does not matter (a training step, a generate()).
    CUDA otherwise: `triton.testing.do_bench(fn, warmup, rep, grad_to_none, quantiles=[0.5, 0.2, 0.8])`, which
    flushes the L2 cache between calls and times with CUDA events. CPU otherwise: a perf_counter loop (at least 3
    calls, about `rep_ms` of them), good enough for smoke runs, not for numbers anyone should quote; one call
    under TRITON_INTERPRET=1 (the tests' CPU runs), where kernels take seconds and the time is only plumbing.
    """
    device = torch.device(device)
    if device.type == "cuda" and reps is None:
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                quantiles=list(QUANTILES))
        return Timing(float(p50), float(p20), float(p80))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        reps, warmup = 1, 0  # kernels run in Triton's interpreter: seconds per call, and its times mean nothing
    for _ in range(warmup if reps is not None else 1):  # first-call allocations, lazy inits, autotuning
        _clear_grads(grad_to_none)
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while (len(times) < reps) if reps is not None else (
            len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000)):
        _clear_grads(grad_to_none)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) == 1:
        return Timing(times[0], times[0], times[0])
    qs = statistics.quantiles(times, n=10, method="inclusive")  # deciles: qs[1] = 20th, qs[7] = 80th
    return Timing(statistics.median(times), qs[1], qs[7])


def peak_memory(fn: Callable[[], Any], device: torch.device | str,
                grad_to_none: Sequence[torch.Tensor] | None = None) -> int | None:
    """Bytes allocated at the peak of one `fn()` call above what was allocated before it (CUDA only).

    Inputs and weights made before the call are not counted, so this is the activation (and output,
    and gradient) memory of the call. Returns None on the CPU, where torch keeps no such counter.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    _clear_grads(grad_to_none)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    _clear_grads(grad_to_none)
    return int(peak)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No FutureWarning / deprecation chatter from transformers and PEFT in the benchmark logs."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            yield
        finally:
            transformers.logging.set_verbosity(level)


def free_memory(device: torch.device) -> None:
    """Give cached blocks back between providers, so one provider's peak does not shape the next one's."""
    gc.collect()  # wrapped models (PEFT's above all) hold reference cycles
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ environment
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def git_commit(repo: Path = REPO) -> str:
    """The commit benchmarked: env FASTADAPTERS_COMMIT, else `git rev-parse` (+"-dirty"), else "unknown"."""
    if os.environ.get("FASTADAPTERS_COMMIT"):
        return os.environ["FASTADAPTERS_COMMIT"]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD"], capture_output=True,
                               timeout=10).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def env_meta(device: torch.device | str) -> dict[str, str]:
    """The columns every row of one run shares: gpu, library versions, date (UTC) and commit."""
    return {
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
    }


def backend_available(op: str, backend: str) -> bool:
    """Whether the op registry holds a `backend` implementation of `op` (False if there is no registry)."""
    from fastadapters.env import registered_backends

    backends = registered_backends(op)
    return bool(backends) and backend in backends


FUSED_PROVIDERS = (("fused", "triton"), ("cuda", "cuda"))  # provider name in the CSV, fastadapters backend


def fused_providers(rec: Recorder, call: Callable[[str], Any]) -> list[tuple[str, str]]:
    """The (provider, backend) pairs whose kernel for `rec.op` is registered and accepts `call(backend)`'s inputs.

    A backend with no kernel, or whose kernel refuses the inputs (KernelUnavailableError), is skipped with a note,
    so the other providers still run; any other exception propagates (a real failure).
    """
    import fastadapters as fa

    ok = []
    for provider, backend in FUSED_PROVIDERS:
        if not backend_available(rec.op, backend):
            if backend == "triton":
                rec.note(f"{provider} ({backend}): skipped, no {backend} kernel is registered for {rec.op}")
            continue
        try:
            call(backend)
        except fa.ops.KernelUnavailableError as e:
            rec.note(f"{provider} ({backend}): skipped ({e})")
        else:
            ok.append((provider, backend))
    return ok


# ----------------------------------------------------------------------------------------------------- rows
def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}"


@dataclass
class Recorder:
    """Collects one benchmark's rows (and skip notes) for the CSV and the printed table.

    With `path` set, every row is appended to that CSV as soon as it is made, so a run cut short (a timeout,
    a crashed kernel) keeps what it measured; `finish` writes whatever is left.
    """

    op: str
    device: torch.device
    meta: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    rows: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _written: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.meta:
            self.meta = env_meta(self.device)

    def add(self, provider: str, mode: str, shape: str, dtype: torch.dtype | str, metric: str,
            p50: float, p20: float | None = None, p80: float | None = None) -> None:
        """One row: `metric` ("ms", "peak_MiB", "TFLOP/s", "GB/s", "tokens/s", "x_floor", ...) of `provider`."""
        dtype = str(dtype).removeprefix("torch.")
        row = {"op": self.op, "provider": provider, "mode": mode, "shape": shape, "dtype": dtype, "metric": metric,
               "p50": _fmt(p50), "p20": _fmt(p50 if p20 is None else p20), "p80": _fmt(p50 if p80 is None else p80)}
        row.update(self.meta)
        self.rows.append(row)
        if self.path is not None:
            self._flush(self.path)

    def add_timing(self, provider: str, mode: str, shape: str, dtype: torch.dtype | str, t: Timing, *,
                   flops: float | None = None, nbytes: float | None = None, metric: str = "ms") -> None:
        """A time row (`metric`, "ms" by default), and TFLOP/s / GB/s rows when `flops` / `nbytes` are given.

        For a rate, p20 comes from the slower (80th percentile) time, so p20 <= p50 <= p80 holds for every metric.
        """
        self.add(provider, mode, shape, dtype, metric, t.p50, t.p20, t.p80)
        if flops:
            self.add_rate(provider, mode, shape, dtype, "TFLOP/s", flops / 1e9, t)
        if nbytes:
            self.add_rate(provider, mode, shape, dtype, "GB/s", nbytes / 1e6, t)

    def add_rate(self, provider: str, mode: str, shape: str, dtype: torch.dtype | str, metric: str,
                 per_ms: float, t: Timing) -> None:
        """A rate row: `per_ms` units per millisecond divided by the time (p20 from the slow end)."""
        self.add(provider, mode, shape, dtype, metric, per_ms / t.p50, per_ms / t.p80, per_ms / t.p20)

    def add_memory(self, provider: str, mode: str, shape: str, dtype: torch.dtype | str, nbytes: int | None) -> None:
        if nbytes is not None:
            self.add(provider, mode, shape, dtype, "peak_MiB", nbytes / MiB)

    def note(self, text: str) -> None:
        """A provider skipped on purpose (no kernel registered, package missing): printed once, no row."""
        if text in self.notes:
            return
        self.notes.append(text)
        print(f"note: {self.op}: {text}", flush=True)

    def error(self, text: str) -> None:
        """A provider that failed: printed and counted; the run exits non-zero after writing its rows."""
        self.errors.append(text)
        print(f"ERROR: {text}", flush=True)

    def run(self, label: str, fn: Callable[[], None]) -> bool:
        """Call `fn`, turning an exception into an error line so the other providers still run."""
        try:
            fn()
            return True
        except Exception as e:  # one broken provider must not hide the other providers' numbers
            self.error(f"{label}: {type(e).__name__}: {e}")
            free_memory(self.device)
            return False

    def _flush(self, path: Path) -> None:
        append_rows(path, self.rows[self._written:])
        self._written = len(self.rows)

    def finish(self, out: str | os.PathLike | None = None) -> int:
        """Print the table, write the rows not yet written (to `path`, else to `out`); 0 if nothing failed, else 1."""
        print(format_table(self.rows))
        path = self.path if self.path is not None else results_path(out)
        self._flush(path)
        print(f"{len(self.rows)} rows of {self.op} in {path}", flush=True)
        return 1 if self.errors else 0


SCRATCH_OUT = Path(tempfile.gettempdir()) / "fastadapters-benchmarks"  # smoke runs: plumbing, not results


def results_path(out: str | os.PathLike | None, preset: str | None = None) -> Path:
    """`out` may be a folder (results.csv inside it) or a path ending in .csv; None means benchmarks/results/
    (the committed results), except for the smoke preset, whose rows are not results: a scratch folder then."""
    if out is None:
        return (SCRATCH_OUT if preset == "smoke" else DEFAULT_OUT) / RESULTS_NAME
    out = Path(out)
    return out if out.suffix == ".csv" else out / RESULTS_NAME


def append_rows(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append `rows` to the CSV at `path`, writing the header first when the file is new or empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            raise ValueError(f"{path} has columns {header}, not {list(COLUMNS)}: move it aside or pass "
                             "--out with another folder")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="raise")
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in COLUMNS})


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def latest_run(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Per op, the rows of its most recent run (the latest `date`; a run stamps one date on all its rows)."""
    last: dict[str, str] = {}
    for r in rows:
        last[r["op"]] = max(last.get(r["op"], ""), r["date"])
    return [r for r in rows if r["date"] == last[r["op"]]]


# ------------------------------------------------------------------------------------------------ shapes
TOKEN_KEYS = ("tokens", "M", "B", "L")  # the keys of a shape string that say how many tokens a call handles


def parse_shape(shape: str) -> dict[str, str]:
    """"M=4096 K=4096 r=16" -> {"M": "4096", "K": "4096", "r": "16"} (words without "=" are ignored)."""
    return dict(m.groups() for m in re.finditer(r"([^\s=]+)=(\S+)", shape))


def tokens_of(shape: str) -> int | None:
    """Tokens per call: `tokens=`, else `M=` (rows of a linear layer), else B*L (attention); None if unknown."""
    kv = parse_shape(shape)
    try:
        if "tokens" in kv:
            return int(kv["tokens"])
        if "M" in kv:
            return int(kv["M"])
        if "B" in kv and "L" in kv:
            return int(kv["B"]) * int(kv["L"])
    except ValueError:
        return None
    return None


def variant_of(shape: str) -> str:
    """The shape without its token-count keys: what stays fixed along one line of a plot."""
    return " ".join(f"{k}={v}" for k, v in parse_shape(shape).items() if k not in TOKEN_KEYS)


# ------------------------------------------------------------------------------------------------ tables
METRIC_ORDER = ("ms", "ms/token", "x_floor", "tokens/s", "TFLOP/s", "GB/s", "peak_MiB")
KEY_COLS = ("op", "provider", "mode", "shape", "dtype")


def pivot(rows: Sequence[dict[str, str]], key_cols: Sequence[str] = KEY_COLS) -> tuple[list[str], list[list[str]]]:
    """One line per `key_cols` value with one column per metric; times show "p50 [p20, p80]"."""
    metrics = [m for m in METRIC_ORDER if any(r["metric"] == m for r in rows)]
    metrics += sorted({r["metric"] for r in rows} - set(metrics))
    lines: dict[tuple[str, ...], dict[str, str]] = {}
    for r in rows:
        key = tuple(r[c] for c in key_cols)
        cell = r["p50"]
        if r["metric"] in ("ms", "ms/token") and r["p20"] and r["p80"]:
            cell = f"{float(r['p50']):.4g} [{float(r['p20']):.4g}, {float(r['p80']):.4g}]"
        elif cell:
            cell = f"{float(cell):.4g}"
        lines.setdefault(key, {})[r["metric"]] = cell
    header = [*key_cols, *metrics]
    body = [[*key, *(vals.get(m, "") for m in metrics)] for key, vals in lines.items()]
    return header, body


def format_table(rows: Sequence[dict[str, str]], markdown: bool = False,
                 key_cols: Sequence[str] = KEY_COLS) -> str:
    """The rows as a table, one line per `key_cols` value and a column per metric."""
    if not rows:
        return "(no rows)"
    header, body = pivot(rows, key_cols)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in body]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ measuring
def record(rec: Recorder, provider: str, mode: str, shape: str, dtype: torch.dtype, t: Timing, *,
           peak: int | None = None, flops: float | None = None, nbytes: float | None = None,
           tokens: int | None = None, floor: Timing | None = None, metric: str = "ms") -> None:
    """All rows of one measured call: time (+ TFLOP/s, GB/s, tokens/s), peak memory, and the ratio to the floor."""
    rec.add_timing(provider, mode, shape, dtype, t, flops=flops, nbytes=nbytes, metric=metric)
    if tokens:
        rec.add_rate(provider, mode, shape, dtype, "tokens/s", tokens * 1e3, t)
    rec.add_memory(provider, mode, shape, dtype, peak)
    if floor is not None:
        rec.add(provider, mode, shape, dtype, "x_floor", t.p50 / floor.p50, t.p20 / floor.p50, t.p80 / floor.p50)


def measure(rec: Recorder, provider: str, shape: str, dtype: torch.dtype, fwd: Callable[[], torch.Tensor],
            grads: Sequence[torch.Tensor], modes: Sequence[str], budget: dict[str, float], *,
            flops: dict[str, float] | None = None, nbytes: dict[str, float] | None = None,
            floor: dict[str, Timing] | None = None) -> dict[str, Timing]:
    """Time and measure peak memory of one provider of a kernel-level op in each of `modes`.

    "fwd": `fwd()`; "bwd": `out.backward(dy, retain_graph=True)` on one forward's graph; "fwd+bwd": both.
    fwd: () -> output tensor; grads: the leaves whose .grad is reset between calls; floor: mode -> Timing of the
    floor, for the "x_floor" rows. Returns mode -> Timing for the modes that ran.
    """
    dys: list[torch.Tensor] = []
    if not rec.run(f"{rec.op} {provider} {shape}", lambda: dys.append(torch.randn_like(fwd().detach()))):
        return {}
    dy = dys[0]
    got: dict[str, Timing] = {}
    for mode in modes:
        def one(mode: str = mode) -> None:
            if mode == "fwd":
                fn: Callable[[], Any] = fwd
            elif mode == "bwd":
                out = fwd()
                fn = lambda: out.backward(dy, retain_graph=True)  # noqa: E731  (the graph of one forward)
            elif mode == "fwd+bwd":
                fn = lambda: fwd().backward(dy)  # noqa: E731
            else:
                raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
            t = bench(fn, rec.device, grad_to_none=grads, **budget)
            record(rec, provider, mode, shape, dtype, t, peak=peak_memory(fn, rec.device, grads),
                   flops=(flops or {}).get(mode), nbytes=(nbytes or {}).get(mode), floor=(floor or {}).get(mode))
            got[mode] = t

        rec.run(f"{rec.op} {provider} {mode} {shape}", one)
    _clear_grads(grads)
    return got


CEILINGS = {  # per preset: bytes of the copied buffer, n of the n^3 matmul
    "smoke": {"copy_bytes": 16 * MiB, "matmul_n": 256},
    "quick": {"copy_bytes": 1024 * MiB, "matmul_n": 8192},
    "full": {"copy_bytes": 2048 * MiB, "matmul_n": 8192},
}


def _copy_rate(rec: Recorder, ctx: Context, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, device=ctx.device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    moved = 2.0 * src.numel() * 4
    t = bench(lambda: dst.copy_(src), ctx.device, **ctx.budget)
    rec.add_timing("device_copy", "fwd", f"bytes={src.numel() * 4}", torch.float32, t, nbytes=moved)
    return moved / (t.p50 * 1e-3)


def _matmul_rate(rec: Recorder, ctx: Context, n: int) -> float:
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    t = bench(lambda: a @ b, ctx.device, **ctx.budget)
    rec.add_timing("matmul", "fwd", f"{n}x{n}x{n}", ctx.dtype, t, flops=2.0 * n**3)
    return 2.0 * n**3 / (t.p50 * 1e-3)


def measure_ceilings(rec: Recorder, ctx: Context) -> None:
    """Measure the device's ceilings into `ctx` (and as rows of op "ceiling"): a large device-to-device copy
    (bytes read + written per second) and a large n^3 matmul in ctx.dtype (FLOP/s). Floors built from bytes and
    FLOPs (bottleneck) divide by these: max(bytes / copy rate, FLOPs / matmul rate)."""
    size = CEILINGS[ctx.preset]
    ctx.copy_bytes_per_s = _copy_rate(rec, ctx, size["copy_bytes"])
    free_memory(ctx.device)
    ctx.matmul_flops_per_s = _matmul_rate(rec, ctx, size["matmul_n"])
    free_memory(ctx.device)
    print(f"ceilings: copy {ctx.copy_bytes_per_s / 1e9:.4g} GB/s, {ctx.dtype} matmul "
          f"{ctx.matmul_flops_per_s / 1e12:.4g} TFLOP/s", flush=True)


# -------------------------------------------------------------------------------------------------- arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark command takes (the driver adds --ops, --layers, --plots)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="smoke: tiny shapes for a CPU (tests); quick: the GPU check; full: every shape")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--smoke", action="store_true", help="same as --preset smoke")
    p.add_argument("--out", default=None,
                   help="folder for results.csv, or a .csv path (default: benchmarks/results/results.csv; smoke "
                        f"preset: {SCRATCH_OUT}/results.csv)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    return p


def preset_of(args: argparse.Namespace, default: str = "full") -> str:
    """The preset the arguments ask for: --preset, else --smoke / --quick, else `default`."""
    if getattr(args, "preset", None):
        return args.preset
    if args.smoke:
        return "smoke"
    if args.quick:
        return "quick"
    return default


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA GPU; use --device cpu "
                         "--preset smoke")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, dict[str, float]]:
    """(device, dtype, timing budget) from the parsed arguments of base_parser.

    A CPU smoke run uses one intra-op thread unless OMP_NUM_THREADS says otherwise: with tiny tensors on a
    small shared machine, torch's spinning thread pool turned microseconds into tens of milliseconds. Other
    presets on the CPU warn that their times mean little.
    """
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    preset = preset_of(args)
    if device.type == "cpu" and preset != "smoke":
        print("warning: full-size shapes on the CPU take minutes and their times mean little; pass --preset smoke "
              "for a quick check, or run on a GPU", flush=True)
    if device.type == "cpu" and preset == "smoke" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return device, dtype, timing_budget(args)


def timing_budget(args: argparse.Namespace) -> dict[str, float]:
    """do_bench warm-up / repetition budget in ms: short for smoke and quick."""
    return dict(BUDGETS[preset_of(args)])
