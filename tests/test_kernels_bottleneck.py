"""The fused Triton bottleneck-adapter kernels (backend "triton") against the reference: output and every gradient
(input, down/up weights, biases, learned scale, residual), three-way tolerance, every activation, series and
parallel forms, fused and chunked modes, in-kernel dropout, torch.compile, and a tiny model end to end.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported) at small odd
shapes; with a GPU the same tests run compiled, and the `gpu` tests add the real shapes (M=4096, d=4096, b=256).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the kernel tests share the process)

import pytest

pytest.importorskip("triton")

import fastadapters as fa  # noqa: E402
from fastadapters.kernels import bottleneck_launch as K  # noqa: E402
from fastadapters.kernels.bottleneck_ref import bottleneck_ref  # noqa: E402
from fastadapters.ops import bottleneck_triton as bt  # noqa: E402
from fastadapters.ops._registry import KernelUnavailableError  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("nan_poison")

# |kernel - ref_hi| <= 2 |ref_lo - ref_hi| + ATOL * max|ref_hi|, per tensor (max norms). ATOL covers what the
# reference in low precision does not round and the kernel does: bf16/fp16 dot operands (act(pre) and g) and fp32
# accumulation order; fp32 has no low-precision reference to lean on (ref_lo is fp32 itself).
ATOL = {torch.float32: 2e-6, torch.bfloat16: 4e-3, torch.float16: 1e-3}
GRADS = ("h", "down_weight", "up_weight", "down_bias", "up_bias", "residual", "scale")


def make_case(M=37, d_in=72, d_out=None, b=5, dtype=torch.float32, wdtype=None, biases=True, residual=False,
              learned=True, seed=0) -> dict:
    """Leaf tensors of one call (requires_grad), random enough that every term of every gradient shows."""
    d_out = d_in if d_out is None else d_out
    wdtype = dtype if wdtype is None else wdtype
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, dt=dtype):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dt).to(DEV)
        return t.requires_grad_()

    return dict(
        h=rnd(M, d_in), down_weight=rnd(b, d_in, std=2 * d_in**-0.5, dt=wdtype),
        up_weight=rnd(d_out, b, std=b**-0.5, dt=wdtype),
        down_bias=rnd(b, std=0.5, dt=wdtype) if biases else None, up_bias=rnd(d_out, dt=wdtype) if biases else None,
        residual=rnd(M, d_out) if residual else None,
        scale=rnd(1, dt=torch.float32) if learned else None,
        dy=torch.randn(M, d_out, generator=g, dtype=torch.float64).to(dtype).to(DEV),
    )


def _leaves(case: dict) -> dict[str, torch.Tensor]:
    return {n: case[n] for n in GRADS if case.get(n) is not None}


def run_kernel(case: dict, activation: str, *, dropout_p: float = 0.0, seed: int | None = 0, scaling: float = 0.8,
               row: K.RowConfig | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """y and the gradients of sum(y * dy) through fa.ops.bottleneck_adapter on the "triton" backend."""
    leaves = _leaves(case)
    s = case["scale"] if case.get("scale") is not None else scaling
    with fa.use_backend("triton"), K.use_configs(row=row):
        y = fa.ops.bottleneck_adapter(case["h"], case["down_weight"], case["up_weight"], activation, s,
                                      case.get("residual"), down_bias=case.get("down_bias"),
                                      up_bias=case.get("up_bias"), dropout_p=dropout_p, seed=seed)
    grads = torch.autograd.grad(y, list(leaves.values()), case["dy"])
    return y, dict(zip(leaves, grads, strict=True))


def run_ref(case: dict, activation: str, *, mask: torch.Tensor | None = None, scaling: float = 0.8,
            upcast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference on the same leaves (upcast: float64 copies, the "hi" reference)."""
    leaves = _leaves(case)
    ins = {n: (t.detach().double().requires_grad_() if upcast else t) for n, t in leaves.items()}
    s = ins["scale"] if "scale" in ins else scaling
    wd, wu = ins["down_weight"], ins["up_weight"]
    if not upcast and ins["h"].dtype in (torch.bfloat16, torch.float16) and wd.dtype != ins["h"].dtype:
        # fp32 master weights on a 16-bit model: the kernel path uses them in the activation dtype (as the LoRA
        # layers do), so the low-precision reference rounds them too (a differentiable cast: fp32 gradients)
        wd, wu = wd.to(ins["h"].dtype), wu.to(ins["h"].dtype)
    y = bottleneck_ref(ins["h"], wd, wu, activation, s, ins.get("residual"),
                       ins.get("down_bias"), ins.get("up_bias"), None if mask is None else mask.to(DEV))
    dy = case["dy"].double() if upcast else case["dy"]
    grads = torch.autograd.grad(y, list(ins.values()), dy)
    return y, dict(zip(ins, grads, strict=True))


def assert_three_way(name: str, kernel: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> None:
    assert kernel.shape == hi.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(hi.shape)}"
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values (an unwritten, NaN-poisoned element?)"
    k, lo, hi = kernel.double(), lo.double(), hi.double()
    err = (k - hi).abs().max().item()
    ref_err = (lo - hi).abs().max().item()
    atol = ATOL[dtype] * hi.abs().max().item()
    assert err <= 2 * ref_err + atol, (f"{name}: |kernel - ref_hi| = {err:.3g} > 2 * |ref_lo - ref_hi| = "
                                       f"{2 * ref_err:.3g} + atol {atol:.3g}")


def check_against_reference(case: dict, activation: str, *, dropout_p: float = 0.0, seed: int = 0,
                            row: K.RowConfig | None = None) -> None:
    dtype = case["h"].dtype
    mask = bt.bottleneck_dropout_mask(tuple(case["h"].shape), dropout_p, seed, DEV) if dropout_p else None
    y, g = run_kernel(case, activation, dropout_p=dropout_p, seed=seed, row=row)
    y_lo, g_lo = run_ref(case, activation, mask=mask)
    y_hi, g_hi = run_ref(case, activation, mask=mask, upcast=True)
    assert y.dtype == dtype and y.shape == y_hi.shape
    assert_three_way("y", y, y_lo, y_hi, dtype)
    for n in g_hi:
        assert g[n].dtype == case[n].dtype and g[n].shape == case[n].shape, n
        assert_three_way(f"d{n}", g[n], g_lo[n], g_hi[n], dtype)


# ------------------------------------------------------------------------------------------------ vs reference
@pytest.mark.parametrize("activation", K.ACTIVATIONS)
def test_every_activation_fp32_parallel_biases_learned_scale(activation):
    """d_in != d_out, residual given, both biases, a learned scale: all seven gradients."""
    case = make_case(M=37, d_in=72, d_out=40, b=5, residual=True, seed=1)
    with torch.no_grad():
        case["down_weight"].mul_(3)  # pre-activations over a wide range (both relu sides, sigmoid tails)
    check_against_reference(case, activation)


@pytest.mark.parametrize(
    "dtype,wdtype,layout",
    [(torch.bfloat16, torch.bfloat16, "series"), (torch.bfloat16, torch.bfloat16, "parallel"),
     (torch.float16, torch.float16, "series"), (torch.float16, torch.float16, "parallel"),
     (torch.bfloat16, torch.float32, "series"), (torch.float32, torch.float32, "series")],
    ids=["bf16-series", "bf16-parallel", "fp16-series", "fp16-parallel", "bf16-fp32weights-series",
         "fp32-series"],
)
def test_dtypes_and_layouts(dtype, wdtype, layout):
    parallel = layout == "parallel"
    case = make_case(M=37, d_in=72, d_out=40 if parallel else None, b=5, dtype=dtype, wdtype=wdtype,
                     residual=parallel, seed=2)
    check_against_reference(case, "silu")


def test_chunked_mode_large_bottleneck_no_bias_float_scaling():
    """BLOCK_J < B (the large-b mode: act(pre) and g pass through memory between the phases), b = 40 > 16 so
    three chunks, no biases, a float scaling (no scale gradient)."""
    case = make_case(M=37, d_in=72, d_out=56, b=40, biases=False, learned=False, residual=True, seed=3)
    check_against_reference(case, "gelu", row=K.RowConfig(16, 32, 32, 4, 1, block_j=16))


def test_chunked_bias_and_scale_grads_only_twice():
    """Only the down bias and the learned scale train (no dh, no weight gradients: g is not stored) in the chunked
    mode; a second backward through the same graph (retain_graph) gives the same gradients, so the saved pre and
    act(pre) were not overwritten."""
    case = make_case(M=23, d_in=48, b=40, seed=16)
    for n in ("h", "down_weight", "up_weight", "up_bias"):
        case[n].requires_grad_(False)
    row = K.RowConfig(16, 32, 32, 4, 1, block_j=16)
    with fa.use_backend("triton"), K.use_configs(row=row):
        y = fa.ops.bottleneck_adapter(case["h"], case["down_weight"], case["up_weight"], "tanh", case["scale"],
                                      down_bias=case["down_bias"], up_bias=case["up_bias"])
        first = torch.autograd.grad(y, [case["down_bias"], case["scale"]], case["dy"], retain_graph=True)
        second = torch.autograd.grad(y, [case["down_bias"], case["scale"]], case["dy"])
    ref = bottleneck_ref(case["h"], case["down_weight"], case["up_weight"], "tanh", case["scale"], None,
                         case["down_bias"], case["up_bias"])
    want = torch.autograd.grad(ref, [case["down_bias"], case["scale"]], case["dy"])
    for a, b, w in zip(first, second, want, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


def test_residual_h_passed_explicitly_equals_series():
    """residual=h (the benchmark's call) runs as residual=None: same output and gradients as the series form."""
    case = make_case(M=21, d_in=48, b=7, seed=4)
    y1, g1 = run_kernel(case, "tanh")
    leaves = _leaves(case)
    with fa.use_backend("triton"):
        y2 = fa.ops.bottleneck_adapter(case["h"], case["down_weight"], case["up_weight"], "tanh", case["scale"],
                                       case["h"], down_bias=case["down_bias"], up_bias=case["up_bias"], seed=0)
    g2 = dict(zip(leaves, torch.autograd.grad(y2, list(leaves.values()), case["dy"]), strict=True))
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-6, atol=1e-6)


def test_only_weights_need_grad_and_leading_dims():
    """A frozen input (h without grad, the first adapter of a model) skips dh; (2, 3, d) inputs keep their shape."""
    case = make_case(M=6, d_in=40, b=6, seed=5)
    h = case["h"].detach().reshape(2, 3, 40)
    with fa.use_backend("triton"):
        y = fa.ops.bottleneck_adapter(h, case["down_weight"], case["up_weight"], "relu", 0.5,
                                      down_bias=case["down_bias"])
    assert y.shape == (2, 3, 40)
    dd, du, db = torch.autograd.grad(y, [case["down_weight"], case["up_weight"], case["down_bias"]],
                                     case["dy"].reshape(2, 3, 40))
    ref = bottleneck_ref(h, case["down_weight"], case["up_weight"], "relu", 0.5, None, case["down_bias"])
    rd, ru, rb = torch.autograd.grad(ref, [case["down_weight"], case["up_weight"], case["down_bias"]],
                                     case["dy"].reshape(2, 3, 40))
    for got, want in ((y, ref), (dd, rd), (du, ru), (db, rb)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_empty_input():
    case = make_case(M=0, d_in=32, b=4)
    y, g = run_kernel(case, "tanh")
    assert y.shape == (0, 32) and g["h"].shape == (0, 32)
    assert torch.equal(g["down_weight"], torch.zeros_like(g["down_weight"]))
    assert g["scale"].shape == (1,) and g["scale"].item() == 0.0


def test_no_grad_saves_nothing_and_matches():
    case = make_case(M=19, d_in=40, b=6, seed=6)
    with torch.no_grad(), fa.use_backend("triton"):
        y = fa.ops.bottleneck_adapter(case["h"], case["down_weight"], case["up_weight"], "sigmoid", 1.5)
    assert y.grad_fn is None
    ref = bottleneck_ref(case["h"], case["down_weight"], case["up_weight"], "sigmoid", 1.5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ dropout
def test_dropout_matches_reference_with_the_kernel_mask():
    """The backward regenerates the forward's mask from the seed: every gradient matches the reference run with
    the materialised mask (a different mask in either pass would break dh and dW_d)."""
    case = make_case(M=37, d_in=72, d_out=40, b=5, residual=True, seed=7)
    check_against_reference(case, "gelu_tanh", dropout_p=0.3, seed=11)


def test_dropout_mask_statistics_and_seeds():
    m1 = bt.bottleneck_dropout_mask((64, 96), 0.25, 5, DEV)
    assert torch.equal(m1, bt.bottleneck_dropout_mask((64, 96), 0.25, 5, DEV))
    assert not torch.equal(m1, bt.bottleneck_dropout_mask((64, 96), 0.25, 6, DEV))
    keep = m1 > 0
    assert 0.70 < keep.float().mean().item() < 0.80
    assert torch.allclose(m1[keep], torch.full_like(m1[keep], 1 / 0.75), rtol=1e-4)  # p quantised to 2^-16
    assert torch.equal(bt.bottleneck_dropout_mask((5, 7), 0.0, 1, DEV), torch.ones(5, 7, device=DEV))


def test_dropout_mask_is_the_lora_kernels_mask():
    """One Philox scheme for both ops' in-kernel dropout: same seed and shape, same mask."""
    lora = pytest.importorskip("fastadapters.kernels.lora")
    if not hasattr(lora, "lora_dropout_mask"):
        pytest.skip("kernels.lora has no lora_dropout_mask")
    torch.testing.assert_close(bt.bottleneck_dropout_mask((33, 80), 0.1, 9, DEV),
                               lora.lora_dropout_mask((33, 80), 0.1, 9, DEV), rtol=0, atol=0)


def test_dropout_zero_or_eval_is_exact_and_seed_free():
    case = make_case(M=19, d_in=40, b=6, seed=8)
    args = (case["h"], case["down_weight"], case["up_weight"], "silu", 0.7)
    with fa.use_backend("triton"), torch.no_grad():
        base = fa.ops.bottleneck_adapter(*args)
        p0 = fa.ops.bottleneck_adapter(*args, dropout_p=0.0, seed=3)
        p0b = fa.ops.bottleneck_adapter(*args, dropout_p=0.0, seed=4)
        evald = fa.ops.bottleneck_adapter(*args, dropout_p=0.5, training=False, seed=3)
        on = fa.ops.bottleneck_adapter(*args, dropout_p=0.5, seed=3)
    assert torch.equal(p0, base) and torch.equal(p0b, base) and torch.equal(evald, base)
    assert not torch.equal(on, base)


def test_dropout_without_seed_draws_a_fresh_one_from_torch():
    """seed=None: each call draws a seed from torch's CPU generator (reproducible under torch.manual_seed), and the
    backward uses the same one."""
    case = make_case(M=19, d_in=40, b=6, learned=False, seed=9)
    torch.manual_seed(123)
    y1, g1 = run_kernel(case, "tanh", dropout_p=0.4, seed=None)
    y2, _ = run_kernel(case, "tanh", dropout_p=0.4, seed=None)
    assert not torch.equal(y1, y2)
    torch.manual_seed(123)
    used = bt._draw_seed()
    mask = bt.bottleneck_dropout_mask((19, 40), 0.4, used, DEV)
    y_ref, g_ref = run_ref(case, "tanh", mask=mask)
    torch.testing.assert_close(y1, y_ref, rtol=1e-5, atol=1e-5)
    for n in g_ref:
        torch.testing.assert_close(g1[n], g_ref[n], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ determinism, configs
def test_weight_grads_bitwise_reproducible():
    """Two backward runs give bitwise equal weight and bias gradients: the wgrad split over M (here 2 partial sums,
    so the reduction order matters) is a function of the arch and the M bucket, never of a timing race."""
    case = make_case(M=100, d_in=72, b=5, seed=18)
    leaves = _leaves(case)
    with K.record_launches() as rec:  # what the launch would be, on meta copies: a real split over M
        meta = {n: t.detach().to("meta") for n, t in case.items() if isinstance(t, torch.Tensor)}
        _, pre, a = K.bottleneck_fwd(meta["h"], meta["down_weight"], meta["up_weight"], None, None, None, None,
                                     1.0, "tanh")
        K.bottleneck_bwd(meta["dy"], meta["h"], meta["down_weight"], meta["up_weight"], None, pre, a, None, 1.0,
                         "tanh", add_dy=True)
    assert rec[-1].grid[1] == 2, rec[-1].grid
    runs = []
    for _ in range(2):
        y, g = run_kernel(case, "tanh", dropout_p=0.2, seed=3)
        runs.append(g)
    for n in ("down_weight", "up_weight", "down_bias", "up_bias", "scale", "h"):
        assert torch.equal(runs[0][n], runs[1][n]), n
    assert leaves["down_weight"].dtype == runs[0]["down_weight"].dtype


def test_wgrad_split_is_a_function_of_arch_and_bucket():
    from fastadapters.kernels._configs import ARCHS, Target, shape_bucket
    from fastadapters.kernels.bottleneck_configs import wgrad_split

    h100_pcie = Target("sm_90", (9, 0), 232448, 114, "NVIDIA H100 PCIe")  # fewer SMs than the table's sm_90
    for M in (1000, 4097, 16384, 70000):
        for tiles in (6, 128, 1024):
            s = wgrad_split(ARCHS["sm_90"], shape_bucket(M), tiles, 64)
            assert s == wgrad_split(h100_pcie, shape_bucket(M), tiles, 64)
            assert s == wgrad_split(ARCHS["sm_90"], shape_bucket(shape_bucket(M) // 2 + 1), tiles, 64)
            assert 1 <= s <= 16
    assert wgrad_split(ARCHS["sm_90"], 16384, 128, 64) == 3  # two waves of 132 SMs over 128 tiles


def _meta_case(M=4096, d=4096, b=256, wdtype=torch.float32):
    meta = torch.device("meta")
    return (torch.empty((M, d), device=meta, dtype=torch.bfloat16), torch.empty((b, d), device=meta, dtype=wdtype),
            torch.empty((d, b), device=meta, dtype=wdtype))


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90"])
def test_launchers_run_on_meta_per_arch(arch):
    """Forward and backward run end to end on meta tensors (no host sync anywhere) under use_target(arch); the
    configs are the pure function's (the same twice); fp32 master weights get fp32 gradients."""
    from fastadapters.kernels._configs import use_target
    from fastadapters.kernels.bottleneck_configs import bottleneck_config

    h, wd, wu = _meta_case()
    seen = []
    for _ in range(2):
        with use_target(arch) as tgt, K.record_launches() as rec:
            _, pre, a = K.bottleneck_fwd(h, wd, wu, None, None, None, None, 1.0, "silu", 0.1, 7)
            grads = K.bottleneck_bwd(h, h, wd, wu, None, pre, a, None, 1.0, "silu", 0.1, 7, add_dy=True)
        seen.append([(L.kernel, L.grid, L.num_warps, L.num_stages,
                      tuple((k, v) for k, v in L.kwargs.items() if not isinstance(v, torch.Tensor))) for L in rec])
        assert a.dtype == torch.bfloat16 and grads[1].dtype == grads[2].dtype == torch.float32
        assert grads[0].dtype == torch.bfloat16 and grads[1].device.type == "meta"
        fwd = rec[0]
        cfg = bottleneck_config(tgt, "fwd", torch.bfloat16, 256)
        assert (fwd.kwargs["BLOCK_M"], fwd.kwargs["BLOCK_K"], fwd.kwargs["BLOCK_N"]) == (
            cfg.block_m, cfg.block_k, cfg.block_n)
    assert seen[0] == seen[1]


def test_tuned_table_entry_wins(tmp_path, monkeypatch):
    """A per-device table written by the offline tuner (kernels/configs/<device>.json) overrides the built-in
    config for its key, and only for that device."""
    import json

    from fastadapters.kernels import _configs
    from fastadapters.kernels.bottleneck_configs import config_key

    key = config_key(torch.bfloat16, 4096, 4096, 4096, 256, True)
    table = {"bottleneck": {"fwd": {key: {"block_m": 64, "block_k": 32, "block_n": 64, "num_warps": 4,
                                          "num_stages": 2}}}}
    (tmp_path / "test_gpu_9000.json").write_text(json.dumps(table))
    monkeypatch.setenv("FASTADAPTERS_CONFIG_DIR", str(tmp_path))
    _configs.clear_cache()
    gpu = _configs.Target("sm_90", (9, 0), 232448, 132, "Test GPU 9000")
    h, wd, wu = _meta_case()
    try:
        for tgt, want in ((gpu, (64, 32, 64, 4)), (_configs.ARCHS["sm_90"], (64, 64, 128, 8))):
            with _configs.use_target(tgt), K.record_launches() as rec:
                K.bottleneck_fwd(h, wd, wu, None, None, None, None, 1.0, "silu")
            kw = rec[0].kwargs
            assert (kw["BLOCK_M"], kw["BLOCK_K"], kw["BLOCK_N"], rec[0].num_warps) == want
    finally:
        _configs.clear_cache()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_runs_on_the_inputs_device():
    """A model split across GPUs: inputs on cuda:1 while cuda:0 is current give the same result as on cuda:0."""
    case = make_case(M=256, d_in=512, b=64, dtype=torch.bfloat16, wdtype=torch.float32, seed=19)
    y0, _ = run_kernel(case, "silu")
    moved = {n: (t.detach().to("cuda:1").requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t)
             for n, t in case.items()}
    with torch.cuda.device(0):
        y1, _ = run_kernel(moved, "silu")
    assert y1.device.index == 1
    torch.testing.assert_close(y1.cpu(), y0.cpu(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ dispatch
def test_registered_and_refusals():
    assert "triton" in fa.ops.registered_backends("bottleneck_adapter")
    case = make_case(M=4, d_in=16, b=2)
    h, dw, uw = (case[n].detach() for n in ("h", "down_weight", "up_weight"))
    with fa.use_backend("triton"):
        with pytest.raises(KernelUnavailableError, match="float64"):
            fa.ops.bottleneck_adapter(h.double(), dw.double(), uw.double())
        big = torch.zeros(1025, 16, device=DEV)
        with pytest.raises(KernelUnavailableError, match="b=1025 is outside 1..1024"):
            fa.ops.bottleneck_adapter(h, big, torch.zeros(16, 1025, device=DEV))
    with pytest.raises(ValueError, match="does not read a precomputed dropout_mask"):
        bt.bottleneck_triton(h, dw, uw, "tanh", 1.0, dropout_mask=torch.ones_like(h))
    if DEV == "cpu":
        with fa.use_backend("auto"):  # auto never picks the interpreter: the reference runs
            assert fa.ops.bottleneck_adapter(h, dw, uw).grad_fn is None


def test_opcheck_custom_ops():
    """torch.library.opcheck: schema, fake (meta) implementations and autograd registration of both ops."""
    case = make_case(M=9, d_in=32, b=4, seed=10)
    h, dw, uw, db, ub, s = (case[n].detach() for n in ("h", "down_weight", "up_weight", "down_bias", "up_bias",
                                                       "scale"))
    fwd_args = (h, dw, uw, db, ub, None, s, 1.0, "gelu", 0.2, 5, True)
    torch.library.opcheck(torch.ops.fastadapters.bottleneck_fwd, fwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    y, pre, a, seed = torch.ops.fastadapters.bottleneck_fwd(*fwd_args)
    bwd_args = (case["dy"], h, dw, uw, ub, pre, a, s, seed, 1.0, "gelu", 0.2, True, True, True, True, True, True,
                True)
    torch.library.opcheck(torch.ops.fastadapters.bottleneck_bwd, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """The custom ops are opaque to dynamo: one graph, same output and gradients as eager."""
    case = make_case(M=18, d_in=32, b=4, seed=12)
    leaves = _leaves(case)

    def f(h, down_weight, up_weight, down_bias, up_bias, scale):
        return fa.ops.bottleneck_adapter(h.reshape(2, 9, 32), down_weight, up_weight, "silu", scale,
                                         down_bias=down_bias, up_bias=up_bias, dropout_p=0.1, seed=3)

    torch._dynamo.reset()
    with fa.use_backend("triton"):
        y_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves.values())
        g_c = torch.autograd.grad(y_c, list(leaves.values()), case["dy"].reshape(2, 9, 32))
        y_e = f(*leaves.values())
        g_e = torch.autograd.grad(y_e, list(leaves.values()), case["dy"].reshape(2, 9, 32))
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ tiny model
@pytest.mark.parametrize("placement", ["series", "parallel"])
def test_tiny_model_same_logits_and_grads_torch_vs_triton(placement, monkeypatch):
    """Every placement (series: before the MLP input projections and after the output projection; parallel: beside
    the attention projections, d_in != d_out for k/v) with a learned scale: logits, loss and every adapter
    gradient agree between the reference and the kernels."""
    from tiny_models import tiny_batch, tiny_model

    from fastadapters.tuners.bottleneck import BottleneckLayer

    kw = {"use_parallel_adapter": True} if placement == "parallel" else {}
    am = fa.get_adapter_model(tiny_model("llama"), fa.BottleneckConfig(
        bottleneck_size=8, non_linearity="gelu", scaling="learned", init_weights="bert", **kw)).to(DEV)
    placements = {m.placement["default"] for m in am.base_model.modules() if isinstance(m, BottleneckLayer)}
    assert placements == ({"parallel"} if placement == "parallel" else {"before", "after"})
    ids, mask = (t.to(DEV) for t in tiny_batch(batch=2, length=7))
    calls = []
    real_fwd = K.bottleneck_fwd
    monkeypatch.setattr(K, "bottleneck_fwd", lambda *a, **kw: calls.append(1) or real_fwd(*a, **kw))
    am.train()
    out = {}
    for backend in ("torch", "triton"):
        am.zero_grad()
        with fa.use_backend(backend):
            res = am(input_ids=ids, attention_mask=mask, labels=ids)
        res.loss.backward()
        out[backend] = (res.logits.detach(), {n: p.grad.clone() for n, p in am.named_parameters()
                                              if p.requires_grad})
    assert len(calls) == sum(isinstance(m, BottleneckLayer) for m in am.base_model.modules())  # kernels ran
    logits_t, grads_t = out["torch"]
    logits_k, grads_k = out["triton"]
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-5, atol=1e-5)
    assert grads_k.keys() == grads_t.keys() and len(grads_t) >= 8
    for n in grads_t:
        torch.testing.assert_close(grads_k[n], grads_t[n], rtol=1e-4, atol=1e-5, msg=n)


# ------------------------------------------------------------------------------------------------ GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["series", "parallel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_real_shapes(dtype, layout):
    """M = 4096, d = 4096, b = 256 (the benchmark's shape), silu, learned scale, biases, dropout: the first config
    of each list (no autotuning in tests)."""
    parallel = layout == "parallel"
    case = make_case(M=4096, d_in=4096, d_out=3072 if parallel else None, b=256, dtype=dtype, residual=parallel,
                     seed=13)
    check_against_reference(case, "silu", dropout_p=0.1, seed=17)


@pytest.mark.gpu
@pytest.mark.parametrize("b", [8, 100, 1024], ids=["b8", "b100-unaligned", "b1024-chunked"])
def test_gpu_bottleneck_sizes(b):
    case = make_case(M=1000, d_in=1024, b=b, dtype=torch.bfloat16, seed=14)
    check_against_reference(case, "gelu")


@pytest.mark.gpu
def test_gpu_fp32_weights_on_bf16_input():
    """The bottleneck layers' real configuration on a bf16 model: fp32 adapter weights, bf16 activations."""
    case = make_case(M=2048, d_in=2048, b=64, dtype=torch.bfloat16, wdtype=torch.float32, seed=15)
    check_against_reference(case, "tanh")
