"""bottleneck_adapter and its reference bottleneck_ref: gradients, an independent formulation, the fp32 upcast,
learned scaling, dropout, errors."""

from __future__ import annotations

import math

import pytest
import torch

import fastadapters as fa
from fastadapters.config import ACTIVATIONS
from fastadapters.kernels.bottleneck_ref import bottleneck_ref

EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half an ulp, relative

# Written from the textbook formulas, not from torch.nn.functional, so the reference is checked against
# something it does not share code with.
MANUAL_ACTS = {
    "tanh": lambda z: (torch.exp(2 * z) - 1) / (torch.exp(2 * z) + 1),
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "sigmoid": lambda z: 1 / (1 + torch.exp(-z)),
}


def make(lead=(7,), d_in=9, b=3, d_out=None, dtype=torch.float64, wdtype=None, biases=True, residual=False,
         seed=0, requires_grad=False):
    """Arguments of bottleneck_adapter as a dict (random up_weight so the adapter term shows)."""
    d_out = d_in if d_out is None else d_out
    wdtype = dtype if wdtype is None else wdtype
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dt).requires_grad_(requires_grad)

    return dict(
        h=rnd(*lead, d_in),
        down_weight=rnd(b, d_in, std=d_in**-0.5, dt=wdtype),
        up_weight=rnd(d_out, b, std=b**-0.5, dt=wdtype),
        activation="tanh",
        scaling=0.8,
        residual=rnd(*lead, d_out) if residual else None,
        down_bias=rnd(b, dt=wdtype) if biases else None,
        up_bias=rnd(d_out, dt=wdtype) if biases else None,
    )


def call_op(d, **kwargs):
    return fa.ops.bottleneck_adapter(d["h"], d["down_weight"], d["up_weight"], d["activation"], d["scaling"],
                                     d["residual"], down_bias=d["down_bias"], up_bias=d["up_bias"], **kwargs)


def call_ref(d, mask=None):
    return bottleneck_ref(d["h"], d["down_weight"], d["up_weight"], d["activation"], d["scaling"], d["residual"],
                          d["down_bias"], d["up_bias"], mask)


def manual(d, mask=None):
    z = d["h"] if mask is None else d["h"] * mask
    z = z @ d["down_weight"].T
    if d["down_bias"] is not None:
        z = z + d["down_bias"]
    z = MANUAL_ACTS[d["activation"]](z) @ d["up_weight"].T
    if d["up_bias"] is not None:
        z = z + d["up_bias"]
    res = d["h"] if d["residual"] is None else d["residual"]
    s = d["scaling"]
    return res + (s.reshape(()) if isinstance(s, torch.Tensor) else s) * z


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bottleneck_ref_gradcheck(activation):
    # parallel layout (residual given, d_out != d_in), biases, learned scalar, dropout mask: every input gets a grad
    d = make(lead=(2, 3), d_in=9, b=3, d_out=5, biases=True, residual=True, requires_grad=True)
    d["activation"] = activation
    d["scaling"] = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    mask = fa.ops.dropout_mask((2, 3, 9), 0.3, seed=1, dtype=torch.float64)
    names = ["h", "down_weight", "up_weight", "scaling", "residual", "down_bias", "up_bias"]

    def f(*ts):
        dd = dict(d, **dict(zip(names, ts, strict=True)))
        return call_ref(dd, mask)

    assert torch.autograd.gradcheck(f, tuple(d[n] for n in names))


def test_bottleneck_ref_gradcheck_series_no_bias():
    d = make(lead=(7,), d_in=9, b=3, biases=False, requires_grad=True)
    names = ["h", "down_weight", "up_weight"]

    def f(*ts):
        return call_ref(dict(d, **dict(zip(names, ts, strict=True))))

    assert torch.autograd.gradcheck(f, tuple(d[n] for n in names))


@pytest.mark.parametrize("layout", ["series", "parallel"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bottleneck_ref_matches_manual_formula(activation, layout):
    parallel = layout == "parallel"
    d = make(lead=(37,), d_in=72, b=5, d_out=40 if parallel else None, residual=parallel)
    d["activation"] = activation
    mask = fa.ops.dropout_mask((37, 72), 0.2, seed=4, dtype=torch.float64)
    for m in (None, mask):
        torch.testing.assert_close(call_ref(d, m), manual(d, m), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bottleneck_adapter_is_the_reference(backend, nan_poison):
    d = make(lead=(4, 5), d_in=24, b=6, dtype=torch.float32)
    with fa.use_backend(backend):
        y = call_op(d)
    assert torch.equal(y, call_ref(d))
    assert not y.isnan().any()


@pytest.mark.parametrize(
    "dtype,wdtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
    ids=["bf16", "fp16", "bf16-fp32weights"],
)
@pytest.mark.parametrize("layout", ["series", "parallel"])
def test_bottleneck_computes_in_fp32(dtype, wdtype, layout):
    """Inputs exactly representable in both precisions, so the low-precision result may differ from float64 by
    the final rounding (half an ulp) and fp32 arithmetic only; a bf16/fp16 computation would be far off."""
    parallel = layout == "parallel"
    lo = make(lead=(37,), d_in=72, b=5, d_out=40 if parallel else None, dtype=dtype, wdtype=wdtype,
              residual=parallel)
    hi = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in lo.items()}
    y_lo, y_hi = call_op(lo), call_op(hi)
    assert y_lo.dtype == dtype and y_hi.dtype == torch.float64
    err = (y_lo.double() - y_hi).abs()
    bound = EPS[dtype] * y_hi.abs() * 1.01 + 1e-5 * y_hi.abs().max()
    assert torch.all(err <= bound), (err - bound).max().item()


def test_zero_up_weight_returns_h_exactly():
    d = make(lead=(3, 4), d_in=16, b=4, dtype=torch.bfloat16, wdtype=torch.float32, biases=False)
    d["up_weight"] = torch.zeros_like(d["up_weight"])
    assert torch.equal(call_op(d), d["h"])


def test_learned_scaling_gradient():
    d = make(lead=(7,), d_in=9, b=3)
    adapter_term = manual(dict(d, scaling=1.0)) - d["h"]
    g = torch.randn(7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for shape in [(), (1,)]:
        s = torch.full(shape, 0.6, dtype=torch.float64, requires_grad=True)
        y = call_op(dict(d, scaling=s))
        assert y.shape == (7, 9)  # a (1,)-shaped scalar (LLM-Adapters' nn.Parameter(torch.ones(1))) adds no dim
        torch.testing.assert_close(y, call_op(dict(d, scaling=0.6)), rtol=0, atol=0)
        (y * g).sum().backward()
        assert s.grad.shape == shape
        torch.testing.assert_close(s.grad.reshape(()), (g * adapter_term).sum(), rtol=1e-12, atol=1e-12)


def test_learned_scaling_fp32_with_bf16_input():
    d = make(lead=(7,), d_in=16, b=4, dtype=torch.bfloat16, wdtype=torch.float32)
    s = torch.tensor(0.5, requires_grad=True)
    y = call_op(dict(d, scaling=s))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and s.grad is not None and torch.isfinite(s.grad)


# ---------------------------------------------------------------- dropout


def test_dropout_seeded_and_matches_explicit_mask(nan_poison):
    d = make(lead=(6, 5), d_in=16, b=4, dtype=torch.float32)
    y1, y2 = call_op(d, dropout_p=0.3, seed=9), call_op(d, dropout_p=0.3, seed=9)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, call_op(d, dropout_p=0.3, seed=10))
    assert torch.equal(y1, call_ref(d, fa.ops.dropout_mask((6, 5, 16), 0.3, seed=9)))


@pytest.mark.parametrize("p,training", [(0.0, True), (0.4, False)], ids=["p0", "p04-eval"])
def test_no_dropout_is_exact(p, training):
    d = make(lead=(6, 5), d_in=16, b=4, dtype=torch.float32)
    assert torch.equal(call_op(d, dropout_p=p, training=training, seed=0), call_ref(d))


def test_masked_columns_do_not_affect_the_adapter_term():
    d = make(lead=(6,), d_in=16, b=4, d_out=8, residual=True)
    mask = torch.full((6, 16), 2.0, dtype=torch.float64)
    dropped = torch.tensor([0, 3, 7, 15])
    mask[:, dropped] = 0
    d2 = dict(d, h=d["h"].clone())
    d2["h"][:, dropped] -= 5.0
    torch.testing.assert_close(call_ref(d2, mask), call_ref(d, mask), rtol=0, atol=1e-12)
    assert not torch.allclose(call_ref(d2), call_ref(d))


# ---------------------------------------------------------------- errors


def _set(**changes):
    def apply(d):
        for key, value in changes.items():
            d[key] = value(d) if callable(value) else value
        return d

    return apply


ERRORS = [
    ("h-not-tensor", _set(h=None), {}, r"h must be a torch\.Tensor, got NoneType"),
    ("h-int", _set(h=lambda d: d["h"].int()), {}, r"h has dtype torch\.int32 but must be floating point"),
    ("down-1d", _set(down_weight=lambda d: d["down_weight"][0]), {},
     r"down_weight has shape \(9,\) \(1-d\) but must be 2-d"),
    ("b-zero", _set(down_weight=lambda d: d["down_weight"][:0], up_weight=lambda d: d["up_weight"][:, :0]), {},
     r"down_weight has shape \(0, 9\): \(bottleneck_size, d_in\) must both be at least 1"),
    ("h-last-dim", _set(h=lambda d: d["h"][:, :8]), {}, r"h has shape \(7, 8\) but the adapter expects \(\.\.\., 9\)"),
    ("up-wrong-b", _set(up_weight=lambda d: torch.zeros(9, 4, dtype=torch.float64)), {},
     r"up_weight has shape \(9, 4\) but the adapter expects \(d_out, 3\)"),
    ("down-bias", _set(down_bias=lambda d: d["down_bias"][:2]), {},
     r"down_bias has shape \(2,\) but the adapter expects \(3,\)"),
    ("up-bias", _set(up_bias=lambda d: d["up_bias"][:4]), {},
     r"up_bias has shape \(4,\) but the adapter expects \(9,\)"),
    ("residual-needed", _set(up_weight=lambda d: d["up_weight"][:5], up_bias=None), {},
     r"residual=None adds h, which needs d_out == d_in.*pass residual of shape \(7, 5\)"),
    ("residual-shape", _set(residual=lambda d: d["h"][:6]), {},
     r"residual has shape \(6, 9\) but the adapter expects \(7, 9\)"),
    ("residual-dtype", _set(residual=lambda d: d["h"].float()), {},
     r"residual has dtype torch\.float32 but h has torch\.float64"),
    ("weights-dtype", _set(up_weight=lambda d: d["up_weight"].float()), {},
     r"up_weight has dtype torch\.float32 but down_weight has torch\.float64"),
    ("device", _set(down_weight=lambda d: d["down_weight"].to("meta")), {}, r"down_weight is on meta but h is on cpu"),
    ("activation", _set(activation="swish"), {}, r"unknown activation 'swish': choose one of \('tanh'"),
    ("scaling-2el", _set(scaling=torch.ones(2)), {}, r"scaling is a tensor of shape \(2,\).*one-element"),
    ("scaling-str", _set(scaling="learned"), {}, r"scaling='learned' must be a float or a one-element tensor"),
    ("scaling-device", _set(scaling=torch.ones((), device="meta")), {}, r"scaling is on meta but h is on cpu"),
    ("p-one", None, {"dropout_p": 1.0}, r"dropout_p=1\.0 is outside \[0, 1\)"),
    ("seed", None, {"dropout_p": 0.1, "seed": "a"}, r"seed='a' must be an int"),
]


@pytest.mark.parametrize("change,kwargs,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bottleneck_adapter_errors(change, kwargs, match):
    d = make()
    if change is not None:
        d = change(d)
    with pytest.raises(ValueError, match=match):
        call_op(d, **kwargs)
