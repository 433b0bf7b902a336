"""The optional C++/CUDA extension (csrc/, fastadapters/ext.py): built here with the CPU compiler (cached in the
user cache folder across runs), its CPU multi-LoRA op against the reference, the binding layer's argument checks,
and the fallback when it cannot be built (one warning, then the torch / Triton paths).

FASTADAPTERS_EXT=0 skips the build tests (for a machine without a C++ compiler); otherwise a failed build fails.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import fastadapters as fa
from fastadapters import ext
from fastadapters.kernels.multi_lora_ref import multi_lora_loop_ref, multi_lora_ref
from fastadapters.ops.multi_lora import multi_lora_delta

if os.environ.get("FASTADAPTERS_EXT", "1") == "0":
    pytest.skip("FASTADAPTERS_EXT=0: the C++ extension is disabled", allow_module_level=True)

EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


@pytest.fixture(scope="module")
def mod():
    """The extension, built on first use (tens of seconds once per source change; later runs import the cache)."""
    ext.reset()
    m = ext.load()
    assert m is not None, f"the C++ extension did not build: {ext.unavailable_reason()}"
    st = ext.status()
    print(f"\nC++ extension: {st['folder']} build {st['build_seconds']} s (cached={st['cached']}, "
          f"this load {st['load_seconds']:.2f} s)")
    return m


def case(M=37, K=72, N=40, ranks=(7, 1, 5, 3, 7), dtype=torch.float32, idx_dtype=torch.int64, seed=0, p_none=0.2):
    g = torch.Generator().manual_seed(seed)
    n, R = len(ranks), max(ranks)
    A = torch.zeros(n, R, K, dtype=torch.float64)
    B = torch.zeros(n, N, R, dtype=torch.float64)
    for i, r in enumerate(ranks):
        A[i, :r] = torch.randn(r, K, generator=g, dtype=torch.float64) * K**-0.5
        B[i, :, :r] = torch.randn(N, r, generator=g, dtype=torch.float64) * r**-0.5
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    s = (torch.rand(n, generator=g) * 2 + 0.25).float()
    idx = torch.randint(0, n, (M,), generator=g)
    idx[torch.rand(M, generator=g) < p_none] = -1
    return x.to(dtype), A.to(dtype), B.to(dtype), s, idx.to(idx_dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("shape", [dict(M=37, K=72, N=40, ranks=(7, 1, 5, 3, 7)), dict(M=1, K=16, N=8, ranks=(64,)),
                                   dict(M=12, K=33, N=7, ranks=(16, 2), p_none=1.0)],
                         ids=["M37-ranks1to7", "M1-r64", "all-base"])
def test_cpu_op_matches_reference(mod, dtype, idx_dtype, shape, nan_poison):
    x, A, B, s, idx = case(dtype=dtype, idx_dtype=idx_dtype, **shape)
    out = torch.randn(x.shape[0], B.shape[1]).to(dtype)
    base = out.clone()
    assert mod.multi_lora_bgmv_(out, x, A, B, s, idx) is out
    hi = multi_lora_loop_ref(x, A, B, s, idx)
    lo = multi_lora_ref(x, A, B, s, idx).double()
    err = (out.double() - base.double() - hi).abs()
    atol = 1e-12 if dtype == torch.float64 else 2 * EPS[dtype] * (base.abs().max().item() + hi.abs().max().item())
    assert (err <= 2 * (lo - hi).abs() + atol).all(), f"max err {err.max():.3g}"
    assert torch.equal(out[idx < 0], base[idx < 0])


def test_registry_backend_cuda_runs_the_extension_on_cpu(mod, monkeypatch):
    x, A, B, s, idx = case()
    calls = []
    real = ext.bgmv_op()
    monkeypatch.setattr(ext, "bgmv_op", lambda: lambda *a: calls.append(1) or real(*a))
    with fa.use_backend("cuda"):
        got = multi_lora_delta(x.view(1, 37, 72), A, B, s, idx.view(1, 37))
    assert calls == [1]
    torch.testing.assert_close(got.view(37, 40).double(), multi_lora_loop_ref(x, A, B, s, idx), rtol=1e-5, atol=1e-5)
    with fa.use_backend("auto"):  # CPU tensors stay on the reference under auto
        multi_lora_delta(x, A, B, s, idx)
    assert calls == [1]


def test_mixed_batch_model_on_the_cpp_path(mod):
    from test_multi_lora import NAMES, multi_adapter_model
    from tiny_models import tiny_batch

    am = multi_adapter_model("llama")
    ids, mask = tiny_batch(len(NAMES), 7, left_pad=2)
    with torch.no_grad():
        with fa.use_backend("cuda"):
            got = am(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        with fa.use_backend("torch"):
            ref = am(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(x=a["x"][:, :-1].contiguous()), r"lora_A_stack has shape \(5, 7, 72\) but x \(37, 71\)"),
        (lambda a: a.update(B=a["B"][:, :, :-1].contiguous()), r"lora_B_stack has shape \(5, 40, 6\)"),
        (lambda a: a.update(out=a["out"][:, :-1].contiguous()), r"out has shape \(37, 39\) but must be"),
        (lambda a: a.update(s=a["s"][:-1]), r"scalings has shape \(4,\) but must be \(n,\) = \(5,\)"),
        (lambda a: a.update(s=a["s"].double()), "scalings has dtype Double but must be float32"),
        (lambda a: a.update(idx=a["idx"].float()), "must be int64 or int32"),
        (lambda a: a.update(idx=a["idx"][:-1]), r"token_adapter_idx has shape \(36,\)"),
        (lambda a: a.update(A=a["A"].double()), "must share one dtype"),
        (lambda a: a.update(out=a["out"].double()), "out has dtype Double but x has Float"),
        (lambda a: a.update(x=a["x"].t().contiguous().t()), "x must be contiguous"),
        (lambda a: a.update(A=a["A"][0]), r"lora_A_stack has shape \(7, 72\) but must be 3-D"),
        (lambda a: a["idx"].__setitem__(3, 5), r"token_adapter_idx\[3\] = 5 is outside \[-1, 5\)"),
    ],
    ids=["x-K", "B-R", "out-N", "s-len", "s-dtype", "idx-float", "idx-len", "A-dtype", "out-dtype", "x-strides",
         "A-2d", "idx-range"],
)
def test_binding_argument_checks(mod, mutate, match):
    x, A, B, s, idx = case()
    a = dict(out=torch.zeros(37, 40), x=x, A=A, B=B, s=s, idx=idx)
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        mod.multi_lora_bgmv_(a["out"], a["x"], a["A"], a["B"], a["s"], a["idx"])


def test_op_is_registered_with_the_dispatcher_and_compiles(mod, nan_poison):
    """TORCH_LIBRARY: torch.ops.fastadapters.multi_lora_bgmv_ runs the C++ code through the dispatcher (same bits
    as the pybind entry), has a fake (meta) implementation, and torch.compile(fullgraph=True) traces it."""
    op = torch.ops.fastadapters.multi_lora_bgmv_
    assert ext.bgmv_op() is op
    x, A, B, s, idx = case()
    out1, out2 = torch.ones(37, 40), torch.ones(37, 40)
    assert op(out1, x, A, B, s, idx) is None  # in place
    mod.multi_lora_bgmv_(out2, x, A, B, s, idx)
    assert torch.equal(out1, out2) and not torch.equal(out1, torch.ones(37, 40))
    op(*[t.to("meta") for t in (torch.ones(37, 40), x, A, B, s, idx)])  # the fake: no data, no error

    def f(out, x, A, B, s, idx):
        torch.ops.fastadapters.multi_lora_bgmv_(out, x, A, B, s, idx)
        return out * 2

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(torch.ones(37, 40), x, A, B, s, idx)
    assert torch.equal(got, out1 * 2)


def test_cuda_code_only_with_a_gpu_and_toolkit(mod):
    assert mod.has_cuda() == ext.cuda_buildable()[0]
    with pytest.raises(RuntimeError, match="tensors on meta are not supported"):
        mod.multi_lora_bgmv_(torch.zeros(1, 1, device="meta"), torch.zeros(1, 1, device="meta"),
                             torch.zeros(1, 1, 1, device="meta"), torch.zeros(1, 1, 1, device="meta"),
                             torch.zeros(1, device="meta"), torch.zeros(1, device="meta", dtype=torch.long))


def test_status_reports_build_and_paths(mod):
    st = ext.status()
    assert st["loaded"] and st["error"] is None and st["folder"]
    assert st["build_seconds"] is not None and st["build_seconds"] > 0
    paths = st["ops"]["multi_lora_delta"]
    assert paths["cpu auto"] == "torch reference" and paths["cpu cuda"] == "C++ extension (CPU code)"
    json.dumps(st, default=str)


def test_cli_prints_status(mod, capsys, monkeypatch):
    monkeypatch.setenv("FASTADAPTERS_EXT_VERBOSE", "0")
    assert ext.main([]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["loaded"] and st["folder"] == ext.status()["folder"]


# ------------------------------------------------------------------------------------------------ fallback
@pytest.fixture
def broken_build(monkeypatch, tmp_path):
    """No cached build (empty cache folder) and a compiler that fails; the real state comes back afterwards."""
    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'fastadapters_ext': simulated compiler failure")

    monkeypatch.setenv("FASTADAPTERS_CACHE", str(tmp_path))
    monkeypatch.setattr(ext, "_build", fail)
    ext.reset()
    yield
    ext.reset()


def test_build_failure_warns_once_and_falls_back(broken_build):
    with pytest.warns(RuntimeWarning, match="C\\+\\+/CUDA extension is unavailable .*simulated compiler failure"):
        assert ext.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert ext.load() is None
        st = ext.status()
    assert not st["loaded"] and "simulated compiler failure" in st["error"]
    assert st["ops"]["multi_lora_delta"]["cpu cuda"].startswith("unavailable: ")
    x, A, B, s, idx = case()
    with fa.use_backend("cuda"), pytest.raises(fa.ops.KernelUnavailableError, match="extension is unavailable"):
        multi_lora_delta(x, A, B, s, idx)
    with fa.use_backend("auto"):
        got = multi_lora_delta(x, A, B, s, idx)
    torch.testing.assert_close(got.double(), multi_lora_loop_ref(x, A, B, s, idx), rtol=1e-5, atol=1e-5)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("FASTADAPTERS_EXT", "0")
    ext.reset()
    try:
        with pytest.warns(RuntimeWarning, match="disabled by FASTADAPTERS_EXT=0"):
            assert ext.load() is None
        assert ext.status()["enabled"] is False
    finally:
        ext.reset()


def test_missing_sources_fall_back(monkeypatch, tmp_path):
    monkeypatch.setattr(ext, "CSRC", tmp_path / "no-csrc")
    ext.reset()
    try:
        with pytest.warns(RuntimeWarning, match="sources not found"):
            assert ext.load() is None
    finally:
        ext.reset()
