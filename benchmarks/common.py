"""Shared benchmark plumbing: timing, peak memory, the results CSV and the printed table.

Every benchmark script times its providers with `bench` (triton.testing.do_bench on CUDA with quantiles
(median, 20th, 80th); a plain perf_counter loop on the CPU, for smoke runs only), measures peak memory with
`peak_memory` (CUDA only), collects rows in a `Recorder`, prints them as a table and appends them to a CSV
whose columns are `COLUMNS`.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

COLUMNS = ("op", "provider", "mode", "shape", "dtype", "metric", "p50", "p20", "p80",
           "gpu", "torch", "triton", "transformers", "peft", "date", "commit")
QUANTILES = (0.5, 0.2, 0.8)
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
RESULTS_NAME = "results.csv"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call at the median, 20th and 80th percentile."""

    p50: float
    p20: float
    p80: float


# --------------------------------------------------------------------------------------------- timing + memory
def _clear_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def bench(fn: Callable[[], Any], device: torch.device | str, *, warmup_ms: float = 25, rep_ms: float = 100,
          grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    """Time `fn()` in milliseconds: p50/p20/p80 over repeated calls.

    CUDA: `triton.testing.do_bench(fn, warmup, rep, grad_to_none, quantiles=[0.5, 0.2, 0.8])`, which flushes
    the L2 cache between calls and times with CUDA events. CPU: a perf_counter loop (at least 3 calls, about
    `rep_ms` of them), good enough for smoke runs, not for numbers anyone should quote.
    """
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                quantiles=list(QUANTILES))
        return Timing(float(p50), float(p20), float(p80))
    _clear_grads(grad_to_none)
    fn()  # warm-up: first-call allocations, lazy inits
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
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


# ----------------------------------------------------------------------------------------------------- rows
def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}"


@dataclass
class Recorder:
    """Collects one benchmark run's rows (and skip notes) for the CSV and the printed table."""

    op: str
    device: torch.device
    meta: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.meta:
            self.meta = env_meta(self.device)

    def add(self, provider: str, mode: str, shape: str, dtype: torch.dtype | str, metric: str,
            p50: float, p20: float | None = None, p80: float | None = None) -> None:
        """One row: `metric` ("ms", "peak_MiB", "TFLOP/s", "GB/s", "x_floor") of `provider` in `mode`."""
        dtype = str(dtype).removeprefix("torch.")
        row = {"op": self.op, "provider": provider, "mode": mode, "shape": shape, "dtype": dtype, "metric": metric,
               "p50": _fmt(p50), "p20": _fmt(p50 if p20 is None else p20), "p80": _fmt(p50 if p80 is None else p80)}
        row.update(self.meta)
        self.rows.append(row)

    def add_timing(self, provider: str, mode: str, shape: str, dtype: torch.dtype | str, t: Timing, *,
                   flops: float | None = None, nbytes: float | None = None) -> None:
        """A "ms" row, and TFLOP/s / GB/s rows when `flops` / `nbytes` are given.

        For a rate, p20 comes from the slower (80th percentile) time, so p20 <= p50 <= p80 holds for every metric.
        """
        self.add(provider, mode, shape, dtype, "ms", t.p50, t.p20, t.p80)
        if flops:
            self.add(provider, mode, shape, dtype, "TFLOP/s",
                     flops / t.p50 / 1e9, flops / t.p80 / 1e9, flops / t.p20 / 1e9)
        if nbytes:
            self.add(provider, mode, shape, dtype, "GB/s",
                     nbytes / t.p50 / 1e6, nbytes / t.p80 / 1e6, nbytes / t.p20 / 1e6)

    def add_memory(self, provider: str, mode: str, shape: str, dtype: torch.dtype | str, nbytes: int | None) -> None:
        if nbytes is not None:
            self.add(provider, mode, shape, dtype, "peak_MiB", nbytes / MiB)

    def note(self, text: str) -> None:
        """A provider skipped on purpose (no kernel registered, package missing): printed, no row."""
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def error(self, text: str) -> None:
        """A provider that failed: printed and counted; the script exits non-zero after writing its rows."""
        self.errors.append(text)
        print(f"ERROR: {text}", flush=True)

    def run(self, label: str, fn: Callable[[], None]) -> bool:
        """Call `fn`, turning an exception into an error line so the other providers still run."""
        try:
            fn()
            return True
        except Exception as e:  # one broken provider must not hide the other providers' numbers
            self.error(f"{label}: {type(e).__name__}: {e}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return False

    def finish(self, out: str | os.PathLike | None) -> int:
        """Print the table, append the rows to `out`/results.csv; 0 if no provider failed, else 1."""
        print(format_table(self.rows))
        path = results_path(out)
        append_rows(path, self.rows)
        print(f"{len(self.rows)} rows appended to {path}")
        return 1 if self.errors else 0


def results_path(out: str | os.PathLike | None) -> Path:
    """`out` may be a folder (results.csv inside it) or a path ending in .csv; None means benchmarks/results/."""
    if out is None:
        return DEFAULT_OUT / RESULTS_NAME
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


METRIC_ORDER = ("ms", "TFLOP/s", "GB/s", "peak_MiB", "x_floor")
KEY_COLS = ("op", "provider", "mode", "shape", "dtype")


def pivot(rows: Sequence[dict[str, str]]) -> tuple[list[str], list[list[str]]]:
    """One line per (op, provider, mode, shape, dtype) with one column per metric; "ms" shows p50 [p20, p80]."""
    metrics = [m for m in METRIC_ORDER if any(r["metric"] == m for r in rows)]
    metrics += sorted({r["metric"] for r in rows} - set(metrics))
    lines: dict[tuple[str, ...], dict[str, str]] = {}
    for r in rows:
        key = tuple(r[c] for c in KEY_COLS)
        cell = r["p50"]
        if r["metric"] == "ms" and r["p20"] and r["p80"]:
            cell = f"{float(r['p50']):.4g} [{float(r['p20']):.4g}, {float(r['p80']):.4g}]"
        elif cell:
            cell = f"{float(cell):.4g}"
        lines.setdefault(key, {})[r["metric"]] = cell
    header = [*KEY_COLS, *metrics]
    body = [[*key, *(vals.get(m, "") for m in metrics)] for key, vals in lines.items()]
    return header, body


def format_table(rows: Sequence[dict[str, str]], markdown: bool = False) -> str:
    """The rows as a table, one line per (op, provider, mode, shape, dtype) and a column per metric."""
    if not rows:
        return "(no rows)"
    header, body = pivot(rows)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in body]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(out)


def measure(rec: Recorder, provider: str, shape: str, dtype: torch.dtype, fwd: Callable[[], torch.Tensor],
            grads: Sequence[torch.Tensor], modes: Sequence[str], budget: dict[str, float], *,
            flops: dict[str, float] | None = None, nbytes: dict[str, float] | None = None,
            floor: dict[str, Timing] | None = None) -> dict[str, Timing]:
    """Time and measure peak memory of `fwd` ("fwd") and of `fwd().backward(dy)` ("fwd+bwd") for one provider.

    fwd: () -> output tensor; grads: the leaves whose .grad is reset between calls; floor: mode -> Timing of the
    floor, for the "x_floor" ratio rows. Returns mode -> Timing for the modes that ran.
    """
    dys: list[torch.Tensor] = []
    if not rec.run(f"{rec.op} {provider} {shape}", lambda: dys.append(torch.randn_like(fwd().detach()))):
        return {}
    dy = dys[0]
    fns: dict[str, Callable[[], Any]] = {"fwd": fwd, "fwd+bwd": lambda: fwd().backward(dy)}
    got: dict[str, Timing] = {}
    for mode in modes:
        fn = fns[mode]

        def one(mode: str = mode, fn: Callable[[], Any] = fn) -> None:
            t = bench(fn, rec.device, grad_to_none=grads, **budget)
            rec.add_timing(provider, mode, shape, dtype, t, flops=(flops or {}).get(mode),
                           nbytes=(nbytes or {}).get(mode))
            rec.add_memory(provider, mode, shape, dtype, peak_memory(fn, rec.device, grads))
            if floor and mode in floor:
                f = floor[mode]
                rec.add(provider, mode, shape, dtype, "x_floor", t.p50 / f.p50, t.p20 / f.p50, t.p80 / f.p50)
            got[mode] = t

        rec.run(f"{rec.op} {provider} {mode} {shape}", one)
    return got


# -------------------------------------------------------------------------------------------------- arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a small preset (one or two shapes) for scripts/gpu_check.sh")
    p.add_argument("--smoke", action="store_true", help="tiny shapes that run in seconds on a CPU (for the tests)")
    p.add_argument("--out", default=None,
                   help="folder for results.csv, or a .csv path (default: benchmarks/results/results.csv)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA GPU; use --device cpu --smoke")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def warn_cpu_full(args: argparse.Namespace, device: torch.device) -> None:
    if device.type == "cpu" and not args.smoke:
        print("warning: full-size shapes on the CPU take minutes and their times mean little; pass --smoke "
              "for a quick check, or run on a GPU", flush=True)


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, dict[str, float]]:
    """(device, dtype, timing budget) from the parsed arguments of base_parser.

    A CPU smoke run uses one intra-op thread unless OMP_NUM_THREADS says otherwise: with tiny tensors on a
    small shared machine, torch's spinning thread pool turned microseconds into tens of milliseconds.
    """
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    warn_cpu_full(args, device)
    if device.type == "cpu" and args.smoke and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return device, dtype, timing_budget(args)


def timing_budget(args: argparse.Namespace) -> dict[str, float]:
    """do_bench warm-up / repetition budget in ms: short for --smoke and --quick."""
    if args.smoke:
        return {"warmup_ms": 1, "rep_ms": 10}
    if args.quick:
        return {"warmup_ms": 10, "rep_ms": 50}
    return {"warmup_ms": 25, "rep_ms": 100}
