"""The benchmark suite end to end on the CPU (smoke preset): the driver, its CSV, the plots, the README block and
the GPU-check plumbing. Times measured here mean nothing; what is tested is that every provider runs and writes."""

from __future__ import annotations

import csv
import importlib.util
import textwrap
import types
from pathlib import Path

import pytest
import torch

import fastadapters as fa
from benchmarks import common, gpu_check, plot, readme_table, run

REPO = Path(__file__).resolve().parent.parent
SMOKE_OPS = ("lora", "bottleneck", "prefix_attention", "model", "decode")  # multi_lora is another issue's
KERNEL_OPS = ("lora_linear", "bottleneck_adapter", "prefix_attention")
EXPECTED = {  # op -> providers every CPU smoke run writes ("fused" joins on a GPU where a kernel is registered)
    "ceiling": {"device_copy", "matmul"},
    "lora_linear": {"floor", "reference", "peft"},
    "bottleneck_adapter": {"floor", "reference"},
    "prefix_attention": {"floor", "sdpa_lower_right", "sdpa_mask", "reference"},
    "model_step": {"floor", "fastadapters", "peft", "reference"},
    "decode": {"no_adapter", "fastadapters", "peft", "reference", "merged"},
}
MODEL_SETUPS = {"lora_qv_r16": "peft", "lora_qkvud_r32": "peft", "series": "reference", "parallel": "reference",
                "prefix_p10": "peft", "prefix_p30": "peft", "prompt_p20": "peft"}
DECODE_SETUPS = {"lora_qv_r16", "series", "parallel", "prefix_p30", "prompt_p20"}


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A CPU smoke run drops torch to one thread (benchmarks.common.setup); later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[int, Path, list[dict[str, str]]]:
    """One driver run of every op at the smoke preset on the CPU: (exit code, csv path, rows)."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        rc = run.main(["--preset", "smoke", "--device", "cpu", "--ops", ",".join(SMOKE_OPS), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    header, rows = _read(out / "results.csv")
    assert tuple(header) == common.COLUMNS
    return rc, out / "results.csv", rows


def _of(rows, op, **match):
    return [r for r in rows if r["op"] == op and all(r[k] == v for k, v in match.items())]


# ------------------------------------------------------------------------------------------------ the driver
def test_smoke_run_succeeds_with_every_op_and_provider(smoke):
    rc, _, rows = smoke
    assert rc == 0
    assert {r["op"] for r in rows} == set(EXPECTED)
    for op, providers in EXPECTED.items():
        got = {r["provider"] for r in _of(rows, op)}
        assert providers <= got, f"{op}: missing {providers - got}"


def test_rows_have_every_column_and_one_stamp_per_run(smoke):
    _, _, rows = smoke
    for r in rows:
        empty = [c for c in common.COLUMNS if not r[c]]
        assert not empty, f"row {r} has empty columns {empty}"
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]), r
        assert r["dtype"] in ("float32",) and r["torch"] == torch.__version__ and r["gpu"].startswith("cpu")
    for col in ("gpu", "torch", "triton", "transformers", "peft", "date", "commit"):
        assert len({r[col] for r in rows}) == 1, f"{col} differs between the rows of one run"


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_kernel_level_rows_cover_every_mode_with_floor_ratios(smoke, op):
    _, _, rows = smoke
    for provider in ("floor", "reference"):
        assert {r["mode"] for r in _of(rows, op, provider=provider, metric="ms")} == set(common.MODES)
    assert {r["mode"] for r in _of(rows, op, provider="reference", metric="x_floor")} == set(common.MODES)
    assert _of(rows, op, provider="reference", metric="TFLOP/s")
    assert all(common.tokens_of(r["shape"]) for r in _of(rows, op))


def test_bottleneck_floor_comes_from_the_measured_ceilings(smoke):
    _, _, rows = smoke
    (copy,) = _of(rows, "ceiling", provider="device_copy", metric="GB/s")
    (mm,) = _of(rows, "ceiling", provider="matmul", metric="TFLOP/s")
    from benchmarks.bench_bottleneck import floor_model

    (fl,) = _of(rows, "bottleneck_adapter", provider="floor", mode="fwd", metric="ms")
    kv = common.parse_shape(fl["shape"])
    nbytes, flops = floor_model(int(kv["M"]), int(kv["d"]), int(kv["b"]), 4)
    want = max(nbytes["fwd"] / (float(copy["p50"]) * 1e9), flops["fwd"] / (float(mm["p50"]) * 1e12)) * 1e3
    assert float(fl["p50"]) == pytest.approx(want, rel=1e-4)


def test_model_level_rows_per_setup_and_provider(smoke):
    _, _, rows = smoke
    steps = _of(rows, "model_step", metric="ms")
    assert {r["mode"] for r in steps} == {"train_step"}
    got = {(common.parse_shape(r["shape"])["adapter"], r["provider"]) for r in steps}
    want = {("none", "floor")} | {(s, p) for s, peer in MODEL_SETUPS.items() for p in ("fastadapters", peer)}
    assert got == want
    for metric in ("tokens/s", "x_floor"):
        assert len(_of(rows, "model_step", metric=metric)) == len(steps) - (metric == "x_floor")


def test_decode_rows_per_adapter_type_and_batch(smoke):
    _, _, rows = smoke
    lat = _of(rows, "decode", metric="ms/token")
    got = {(common.parse_shape(r["shape"])["adapter"], r["provider"], common.parse_shape(r["shape"])["B"])
           for r in lat}
    assert {a for a, _, _ in got} == DECODE_SETUPS | {"none"}
    assert {b for _, _, b in got} == {"1", "2"}
    assert ("lora_qv_r16", "merged", "1") in got and ("series", "reference", "2") in got
    assert ("prefix_p30", "peft", "1") in got and ("none", "no_adapter", "2") in got
    assert len(_of(rows, "decode", metric="x_floor")) == len(lat) - 2  # all but the two no_adapter floors


def test_bench_module_runs_its_op_through_the_driver(tmp_path):
    from benchmarks import bench_bottleneck

    assert bench_bottleneck.run(["--preset", "smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    _, rows = _read(tmp_path / "results.csv")
    assert {r["op"] for r in rows} == {"ceiling", "bottleneck_adapter"}
    assert bench_bottleneck.run(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0  # appends
    _, rows2 = _read(tmp_path / "results.csv")
    assert len(rows2) == 2 * len(rows)


def test_optional_op_missing_is_a_note_and_legacy_modules_run_through_run_argv(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(run.REGISTRY, "multi_lora", "benchmarks._not_written_yet")
    assert run.load("multi_lora") is None
    monkeypatch.setitem(run.REGISTRY, "lora", "benchmarks._not_written_yet")
    with pytest.raises(ModuleNotFoundError):  # a required op that is missing is an error
        run.load("lora")

    seen = []
    legacy = types.SimpleNamespace(run=lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(run, "load", lambda name: legacy)
    ctx = common.Context(torch.device("cpu"), torch.float32, "smoke")
    args = run.parser().parse_args(["--device", "cpu", "--out", str(tmp_path)])
    assert run.run_op("multi_lora", ctx, {}, tmp_path / "results.csv", args) == 0
    assert seen == [["--smoke", "--device", "cpu", "--out", str(tmp_path / "results.csv")]]


@pytest.mark.parametrize("name", [n for n in run.REGISTRY if n not in run.OPTIONAL])
def test_every_op_has_the_three_presets_with_the_same_keys(name):
    mod = run.load(name)
    assert set(mod.PRESETS) == set(common.PRESETS) and callable(mod.bench) and mod.OP
    keys = {p: set(cfg) for p, cfg in mod.PRESETS.items()}
    assert keys["smoke"] == keys["quick"] == keys["full"], keys


def test_quick_preset_is_the_issue_s_model_and_decode_geometry():
    from benchmarks import bench_decode, bench_model, models

    assert {k: models.LLAMA_7B[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads")} == {
        "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32}
    q = bench_model.PRESETS["quick"]
    assert (q["size"], q["layers"], q["batch"] * q["seqs"][0], q["bottleneck"]) == ("llama7b", 2, 4096, 256)
    d = bench_decode.PRESETS["quick"]
    assert (d["size"], d["layers"], d["batches"], d["new"]) == ("llama7b", 2, (1, 16), 128)
    assert [s.name for s in models.SETUPS] == list(MODEL_SETUPS)
    assert {s.name for s in models.SETUPS if s.decode} == DECODE_SETUPS


def test_unknown_op_is_refused_with_the_choices():
    with pytest.raises(SystemExit, match="--ops nope: unknown; choose from lora,dora,bottleneck,"):
        run.select("lora,nope")
    assert run.select("decode,lora") == ["lora", "decode"]  # registry order


def test_flex_mask_mod_is_the_prefix_causal_mask():
    from benchmarks.bench_prefix_attention import prefix_mask, prefix_mask_mod

    L, P = 7, 3
    q_idx, kv_idx = torch.arange(L)[:, None], torch.arange(P + L)[None, :]
    assert torch.equal(prefix_mask_mod(P)(0, 0, q_idx, kv_idx), prefix_mask(L, P, torch.device("cpu")))
    assert prefix_mask(L, P, torch.device("cpu"))[0].tolist() == [True] * (P + 1) + [False] * (L - 1)


# ------------------------------------------------------------------------------------------------ plumbing
@pytest.mark.parametrize("shape,tokens,variant", [
    ("M=4096 K=4096 N=4096 r=16 p=0.05", 4096, "K=4096 N=4096 r=16 p=0.05"),
    ("B=8 H=32 L=2048 D=128 P=30", 16384, "H=32 D=128 P=30"),
    ("adapter=series layers=2 B=1 L=4096 tokens=4096", 4096, "adapter=series layers=2"),
    ("8192x8192x8192", None, ""),
], ids=["lora", "attention", "model", "no-tokens"])
def test_shape_parsing(shape, tokens, variant):
    assert common.tokens_of(shape) == tokens
    assert common.variant_of(shape) == variant


def test_append_rows_refuses_a_csv_with_other_columns(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("op,provider,ms\nx,y,1\n")
    with pytest.raises(ValueError, match="has columns"):
        common.append_rows(path, [{"op": "lora_linear"}])


def test_results_path_takes_a_folder_or_a_csv(tmp_path):
    assert common.results_path(tmp_path) == tmp_path / "results.csv"
    assert common.results_path(tmp_path / "x.csv") == tmp_path / "x.csv"
    assert common.results_path(None) == REPO / "benchmarks" / "results" / "results.csv"
    assert common.results_path(None, "quick") == REPO / "benchmarks" / "results" / "results.csv"
    smoke = common.results_path(None, "smoke")  # a smoke run's rows are plumbing, not results: never in the repo
    assert REPO not in smoke.parents and smoke.name == "results.csv"


def test_cpu_bench_times_and_orders_quantiles(monkeypatch):
    calls = []
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # kernels in the interpreter: one call, its time only plumbing
    common.bench(lambda: calls.append(1), "cpu", rep_ms=5)
    common.bench(lambda: calls.append(1), "cpu", reps=3, warmup=2)
    assert len(calls) == 2
    calls.clear()
    monkeypatch.delenv("TRITON_INTERPRET")
    t = common.bench(lambda: calls.append(1), "cpu", rep_ms=5)
    assert len(calls) >= 4  # warm-up + at least 3 timed
    assert 0 <= t.p20 <= t.p50 <= t.p80
    calls.clear()
    common.bench(lambda: calls.append(1), "cpu", reps=3, warmup=2)
    assert len(calls) == 5
    assert common.peak_memory(lambda: None, "cpu") is None


def test_rate_rows_keep_quantile_order():
    rec = common.Recorder("lora_linear", torch.device("cpu"), meta={c: "x" for c in common.COLUMNS[9:]})
    common.record(rec, "floor", "fwd", "M=1", torch.float32, common.Timing(2.0, 1.0, 4.0), flops=4e9, nbytes=8e6,
                  tokens=1000, floor=common.Timing(1.0, 1.0, 1.0))
    by_metric = {r["metric"]: r for r in rec.rows}
    assert set(by_metric) == {"ms", "TFLOP/s", "GB/s", "tokens/s", "x_floor"}
    tf = by_metric["TFLOP/s"]
    # 4 GFLOP in 2 ms = 2 TFLOP/s; the 20th percentile of the rate comes from the slow (80th) time
    assert float(tf["p50"]) == pytest.approx(2.0) and float(tf["p20"]) == pytest.approx(1.0)
    assert float(tf["p80"]) == pytest.approx(4.0)
    assert float(by_metric["GB/s"]["p50"]) == pytest.approx(4.0)
    assert float(by_metric["tokens/s"]["p50"]) == pytest.approx(5e5)
    assert float(by_metric["x_floor"]["p80"]) == pytest.approx(4.0)


def test_a_failing_provider_is_reported_and_fails_the_run_but_keeps_the_rows(tmp_path, capsys):
    rec = common.Recorder("lora_linear", torch.device("cpu"), path=tmp_path / "r.csv")
    x = torch.ones(3, requires_grad=True)
    budget = {"warmup_ms": 1, "rep_ms": 1}
    common.measure(rec, "broken", "s", torch.float32, lambda: (_ for _ in ()).throw(RuntimeError("boom")), [x],
                   ("fwd",), budget)
    common.measure(rec, "ok", "s", torch.float32, lambda: x * 2, [x], common.MODES, budget)
    assert rec.errors and "boom" in rec.errors[0]
    assert {r["provider"] for r in rec.rows} == {"ok"}
    assert len(_read(tmp_path / "r.csv")[1]) == len(rec.rows)  # written as measured, before finish
    assert rec.finish() == 1
    assert len(_read(tmp_path / "r.csv")[1]) == len(rec.rows)  # and not twice
    assert "ERROR: lora_linear broken" in capsys.readouterr().out


def test_micro_benchmarks_run_once_each():
    micro = pytest.importorskip("benchmarks.test_micro_cpu")
    calls = []

    def once(fn):
        calls.append(fn())

    with fa.use_backend("torch"):
        micro.test_lora_linear(once, "fwd+bwd", 0.05)
        micro.test_bottleneck_adapter(once, "fwd+bwd")
        micro.test_prefix_attention(once, "fwd")
        micro.test_tiny_model_train_step(once, "prompt_p20")
    assert len(calls) == 4


# ------------------------------------------------------------------------------------------------ plots
def test_plot_draws_a_png_per_op_variant_with_the_floor(smoke, tmp_path):
    pytest.importorskip("matplotlib")
    _, path, rows = smoke
    drawn = plot.draw([path], tmp_path / "plots")
    variants = {(r["op"], common.variant_of(r["shape"])) for r in rows
                if r["op"] != "ceiling" and r["provider"] not in common.FLOOR_PROVIDERS}
    assert len(drawn) == len(variants) == 2 + 1 + 1 + len(MODEL_SETUPS) + len(DECODE_SETUPS)
    for png, labels in drawn.items():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert {"floor", "no_adapter"} & set(labels), f"{png.name}: no floor in {labels}"
        assert "reference" in labels or "fastadapters" in labels
    assert (tmp_path / "plots" / "bottleneck_adapter.png") in drawn


# ------------------------------------------------------------------------------------------------ README
README = f"""# proj

## Performance

{readme_table.START}
old text
{readme_table.END}

How to run: by hand.

## Development
"""


def _gpu_csv(rows, path: Path, gpu: str, date: str, scale: float = 1.0) -> Path:
    out = []
    for r in rows:
        if r["op"] in ("ceiling", "bottleneck_adapter", "decode"):
            r = dict(r, gpu=gpu, date=date, dtype="bfloat16", torch="2.11.0+cu130")
            for q in ("p50", "p20", "p80"):
                r[q] = f"{float(r[q]) * scale:.6g}"
            out.append(r)
    common.append_rows(path, out)
    return path


def test_readme_table_writes_the_latest_gpu_run_with_versions_and_plots(smoke, tmp_path):
    _, _, rows = smoke
    results = tmp_path / "results"
    _gpu_csv(rows, results / "h200-old.csv", "NVIDIA H200", "2026-01-01T00:00:00Z", scale=1000.0)
    _gpu_csv(rows, results / "h200-new.csv", "NVIDIA H200", "2026-02-02T00:00:00Z")
    common.append_rows(results / "cpu.csv", [dict(r, date="2027-01-01T00:00:00Z") for r in rows])  # not a GPU
    readme = tmp_path / "README.md"
    readme.write_text(README)
    args = ["--results", str(results), "--readme", str(readme)]

    assert readme_table.main(args) == 0
    text = readme.read_text()
    block = text.split(readme_table.START)[1].split(readme_table.END)[0]
    assert text.replace(block, "\nold text\n") == README  # the rest of the README is untouched
    flat = " ".join(block.split())  # the prose is wrapped
    assert "**NVIDIA H200** (bfloat16), torch 2.11.0+cu130" in flat and f"peft {rows[0]['peft']}" in flat
    assert "2026-02-02" in flat and "2026-01-01" not in flat and rows[0]["commit"] in flat
    (ref,) = [r for r in rows if r["op"] == "bottleneck_adapter" and r["provider"] == "reference"
              and r["mode"] == "fwd" and r["metric"] == "ms"]
    assert f"{float(ref['p50']):.4g} [{float(ref['p20']):.4g}, {float(ref['p80']):.4g}]" in block
    assert "### Bottleneck adapter (kernel level)" in block and "### Decode: generate() per token" in block
    assert "### Training step" not in block and "Ceilings measured" in block and "cpu (" not in block
    links = [ln.split("(")[-1].rstrip(")") for ln in block.splitlines() if ln.startswith("![")]
    assert links == ["results/plots/bottleneck_adapter.png"], links  # decode's 5 charts are listed as links
    assert block.count("](results/plots/decode__adapter=") == len(DECODE_SETUPS)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / links[0]).exists() and len(list((results / "plots").glob("decode__*.png"))) == len(
            DECODE_SETUPS)

    assert readme_table.main([*args, "--check"]) == 0
    assert readme_table.main(args) == 0 and readme.read_text() == text  # idempotent
    readme.write_text(text.replace("bfloat16", "float8"))
    assert readme_table.main([*args, "--check"]) == 1


def test_readme_table_says_not_measured_without_gpu_rows(smoke, tmp_path):
    _, path, _ = smoke
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu.csv").write_bytes(path.read_bytes())
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert readme_table.main(["--results", str(results), "--readme", str(readme)]) == 0
    block = readme.read_text().split(readme_table.START)[1].split(readme_table.END)[0]
    assert block.strip() == readme_table.not_measured("H200")
    assert not any(ch.isdigit() for ch in block.replace("H200", "")), "a number in the not-measured text"


def test_readme_table_needs_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# proj\n\n## Performance\n\nnothing\n")
    with pytest.raises(SystemExit, match="benchmarks:start"):
        readme_table.main(["--results", str(tmp_path), "--readme", str(readme)])


def test_repository_readme_block_is_generated():
    assert readme_table.main(["--check"]) == 0, "run python -m benchmarks.readme_table and commit README.md"


# ------------------------------------------------------------------------------------------------ GPU check
def test_gpu_check_groups_cover_every_op_once():
    groups = gpu_check.bench_groups(list(run.REGISTRY))
    assert sorted(n for g in groups for n in g) == sorted(run.REGISTRY)
    assert set(gpu_check.OP_WEIGHTS) == set(run.REGISTRY)
    assert gpu_check.bench_groups(["decode", "bottleneck"]) == [("bottleneck",), ("decode",)]


def test_gpu_check_smoke_writes_summary_csv_plots_and_junit(tmp_path):
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
    rc = gpu_check.main([str(out), "--smoke", "--tests", str(tests), "--ops", "bottleneck",
                         "--budget", "300"])
    assert rc == 1  # the planted failure
    summary = (out / "summary.md").read_text()
    assert "0 passed, 1 failed, 0 errors, 1 skipped" in summary
    assert "test_fails_on_purpose: " in summary and "planted failure" in summary
    assert f"kernels from {REPO / 'kernels'}" in summary
    assert "### bottleneck_adapter" in summary and "| reference | fwd+bwd |" in summary and "### ceiling" in summary
    assert "torch         " + torch.__version__ in (out / "env.txt").read_text()
    header, rows = _read(out / "results.csv")
    assert tuple(header) == common.COLUMNS and {r["op"] for r in rows} == {"ceiling", "bottleneck_adapter"}
    assert (out / "junit.xml").exists()
    if importlib.util.find_spec("matplotlib"):
        assert (out / "plots" / "bottleneck_adapter.png").exists() and "plots/bottleneck_adapter.png" in summary
