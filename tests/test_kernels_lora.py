"""Fused Triton LoRA kernels (kernels/lora.py) behind fa.ops.lora_linear on the "triton" backend.

Outputs and every gradient against the reference (kernels/lora_ref.py) run with the kernels' own dropout mask
(materialised by lora_dropout_mask), three-way tolerance of STYLE.md; the mask is the same in every kernel, for
every tile shape, forward and backward; p = 0 is exactly the no-dropout path; the LoRA part of dx is masked.
On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set here before triton is imported) at
small odd shapes with fixed small tiles; tests marked `gpu` run real shapes on CUDA.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton in this process

import pytest

pytest.importorskip("triton")

import fastadapters as fa  # noqa: E402
from fastadapters.kernels import lora_launch as K  # noqa: E402
from fastadapters.kernels._configs import target  # noqa: E402
from fastadapters.kernels.lora_configs import epilogue_config, shrink_config  # noqa: E402
from fastadapters.kernels.lora_ref import lora_ref  # noqa: E402
from fastadapters.ops import _registry, lora_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
NAMES = ("x", "weight", "bias", "lora_A", "lora_B")
SCALING = 1.7
SEED = 1234

pytestmark = [
    pytest.mark.usefixtures("nan_poison"),
    # the interpreter converts 1-element arrays with int() (numpy >= 1.25 warns): its code, not ours
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def fixed_configs():
    """Small fixed tiles (several programs, K iterations, ragged edges at these shapes) and a split reduction;
    never the autotuner."""
    if DEVICE == "cpu" and not K.INTERPRETED:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set, so the kernels cannot run on CPU: "
                    "set TRITON_INTERPRET=1 in the environment or in tests/conftest.py")
    # another module's fixture may have replaced the registration (a fake kernel, then unregister): restore it
    _registry.register_kernel("lora_linear", "triton", lora_triton.lora_linear_triton, supports=lora_triton.supports)
    with K.use_configs(gemm=K.INTERPRETER_GEMM, shrink=K.INTERPRETER_SHRINK, epilogue=K.INTERPRETER_GEMM, split=2):
        yield


def make(lead=(37,), k=72, n=40, r=5, bias=True, seed=0) -> dict[str, torch.Tensor | None]:
    """fp64 master values: x ~ N(0, 1), W and A scaled by 1/sqrt(K), B by 1/sqrt(r) (random, not PEFT's zeros)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    return dict(x=rnd(*lead, k), weight=rnd(n, k, std=k**-0.5), bias=rnd(n) if bias else None,
                lora_A=rnd(r, k, std=k**-0.5), lora_B=rnd(n, r, std=r**-0.5))


def leaves(master, dtype, trainable=NAMES):
    return {k: None if v is None else v.to(DEVICE, dtype).requires_grad_(k in trainable) for k, v in master.items()}


def run(fn, t, dy, **kw):
    """y and the gradients of the trainable leaves after y.backward(dy)."""
    y = fn(*(t[k] for k in NAMES), SCALING, **kw)
    y.backward(dy.to(y.dtype))
    return y.detach(), {k: v.grad for k, v in t.items() if v is not None and v.requires_grad}


def triton_op(*args, dropout_p=0.0, seed=SEED, training=True):
    with fa.use_backend("triton"):
        return fa.ops.lora_linear(*args, dropout_p=dropout_p, seed=seed, training=training)


def kernel_mask(x_shape, p):
    """The kernels' mask for x (..., K), or None for p = 0."""
    if p == 0:
        return None
    m = K.lora_dropout_mask((math.prod(x_shape[:-1]), x_shape[-1]), p, SEED, device=DEVICE)
    return m.reshape(x_shape)


def assert_three_way(name, out, ref_lo, ref_hi, dtype):
    """|out - ref_hi| <= 2 |ref_lo - ref_hi| + atol, atol = 2 ulp of the largest |ref_hi| in dtype."""
    hi = ref_hi.double()
    err = (out.double() - hi).abs()
    bound = 2 * (ref_lo.double() - hi).abs() + 2 * EPS[dtype] * hi.abs().max()
    assert out.shape == ref_hi.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    excess = (err - bound).max().item()
    assert excess <= 0, f"{name}: error exceeds the three-way bound by {excess:.3g} (max error {err.max().item():.3g})"


def check_against_reference(master, dtype, p, trainable=NAMES):
    """Kernel vs reference in dtype vs reference in fp64, with the kernels' mask; y and every gradient."""
    x_shape = master["x"].shape
    dy = torch.randn(*x_shape[:-1], master["weight"].shape[0], generator=torch.Generator().manual_seed(9),
                     dtype=torch.float64).to(DEVICE)
    y, grads = run(triton_op, leaves(master, dtype, trainable), dy, dropout_p=p)
    mask = kernel_mask(x_shape, p)
    y_lo, g_lo = run(lora_ref, leaves(master, dtype, trainable), dy, dropout_mask=mask)
    y_hi, g_hi = run(lora_ref, leaves(master, torch.float64, trainable), dy, dropout_mask=mask)
    assert y.dtype == dtype
    assert_three_way("y", y, y_lo, y_hi, dtype)
    assert set(grads) == set(g_hi) == {k for k in trainable if master[k] is not None}
    for k in g_hi:
        assert grads[k].dtype == dtype, k
        assert_three_way(f"d{k}", grads[k], g_lo[k], g_hi[k], dtype)


SHAPES = [
    pytest.param((37,), 72, 40, 5, id="M37-K72-N40-r5"),
    pytest.param((2, 3), 16, 24, 1, id="B2xL3-K16-N24-r1"),
    pytest.param((20,), 40, 33, 17, id="M20-K40-N33-r17"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n,r", SHAPES)
def test_matches_reference_with_dropout(lead, k, n, r, dtype):
    check_against_reference(make(lead, k, n, r), dtype, p=0.3)


@pytest.mark.parametrize(
    "base,bias,p,dtype",
    [("cublas", True, 0.3, torch.float32), ("cublas", False, 0.0, torch.bfloat16),
     ("fused", False, 0.0, torch.float32), ("fused", True, 0.0, torch.float16)],
    ids=["cublas-bias-p0.3-fp32", "cublas-nobias-p0-bf16", "fused-nobias-p0-fp32", "fused-bias-p0-fp16"],
)
def test_both_base_paths_bias_and_no_dropout(base, bias, p, dtype):
    with K.use_configs(base=base):
        check_against_reference(make(bias=bias), dtype, p)


def test_rank_256_is_padded_inside():
    check_against_reference(make((9,), 32, 24, 256), torch.bfloat16, p=0.1)


def test_frozen_base_gets_no_weight_gradients():
    """Only x and the adapter train (the LoRA setting): dW and db are neither computed nor returned."""
    check_against_reference(make(), torch.float32, p=0.2, trainable=("x", "lora_A", "lora_B"))
    t = leaves(make(), torch.float32, trainable=("lora_A", "lora_B"))
    y = triton_op(*(t[k] for k in NAMES), SCALING, dropout_p=0.2)
    y.sum().backward()
    assert t["weight"].grad is None and t["bias"].grad is None and t["x"].grad is None
    assert t["lora_A"].grad is not None and t["lora_B"].grad is not None


def test_dropout_zero_is_exactly_the_no_dropout_path():
    """p = 0, training=False with p > 0, and the kernels' dropout code with threshold 0 all give identical bits."""
    master = make()
    dy = torch.randn(37, 40, dtype=torch.float64).to(DEVICE)
    y0, g0 = run(triton_op, leaves(master, torch.bfloat16), dy, dropout_p=0.0)
    y1, g1 = run(triton_op, leaves(master, torch.bfloat16), dy, dropout_p=0.5, training=False)
    assert torch.equal(y0, y1)
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    # inside the kernels: HAS_DROPOUT with keep-everything equals HAS_DROPOUT=False
    t = leaves(master, torch.bfloat16, trainable=())
    x, A, B = t["x"], t["lora_A"], t["lora_B"]
    xa0 = K.lora_shrink(x, A, 1.0)
    xa1 = K.lora_shrink(x, A, 1.0, dropout=True, drop_thr=0, seed=7, kx=72)
    assert torch.equal(xa0, xa1)
    out0 = K.lora_gemm(x, t["weight"].t(), xa0, B.t(), None, torch.empty(37, 40, dtype=x.dtype, device=DEVICE), 1.3)
    out1 = K.lora_gemm(x, t["weight"].t(), xa0, B.t(), None, torch.empty(37, 40, dtype=x.dtype, device=DEVICE), 1.3,
                       dropout=True, drop_thr=0, seed=7)
    assert torch.equal(out0, out1)


def test_same_seed_same_mask_other_seed_other_mask():
    master = make()
    dy = torch.randn(37, 40, dtype=torch.float64).to(DEVICE)
    ya, ga = run(triton_op, leaves(master, torch.float32), dy, dropout_p=0.3, seed=5)
    yb, gb = run(triton_op, leaves(master, torch.float32), dy, dropout_p=0.3, seed=5)
    yc, _ = run(triton_op, leaves(master, torch.float32), dy, dropout_p=0.3, seed=6)
    assert torch.equal(ya, yb) and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert not torch.equal(ya, yc)
    # no seed: a fresh mask per call, and backward uses the forward's (checked against the reference with the
    # mask of the drawn seed, recovered from the saved tensors)
    torch.manual_seed(0)  # the seeds are drawn from torch's CPU generator
    t = leaves(master, torch.float32)
    y1 = triton_op(*(t[k] for k in NAMES), SCALING, dropout_p=0.3, seed=None)
    y2 = triton_op(*(t[k] for k in NAMES), SCALING, dropout_p=0.3, seed=None)
    assert not torch.equal(y1, y2)
    drawn = int(y1.grad_fn.next_functions[0][0].saved_tensors[-1])  # the op's node, behind the reshape
    mask = K.lora_dropout_mask((37, 72), 0.3, drawn, device=DEVICE)
    y1.backward(dy.float())
    lo, hi = leaves(master, torch.float32), leaves(master, torch.float64)
    refs = [lora_ref(*(tr[k] for k in NAMES), SCALING, mask) for tr in (lo, hi)]
    for ref in refs:
        ref.backward(dy.to(ref.dtype))
    assert_three_way("y", y1.detach(), refs[0].detach(), refs[1].detach(), torch.float32)
    for k in NAMES:
        assert_three_way(f"d{k}", t[k].grad, lo[k].grad, hi[k].grad, torch.float32)


SHRINK_TILES = [K.ShrinkConfig(16, 16, 4, 1), K.ShrinkConfig(32, 64, 4, 1)]
GEMM_TILES = [K.GemmConfig(16, 16, 16, 4, 1, group_m=1, block_r=16), K.GemmConfig(32, 64, 16, 4, 1, block_r=32)]


@pytest.mark.parametrize("tile", [0, 1], ids=["tiles-16", "tiles-32x64"])
def test_every_kernel_draws_the_same_mask(tile):
    """Forward shrink (x), backward shrink (x^T, the dA pass) and the GEMM (the dx epilogue, fused and after
    cuBLAS) reproduce lora_dropout_mask exactly, whatever their tile shape: with identity / ones operands each
    output element is one masked product, so the comparison is exact."""
    M, Kx, p, seed = 40, 48, 0.35, 77
    mask = K.lora_dropout_mask((M, Kx), p, seed, device=DEVICE)
    thr, rescale = K.dropout_threshold(p)
    x = torch.randn(M, Kx, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    drop = dict(seed=seed, drop_thr=thr, dropout=True)
    with K.use_configs(shrink=SHRINK_TILES[tile]):
        xa = K.lora_shrink(x, torch.eye(Kx, device=DEVICE), rescale, kx=Kx, **drop)  # x A^T with A = I
        xt = K.lora_shrink(x.t(), torch.eye(M, device=DEVICE), rescale, kx=Kx, trans_in=True, **drop)  # (x^T) I
    assert torch.equal(xa, x * mask)
    assert torch.equal(xt, (x * mask).t())
    ones, eye = torch.ones(M, Kx, device=DEVICE), torch.eye(M, device=DEVICE)
    out = K.lora_gemm(None, None, eye, ones, None, torch.zeros(M, Kx, device=DEVICE), rescale, accumulate=True,
                      config=GEMM_TILES[tile], **drop)
    assert torch.equal(out, mask)
    zeros_a, zeros_b = torch.zeros(M, 16, device=DEVICE), torch.zeros(16, Kx, device=DEVICE)
    out = K.lora_gemm(zeros_a, zeros_b, eye, ones, None, torch.empty(M, Kx, device=DEVICE), rescale,
                      config=GEMM_TILES[tile], **drop)
    assert torch.equal(out, mask)


@pytest.mark.parametrize("p", [0.05, 0.5], ids=["p0.05", "p0.5"])
def test_mask_statistics(p):
    """Keep rate 1 - p within 4 sigma over 16k elements, values 0 or 1/(1 - p_eff), rows not repeated."""
    M, Kx = 64, 256
    mask = K.lora_dropout_mask((M, Kx), p, 3, device=DEVICE)
    thr, rescale = K.dropout_threshold(p)
    assert abs(thr / 2**16 - p) <= 2**-17 and rescale == pytest.approx(1 / (1 - thr / 2**16))
    assert torch.equal(mask.unique().cpu(), torch.tensor([0.0, rescale], dtype=torch.float32))
    keep = (mask > 0).double().mean().item()
    assert abs(keep - (1 - p)) <= 4 * (p * (1 - p) / (M * Kx)) ** 0.5
    assert len({tuple(row.tolist()) for row in (mask > 0).int()}) == M
    assert (mask.mean() - 1).abs() < 0.05  # inverted dropout keeps the expectation


def test_lora_part_of_dx_is_masked():
    """With W = 0, dx is the LoRA part alone: exactly zero where the mask dropped x, and (s dy B A) * mask."""
    master = make(bias=False)
    master["weight"] = torch.zeros_like(master["weight"])
    t = leaves(master, torch.float32)
    dy = torch.randn(37, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = triton_op(*(t[k] for k in NAMES), SCALING, dropout_p=0.5)
    y.backward(dy.float().to(DEVICE))
    mask = kernel_mask((37, 72), 0.5).double().cpu()
    dx = t["x"].grad.double().cpu()
    assert (dx[mask == 0] == 0).all()
    assert (dx[mask != 0] != 0).float().mean() > 0.99
    expected = SCALING * dy @ master["lora_B"] @ master["lora_A"] * mask
    torch.testing.assert_close(dx, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["strided-cols", "transposed", "permuted-3d"])
def test_non_contiguous_x_equals_contiguous(layout):
    g = torch.Generator().manual_seed(2)
    master = make()
    if layout == "strided-cols":
        x = torch.randn(37, 144, generator=g)[:, ::2]
    elif layout == "transposed":
        x = torch.randn(72, 37, generator=g).t()
    else:
        x = torch.randn(5, 72, 7, generator=g).permute(2, 0, 1)  # (7, 5, 72), K stride 7
    assert not x.is_contiguous()
    master["x"] = x.double()
    dy = torch.randn(*x.shape[:-1], 40, generator=g, dtype=torch.float64).to(DEVICE)
    ta, tb = leaves(master, torch.float32), leaves(master, torch.float32)
    ta["x"] = x.to(DEVICE).requires_grad_()  # the strided view itself
    ya, ga = run(triton_op, ta, dy, dropout_p=0.2)
    yb, gb = run(triton_op, tb, dy, dropout_p=0.2)  # a contiguous copy
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=0, msg=k)


def test_several_adapters_on_one_layer():
    """y = base + adapter 1 + adapter 2, the op called once per adapter (the second without the base): output and
    every gradient (x's from both calls) against the reference, each adapter with its own mask."""
    m1, m2 = make(seed=0), make(r=3, seed=1)
    dy = torch.randn(37, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)

    def two(fn, t1, t2, mask1, mask2, **kw):
        zero_w = torch.zeros_like(t1["weight"])
        kw1 = dict(dropout_p=0.3, seed=11) if fn is triton_op else dict(dropout_mask=mask1)
        kw2 = dict(dropout_p=0.1, seed=12) if fn is triton_op else dict(dropout_mask=mask2)
        y = fn(t1["x"], t1["weight"], t1["bias"], t1["lora_A"], t1["lora_B"], SCALING, **kw1)
        y = y + fn(t1["x"], zero_w, None, t2["lora_A"], t2["lora_B"], 0.5, **kw2)
        y.backward(dy.to(y.dtype))
        return y.detach(), [t1[k].grad for k in NAMES] + [t2["lora_A"].grad, t2["lora_B"].grad]

    mask1 = K.lora_dropout_mask((37, 72), 0.3, 11, device=DEVICE)
    mask2 = K.lora_dropout_mask((37, 72), 0.1, 12, device=DEVICE)
    out = two(triton_op, leaves(m1, torch.bfloat16), leaves(m2, torch.bfloat16), None, None)
    lo = two(lora_ref, leaves(m1, torch.bfloat16), leaves(m2, torch.bfloat16), mask1, mask2)
    hi = two(lora_ref, leaves(m1, torch.float64), leaves(m2, torch.float64), mask1, mask2)
    assert_three_way("y", out[0], lo[0], hi[0], torch.bfloat16)
    for i, (a, b, c) in enumerate(zip(out[1], lo[1], hi[1], strict=True)):
        assert_three_way(f"grad {i}", a, b, c, torch.bfloat16)


def test_empty_batch():
    t = leaves(make(lead=(0,)), torch.float32)
    y = triton_op(*(t[k] for k in NAMES), SCALING, dropout_p=0.3)
    assert y.shape == (0, 40)
    y.sum().backward()
    assert t["x"].grad.shape == (0, 72)
    assert torch.equal(t["lora_A"].grad, torch.zeros(5, 72, device=DEVICE))
    assert torch.equal(t["lora_B"].grad, torch.zeros(40, 5, device=DEVICE))


def test_torch_compile_fullgraph():
    """The layer math compiles with fullgraph=True (custom ops with fake impls, no graph break); a compiled
    graph draws a fresh seed per call when none is given; outputs and gradients equal eager."""
    master = make()
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def f(x, w, b, a, bb):
        return fa.ops.lora_linear(x, w, b, a, bb, SCALING, dropout_p=0.25, seed=3)

    def g(x, w, b, a, bb):
        return fa.ops.lora_linear(x, w, b, a, bb, SCALING, dropout_p=0.25)

    torch._dynamo.reset()
    with fa.use_backend("triton"):
        te, tc = leaves(master, torch.float32), leaves(master, torch.float32)
        ye = f(*(te[k] for k in NAMES))
        yc = torch.compile(f, fullgraph=True, backend=backend)(*(tc[k] for k in NAMES))
        torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)
        ye.sum().backward()
        yc.sum().backward()
        for k in NAMES:
            torch.testing.assert_close(tc[k].grad, te[k].grad, rtol=1e-6, atol=1e-6, msg=k)
        cg = torch.compile(g, fullgraph=True, backend=backend)
        args = [leaves(master, torch.float32)[k] for k in NAMES]
        assert not torch.equal(cg(*args), cg(*args))


def test_registry_and_refusals():
    """'triton' is registered; asking it for what it cannot run says why; 'auto' keeps the reference on CPU."""
    assert "triton" in fa.ops.registered_backends("lora_linear")
    t = leaves(make(), torch.float64, trainable=())
    with pytest.raises(fa.ops.KernelUnavailableError, match="dtype torch.float64"):
        triton_op(*(t[k] for k in NAMES), SCALING)
    t = leaves(make(r=257, k=16, n=8, lead=(3,)), torch.float32, trainable=())
    with pytest.raises(fa.ops.KernelUnavailableError, match="rank r=257"):
        triton_op(*(t[k] for k in NAMES), SCALING)
    t = leaves(make(), torch.float32, trainable=())
    args = [t[k] for k in NAMES]
    assert lora_triton.supports(*args, SCALING, torch.ones(37, 72)) is not None
    with pytest.raises(ValueError, match="does not read a precomputed dropout_mask"):
        lora_triton.lora_linear_triton(*args, SCALING, torch.ones(37, 72))
    if DEVICE == "cpu":
        with fa.use_backend("auto"):
            assert torch.equal(fa.ops.lora_linear(*args, SCALING), lora_ref(*args, SCALING))


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("base", ["fused", "cublas"])
@pytest.mark.parametrize("p", [0.0, 0.05], ids=["p0", "p0.05"])
def test_gpu_real_shape(base, p):
    """M = 4096, K = N = 4096, r = 16, bf16, with a fixed tile valid for both GEMMs (no autotuning in tests)."""
    tgt = target(torch.device(DEVICE))
    with K.use_configs(gemm=K.GemmConfig(128, 128, 64, 8, 4), shrink=shrink_config(tgt, torch.bfloat16, 16, 4096),
                       epilogue=epilogue_config(tgt, torch.bfloat16), base=base, split=8):
        check_against_reference(make((4096,), 4096, 4096, 16), torch.bfloat16, p)


@pytest.mark.gpu
def test_gpu_real_shape_3d_fp16_rank_64():
    tgt = target(torch.device(DEVICE))
    with K.use_configs(gemm=K.GemmConfig(64, 128, 64, 4, 4), shrink=shrink_config(tgt, torch.float16, 64, 2048),
                       epilogue=epilogue_config(tgt, torch.float16), base="fused", split=4):
        check_against_reference(make((4, 512), 4096, 11008, 64), torch.float16, 0.1)


def test_lora_layer_runs_the_kernel_and_matches_the_reference_backend(monkeypatch):
    """A tiny Llama with LoRA on q/v (lora_B randomised so the adapter shows): logits and adapter gradients on the
    "triton" backend equal the "torch" backend's (no dropout); with dropout the training step runs and trains."""
    from tiny_models import tiny_batch, tiny_model

    def build(p):
        cfg = fa.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["q_proj", "v_proj"])
        model = fa.get_adapter_model(tiny_model("llama", seed=0).to(DEVICE), cfg)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if "lora_B" in name:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
        return model.train()

    calls = []
    real_fwd = K.lora_linear_fwd
    monkeypatch.setattr(K, "lora_linear_fwd", lambda *a, **kw: calls.append(a[0].shape) or real_fwd(*a, **kw))
    ids, mask = (t.to(DEVICE) for t in tiny_batch())
    out = {}
    for backend in ("torch", "triton"):
        model = build(0.0)
        with fa.use_backend(backend):
            logits = model(input_ids=ids, attention_mask=mask).logits
            logits.float().square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        out[backend] = logits.detach(), grads
    assert len(calls) == 4  # q and v of both layers ran the kernels (the torch backend never does)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-5)
    for n in out["torch"][1]:
        torch.testing.assert_close(out["triton"][1][n], out["torch"][1][n], rtol=1e-3, atol=1e-6, msg=n)
    model = build(0.1)
    with fa.use_backend("triton"):
        loss = model(input_ids=ids, attention_mask=mask).logits.float().square().mean()
        loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                        for p in model.parameters() if p.requires_grad)


def test_bf16_model_with_fp32_adapters_takes_the_kernel(monkeypatch):
    """PEFT keeps adapters in fp32 on half-precision models; the layer then hands the kernel the adapter in the
    activation dtype (fp32 master weights get the gradients) instead of falling back to the unfused torch path."""
    from tiny_models import tiny_batch, tiny_model

    cfg = fa.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = fa.get_adapter_model(tiny_model("llama", seed=0, dtype=torch.bfloat16).to(DEVICE), cfg)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    calls = []
    real_fwd = K.lora_linear_fwd
    monkeypatch.setattr(K, "lora_linear_fwd", lambda *a, **kw: calls.append(a[0].dtype) or real_fwd(*a, **kw))
    ids, mask = (t.to(DEVICE) for t in tiny_batch())
    out = {}
    for backend in ("torch", "triton"):
        for p in lora:
            p.grad = None
        with fa.use_backend(backend):
            logits = model(input_ids=ids, attention_mask=mask).logits
            logits.float().square().mean().backward()
        out[backend] = logits.detach().float(), {id(p): p.grad.clone() for p in lora}
    assert calls == [torch.bfloat16] * 4  # q and v of both layers, on the triton backend only
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=2e-2, atol=2e-2)
    for p in lora:
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(out["triton"][1][id(p)], out["torch"][1][id(p)], rtol=5e-2, atol=5e-3)


# ------------------------------------------------------------------------------------------------ issue 11
def test_weight_gradients_are_bitwise_reproducible():
    """Two backward runs of the same step give identical dA, dB and dx (fixed tiles and splits, partial sums added
    in a fixed order, no atomics), on both base paths."""
    master = make((45,), 80, 40, 6)
    dy = torch.randn(45, 40, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(DEVICE)
    for base in ("cublas", "fused"):
        with K.use_configs(base=base, split=3):
            runs = [run(triton_op, leaves(master, torch.bfloat16), dy, dropout_p=0.2)[1] for _ in range(2)]
        for k in ("lora_A", "lora_B", "x"):
            assert torch.equal(runs[0][k], runs[1][k]), (base, k)


def test_default_base_path_is_cublas_and_the_fused_gemm_is_opt_in(monkeypatch):
    """No GPU measurement shows the fused Triton GEMM beating cuBLAS yet: the default (and 'auto') is the cuBLAS
    base product plus the rank-r term; FASTADAPTERS_LORA_GEMM=fused opts in; a bad value is one clear error."""
    with K.use_configs():  # the fixture's overrides name no base path
        for env, want in ((None, "cublas"), ("auto", "cublas"), ("cublas", "cublas"), ("fused", "fused")):
            if env is None:
                monkeypatch.delenv("FASTADAPTERS_LORA_GEMM", raising=False)
            else:
                monkeypatch.setenv("FASTADAPTERS_LORA_GEMM", env)
            assert K.base_gemm_choice(1 << 20) == want == K.base_gemm_choice(16)
        monkeypatch.setenv("FASTADAPTERS_LORA_GEMM", "fast")
        with pytest.raises(ValueError, match="FASTADAPTERS_LORA_GEMM='fast': use 'cublas'"):
            K.base_gemm_choice(16)
    assert not hasattr(K, "_tuned") and "do_bench" not in open(K.__file__).read()  # no run-time autotuning


def test_epilogue_column_scale():
    """The epilogue's per-output-column scale (room for DoRA): out = col * (out + s * D(lr @ lw)) + bias."""
    g = torch.Generator().manual_seed(6)
    M, N, R = 37, 40, 5
    out0 = torch.randn(M, N, generator=g).to(DEVICE)
    lr, lw = torch.randn(M, R, generator=g).to(DEVICE), torch.randn(R, N, generator=g).to(DEVICE)
    col, bias = torch.rand(N, generator=g).to(DEVICE) + 0.5, torch.randn(N, generator=g).to(DEVICE)
    thr, rescale = K.dropout_threshold(0.3)
    mask = K.lora_dropout_mask((M, N), 0.3, 21, device=DEVICE)
    got = K.lora_gemm(None, None, lr, lw, bias, out0.clone(), 1.5 * rescale, accumulate=True, col_scale=col,
                      seed=21, drop_thr=thr, dropout=True)
    want = col * (out0.double() + 1.5 * (lr.double() @ lw.double()) * mask.double()) + bias  # mask: keep/(1-p)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", ["cublas", "fused"])
def test_forward_with_column_scale(base):
    """lora_linear_fwd(col_scale=c): y = c * (x W^T + s D(x) A^T B^T) + b on both base paths (DoRA's hook)."""
    t = leaves(make(), torch.float32, trainable=())
    c = torch.rand(40, generator=torch.Generator().manual_seed(2)).to(DEVICE) + 0.5
    thr, _ = K.dropout_threshold(0.3)
    with K.use_configs(base=base):
        y, _ = K.lora_linear_fwd(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, 0.3, seed=SEED,
                                 col_scale=c)
    mask = kernel_mask((37, 72), 0.3)
    want = c * lora_ref(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], SCALING, mask) + t["bias"]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
