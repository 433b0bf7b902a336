"""DoRA: the norm without the dense delta (float64 against the dense formula), dora_linear's reference against the
merged-weight formula, its kernel path (fused LoRA + column scale, backend "triton", the interpreter on CPU) at odd
shapes with every gradient, the layer's norm cache, and the layer on the kernel path against the reference path.
"""

from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton in this process

import pytest
import torch.nn as nn

import fastadapters as fa
import fastadapters.tuners.lora as lora_tuner
from fastadapters.kernels import dora_ref
from fastadapters.kernels.dora_ref import dora_linear_ref, dora_norm_dense_ref, dora_norm_ref, dora_weight_sq_ref
from fastadapters.ops.dora import dora_linear, dora_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}
NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")
SCALING = 1.7

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]


def make(lead=(37,), k=72, n=40, r=5, bias=True, seed=0) -> dict[str, torch.Tensor | None]:
    """fp64 masters: x ~ N(0, 1), W and A ~ 1/sqrt(K), B ~ 1/sqrt(r) (random, so the LoRA term and the norm's cross
    terms are not zero), magnitude = the norm times a random factor around 1 (a trained-looking magnitude)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    d = dict(x=rnd(*lead, k), weight=rnd(n, k, std=k**-0.5), bias=rnd(n) if bias else None,
             lora_A=rnd(r, k, std=k**-0.5), lora_B=rnd(n, r, std=r**-0.5))
    norm = dora_norm_dense_ref(d["weight"], d["lora_A"], d["lora_B"], SCALING)
    d["magnitude"] = norm * (1 + 0.2 * rnd(n))
    return d


# ------------------------------------------------------------------------------------------------ the norm
SHAPES = [(40, 72, 5), (5, 9, 1), (12, 4, 16), (64, 33, 8)]
SHAPE_IDS = [f"N{n}-K{k}-r{r}" for n, k, r in SHAPES]


@pytest.mark.parametrize("n,k,r", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", ["rowmajor", "conv1d_view"])
def test_dora_norm_ref_matches_dense_in_float64(n, k, r, layout):
    d = make(k=k, n=n, r=r)
    W = d["weight"]
    if layout == "conv1d_view":  # Conv1D stores (K, N); the layer reads it through a transposed view
        W = W.t().contiguous().t()
    dense = dora_norm_dense_ref(W, d["lora_A"], d["lora_B"], SCALING)
    torch.testing.assert_close(dora_norm_ref(W, d["lora_A"], d["lora_B"], SCALING), dense, rtol=1e-12, atol=1e-12)
    wsq = dora_weight_sq_ref(W, torch.float64)
    torch.testing.assert_close(wsq, (W * W).sum(1), rtol=1e-13, atol=0)
    got = dora_norm_ref(W, d["lora_A"], d["lora_B"], SCALING, weight_sq=wsq)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)


def test_dora_norm_large_delta_and_zero_B():
    """B = 0 gives ||W|| exactly in float64; a delta as large as W (|s B A| ~ |W|) still agrees with the dense form."""
    d = make(k=72, n=40, r=5)
    zero = torch.zeros_like(d["lora_B"])
    torch.testing.assert_close(dora_norm_ref(d["weight"], d["lora_A"], zero, SCALING),
                               d["weight"].norm(dim=1), rtol=1e-14, atol=0)
    big = d["lora_B"] * 8
    torch.testing.assert_close(dora_norm_ref(d["weight"], d["lora_A"], big, SCALING),
                               dora_norm_dense_ref(d["weight"], d["lora_A"], big, SCALING), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 100], ids=["whole", "rows_chunked"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["fp32W", "bf16W"])
def test_dora_norm_float32_close_to_float64(wdtype, chunk, monkeypatch):
    """In float32 (the layer's precision, also for bf16 weights with fp32 adapters) within a few ulp of float64;
    a bf16 W is upcast a block of rows at a time (here 1 row of 72 per block with chunk=100)."""
    if chunk is not None:
        monkeypatch.setattr(dora_ref, "_UPCAST_ELEMENTS", chunk)
    d = make(k=72, n=40, r=5)
    W = d["weight"].to(wdtype)
    A, B = d["lora_A"].float(), d["lora_B"].float()
    exact = dora_norm_dense_ref(W.double(), A.double(), B.double(), SCALING)
    got = dora_norm(W, A, B, SCALING)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), exact, rtol=8 * EPS[torch.float32], atol=0)


def test_dora_norm_has_no_gradient_and_checks_shapes():
    d = make(k=9, n=5, r=3)
    A = d["lora_A"].clone().requires_grad_()
    assert not dora_norm(d["weight"], A, d["lora_B"], SCALING).requires_grad
    with pytest.raises(ValueError, match=r"lora_B has shape \(5, 4\) but the layer expects \(N, r\) = \(5, 3\)"):
        dora_norm(d["weight"], d["lora_A"], torch.zeros(5, 4, dtype=torch.float64), SCALING)
    with pytest.raises(ValueError, match=r"weight_sq has shape \(4,\) but the layer expects \(5,\)"):
        dora_norm(d["weight"], d["lora_A"], d["lora_B"], SCALING, weight_sq=torch.ones(4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ dora_linear_ref
def args_of(d):
    norm = dora_norm_dense_ref(d["weight"], d["lora_A"], d["lora_B"], SCALING)
    return d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], SCALING, d["magnitude"], norm


@pytest.mark.parametrize("lead", [(7,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dora_linear_ref_is_the_rescaled_merged_weight(lead, bias):
    d = make(lead=lead, k=24, n=10, r=4, bias=bias)
    merged = d["weight"] + SCALING * d["lora_B"] @ d["lora_A"]
    c = d["magnitude"] / merged.norm(dim=1)
    expected = d["x"] @ (c[:, None] * merged).T + (d["bias"] if bias else 0)
    torch.testing.assert_close(dora_linear_ref(*args_of(d)), expected, rtol=1e-12, atol=1e-12)


def test_dora_linear_ref_dropout_form_is_peft_s():
    """With a mask: x W^T + b + (c - 1) x_d W^T + c s x_d A^T B^T (PEFT recomputes the base on x_d)."""
    d = make(lead=(6,), k=12, n=7, r=2)
    mask = fa.ops.dropout_mask((6, 12), 0.3, seed=4, dtype=torch.float64)
    x, W, b, A, B, s, m, norm = args_of(d)
    c = m / norm
    xd = x * mask
    expected = x @ W.T + b + (c - 1) * (xd @ W.T) + c * s * (xd @ A.T @ B.T)
    torch.testing.assert_close(dora_linear_ref(*args_of(d), dropout_mask=mask), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_mask", [False, True], ids=["nodrop", "mask"])
def test_dora_linear_ref_gradcheck(with_mask):
    d = make(lead=(5,), k=9, n=6, r=3)
    _, W, b, A, B, s, m, norm = args_of(d)
    mask = fa.ops.dropout_mask((5, 9), 0.4, seed=3, dtype=torch.float64) if with_mask else None
    inputs = tuple(t.clone().requires_grad_() for t in (d["x"], W, b, A, B, m))

    def f(x, w, bb, a, b_, mm):
        return dora_linear_ref(x, w, bb, a, b_, s, mm, norm, mask)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_dora_linear_is_the_reference_on_cpu(backend, nan_poison):
    d = {k: v.float() for k, v in make(lead=(4, 5), k=24, n=10, r=4).items()}
    with fa.use_backend(backend):
        y = dora_linear(*args_of(d))
    assert torch.equal(y, dora_linear_ref(*args_of(d)))


def test_dora_linear_errors_are_one_clear_line():
    d = make(lead=(3,), k=8, n=6, r=2)
    x, W, b, A, B, s, m, norm = args_of(d)
    cases = [
        ((x, W, b, A, B, s, m[:5], norm), r"magnitude has shape \(5,\) but the layer expects \(6,\)"),
        ((x, W, b, A, B, s, m, norm[None]), r"weight_norm has shape \(1, 6\) \(2-d\) but must be 1-d"),
        ((x[:, :7], W, b, A, B, s, m, norm), r"x has shape \(3, 7\) but the layer expects \(\.\.\., 8\)"),
        ((x, W, b, A.float(), B, s, m, norm), r"lora_A has dtype torch.float32 but x has torch.float64"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            dora_linear(*args)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ kernel path
triton = pytest.importorskip("triton")


def leaves(master, dtype, mag_dtype):
    out = {k: None if v is None else v.to(DEVICE, dtype).requires_grad_() for k, v in master.items()}
    out["magnitude"] = master["magnitude"].to(DEVICE, mag_dtype).requires_grad_()
    return out


def run(t, dy, backend):
    norm = dora_norm(t["weight"], t["lora_A"], t["lora_B"], SCALING)
    with fa.use_backend(backend):
        y = dora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, t["magnitude"], norm)
    y.backward(dy.to(y.dtype))
    return y.detach(), {k: v.grad for k, v in t.items() if v is not None}


ULPS = 2  # atol in ulps of max |ref| (STYLE.md)


def assert_three_way(name, out, ref_lo, ref_hi, dtype):
    """|out - ref_hi| <= 2 |ref_lo - ref_hi| + atol, atol = ULPS ulp of the largest |ref_hi| in dtype (STYLE.md)."""
    hi = ref_hi.double()
    err = (out.double() - hi).abs()
    bound = 2 * (ref_lo.double() - hi).abs() + ULPS * EPS[dtype] * hi.abs().max()
    assert out.shape == ref_hi.shape and torch.isfinite(out).all(), name
    excess = (err - bound).max().item()
    assert excess <= 0, f"{name}: error exceeds the three-way bound by {excess:.3g} (max error {err.max().item():.3g})"


KERNEL_CASES = [
    pytest.param((37,), 72, 40, 5, True, torch.float32, "cublas", id="M37-K72-N40-r5-fp32"),
    pytest.param((37,), 72, 40, 5, True, torch.bfloat16, "cublas", id="M37-K72-N40-r5-bf16"),
    pytest.param((3, 5), 20, 11, 1, False, torch.float32, "cublas", id="B3xL5-K20-N11-r1-nobias-fp32"),
    pytest.param((37,), 72, 40, 5, True, torch.bfloat16, "fused", id="M37-K72-N40-r5-bf16-fusedgemm"),
]


@pytest.mark.parametrize("lead,k,n,r,bias,dtype,base", KERNEL_CASES)
def test_dora_linear_kernel_path_matches_reference(lead, k, n, r, bias, dtype, base, nan_poison, monkeypatch):
    """backend "triton" (fastadapters.ops.dora_triton: the LoRA kernels with the column scale in the epilogue;
    base: cuBLAS base GEMM + epilogue kernel, or the opt-in fused GEMM): y and the gradients of x, W, b, A, B and
    the magnitude (kept fp32 beside bf16 activations, as the layer does) against the reference in dtype and fp64."""
    monkeypatch.setenv("FASTADAPTERS_LORA_GEMM", base)
    master = make(lead=lead, k=k, n=n, r=r, bias=bias)
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(DEVICE)
    mag = torch.float32 if dtype != torch.float32 else dtype
    y, grads = run(leaves(master, dtype, mag), dy, "triton")
    y_lo, g_lo = run(leaves(master, dtype, mag), dy, "torch")
    y_hi, g_hi = run(leaves(master, torch.float64, torch.float64), dy, "torch")
    assert y.dtype == dtype
    assert_three_way("y", y, y_lo, y_hi, dtype)
    assert set(grads) == set(g_hi) == {k for k in NAMES if master[k] is not None}
    for name in g_hi:
        assert_three_way(f"d{name}", grads[name], g_lo[name], g_hi[name], dtype)


# ------------------------------------------------------------------------------------------------ the layer
def dora_layer(k=72, n=40, r=5, dtype=torch.float32, bias=True, dropout=0.0, seed=0) -> lora_tuner.LoraLayer:
    torch.manual_seed(seed)
    base = nn.Linear(k, n, bias=bias).to(dtype)
    base.requires_grad_(False)
    layer = lora_tuner.LoraLayer(base)
    layer.update_layer("default", fa.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=True,
                                                init_lora_weights=False), "proj")
    layer.adapter_names.append("default")
    layer.set_active(["default"])
    return layer


def test_layer_norm_cache(monkeypatch):
    """||W||^2 once per frozen W; the norm once per (W, A, B) state: recomputed after an optimizer step on A/B,
    both after an in-place change of W; every value equals the dense norm of the current weights."""
    calls = {"wsq": 0, "norm": 0}
    wsq_fn, norm_fn = lora_tuner.dora_weight_sq_ref, lora_tuner.dora_norm_ref

    def count(key, fn):
        def wrapped(*a, **kw):
            calls[key] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(lora_tuner, "dora_weight_sq_ref", count("wsq", wsq_fn))
    monkeypatch.setattr(lora_tuner, "dora_norm_ref", count("norm", norm_fn))
    layer = dora_layer().train()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def check_norm():
        dense = dora_norm_dense_ref(layer.base_weight(), A, B, layer.scaling["default"])
        torch.testing.assert_close(layer.dora_weight_norm("default"), dense, rtol=1e-6, atol=0)

    x = torch.randn(6, 72)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(2):  # two micro-batches, one weight state
        layer(x).square().sum().backward()
    assert calls == {"wsq": 1, "norm": 1}
    check_norm()
    opt.step()
    layer(x)
    assert calls == {"wsq": 1, "norm": 2}
    check_norm()
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)
    layer(x)
    assert calls == {"wsq": 2, "norm": 3}
    check_norm()


@pytest.mark.parametrize("case", ["fp32", "bf16_model_fp32_adapters"])
def test_layer_kernel_path_matches_reference_path(case):
    """A DoRA layer on backend "triton" (fused LoRA kernel + column scale; a bf16 model casts its fp32 adapters to
    bf16 there) against the same layer in float64: output and the gradients of x, A, B and the magnitude. fp32: the
    three-way bound against the fp32 reference path; bf16: within 4 bf16 ulps of the largest value (the reference
    path keeps the LoRA branch in fp32, so it is no fair `ref_lo` for a bf16 kernel path)."""
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    layer = dora_layer(dtype=dtype).eval()
    hi_layer = copy.deepcopy(layer).double()
    x0 = torch.randn(37, 72, generator=torch.Generator().manual_seed(3))
    results = {}
    for key, mod, backend in (("kernel", layer, "triton"), ("lo", layer, "torch"), ("hi", hi_layer, "torch")):
        mod.zero_grad()
        x = x0.to(mod.base_layer.weight.dtype).clone().requires_grad_()
        with fa.use_backend(backend):
            y = mod(x)
        y.double().square().sum().backward()
        grads = {n: p.grad for n, p in mod.named_parameters() if p.requires_grad}
        assert set(grads) == {"lora_A.default.weight", "lora_B.default.weight",
                              "lora_magnitude_vector.default.weight"}
        results[key] = {"y": y.detach(), "dx": x.grad, **grads}
    for name, hi in results["hi"].items():
        out = results["kernel"][name]
        if dtype == torch.float32:
            assert_three_way(name, out, results["lo"][name], hi, dtype)
        else:
            err = (out.double() - hi).abs().max().item()
            assert err <= 4 * EPS[dtype] * hi.abs().max().item(), f"{name}: max error {err:.3g}"


def test_layer_under_torch_compile_matches_eager():
    """torch.compile (aot_eager) of a DoRA layer: the norm cache is skipped while tracing (tensor versions cannot be
    traced), the output and gradients equal eager mode's."""
    layer = dora_layer(k=24, n=10, r=3).train()
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    params = [p for p in layer.parameters() if p.requires_grad]
    results = []
    for fn in (layer, torch.compile(layer, backend="aot_eager")):
        layer.zero_grad()
        y = fn(x)
        y.square().sum().backward()
        results.append([y.detach()] + [p.grad.clone() for p in params])
    torch._dynamo.reset()
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_layer_lora_then_dora_on_the_kernel_path():
    """Two active adapters, plain LoRA first (fused with the base GEMM) then DoRA (rescales the running result,
    PEFT's order): backend "triton" equals the reference path within fp32 rounding, output and gradients."""
    layer = dora_layer(k=40, n=24, r=3)
    layer.update_layer("first", fa.LoraConfig(r=2, lora_dropout=0.0, init_lora_weights=False), "proj")
    layer.adapter_names.append("first")
    layer.set_active(["first", "default"])
    layer.eval()
    x0 = torch.randn(9, 40, generator=torch.Generator().manual_seed(2))
    results = []
    for backend in ("torch", "triton"):
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        with fa.use_backend(backend):
            y = layer(x)
        y.square().sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
    assert len(results[0]) == 2 + 5  # A, B of both adapters and the magnitude
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tiny_model_trains_the_same_on_the_kernel_path_and_the_reference():
    """Convergence (STYLE.md): DoRA on a tiny Llama, 3 AdamW steps with lora_linear on "triton" (the kernel path;
    the interpreter on CPU) and on "torch": the same loss curve within fp32 tolerance, and the loss goes down."""
    from tiny_models import tiny_batch, tiny_model

    ids, mask = tiny_batch()
    curves = {}
    for backend in ("torch", "triton"):
        am = fa.get_adapter_model(tiny_model("llama"), fa.LoraConfig(r=4, lora_dropout=0.0, use_dora=True,
                                                                     init_lora_weights=False))
        torch.manual_seed(0)
        with torch.no_grad():  # identical adapters in both runs (init_lora_weights=False draws from the RNG)
            for n, p in am.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "magnitude" in n else 0.0) * p)
        am.train()
        opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for _ in range(3):
            with fa.use_backend(lora_linear=backend):
                loss = am(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves[backend] = curve
    assert curves["torch"][-1] < curves["torch"][0]
    torch.testing.assert_close(torch.tensor(curves["triton"]), torch.tensor(curves["torch"]), rtol=1e-4, atol=1e-5)
