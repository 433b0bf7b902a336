"""prefix_attention and its reference prefix_attention_ref: gradients, torch SDPA on [prefix ; tokens] with an
explicit mask, GQA, padding, decode, empty rows, low precision, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastadapters as fa
from fastadapters.kernels.prefix_attention_ref import prefix_attention_ref

EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half an ulp, relative


def make(B=3, Hq=4, Hkv=2, Lq=7, Lk=7, P=3, D=8, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)

    return dict(q=rnd(B, Hq, Lq, D), k=rnd(B, Hkv, Lk, D), v=rnd(B, Hkv, Lk, D),
                prefix_k=rnd(Hkv, P, D), prefix_v=rnd(Hkv, P, D))


def padding_mask(kind: str, B: int, Lk: int) -> torch.Tensor | None:
    """Batch row b keeps Lk - 2b real tokens, on the right (left padding) or on the left (right padding)."""
    if kind == "none":
        return None
    mask = torch.ones(B, Lk, dtype=torch.bool)
    for b in range(B):
        n_pad = min(2 * b, Lk)
        if n_pad:
            if kind == "left":
                mask[b, :n_pad] = False
            else:
                mask[b, Lk - n_pad:] = False
    return mask


def sdpa_expected(d, causal, key_padding_mask, scale=None):
    """Independent formulation: torch SDPA on [prefix ; k] with HF-style repeat_kv and an explicit bool mask.
    Returns (out, visible) where visible (B, 1, Lq, P + Lk) is the mask used (True = attend)."""
    q, k, v = d["q"], d["k"], d["v"]
    B, Hq, Lq, D = q.shape
    Hkv, Lk, P = k.shape[1], k.shape[2], d["prefix_k"].shape[1]
    kk = torch.cat([d["prefix_k"].expand(B, Hkv, P, D), k], dim=2)
    vv = torch.cat([d["prefix_v"].expand(B, Hkv, P, D), v], dim=2)
    n_rep = Hq // Hkv
    kk = kk[:, :, None].expand(B, Hkv, n_rep, P + Lk, D).reshape(B, Hq, P + Lk, D)
    vv = vv[:, :, None].expand(B, Hkv, n_rep, P + Lk, D).reshape(B, Hq, P + Lk, D)
    visible = torch.ones(B, 1, Lq, P + Lk, dtype=torch.bool)
    for i in range(Lq):
        pos = Lk - Lq + i  # queries are the last Lq positions
        for j in range(Lk):
            if causal and j > pos:
                visible[:, :, i, P + j] = False
    if key_padding_mask is not None:
        visible[:, :, :, P:] &= key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=visible, scale=scale)
    return out, visible


CASES = [
    (heads, P, pad, causal, Lq)
    for heads in [(4, 4), (4, 2), (6, 1)]
    for P in [0, 3]
    for pad in ["none", "left", "right"]
    for causal in [True, False]
    for Lq in [7, 2]
]


@pytest.mark.parametrize(
    "heads,P,pad,causal,Lq", CASES,
    ids=[f"Hq{h[0]}-Hkv{h[1]}-P{P}-pad_{pad}-{'causal' if c else 'full'}-Lq{lq}" for h, P, pad, c, lq in CASES],
)
def test_prefix_attention_matches_sdpa(heads, P, pad, causal, Lq):
    d = make(Hq=heads[0], Hkv=heads[1], P=P, Lq=Lq, Lk=7)
    kpm = padding_mask(pad, 3, 7)
    out, lse = fa.ops.prefix_attention(**d, causal=causal, key_padding_mask=kpm, return_lse=True)
    expected, visible = sdpa_expected(d, causal, kpm)
    has_key = visible.any(-1, keepdim=True).expand_as(out[..., :1]).squeeze(-1)  # (B, Hq, Lq)
    assert out.shape == d["q"].shape and lse.shape == d["q"].shape[:3]
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out[has_key], expected[has_key], rtol=1e-10, atol=1e-12)
    assert torch.all(out[~has_key] == 0)
    # lse: log-sum-exp of the scaled visible scores, prefix included; -inf where nothing is visible
    Hq, Hkv = heads
    kk = torch.cat([d["prefix_k"].expand(3, Hkv, P, 8), d["k"]], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    scores = (d["q"] @ kk.transpose(-1, -2) / 8**0.5).masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), rtol=1e-12, atol=1e-12)
    if P == 0 and pad == "left" and causal and Lq == 7:
        assert (~has_key).any()  # the case really has empty rows


@pytest.mark.parametrize("P", [0, 4], ids=["P0", "P4"])
@pytest.mark.parametrize("pad", ["none", "left"])
def test_decode_equals_last_rows_of_full_forward(P, pad):
    d = make(B=3, Hq=4, Hkv=2, Lq=9, Lk=9, P=P)
    kpm = padding_mask(pad, 3, 9)
    full = prefix_attention_ref(**d, causal=True, key_padding_mask=kpm)
    for Lq in (1, 2, 3):
        dec = fa.ops.prefix_attention(**dict(d, q=d["q"][:, :, -Lq:]), causal=True, key_padding_mask=kpm)
        torch.testing.assert_close(dec, full[:, :, -Lq:], rtol=1e-12, atol=1e-12)


def test_no_prefix_equals_empty_prefix():
    d = make(P=0)
    kpm = padding_mask("right", 3, 7)
    a = fa.ops.prefix_attention(**d, key_padding_mask=kpm)
    b = fa.ops.prefix_attention(d["q"], d["k"], d["v"], None, None, key_padding_mask=kpm)
    assert torch.equal(a, b)


def test_padding_never_hides_the_prefix():
    d = make(B=2, P=3, Lq=5, Lk=5)
    kpm = torch.zeros(2, 5, dtype=torch.bool)  # every token padded: only the prefix is left
    out = fa.ops.prefix_attention(**d, key_padding_mask=kpm)
    kk = d["prefix_k"].repeat_interleave(2, dim=0).expand(2, -1, -1, -1)
    vv = d["prefix_v"].repeat_interleave(2, dim=0).expand(2, -1, -1, -1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(d["q"], kk, vv), rtol=1e-10, atol=1e-12)


def test_custom_scale():
    d = make(P=2)
    out = fa.ops.prefix_attention(**d, causal=False, scale=0.3)
    expected, _ = sdpa_expected(d, False, None, scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_non_causal_allows_more_queries_than_keys():
    d = make(Lq=9, Lk=4, P=2)
    expected, _ = sdpa_expected(d, False, None)
    torch.testing.assert_close(fa.ops.prefix_attention(**d, causal=False), expected, rtol=1e-10, atol=1e-12)


def test_empty_rows_give_zero_and_finite_gradients(nan_poison):
    d = make(B=2, Hq=2, Hkv=1, Lq=5, Lk=5, P=0, requires_grad=True)
    kpm = torch.tensor([[False, False, True, True, True], [True] * 5])
    out = fa.ops.prefix_attention(**d, causal=True, key_padding_mask=kpm)
    assert torch.all(out[0, :, :2] == 0)  # query rows 0 and 1 of batch 0 see only padding
    assert torch.all(out[0, :, 2:] != 0) and not out.isnan().any()
    out.sum().backward()
    for name in ("q", "k", "v"):
        assert torch.isfinite(d[name].grad).all(), name
    assert torch.all(d["q"].grad[0, :, :2] == 0)


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
def test_prefix_attention_ref_gradcheck(with_lse):
    d = make(B=2, Hq=4, Hkv=2, Lq=3, Lk=5, P=2, D=3, requires_grad=True)
    kpm = torch.tensor([[False, True, True, True, True], [True, True, True, True, False]])
    names = ["q", "k", "v", "prefix_k", "prefix_v"]

    def f(*ts):
        return prefix_attention_ref(*ts, causal=True, key_padding_mask=kpm, return_lse=with_lse)

    assert torch.autograd.gradcheck(f, tuple(d[n] for n in names))


def test_prefix_attention_ref_gradcheck_with_empty_rows():
    d = make(B=1, Hq=2, Hkv=1, Lq=4, Lk=4, P=0, D=3, requires_grad=True)
    kpm = torch.tensor([[False, True, True, True]])

    def f(q, k, v):
        return prefix_attention_ref(q, k, v, None, None, causal=True, key_padding_mask=kpm)

    assert torch.autograd.gradcheck(f, (d["q"], d["k"], d["v"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_softmax_in_fp32(dtype):
    """Inputs exactly representable in both precisions and an fp32 softmax: only the final rounding (half an ulp)
    and fp32 arithmetic separate the result from float64, for the output and for every gradient."""
    lo = make(B=2, Hq=4, Hkv=2, Lq=13, Lk=13, P=5, D=16, dtype=dtype, requires_grad=True)
    hi = {k: v.detach().double().requires_grad_() for k, v in lo.items()}
    kpm = padding_mask("left", 2, 13)
    y_lo = fa.ops.prefix_attention(**lo, key_padding_mask=kpm)
    y_hi = fa.ops.prefix_attention(**hi, key_padding_mask=kpm)
    assert y_lo.dtype == dtype
    err = (y_lo.double() - y_hi).abs()
    assert torch.all(err <= EPS[dtype] * y_hi.abs() * 1.01 + 1e-5 * y_hi.abs().max())
    g = torch.randn(y_hi.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(dtype)
    y_lo.backward(g)
    y_hi.backward(g.double())
    for name in lo:
        a, b = lo[name].grad.double(), hi[name].grad
        assert torch.all((a - b).abs() <= 2 * EPS[dtype] * b.abs() + 1e-4 * b.abs().max()), name


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_prefix_attention_is_the_reference(backend, nan_poison):
    d = make(dtype=torch.float32)
    kpm = padding_mask("left", 3, 7)
    with fa.use_backend(backend):
        out, lse = fa.ops.prefix_attention(**d, key_padding_mask=kpm, return_lse=True)
    ref_out, ref_lse = prefix_attention_ref(**d, key_padding_mask=kpm, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert lse.dtype == torch.float32


# ---------------------------------------------------------------- errors


def _set(**changes):
    def apply(d):
        for key, value in changes.items():
            d[key] = value(d) if callable(value) else value
        return d

    return apply


ERRORS = [
    ("q-3d", _set(q=lambda d: d["q"][0]), {}, r"q has shape \(4, 7, 8\) \(3-d\) but must be 4-d"),
    ("q-int", _set(q=lambda d: d["q"].long()), {}, r"q has dtype torch\.int64 but must be floating point"),
    ("k-batch", _set(k=lambda d: d["k"][:2]), {},
     r"k has shape \(2, 2, 7, 8\) but q \(3, 4, 7, 8\) needs \(B, Hkv, Lk, D\) = \(3, Hkv, Lk, 8\)"),
    ("k-headdim", _set(k=lambda d: d["k"][..., :6]), {}, r"k has shape \(3, 2, 7, 6\) but q"),
    ("v-shape", _set(v=lambda d: d["v"][:, :, :5]), {}, r"v has shape \(3, 2, 5, 8\) but must match k \(3, 2, 7, 8\)"),
    ("heads", _set(k=lambda d: torch.cat([d["k"], d["k"][:, :1]], 1),
                   v=lambda d: torch.cat([d["v"], d["v"][:, :1]], 1)),
     {}, r"q has 4 heads and k/v have 3: the query heads must be a multiple of the kv heads"),
    ("causal-Lq", _set(k=lambda d: d["k"][:, :, :5], v=lambda d: d["v"][:, :, :5]), {},
     r"q has Lq=7 positions but k/v have Lk=5: with causal=True"),
    ("causal-type", None, {"causal": 1}, r"causal=1 must be a bool"),
    ("prefix-one", _set(prefix_v=None), {}, r"pass prefix_k and prefix_v together"),
    ("prefix-heads", _set(prefix_k=lambda d: torch.zeros(3, 3, 8, dtype=torch.float64)), {},
     r"prefix_k has shape \(3, 3, 8\) but the attention expects \(Hkv, P, D\) = \(2, P, 8\)"),
    ("prefix-batched", _set(prefix_k=lambda d: d["prefix_k"].expand(3, -1, -1, -1)), {},
     r"prefix_k has shape \(3, 2, 3, 8\) \(4-d\) but must be 3-d"),
    ("prefix-v", _set(prefix_v=lambda d: d["prefix_v"][:, :2]), {},
     r"prefix_v has shape \(2, 2, 8\) but must match prefix_k \(2, 3, 8\)"),
    ("kpm-dtype", None, {"key_padding_mask": torch.ones(3, 7, dtype=torch.long)},
     r"key_padding_mask has dtype torch\.int64 but must be a bool tensor"),
    ("kpm-shape-with-prefix", None, {"key_padding_mask": torch.ones(3, 10, dtype=torch.bool)},
     r"key_padding_mask has shape \(3, 10\) but the attention expects \(B, Lk\) = \(3, 7\)"),
    ("kpm-device", None, {"key_padding_mask": torch.ones(3, 7, dtype=torch.bool, device="meta")},
     r"key_padding_mask is on meta but q is on cpu"),
    ("scale", None, {"scale": 0.0}, r"scale=0\.0 must be a positive float"),
    ("dtype", _set(k=lambda d: d["k"].float()), {}, r"k has dtype torch\.float32 but q has torch\.float64"),
    ("device", _set(prefix_k=lambda d: d["prefix_k"].to("meta")), {}, r"prefix_k is on meta but q is on cpu"),
]


@pytest.mark.parametrize("change,kwargs,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_prefix_attention_errors(change, kwargs, match):
    d = make()
    if change is not None:
        d = change(d)
    with pytest.raises(ValueError, match=match):
        fa.ops.prefix_attention(**d, **kwargs)


def test_no_keys_at_all_gives_zero_rows_and_minus_inf_lse():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    empty = torch.randn(1, 2, 0, 8, dtype=torch.float64)
    out, lse = fa.ops.prefix_attention(q, empty, empty, None, None, causal=False, return_lse=True)
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(q))
    assert torch.isneginf(lse).all() and lse.shape == (1, 2, 3)
