"""The benchmark scripts end to end on the CPU (--smoke), their CSV, and the GPU-check plumbing."""

from __future__ import annotations

import csv
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import common, gpu_check

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["--smoke", "--device", "cpu"]

EXPECTED = {  # providers every smoke run must write ("fused" joins once a triton kernel is registered)
    "bench_lora": {"floor", "reference", "peft"},
    "bench_bottleneck": {"ceiling_copy", "ceiling_matmul", "floor", "reference"},
    "bench_prefix_attention": {"floor", "sdpa_lower_right", "sdpa_mask", "reference"},
}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A CPU smoke run may drop torch to one thread (benchmarks.common.setup); later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.parametrize("script", sorted(EXPECTED), ids=lambda s: s.removeprefix("bench_"))
def test_bench_smoke_appends_full_rows(script, tmp_path):
    mod = importlib.import_module(f"benchmarks.{script}")
    assert mod.run([*SMOKE, "--out", str(tmp_path)]) == 0
    header, rows = _read(tmp_path / "results.csv")
    assert tuple(header) == common.COLUMNS
    assert rows, "no rows written"
    for r in rows:
        empty = [c for c in common.COLUMNS if not r[c]]
        assert not empty, f"row {r} has empty columns {empty}"
        assert r["op"] == mod.OP and r["dtype"] == "float32" and r["torch"] == torch.__version__
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]), r
    providers = {r["provider"] for r in rows}
    assert EXPECTED[script] <= providers, providers
    ms = {(r["provider"], r["mode"]) for r in rows if r["metric"] == "ms"}
    assert {("reference", "fwd"), ("reference", "fwd+bwd"), ("floor", "fwd"), ("floor", "fwd+bwd")} <= ms
    assert any(r["metric"] == "x_floor" and r["provider"] == "reference" for r in rows)
    assert any(r["metric"] == "TFLOP/s" for r in rows)

    assert mod.run([*SMOKE, "--out", str(tmp_path)]) == 0  # a second run appends under the same header
    header2, rows2 = _read(tmp_path / "results.csv")
    assert header2 == header and len(rows2) == 2 * len(rows)


def test_append_rows_refuses_a_csv_with_other_columns(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("op,provider,ms\nx,y,1\n")
    with pytest.raises(ValueError, match="has columns"):
        common.append_rows(path, [{"op": "lora_linear"}])


def test_results_path_takes_a_folder_or_a_csv(tmp_path):
    assert common.results_path(tmp_path) == tmp_path / "results.csv"
    assert common.results_path(tmp_path / "x.csv") == tmp_path / "x.csv"
    assert common.results_path(None) == REPO / "benchmarks" / "results" / "results.csv"


def test_cpu_bench_times_and_orders_quantiles():
    calls = []
    t = common.bench(lambda: calls.append(1), "cpu", rep_ms=5)
    assert len(calls) >= 4  # warm-up + at least 3 timed
    assert 0 <= t.p20 <= t.p50 <= t.p80
    assert common.peak_memory(lambda: None, "cpu") is None


def test_rate_rows_keep_quantile_order():
    rec = common.Recorder("lora_linear", torch.device("cpu"), meta={c: "x" for c in common.COLUMNS[9:]})
    rec.add_timing("floor", "fwd", "M=1", torch.float32, common.Timing(2.0, 1.0, 4.0), flops=4e9, nbytes=8e6)
    by_metric = {r["metric"]: r for r in rec.rows}
    assert set(by_metric) == {"ms", "TFLOP/s", "GB/s"}
    tf = by_metric["TFLOP/s"]
    # 4 GFLOP in 2 ms = 2 TFLOP/s; the 20th percentile of the rate comes from the slow (80th) time
    assert float(tf["p50"]) == pytest.approx(2.0) and float(tf["p20"]) == pytest.approx(1.0)
    assert float(tf["p80"]) == pytest.approx(4.0)
    assert float(by_metric["GB/s"]["p50"]) == pytest.approx(4.0)


def test_a_failing_provider_is_reported_and_fails_the_run(tmp_path, capsys):
    rec = common.Recorder("lora_linear", torch.device("cpu"))
    x = torch.ones(3, requires_grad=True)
    common.measure(rec, "broken", "s", torch.float32, lambda: (_ for _ in ()).throw(RuntimeError("boom")), [x],
                   ("fwd",), {"warmup_ms": 1, "rep_ms": 1})
    common.measure(rec, "ok", "s", torch.float32, lambda: x * 2, [x], ("fwd", "fwd+bwd"),
                   {"warmup_ms": 1, "rep_ms": 1})
    assert rec.errors and "boom" in rec.errors[0]
    assert {r["provider"] for r in rec.rows} == {"ok"}
    assert rec.finish(tmp_path) == 1
    assert "ERROR: lora_linear broken" in capsys.readouterr().out


SHIM_CHECK = textwrap.dedent("""
    import sys
    def drop(pred):
        sys.meta_path[:] = [f for f in sys.meta_path if not pred(getattr(f, "__module__", ""), f)]
    drop(lambda mod, f: "editable" in mod.lower())  # forget the editable install of the package
    ours = [f for f in sys.meta_path if type(f).__name__ == "_FastadaptersKernelsFinder"]
    assert len(ours) == 1, sys.meta_path
    sys.meta_path.remove(ours[0])
    try:  # control: without the shim the package cannot import its kernels
        import fastadapters.kernels
        raise SystemExit("control failed: fastadapters.kernels imported without the shim")
    except ModuleNotFoundError as e:
        assert "fastadapters.kernels" in str(e), e
    for name in [m for m in sys.modules if m.startswith("fastadapters")]:
        del sys.modules[name]
    sys.meta_path.append(ours[0])
    import fastadapters.kernels, fastadapters.kernels.lora_ref
    print("OK", fastadapters.kernels.__file__)
""")


def test_kernels_shim_maps_top_level_kernels_without_an_install(tmp_path):
    shim = gpu_check.write_kernels_shim(tmp_path / "shim")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{shim}:{REPO}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", SHIM_CHECK], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK") and str(REPO / "kernels" / "__init__.py") in r.stdout


def test_gpu_check_smoke_writes_summary_csv_and_junit(tmp_path):
    tests = tmp_path / "gpu_tests"
    tests.mkdir()
    (tests / "test_fake.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        def test_needs_gpu():
            pytest.skip("needs a CUDA GPU")

        @pytest.mark.gpu
        def test_fails_on_purpose():
            assert 1 == 2, "planted failure"

        def test_not_gpu():
            raise AssertionError("deselected by -m gpu, must not run")
    """))
    out = tmp_path / "out"
    rc = gpu_check.main([str(out), "--smoke", "--force-shim", "--tests", str(tests),
                         "--benches", "bench_bottleneck", "--budget", "300"])
    assert rc == 1  # the planted failure
    summary = (out / "summary.md").read_text()
    assert "0 passed, 1 failed, 0 errors, 1 skipped" in summary
    assert "test_fails_on_purpose: " in summary and "planted failure" in summary
    assert "PYTHONPATH shim" in summary
    assert "### bottleneck_adapter" in summary and "| reference | fwd+bwd |" in summary
    assert "torch         " + torch.__version__ in (out / "env.txt").read_text()
    header, rows = _read(out / "results.csv")
    assert tuple(header) == common.COLUMNS and {r["op"] for r in rows} == {"bottleneck_adapter"}
    assert (out / "junit.xml").exists()
