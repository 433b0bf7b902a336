"""Triton prefix attention (kernels/prefix_attention.py, backend "triton" of fa.ops.prefix_attention) against the
reference prefix_attention_ref in float64: outputs, lse and every gradient (q, k, v, prefix_k, prefix_v), padding
left/right, GQA/MQA, padded head_dim, P = 0, the split-K decode path, non-contiguous inputs, determinism, the custom
op, and a prefix-tuned tiny llama on "torch" vs "triton".

Without a GPU the kernels run on CPU in Triton's interpreter: TRITON_INTERPRET=1 is set here, which works only if
nothing imported triton before (transformers does, through torch._dynamo): in a whole-suite run it must be set in
the environment or in tests/conftest.py, else these tests fail saying so. With a GPU, the same tests run the
compiled kernels on CUDA, and the `gpu` tests add real shapes vs SDPA. Small tiles (16 x 16) make L = 37 span
several query and key blocks, so the masked / mask-free loop splits, the diagonal blocks and the split-K
boundaries are all exercised.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported

tl = pytest.importorskip("triton.language")

from fastadapters.kernels import prefix_attention as K  # noqa: E402
from fastadapters.kernels.prefix_attention_ref import prefix_attention_ref  # noqa: E402

# Triton decides interpreted vs compiled when it (and each @triton.jit function) is imported; transformers imports
# triton (through torch._dynamo), so an earlier test module importing fastadapters fixes it for the whole process.
INTERPRETER_READY = torch.cuda.is_available() or (type(tl.zeros).__name__ == "InterpretedFunction" and K.INTERPRETED)

import fastadapters as fa  # noqa: E402
from fastadapters.ops import _registry  # noqa: E402

_WAS_REGISTERED = "triton" in _registry.registered_backends("prefix_attention")
from fastadapters.ops import prefix_attention_triton as T  # noqa: E402 - registers backend "triton"

if not _WAS_REGISTERED:  # importing this test module must not change the registry other test modules see
    _registry.unregister_kernel("prefix_attention", "triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _interpreter_ready():
    if not INTERPRETER_READY:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (transformers imports it), so the kernels "
                    "cannot run on CPU: set TRITON_INTERPRET=1 in the environment or in tests/conftest.py")


@pytest.fixture(autouse=True, scope="module")
def _triton_backend_registered():
    """Backend "triton" of prefix_attention is this module's kernel while its tests run (and only then, unless
    fastadapters registered it on its own)."""
    T.register()
    yield
    if not _WAS_REGISTERED:
        _registry.unregister_kernel("prefix_attention", "triton")


SMALL = K.AttnConfig(16, 16, 4, 1)
pytestmark = [
    pytest.mark.usefixtures("nan_poison"),
    # the interpreter turns tensor loop bounds into ints through a NumPy conversion NumPy deprecates
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]


# ------------------------------------------------------------------------------------------------ helpers
def make(B=2, Hq=4, Hkv=2, Lq=37, Lk=37, D=16, P=5, dtype=torch.float32, seed=0, pad="none", layout="bhld"):
    """Inputs (float64 masters, rounded to dtype) and a padding mask: batch row 1 loses 7 tokens on the left/right.
    layout "blhd" makes q/k/v transposed views of (B, L, H, D) tensors, as transformers hands them over."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if layout == "blhd":
        q, k, v = (rnd(B, Lq, Hq, D).transpose(1, 2), rnd(B, Lk, Hkv, D).transpose(1, 2),
                   rnd(B, Lk, Hkv, D).transpose(1, 2))
    else:
        q, k, v = rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
    pk, pv = rnd(Hkv, P, D), rnd(Hkv, P, D)
    kpm = None
    if pad != "none":
        kpm = torch.ones(B, Lk, dtype=torch.bool)
        n = min(7, Lk)
        if pad == "left":
            kpm[1, :n] = False
        else:
            kpm[1, Lk - n:] = False
    hi = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)
    lo = {n: t.to(dtype).to(DEVICE) for n, t in hi.items()}
    if layout == "blhd":  # keep the transposed strides after the dtype cast
        for n in ("q", "k", "v"):
            lo[n] = hi[n].transpose(1, 2).to(dtype).to(DEVICE).transpose(1, 2)
    return hi, lo, (kpm.to(DEVICE) if kpm is not None else None)


def ref_grads(inp, kpm, causal, scale, dout, dlse):
    """Reference out, lse and grads of sum(out * dout) + sum(lse * dlse) (rows without a key: lse term 0)."""
    x = {n: t.detach().to("cpu", torch.float64).requires_grad_() for n, t in inp.items()}
    kpm_cpu = kpm.cpu() if kpm is not None else None
    out, lse = prefix_attention_ref(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], causal, scale, kpm_cpu,
                                    return_lse=True)
    finite = torch.isfinite(lse)
    loss = (out * dout.cpu().double()).sum() + (torch.where(finite, lse, 0) * dlse.cpu().double()).sum()
    loss.backward()
    grads = [x[n].grad if x[n].grad is not None else torch.zeros_like(x[n]) for n in x]
    return out.detach(), lse.detach(), grads


def kernel_run(lo, kpm, causal, scale, dout, dlse, fwd_cfg=SMALL, kv_cfg=SMALL, dq_cfg=SMALL, decode=None,
               chunk=None, deterministic=None):
    out, lse = K.prefix_attention_fwd(lo["q"], lo["k"], lo["v"], lo["prefix_k"], lo["prefix_v"], kpm, causal, scale,
                                      config=fwd_cfg, decode=decode, decode_chunk_size=chunk)
    grads = K.prefix_attention_bwd(dout, dlse, lo["q"], lo["k"], lo["v"], lo["prefix_k"], lo["prefix_v"], kpm, out,
                                   lse, causal, scale, kv_config=kv_cfg, dq_config=dq_cfg,
                                   deterministic=deterministic)
    return out, lse, list(grads)


def assert_lse(lse, ref_lse, atol):
    lse, ref_lse = lse.cpu().double(), ref_lse
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without a key must have lse = -inf"
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=0, atol=atol)


NAMES = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")

# (B, Hq, Hkv, Lq, Lk, D, P, pad, causal)
CASES = {
    "mha-P5-D16": (2, 4, 4, 37, 37, 16, 5, "none", True),
    "gqa-P5-D16-left": (2, 4, 2, 37, 37, 16, 5, "left", True),
    "mqa-P0-D16-right": (2, 4, 1, 37, 37, 16, 0, "right", True),
    "gqa-P5-D80pad-right": (2, 4, 2, 37, 37, 80, 5, "right", True),
    "gqa-P21-D16-left-full": (2, 4, 2, 37, 37, 16, 21, "left", False),
    "gqa-P5-D16-chunk-Lq20-Lk37": (2, 4, 2, 20, 37, 16, 5, "left", True),
    "gqa-P5-D16-full-Lq37-Lk20": (2, 4, 2, 37, 20, 16, 5, "none", False),
    "gqa-P0-D16-left-emptyrows": (2, 4, 2, 37, 37, 16, 0, "left", True),
    "mqa-P512-D16-L17": (1, 2, 1, 17, 17, 16, 512, "none", True),
}


# ------------------------------------------------------------------------------------------------ fp32 vs float64
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernels_match_reference_fp32(case):
    B, Hq, Hkv, Lq, Lk, D, P, pad, causal = CASES[case]
    hi, lo, kpm = make(B, Hq, Hkv, Lq, Lk, D, P, pad=pad)
    scale = 0.3 if not causal else 1 / math.sqrt(D)
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(B, Hq, Lq, D, generator=g).to(DEVICE)
    dlse = torch.randn(B, Hq, Lq, generator=g).to(DEVICE)
    out, lse, grads = kernel_run(lo, kpm, causal, scale, dout, dlse, decode=False)
    r_out, r_lse, r_grads = ref_grads(hi, kpm, causal, scale, dout, dlse)
    torch.testing.assert_close(out.cpu().double(), r_out, rtol=0, atol=2e-5)
    assert_lse(lse, r_lse, 2e-5)
    for name, got, want in zip(NAMES, grads, r_grads, strict=True):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=5e-5, msg=lambda m, n=name: f"{n}: {m}")
    if case.endswith("emptyrows"):  # batch row 1's first 7 queries see nothing: 0 out, -inf lse, 0 dq
        assert torch.all(out[1, :, :7] == 0) and torch.all(torch.isinf(lse[1, :, :7]))
        assert torch.all(grads[0][1, :, :7] == 0)


@pytest.mark.parametrize("tiles", ["M32N16", "M16N32", "default"])
def test_tile_shapes_agree(tiles):
    """Other tile shapes (unequal query / key blocks, and the dispatch tables) give the same results."""
    hi, lo, kpm = make(Hq=4, Hkv=2, P=5, pad="left", Lq=37, Lk=45)
    g = torch.Generator().manual_seed(6)
    dout = torch.randn(2, 4, 37, 16, generator=g).to(DEVICE)
    dlse = torch.zeros(2, 4, 37).to(DEVICE)
    cfg = {"M32N16": K.AttnConfig(32, 16, 4, 1), "M16N32": K.AttnConfig(16, 32, 4, 1), "default": None}[tiles]
    out, lse, grads = kernel_run(lo, kpm, True, 0.25, dout, dlse, cfg, cfg, cfg, decode=False)
    r_out, r_lse, r_grads = ref_grads(hi, kpm, True, 0.25, dout, dlse)
    torch.testing.assert_close(out.cpu().double(), r_out, rtol=0, atol=2e-5)
    assert_lse(lse, r_lse, 2e-5)
    for name, got, want in zip(NAMES, grads, r_grads, strict=True):
        torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=5e-5, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------ low precision
def low_precision_ref(inp, kpm, causal, scale, dout):
    """The reference computed in the low dtype the way an unfused attention would: products rounded to the dtype,
    softmax in fp32, probabilities rounded before P V. Returns out and the grads (autograd in that precision)."""
    x = {n: t.detach().cpu().requires_grad_() for n, t in inp.items()}
    q, k, v, pk, pv = x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"]
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    kk = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2).repeat_interleave(Hq // Hkv, 1)
    vv = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2).repeat_interleave(Hq // Hkv, 1)
    s = (q @ kk.transpose(-1, -2)).float() * scale
    vis = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    if causal:
        vis &= torch.arange(Lk)[None, :] <= torch.arange(Lk - Lq, Lk)[:, None]
    if kpm is not None:
        vis &= kpm.cpu()[:, None, None, :]
    vis = torch.cat([vis.new_ones(B, 1, Lq, pk.shape[1]), vis], -1)
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).to(q.dtype)
    out = p @ vv
    (out.float() * dout.cpu().float()).sum().backward()
    return out.detach(), [x[n].grad for n in x]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_three_way(dtype):
    """|kernel - ref_f64| <= 2 |ref_lowprec - ref_f64| + atol, for the output and every gradient."""
    hi, lo, kpm = make(B=2, Hq=4, Hkv=2, Lq=37, Lk=37, D=80, P=5, dtype=dtype, pad="left", seed=3)
    g = torch.Generator().manual_seed(7)
    dout_hi = torch.randn(2, 4, 37, 80, generator=g, dtype=torch.float64)
    dout = dout_hi.to(dtype).to(DEVICE)
    scale = 1 / math.sqrt(80)
    out, lse, grads = kernel_run(lo, kpm, True, scale, dout, None)
    hi_rounded = {n: t.to(dtype).double() for n, t in hi.items()}  # the inputs the kernel saw
    r_out, r_lse, r_grads = ref_grads(hi_rounded, kpm, True, scale, dout.double(), torch.zeros(2, 4, 37))
    l_out, l_grads = low_precision_ref({n: t.to(dtype) for n, t in hi.items()}, kpm, True, scale, dout)
    assert out.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    for name, got, low, want in zip(("out", *NAMES), [out, *grads], [l_out, *l_grads], [r_out, *r_grads], strict=True):
        err = (got.cpu().double() - want).abs().max().item()
        bound = 2 * (low.double() - want).abs().max().item() + 1e-3
        assert err <= bound, f"{name}: kernel error {err:.3g} > {bound:.3g} (2x the {dtype} reference's + 1e-3)"
    assert_lse(lse, r_lse, 2e-3)


# ------------------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("P,pad,heads,chunk", [(0, "left", (4, 2), 16), (5, "left", (4, 2), 16),
                                               (20, "right", (8, 1), 16), (5, "none", (4, 4), None)],
                         ids=["P0-left-gqa-chunk16", "P5-left-gqa-chunk16", "P20-right-mqa8-chunk16",
                              "P5-mha-default-chunk"])
def test_decode_equals_last_rows_of_full_forward(P, pad, heads, chunk):
    """The split-K decode path (q_len 1..3) gives the last rows of the full forward (and the reference)."""
    Hq, Hkv = heads
    hi, lo, kpm = make(B=2, Hq=Hq, Hkv=Hkv, Lq=37, Lk=37, D=16, P=P, pad=pad, seed=11)
    full, full_lse = K.prefix_attention_fwd(lo["q"], lo["k"], lo["v"], lo["prefix_k"], lo["prefix_v"], kpm, True,
                                            0.25, config=SMALL, decode=False)
    r_full, r_lse = prefix_attention_ref(*[hi[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")], True, 0.25,
                                         kpm.cpu() if kpm is not None else None, return_lse=True)
    cfg = K.AttnConfig(16, 16, 4, 1) if chunk else None
    for Lq in (1, 2, 3):
        q = lo["q"][:, :, -Lq:]
        out, lse = K.prefix_attention_fwd(q, lo["k"], lo["v"], lo["prefix_k"], lo["prefix_v"], kpm, True, 0.25,
                                          config=cfg, decode=True, decode_chunk_size=chunk)
        torch.testing.assert_close(out, full[:, :, -Lq:], rtol=0, atol=2e-6)
        torch.testing.assert_close(lse, full_lse[:, :, -Lq:], rtol=0, atol=2e-6)
        torch.testing.assert_close(out.cpu().double(), r_full[:, :, -Lq:], rtol=0, atol=2e-5)
        assert_lse(lse, r_lse[:, :, -Lq:], 2e-5)


def test_decode_split_plan():
    """The split size is a multiple of block_n, fills ~2 programs per SM, and keeps the splits under the cap."""
    for n_prog, P, Lk, sms in [(1, 30, 2048, 132), (256, 30, 2048, 132), (4, 0, 100000, 132), (8, 512, 7, 132)]:
        c = K.decode_chunk(n_prog, P, Lk, 64, sms)
        splits = math.ceil(P / c) + math.ceil(Lk / c)
        assert c % 64 == 0 and splits <= K.MAX_DECODE_SPLITS
        if n_prog == 1:
            assert c == 64  # B = 1, one kv head: every key block is its own split (33 < 2 x 132 SMs)
        if n_prog == 256:
            assert splits <= 3  # 256 programs already fill 132 SMs about twice


def test_decode_path_gradients_through_autograd():
    """q_len <= 16 takes the decode forward; its lse feeds the generic backward correctly."""
    hi, lo, kpm = make(B=2, Hq=4, Hkv=2, Lq=3, Lk=37, D=16, P=5, pad="left", seed=12)
    x = {n: t.clone().requires_grad_() for n, t in lo.items()}
    with fa.use_backend("triton"):
        out = fa.ops.prefix_attention(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], key_padding_mask=kpm)
    dout = torch.randn_like(out)
    out.backward(dout)
    r_out, _, r_grads = ref_grads(hi, kpm, True, 0.25, dout, torch.zeros(2, 4, 3))
    torch.testing.assert_close(out.detach().cpu().double(), r_out, rtol=0, atol=2e-5)
    for name, n, want in zip(NAMES, x, r_grads, strict=True):
        torch.testing.assert_close(x[n].grad.cpu().double(), want, rtol=0, atol=5e-5, msg=lambda m, a=name: f"{a}: {m}")


# ------------------------------------------------------------------------------------------------ autograd op
def test_public_op_noncontiguous_inputs_and_lse_grad():
    """Through fa.ops.prefix_attention (backend "triton"): transposed-view q/k/v, a sliced KV cache, out and lse
    both in the loss; default tiles."""
    hi, lo, kpm = make(B=2, Hq=4, Hkv=2, Lq=37, Lk=37, D=16, P=5, pad="right", layout="blhd", seed=13)
    cache_k = torch.cat([lo["k"], torch.randn_like(lo["k"])], dim=2)  # a longer cache: the kernel reads a slice
    cache_v = torch.cat([lo["v"], torch.randn_like(lo["v"])], dim=2)
    q = lo["q"].clone().requires_grad_()
    ck, cv = cache_k.requires_grad_(), cache_v.requires_grad_()
    pk, pv = lo["prefix_k"].clone().requires_grad_(), lo["prefix_v"].clone().requires_grad_()
    assert not q.is_contiguous() and q.stride(-1) == 1
    with fa.use_backend("triton"):
        out, lse = fa.ops.prefix_attention(q, ck[:, :, :37], cv[:, :, :37], pk, pv, key_padding_mask=kpm,
                                           return_lse=True)
    g = torch.Generator().manual_seed(14)
    dout = torch.randn(out.shape, generator=g).to(DEVICE)
    dlse = torch.randn(lse.shape, generator=g).to(DEVICE)
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    r_out, r_lse, r_grads = ref_grads(hi, kpm, True, 0.25, dout, dlse)
    torch.testing.assert_close(out.detach().cpu().double(), r_out, rtol=0, atol=2e-5)
    assert_lse(lse.detach(), r_lse, 2e-5)
    got = [q.grad, ck.grad[:, :, :37], cv.grad[:, :, :37], pk.grad, pv.grad]
    for name, a, b in zip(NAMES, got, r_grads, strict=True):
        torch.testing.assert_close(a.cpu().double(), b, rtol=0, atol=5e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.all(ck.grad[:, :, 37:] == 0)


def test_backward_is_deterministic():
    """Deterministic mode: two backward passes give bitwise equal gradients (no atomics; prefix grads reduced in a
    fixed order)."""
    _, lo, kpm = make(B=2, Hq=4, Hkv=1, Lq=37, Lk=37, D=16, P=21, pad="left", seed=15)
    args = [lo[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")] + [kpm]
    out, lse = K.prefix_attention_fwd(*args, True, 0.25)
    dout = torch.randn(out.shape).to(DEVICE)
    g1 = K.prefix_attention_bwd(dout, None, *args, out, lse, True, 0.25, deterministic=True)
    g2 = K.prefix_attention_bwd(dout, None, *args, out, lse, True, 0.25, deterministic=True)
    for name, a, b in zip(NAMES, g1, g2, strict=True):
        assert torch.equal(a, b), name
    ga = K.prefix_attention_bwd(dout, None, *args, out, lse, True, 0.25, deterministic=False)
    for name, a, b in zip(NAMES, ga, g1, strict=True):  # atomic dQ: same gradients up to fp32 summation order
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


DET_CASES = ["gqa-P5-D16-left", "gqa-P21-D16-left-full", "gqa-P5-D16-chunk-Lq20-Lk37", "gqa-P5-D80pad-right"]


@pytest.mark.parametrize("case", DET_CASES, ids=DET_CASES)
def test_deterministic_mode_matches_reference(case):
    """The deterministic backward (separate dq kernel, no atomics) against the float64 reference."""
    B, Hq, Hkv, Lq, Lk, D, P, pad, causal = CASES[case]
    hi, lo, kpm = make(B, Hq, Hkv, Lq, Lk, D, P, pad=pad)
    scale = 0.3 if not causal else 1 / math.sqrt(D)
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(B, Hq, Lq, D, generator=g).to(DEVICE)
    dlse = torch.randn(B, Hq, Lq, generator=g).to(DEVICE)
    _, _, grads = kernel_run(lo, kpm, causal, scale, dout, dlse, decode=False, deterministic=True)
    _, _, r_grads = ref_grads(hi, kpm, causal, scale, dout, dlse)
    for name, got, want in zip(NAMES, grads, r_grads, strict=True):
        torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=5e-5, msg=lambda m, n=name: f"{n}: {m}")


def _bwd_kernels(**env) -> list[str]:
    """Kernel names a backward launches on meta tensors (as on an sm_90 GPU)."""
    from fastadapters.kernels._configs import use_target

    meta = torch.device("meta")
    q = torch.empty(2, 4, 64, 64, device=meta, dtype=torch.bfloat16)
    kv = torch.empty(2, 2, 64, 64, device=meta, dtype=torch.bfloat16)
    pk = torch.empty(2, 5, 64, device=meta, dtype=torch.bfloat16)
    lse = torch.empty(2, 4, 64, device=meta)
    with use_target("sm_90"), K.record_launches() as rec:
        K.prefix_attention_bwd(q, None, q, kv, kv, pk, pk, None, q, lse, True, 0.125)
    return [launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.kernel.__name__ for launch in rec]


def test_default_mode_follows_torch_deterministic_algorithms(monkeypatch):
    """Atomic dQ by default; torch.use_deterministic_algorithms(True) or FASTADAPTERS_PREFIX_DETERMINISTIC=1 switch to
    the deterministic dq kernel; =0 forces atomics; anything else is a clear error."""
    monkeypatch.delenv("FASTADAPTERS_PREFIX_DETERMINISTIC", raising=False)
    assert "_prefix_attn_bwd_dq_kernel" not in _bwd_kernels()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert "_prefix_attn_bwd_dq_kernel" in _bwd_kernels()
        monkeypatch.setenv("FASTADAPTERS_PREFIX_DETERMINISTIC", "0")
        assert "_prefix_attn_bwd_dq_kernel" not in _bwd_kernels()
    finally:
        torch.use_deterministic_algorithms(before)
    monkeypatch.setenv("FASTADAPTERS_PREFIX_DETERMINISTIC", "1")
    assert "_prefix_attn_bwd_dq_kernel" in _bwd_kernels()
    monkeypatch.setenv("FASTADAPTERS_PREFIX_DETERMINISTIC", "yes")
    with pytest.raises(ValueError, match="FASTADAPTERS_PREFIX_DETERMINISTIC"):
        _bwd_kernels()


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_90"])
def test_meta_launch_with_more_than_65535_heads(arch):
    """B * H = 131072 (> 65535, the grid y/z limit): forward, decode and both backward modes run end to end on meta
    tensors (no host sync) and every grid is 1-D within grid x's 2^31 - 1."""
    from fastadapters.kernels._configs import use_target

    meta = torch.device("meta")
    B, Hq, Hkv, L, D, P = 2048, 64, 16, 128, 128, 30
    q = torch.empty(B, Hq, L, D, device=meta, dtype=torch.bfloat16)
    kv = torch.empty(B, Hkv, L, D, device=meta, dtype=torch.bfloat16)
    pk = torch.empty(Hkv, P, D, device=meta, dtype=torch.bfloat16)
    kpm = torch.empty(B, L, device=meta, dtype=torch.bool)
    with use_target(arch), K.record_launches() as rec:
        out, lse = K.prefix_attention_fwd(q, kv, kv, pk, pk, kpm, True, 0.1)
        for det in (False, True):
            grads = K.prefix_attention_bwd(out, lse, q, kv, kv, pk, pk, kpm, out, lse, True, 0.1, deterministic=det)
        K.prefix_attention_fwd(q[:, :, -1:], kv, kv, pk, pk, kpm, True, 0.1)  # decode
    assert out.shape == q.shape and lse.shape == (B, Hq, L)
    assert [t.shape for t in grads] == [q.shape, kv.shape, kv.shape, pk.shape, pk.shape]
    assert len(rec) == 8  # fwd; preprocess + kv; preprocess + kv + dq; decode + combine
    for launch in rec:
        assert len(launch.grid) == 1 and 65535 < launch.grid[0] < 2**31, launch.grid


def test_no_prefix_none_and_empty_agree():
    """prefix None and an empty (Hkv, 0, D) prefix give the same output; grads of the empty prefix are empty."""
    _, lo, kpm = make(P=0, pad="right")
    pk = lo["prefix_k"].clone().requires_grad_()
    with fa.use_backend("triton"):
        a = fa.ops.prefix_attention(lo["q"], lo["k"], lo["v"], None, None, key_padding_mask=kpm)
        b = fa.ops.prefix_attention(lo["q"], lo["k"], lo["v"], pk, lo["prefix_v"], key_padding_mask=kpm)
    assert torch.equal(a, b)
    b.sum().backward()
    assert pk.grad.shape == (2, 0, 16)


def test_registration_and_refusals():
    assert "triton" in fa.ops.registered_backends("prefix_attention")
    _, lo, _ = make(Lq=4, Lk=4)
    with fa.use_backend("triton"), pytest.raises(fa.ops.KernelUnavailableError, match="float64"):
        fa.ops.prefix_attention(*[lo[n].double() for n in ("q", "k", "v", "prefix_k", "prefix_v")])
    if DEVICE == "cpu":  # "auto" never picks the interpreter: it stays on the reference for CPU tensors
        with fa.use_backend("auto"):
            assert _registry.resolve("prefix_attention", lo["q"], lo["k"], lo["v"], None, None)[0] == "torch"


def test_custom_op_opcheck():
    """torch.library's checks of the forward custom op: schema, fake (meta) impl, autograd registration."""
    _, lo, kpm = make(B=2, Hq=2, Hkv=1, Lq=5, Lk=7, D=16, P=3, pad="left")
    args = (lo["q"].requires_grad_(), lo["k"], lo["v"], lo["prefix_k"].requires_grad_(), lo["prefix_v"], kpm, True,
            0.25)
    torch.library.opcheck(torch.ops.fastadapters.prefix_attention_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ------------------------------------------------------------------------------------------------ model
def test_prefix_tuned_llama_same_logits_grads_and_generation():
    """A prefix-tuned tiny llama: the same logits, prefix-encoder gradients and greedy generation (decode path with
    a KV cache) on backends "torch" and "triton"."""
    pytest.importorskip("fastadapters.tuners.prefix", reason="the prefix tuner (fastadapters/tuners/prefix.py) is "
                        "not in this checkout yet")
    from tiny_models import tiny_batch, tiny_model

    model = fa.get_adapter_model(tiny_model("llama"), fa.PrefixTuningConfig(num_virtual_tokens=5))
    model = model.to(DEVICE)
    ids, mask = tiny_batch(batch=2, length=9, left_pad=3)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with fa.use_backend(backend):
            logits = model(input_ids=ids, attention_mask=mask).logits
        (logits.float().square() * mask[..., None]).mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        results[backend] = (logits.detach(), grads)
    (l_t, g_t), (l_k, g_k) = results["torch"], results["triton"]
    real = mask.bool()
    torch.testing.assert_close(l_k[real], l_t[real], rtol=1e-4, atol=1e-4)
    for n in g_t:
        torch.testing.assert_close(g_k[n], g_t[n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    generated = {}
    for backend in ("torch", "triton"):
        with fa.use_backend(backend), torch.no_grad():
            generated[backend] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                                do_sample=False, pad_token_id=0)
    assert generated["torch"].shape[1] == ids.shape[1] + 4
    assert torch.equal(generated["triton"], generated["torch"])


# ------------------------------------------------------------------------------------------------ GPU, real shapes
def _sdpa_prefix(q, k, v, pk, pv, causal=True):
    from torch.nn.attention.bias import causal_lower_right

    B, Hq, Lq, _ = q.shape
    Hkv, Lk, P = k.shape[1], k.shape[2], pk.shape[1]
    kk = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2).repeat_interleave(Hq // Hkv, 1)
    vv = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2).repeat_interleave(Hq // Hkv, 1)
    mask = causal_lower_right(Lq, P + Lk) if causal else None
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("Hkv,Lq", [(32, 2048), (8, 2048), (32, 1), (8, 16)], ids=["mha", "gqa4", "decode1-mha",
                                                                                 "decode16-gqa4"])
def test_gpu_real_shapes_vs_sdpa(Hkv, Lq):
    """B=2, H=32, L=2048, D=128, P=30, bf16: out and every grad vs SDPA (causal_lower_right on [prefix ; k]);
    three-way against SDPA in fp32."""
    torch.manual_seed(0)
    B, Hq, Lk, D, P = 2, 32, 2048, 128, 30
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float32)  # noqa: E731
    hi = [mk(B, Lq, Hq, D).transpose(1, 2), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, D), mk(Hkv, P, D), mk(Hkv, P, D)]
    dout = mk(B, Hq, Lq, D)

    def run(fn, dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in hi]
        out = fn(*xs)
        out.backward(dout.to(dtype))
        return [out.detach().float()] + [x.grad.float() for x in xs]

    with fa.use_backend("triton"):
        got = run(lambda *a: fa.ops.prefix_attention(*a), torch.bfloat16)
    ref_lo = run(_sdpa_prefix, torch.bfloat16)
    ref_hi = run(_sdpa_prefix, torch.float32)
    for name, a, lo_, hi_ in zip(("out", *NAMES), got, ref_lo, ref_hi, strict=True):
        err = (a - hi_).abs().max().item()
        bound = 2 * (lo_ - hi_).abs().max().item() + 1e-3
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"


@pytest.mark.gpu
def test_gpu_backward_deterministic_real_shape():
    torch.manual_seed(0)
    B, H, L, D, P = 2, 32, 1024, 128, 30
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pk, pv = (torch.randn(H, P, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    out, lse = K.prefix_attention_fwd(q, k, v, pk, pv, None, True, D**-0.5)
    g1 = K.prefix_attention_bwd(dout, None, q, k, v, pk, pv, None, out, lse, True, D**-0.5)
    g2 = K.prefix_attention_bwd(dout, None, q, k, v, pk, pv, None, out, lse, True, D**-0.5)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
