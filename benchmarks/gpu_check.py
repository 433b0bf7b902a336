"""One command for a GPU machine: the GPU tests and the quick benchmarks, summed up in OUTDIR/summary.md.

    bash scripts/gpu_check.sh OUTDIR          (installs the package if it can, then runs this)
    python -m benchmarks.gpu_check OUTDIR     (from the repository root)

Writes into OUTDIR: summary.md (environment, test counts and failures, benchmark tables, notes, charts),
results.csv (the benchmark rows, columns of benchmarks/common.py), plots/ (PNG charts, when matplotlib is
there), junit.xml (pytest -m gpu), env.txt (python -m fastadapters.env), pytest.log and bench.log. The
benchmarks are the driver's `quick` preset (`python -m benchmarks --preset quick`), one process per group of
OP_GROUPS so that a crashed kernel or a timeout costs only the rest of its group (rows are written as they are
measured). Keeps to a time budget (default 300 s, plus at most 45 s of install: under 6 minutes on an H200) by
giving each step a timeout from what is left, shared among the groups by OP_WEIGHTS.

The children run from the repository root with it on PYTHONPATH: no install is needed.
`--smoke` runs the same steps on a CPU with tiny shapes (for the tests).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from benchmarks import common
from benchmarks.run import REGISTRY

REPO = common.REPO
DEFAULT_BUDGET_S = 300.0  # + the install in scripts/gpu_check.sh (at most 45 s): under 6 minutes
BENCH_SHARE = 0.7  # of the budget kept for the benchmarks while the GPU tests run (at most BENCH_RESERVE_S)
BENCH_RESERVE_S = 210.0
# One driver process per group (a process start costs ~6-8 s of imports and CUDA init; a crashed kernel costs
# the rest of its group only), and the relative time each op may take of what is left: FlexAttention compiles,
# the model level builds a 2-layer 7B-shaped model, decode runs ~70 generate() calls of 128 tokens.
OP_GROUPS = (("lora", "bottleneck", "multi_lora", "prefix_attention"), ("model",), ("decode",))
OP_WEIGHTS = {"lora": 1.5, "dora": 1.0, "bottleneck": 1.0, "multi_lora": 1.5, "prefix_attention": 2.5, "model": 2.0,
              "decode": 2.5}

def child_env() -> tuple[dict[str, str], str]:
    """The environment for the steps (repo root first on PYTHONPATH), and where fastadapters is imported from.

    No install is needed: fastadapters maps the top-level kernels/ folder to fastadapters.kernels itself.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    paths = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    r = subprocess.run([sys.executable, "-c", "import fastadapters.kernels as k; print(k.__path__[0])"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    how = f"kernels from {r.stdout.strip()}" if r.returncode == 0 else f"NOT IMPORTABLE: {r.stderr.strip()[-300:]}"
    return env, how


def run_step(label: str, cmd: Sequence[str], env: dict[str, str], log: Path,
             timeout: float) -> tuple[int | None, float]:
    """Run `cmd` from the repo root, appending its output to `log`; (exit code or None on timeout, seconds).

    On timeout the child first gets SIGINT (pytest then still writes its junit xml for the tests that ran),
    and is killed 20 s later if it has not stopped.
    """
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc: int | None = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            rc = None
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            f.write(f"\n[gpu_check] {label} timed out after {timeout:.0f} s\n")
    dt = time.perf_counter() - t0
    print(f"[gpu_check] {label}: {'timeout' if rc is None else f'exit {rc}'} in {dt:.0f} s", flush=True)
    return rc, dt


def junit_summary(path: Path) -> dict:
    """Counts (tests, failures, errors, skipped) and the failing tests' names and messages from a junit xml."""
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    if not path.exists():
        return out
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            for bad in (*case.findall("failure"), *case.findall("error")):
                msg = (bad.get("message") or "").strip().splitlines()
                out["failed"].append(f"{case.get('classname', '')}::{case.get('name', '')}: "
                                     f"{msg[0][:300] if msg else bad.tag}")
    return out


def _log_lines(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    if not path.exists():
        return []
    return [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.startswith(prefixes)]


def write_summary(out: Path, *, started: str, elapsed: float, how: str, steps: list[tuple[str, int | None, float]],
                  junit: dict | None, rows: list[dict[str, str]], smoke: bool, plots_note: str = "") -> Path:
    env_txt = (out / "env.txt").read_text() if (out / "env.txt").exists() else "(not collected)"
    lines = [f"# fastadapters GPU check ({'CPU smoke run' if smoke else 'quick presets'})", "",
             f"- started {started}, took {elapsed:.0f} s; commit {common.git_commit()}",
             f"- fastadapters.kernels: {how}", ""]
    lines += ["## Steps", "", "| step | exit | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {'timeout' if rc is None else rc} | {dt:.0f} |" for name, rc, dt in steps]
    lines += ["", "## Environment", "", "```", env_txt.rstrip(), "```", ""]
    lines += ["## GPU tests (pytest -m gpu)", ""]
    if junit is None:
        lines.append("not run")
    else:
        passed = junit["tests"] - junit["failures"] - junit["errors"] - junit["skipped"]
        lines.append(f"{passed} passed, {junit['failures']} failed, {junit['errors']} errors, "
                     f"{junit['skipped']} skipped ({junit['tests']} collected with the gpu marker); log: pytest.log")
        lines += [f"- FAILED {f}" for f in junit["failed"][:30]]
        if len(junit["failed"]) > 30:
            lines.append(f"- ... and {len(junit['failed']) - 30} more (junit.xml)")
    lines += ["", "## Benchmarks", "",
              "ms = p50 [p20, p80] per call; peak_MiB = peak allocation above the inputs; x_floor = time / floor.",
              ""]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [f"### {op}", "", common.format_table([r for r in rows if r["op"] == op], markdown=True), ""]
    if not rows:
        lines += ["no benchmark rows were written", ""]
    notes = _log_lines(out / "bench.log", ("note:", "ERROR:", "ceilings:", "Traceback", "[gpu_check]"))
    if notes:
        lines += ["### Notes and errors (bench.log)", ""] + [f"- {n}" for n in notes] + [""]
    pngs = sorted((out / "plots").glob("*.png"))
    lines += ["### Charts", ""] + ([f"- plots/{p.name}" for p in pngs] or [plots_note or "none drawn"]) + [""]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_groups(ops: Sequence[str]) -> list[tuple[str, ...]]:
    """OP_GROUPS restricted to `ops` (an op in no group runs alone), empty groups dropped."""
    grouped = [tuple(n for n in g if n in ops) for g in OP_GROUPS]
    grouped += [(n,) for n in ops if not any(n in g for g in OP_GROUPS)]
    return [g for g in grouped if g]


def draw_plots(csv_path: Path, out: Path) -> str:
    """Draw the charts of `csv_path` into `out` (in this process); "" when drawn, else why not."""
    if not csv_path.exists():
        return "no results.csv: nothing to draw"
    try:
        from benchmarks import plot

        drawn = plot.draw([csv_path], out)
    except ModuleNotFoundError as e:
        return f"not drawn ({e}): draw them later with python -m benchmarks.plot results.csv"
    except Exception as e:  # a chart must not cost the summary
        return f"not drawn ({type(e).__name__}: {e})"
    print(f"[gpu_check] {len(drawn)} charts in {out}", flush=True)
    return "" if drawn else "no rows to draw"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir", help="folder for summary.md, results.csv, junit.xml, env.txt and the logs")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: check the plumbing without a GPU")
    p.add_argument("--budget", type=float, default=float(os.environ.get("FASTADAPTERS_GPU_CHECK_BUDGET",
                                                                          DEFAULT_BUDGET_S)),
                   help=f"seconds for everything (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--tests", default="tests", help="what pytest collects (default tests/)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--ops", default=",".join(REGISTRY), help=f"comma-separated subset of {','.join(REGISTRY)}")
    args = p.parse_args(argv)
    ops = [b.strip() for b in args.ops.split(",") if b.strip()]
    unknown = sorted(set(ops) - set(REGISTRY))
    if unknown:
        p.error(f"--ops {','.join(unknown)}: choose from {','.join(REGISTRY)}")

    t_start = time.perf_counter()
    deadline = t_start + args.budget
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("pytest.log", "bench.log"):
        (out / name).write_text("")
    py = sys.executable
    env, how = child_env()
    print(f"[gpu_check] fastadapters.kernels: {how}", flush=True)
    steps: list[tuple[str, int | None, float]] = []

    def left(reserve: float = 0.0) -> float:
        return deadline - time.perf_counter() - reserve

    r = subprocess.run([py, "-m", "fastadapters.env"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=max(min(120.0, left()), 1.0))
    (out / "env.txt").write_text(r.stdout + (f"\n{r.stderr}" if r.returncode else ""))
    steps.append(("python -m fastadapters.env", r.returncode, 0.0))

    junit = None
    bench_reserve = 0.0 if args.skip_bench else min(BENCH_RESERVE_S, args.budget * BENCH_SHARE)
    if not args.skip_tests:
        cmd = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'junit.xml'}",
               "-o", "junit_family=xunit2", args.tests]
        if importlib.util.find_spec("pytest_timeout") is not None:  # the children run this same Python
            cmd.insert(-1, "--timeout=120")
        rc, dt = run_step("pytest -m gpu", cmd, env, out / "pytest.log", left(bench_reserve))
        steps.append(("pytest -m gpu", rc, dt))
        junit = junit_summary(out / "junit.xml")

    csv_path = out / "results.csv"
    before = len(common.read_rows(csv_path)) if csv_path.exists() else 0
    plots_note = ""
    if not args.skip_bench:
        preset = ["--preset", "smoke", "--device", "cpu"] if args.smoke else ["--preset", "quick", "--device", "cuda"]
        groups = bench_groups(ops)
        for i, group in enumerate(groups):
            weight = [sum(OP_WEIGHTS.get(n, 1.0) for n in g) for g in groups[i:]]
            name = ",".join(group)
            rc, dt = run_step(name, [py, "-m", "benchmarks", *preset, "--ops", name, "--out", str(csv_path)], env,
                              out / "bench.log", left() * weight[0] / sum(weight))
            steps.append((name, rc, dt))
        plots_note = draw_plots(csv_path, out / "plots")
    rows = common.read_rows(csv_path)[before:] if csv_path.exists() else []

    summary = write_summary(out, started=started, elapsed=time.perf_counter() - t_start, how=how, steps=steps,
                            junit=junit, rows=rows, smoke=args.smoke, plots_note=plots_note)
    print(summary.read_text())
    ok = all(rc == 0 or (name == "pytest -m gpu" and rc == 5) for name, rc, _ in steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
