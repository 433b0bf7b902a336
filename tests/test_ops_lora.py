"""lora_linear and its reference lora_ref: gradients, an independent formulation, low precision, dropout, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastadapters as fa
from fastadapters.kernels.lora_ref import lora_ref

EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def make(lead=(7,), K=9, N=5, r=3, dtype=torch.float64, bias=True, seed=0, requires_grad=False):
    """Arguments of lora_linear as a dict; lora_B is random (not PEFT's zero init) so the LoRA term shows."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).requires_grad_(requires_grad)

    return dict(
        x=rnd(*lead, K),
        weight=rnd(N, K, std=K**-0.5),
        bias=rnd(N) if bias else None,
        lora_A=rnd(r, K, std=K**-0.5),
        lora_B=rnd(N, r, std=r**-0.5),
        scaling=1.7,
    )


def args_of(d):
    return d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], d["scaling"]


@pytest.mark.parametrize("lead", [(7,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nodrop", "mask"])
def test_lora_ref_gradcheck(lead, bias, with_mask):
    d = make(lead=lead, bias=bias, requires_grad=True)
    mask = None
    if with_mask:
        mask = fa.ops.dropout_mask((*lead, 9), 0.4, seed=3, dtype=torch.float64)
    inputs = tuple(t for t in args_of(d)[:5] if t is not None)

    def f(*ts):
        x, w, *rest = ts
        b = rest.pop(0) if bias else None
        a, bb = rest
        return lora_ref(x, w, b, a, bb, d["scaling"], mask)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize(
    "lead,K,N,r",
    [((7,), 9, 5, 3), ((37,), 72, 40, 5), ((2, 3), 16, 8, 1), ((1,), 4, 12, 16)],
    ids=["M7-K9-N5-r3", "M37-K72-N40-r5", "B2xL3-K16-N8-r1", "M1-K4-N12-r16"],
)
def test_lora_ref_matches_merged_weight(lead, K, N, r):
    d = make(lead=lead, K=K, N=N, r=r)
    merged = d["weight"] + d["scaling"] * d["lora_B"] @ d["lora_A"]
    expected = d["x"] @ merged.T + d["bias"]
    y = lora_ref(*args_of(d))
    assert y.shape == (*lead, N)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_lora_linear_is_the_reference(backend, nan_poison):
    d = make(lead=(4, 5), K=24, N=10, r=4, dtype=torch.float32)
    with fa.use_backend(backend):
        y = fa.ops.lora_linear(*args_of(d))
    assert torch.equal(y, lora_ref(*args_of(d)))
    assert not y.isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lora_low_precision_close_to_float64(dtype):
    lo = make(lead=(37,), K=72, N=40, r=5, dtype=dtype, requires_grad=True)
    hi = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in lo.items()}
    y_lo, y_hi = fa.ops.lora_linear(*args_of(lo)), fa.ops.lora_linear(*args_of(hi))
    assert y_lo.dtype == dtype
    g = torch.randn(y_hi.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y_lo.backward(g.to(dtype))
    y_hi.backward(g)
    # Inputs are exactly representable in both, so the gap is rounding of sums of K terms of O(1): a few eps.
    err = (y_lo.double() - y_hi).abs().max().item()
    assert err <= 4 * EPS[dtype] * y_hi.abs().max().item(), err
    for name in ("x", "weight", "bias", "lora_A", "lora_B"):
        a, b = lo[name].grad.double(), hi[name].grad
        gerr = (a - b).abs().max().item()
        assert gerr <= 4 * EPS[dtype] * b.abs().max().item(), (name, gerr)


# ---------------------------------------------------------------- dropout


def test_dropout_same_seed_same_output_other_seed_differs():
    d = make(lead=(6, 5), K=16, N=8, r=4, dtype=torch.float32)
    y1 = fa.ops.lora_linear(*args_of(d), dropout_p=0.3, seed=11)
    y2 = fa.ops.lora_linear(*args_of(d), dropout_p=0.3, seed=11)
    y3 = fa.ops.lora_linear(*args_of(d), dropout_p=0.3, seed=12)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_dropout_seed_gives_the_mask_of_dropout_mask(nan_poison):
    d = make(lead=(6, 5), K=16, N=8, r=4, dtype=torch.float32)
    y = fa.ops.lora_linear(*args_of(d), dropout_p=0.25, seed=5)
    mask = fa.ops.dropout_mask(d["x"].shape, 0.25, seed=5)
    assert torch.equal(y, lora_ref(*args_of(d), mask))
    assert not y.isnan().any()


def test_dropout_global_rng_is_reproducible_with_manual_seed():
    d = make(lead=(6, 5), K=16, N=8, r=4, dtype=torch.float32)
    torch.manual_seed(123)
    y1 = fa.ops.lora_linear(*args_of(d), dropout_p=0.5)
    torch.manual_seed(123)
    y2 = fa.ops.lora_linear(*args_of(d), dropout_p=0.5)
    y3 = fa.ops.lora_linear(*args_of(d), dropout_p=0.5)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("p,training", [(0.0, True), (0.0, False), (0.5, False)], ids=["p0", "p0-eval", "p05-eval"])
def test_no_dropout_is_exactly_the_plain_layer(p, training):
    d = make(lead=(6, 5), K=16, N=8, r=4, dtype=torch.float32)
    y = fa.ops.lora_linear(*args_of(d), dropout_p=p, training=training, seed=0)
    assert torch.equal(y, lora_ref(*args_of(d), None))


def test_dropout_only_touches_the_lora_branch():
    d = make(lead=(6, 5), K=16, N=8, r=4, dtype=torch.float32)
    d["lora_B"] = torch.zeros_like(d["lora_B"])
    y = fa.ops.lora_linear(*args_of(d), dropout_p=0.9, seed=0)
    assert torch.equal(y, F.linear(d["x"], d["weight"], d["bias"]))


def test_masked_columns_do_not_affect_the_lora_term():
    d = make(lead=(6,), K=16, N=8, r=4)
    mask = torch.full((6, 16), 1 / 0.75, dtype=torch.float64)
    dropped = torch.tensor([1, 4, 5, 11])
    mask[:, dropped] = 0
    x2 = d["x"].clone()
    x2[:, dropped] += 10.0

    def lora_term(x):
        return lora_ref(x, d["weight"], d["bias"], d["lora_A"], d["lora_B"], d["scaling"], mask) - F.linear(
            x, d["weight"], d["bias"]
        )

    torch.testing.assert_close(lora_term(x2), lora_term(d["x"]), rtol=0, atol=1e-12)
    # ...while the base term does see them, and the kept columns are rescaled by 1/(1-p).
    assert not torch.allclose(F.linear(x2, d["weight"]), F.linear(d["x"], d["weight"]))
    kept = d["x"] * mask
    expected = d["scaling"] * kept @ d["lora_A"].T @ d["lora_B"].T
    torch.testing.assert_close(lora_term(d["x"]), expected, rtol=1e-10, atol=1e-12)


def test_dropout_mask_statistics():
    p = 0.3
    mask = fa.ops.dropout_mask((400, 250), p, seed=0)
    assert mask.dtype == torch.float32
    zero_frac = (mask == 0).double().mean().item()
    assert abs(zero_frac - p) < 0.01, zero_frac
    kept = mask[mask != 0]
    assert torch.all(kept == torch.tensor(1.0) / (1 - p))
    assert abs(mask.double().mean().item() - 1.0) < 0.02


def test_dropout_gradient_flows_through_kept_columns_only():
    d = make(lead=(5,), K=9, N=4, r=2, requires_grad=True)
    d["weight"] = torch.zeros(4, 9, dtype=torch.float64)  # leave only the LoRA path for x's gradient
    y = fa.ops.lora_linear(*args_of(d), dropout_p=0.5, seed=2)
    y.sum().backward()
    mask = fa.ops.dropout_mask((5, 9), 0.5, seed=2, dtype=torch.float64)
    assert torch.all(d["x"].grad[mask == 0] == 0)
    assert torch.all(d["x"].grad[mask != 0] != 0)


# ---------------------------------------------------------------- errors


def _set(**changes):
    def apply(d):
        for key, value in changes.items():
            d[key] = value(d) if callable(value) else value
        return d

    return apply


ERRORS = [
    ("x-not-tensor", _set(x=[[1.0] * 9]), {}, r"x must be a torch\.Tensor, got list"),
    ("x-int", _set(x=lambda d: d["x"].long()), {}, r"x has dtype torch\.int64 but must be floating point"),
    ("weight-1d", _set(weight=lambda d: d["weight"][0]), {}, r"weight has shape \(9,\) \(1-d\) but must be 2-d"),
    ("x-last-dim", _set(x=lambda d: d["x"][:, :8]), {},
     r"x has shape \(7, 8\) but the layer expects \(\.\.\., 9\)"),
    ("bias-shape", _set(bias=lambda d: d["bias"][:4]), {}, r"bias has shape \(4,\) but the layer expects \(5,\)"),
    ("A-wrong-K", _set(lora_A=lambda d: d["lora_A"][:, :8]), {},
     r"lora_A has shape \(3, 8\) but the layer expects \(r, 9\)"),
    ("A-1d", _set(lora_A=lambda d: d["lora_A"][0]), {}, r"lora_A has shape \(9,\) but the layer expects \(r, 9\)"),
    ("r-zero", _set(lora_A=lambda d: d["lora_A"][:0], lora_B=lambda d: d["lora_B"][:, :0]), {},
     r"lora_A has shape \(0, 9\): the rank r must be at least 1"),
    ("B-shape", _set(lora_B=lambda d: torch.zeros(5, 4, dtype=torch.float64)), {},
     r"lora_B has shape \(5, 4\) but the layer expects \(N, r\) = \(5, 3\)"),
    ("B-transposed", _set(lora_B=lambda d: d["lora_B"].T), {},
     r"lora_B has shape \(3, 5\) but the layer expects \(N, r\) = \(5, 3\)"),
    ("dtype", _set(lora_A=lambda d: d["lora_A"].float()), {},
     r"lora_A has dtype torch\.float32 but x has torch\.float64: cast"),
    ("device", _set(lora_B=lambda d: d["lora_B"].to("meta")), {}, r"lora_B is on meta but x is on cpu"),
    ("scaling", _set(scaling="2"), {}, r"scaling='2' must be a real number"),
    ("p-one", None, {"dropout_p": 1.0}, r"dropout_p=1\.0 is outside \[0, 1\)"),
    ("p-negative", None, {"dropout_p": -0.1}, r"dropout_p=-0\.1 is outside \[0, 1\)"),
    ("p-bool", None, {"dropout_p": True}, r"dropout_p=True is outside \[0, 1\)"),
    ("training", None, {"dropout_p": 0.1, "training": 1}, r"training=1 must be a bool"),
    ("seed", None, {"dropout_p": 0.1, "seed": 1.5}, r"seed=1\.5 must be an int"),
]


@pytest.mark.parametrize("change,kwargs,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_lora_linear_errors(change, kwargs, match):
    d = make()
    if change is not None:
        d = change(d)
    with pytest.raises(ValueError, match=match):
        fa.ops.lora_linear(*args_of(d), **kwargs)
