"""Multi-LoRA (one adapter per token): the reference, the Triton kernels (interpreter on CPU), the mixed-batch
routing of AdapterModel (adapter_names=) against running each sequence alone and against PEFT, and the errors.

The C++ extension has its own file (tests/test_ext_cpp.py); sm_90 compiles are in tests/test_sm90_multi_lora.py.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import fastadapters as fa
from fastadapters.kernels.multi_lora_ref import multi_lora_loop_ref, multi_lora_ref
from fastadapters.ops import _registry
from fastadapters.ops.multi_lora import multi_lora_delta

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interp.

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _interpreter_in_process() -> bool:
    """Whether this process can interpret Triton kernels: TRITON_INTERPRET must have been set before triton was
    imported (triton.language's own helpers, tl.zeros / tl.sum, are decorated at that import)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


@pytest.fixture(scope="module")
def interpreter_child(request) -> dict[str, tuple[str, str]]:
    """Runs this module's Triton tests once in a child python with TRITON_INTERPRET=1 from the start, for a CPU
    session whose triton was imported without it; returns test name -> (outcome, failure text)."""
    ids = [item.nodeid for item in request.session.items
           if item.module is request.module and "triton_kernels" in getattr(item, "fixturenames", ())]
    root = str(request.config.rootpath)
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                               *ids], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        if not os.path.exists(xml):
            tail = proc.stdout[-3000:] + proc.stderr[-3000:]
            pytest.fail(f"the TRITON_INTERPRET=1 child run failed to start:\n{tail}")
        results = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped")
            if bad is not None:
                results[case.get("name")] = ("failed", (bad.text or bad.get("message") or "")[-4000:])
            elif skipped is not None:
                results[case.get("name")] = ("skipped", skipped.get("message") or "")
            else:
                results[case.get("name")] = ("passed", "")
    return results


@pytest.fixture
def triton_kernels(request, monkeypatch):
    """The Triton kernel module: compiled on a GPU, else run by the interpreter (TRITON_INTERPRET=1 while the
    test runs; the module is (re)imported under it so its kernels are interpreted). When this process cannot
    interpret (triton imported before TRITON_INTERPRET was set), the test ran in a child process
    (`interpreter_child`): its result is reported here and the fixture returns None (the test body returns)."""
    name = "fastadapters.kernels.multi_lora_launch"  # the launchers; the kernels are in kernels/multi_lora.py
    if CUDA:
        return importlib.import_module(name)
    if not _interpreter_in_process():
        outcome, text = request.getfixturevalue("interpreter_child").get(
            request.node.name, ("missing", "the child run did not report this test"))
        if outcome == "skipped":
            pytest.skip(text)
        if outcome != "passed":
            pytest.fail(f"{outcome} in the TRITON_INTERPRET=1 child process:\n{text}", pytrace=False)
        return None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = sys.modules.get(name)
    if mod is None or not mod.INTERPRETED:
        for dep in ("fastadapters.kernels._common", "fastadapters.kernels.multi_lora", name):  # in import order
            m = sys.modules.get(dep)
            mod = importlib.reload(m) if m is not None else importlib.import_module(dep)
    return mod


def make_case(M=37, K=72, N=40, ranks=(7, 1, 5, 3, 7), dtype=torch.float32, seed=0, p_none=0.2, lead=None,
              device=DEV):
    """x, stacks (zero-padded to the largest rank), scalings and per-token indices with some -1 rows."""
    g = torch.Generator().manual_seed(seed)
    n, R = len(ranks), max(ranks)
    A = torch.zeros(n, R, K, dtype=torch.float64)
    B = torch.zeros(n, N, R, dtype=torch.float64)
    for i, r in enumerate(ranks):
        A[i, :r] = torch.randn(r, K, generator=g, dtype=torch.float64) * K**-0.5
        B[i, :, :r] = torch.randn(N, r, generator=g, dtype=torch.float64) * r**-0.5
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.25
    idx = torch.randint(0, n, (M,), generator=g)
    idx[torch.rand(M, generator=g) < p_none] = -1
    if lead is not None:
        x, idx = x.reshape(*lead, K), idx.reshape(lead)
    cast = dict(device=device, dtype=dtype)
    return x.to(**cast), A.to(**cast), B.to(**cast), s.float().to(device), idx.to(device)


def three_way(got, x, A, B, s, idx, atol):
    """|got - ref_hi| <= 2 |ref_lo - ref_hi| + atol, ref_hi in float64, ref_lo the reference in got's dtype."""
    K, N = x.shape[-1], B.shape[1]
    hi = multi_lora_loop_ref(x.reshape(-1, K).cpu(), A.cpu(), B.cpu(), s.cpu(), idx.reshape(-1).cpu())
    lo = multi_lora_ref(x.reshape(-1, K), A, B, s, idx.reshape(-1)).double().cpu()
    err = (got.reshape(-1, N).double().cpu() - hi).abs()
    bound = 2 * (lo - hi).abs() + atol
    assert torch.isfinite(got).all()
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst excess {(err - bound).max():.3g}"


# ------------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("ranks", [(1,), (7, 1, 5, 3, 7), (64, 16, 1, 33)], ids=["r1", "r1-7", "r1-64"])
@pytest.mark.parametrize("M", [1, 37], ids=["M1", "M37"])
def test_reference_equals_token_loop(M, ranks):
    x, A, B, s, idx = make_case(M=M, ranks=ranks, dtype=torch.float64, device="cpu")
    torch.testing.assert_close(multi_lora_ref(x, A, B, s, idx), multi_lora_loop_ref(x, A, B, s, idx),
                               rtol=1e-12, atol=1e-12)


def test_reference_rows_without_adapter_are_exact_zeros():
    x, A, B, s, idx = make_case(dtype=torch.float64, device="cpu", p_none=0.5)
    x[idx < 0] = float("inf")  # an untouched row must stay untouched even for non-finite inputs elsewhere
    out = torch.randn(x.shape[0], B.shape[1], dtype=torch.float64)
    before = out.clone()
    multi_lora_ref(x, A, B, s, idx, out)
    assert torch.equal(out[idx < 0], before[idx < 0])
    assert torch.isfinite(out[idx >= 0]).all()


def test_reference_is_differentiable_and_auto_falls_back_for_grad():
    x, A, B, s, idx = make_case(M=6, K=5, N=4, ranks=(2, 3), dtype=torch.float64, device="cpu", p_none=0.3)
    A.requires_grad_(True)
    B.requires_grad_(True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, a_, b_: multi_lora_ref(x_, a_, b_, s, idx), (x, A, B))
    with fa.use_backend("auto"):
        assert _registry.resolve("multi_lora_delta", x, A, B, s, idx, torch.zeros(6, 4, dtype=torch.float64))[0] \
            == "torch"


# ------------------------------------------------------------------------------------------------ functional op
CASES = {
    "M37-K72-N40-ranks1to7": dict(M=37, K=72, N=40, ranks=(7, 1, 5, 3, 7)),
    "decode-M8-8adapters": dict(M=8, K=64, N=48, ranks=(16,) * 8, p_none=0.0),
    "B3xL5-ranks1-64": dict(M=15, K=40, N=24, ranks=(1, 64, 16), lead=(3, 5)),
    "all-base": dict(M=9, K=32, N=16, ranks=(4, 4), p_none=1.0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_out", [False, True], ids=["delta", "out"])
def test_op_torch_backend(case, with_out, nan_poison):
    x, A, B, s, idx = make_case(**CASES[case])
    N = B.shape[1]
    out = torch.randn(*x.shape[:-1], N, device=x.device) if with_out else None
    base = out.clone() if with_out else 0
    with fa.use_backend("torch"):
        got = multi_lora_delta(x, A, B, s, idx, out=out)
    if with_out:
        assert got is out
    three_way(got - base, x, A, B, s, idx, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_op_triton_backend(case, triton_kernels, nan_poison):
    if triton_kernels is None:
        return  # ran in the interpreter child process (see the fixture)
    x, A, B, s, idx = make_case(**CASES[case])
    out = torch.randn(*x.shape[:-1], B.shape[1], device=x.device)
    base = out.clone()
    with fa.use_backend("triton"):
        got = multi_lora_delta(x, A, B, s, idx, out=out)
    three_way(got - base, x, A, B, s, idx, atol=1e-5)
    if CASES[case].get("p_none", 0.2) == 1.0:
        assert torch.equal(got, base)


@pytest.mark.parametrize("split_k", [1, 3], ids=["split1", "split3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_dtypes_split_and_strides(dtype, split_k, triton_kernels):
    if triton_kernels is None:
        return  # ran in the interpreter child process (see the fixture)
    x, A, B, s, idx = make_case(M=21, K=96, N=36, ranks=(5, 16, 2), dtype=dtype, seed=3)
    xt = torch.empty(x.shape[1], x.shape[0], device=x.device, dtype=dtype).t()  # non-contiguous x
    xt.copy_(x)
    out = torch.randn(36, 21, device=x.device).to(dtype).t()  # non-contiguous out, updated in place
    base = out.clone()
    with triton_kernels.use_config(split_k=split_k):
        triton_kernels.multi_lora_fwd(xt, A, B, s, idx, out)
    atol = 1e-5 if dtype == torch.float32 else 4 * EPS[dtype] * (base.abs().max().item() + 1)
    three_way(out.double() - base.double(), x, A, B, s, idx, atol=atol)


def test_triton_grouping_is_cached_per_index_tensor(triton_kernels):
    if triton_kernels is None:
        return  # ran in the interpreter child process (see the fixture)
    idx = torch.tensor([2, -1, 0, 2, 2, 1, 7], device=DEV)
    g1 = triton_kernels.group_tokens(idx, 3, 16)
    assert triton_kernels.group_tokens(idx, 3, 16) is g1
    assert g1.perm[: int(g1.seg_start[-1])].tolist() == [2, 5, 0, 3, 4]  # by adapter, stable; -1 and 7 last
    assert g1.seg_start.tolist() == [0, 1, 2, 5] and g1.tile_off.tolist() == [0, 1, 2, 3]
    idx[1] = 0  # in place: the version changes, the grouping is recomputed
    assert triton_kernels.group_tokens(idx, 3, 16).seg_start.tolist() == [0, 2, 3, 6]


def test_triton_path_is_a_custom_op_that_compiles(triton_kernels, nan_poison):
    """The Triton kernels run as torch.ops.fastadapters.multi_lora_sgmv_ (mutates out): callable directly, with a
    fake for tracing, and torch.compile(fullgraph=True) keeps it in one graph."""
    if triton_kernels is None:
        return  # ran in the interpreter child process (see the fixture)
    x, A, B, s, idx = make_case()
    out = torch.zeros(37, 40, device=x.device)
    torch.ops.fastadapters.multi_lora_sgmv_(x, A, B, s, idx, out)
    three_way(out, x, A, B, s, idx, atol=1e-5)

    def f(x, A, B, s, idx):
        o = torch.zeros(x.shape[0], B.shape[1], device=x.device, dtype=x.dtype)
        torch.ops.fastadapters.multi_lora_sgmv_(x, A, B, s, idx, o)
        return o * 2

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, A, B, s, idx)
    torch.testing.assert_close(got, out * 2, rtol=0, atol=0)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(A=a["A"][:, :, :-1]), r"lora_A_stack has shape \(5, 7, 71\) but x"),
        (lambda a: a.update(B=a["B"][:, :, :-1]), r"lora_B_stack has shape \(5, 40, 6\)"),
        (lambda a: a.update(A=a["A"][0]), r"lora_A_stack has shape \(7, 72\) \(2-d\) but must be 3-d"),
        (lambda a: a.update(B=a["B"].double()), "stack both in one dtype"),
        (lambda a: a.update(s=a["s"][:-1]), r"scalings has shape \(4,\) but must be \(n,\) = \(5,\)"),
        (lambda a: a.update(s=[1.0, 2.0]), "must hold 5 real numbers"),
        (lambda a: a.update(idx=a["idx"].float()), "must be int32 or int64"),
        (lambda a: a.update(idx=a["idx"][:-1]), r"token_adapter_idx has shape \(36,\) but x"),
        (lambda a: a.update(idx=torch.full_like(a["idx"], 5)), r"holds 5, outside \[-1, 5\)"),
        (lambda a: a.update(idx=torch.full_like(a["idx"], -2)), r"holds -2, outside \[-1, 5\)"),
        (lambda a: a.update(out=torch.zeros(37, 41)), r"out has shape \(37, 41\) but must be \(37, 40\)"),
        (lambda a: a.update(x=a["x"].long()), "must be floating point"),
    ],
    ids=["A-K", "B-R", "A-2d", "dtype-mix", "scalings-len", "scalings-list", "idx-float", "idx-len", "idx-high",
         "idx-low", "out-shape", "x-int"],
)
def test_op_bad_arguments(mutate, match):
    x, A, B, s, idx = make_case(device="cpu")
    a = dict(x=x, A=A, B=B, s=s, idx=idx, out=None)
    mutate(a)
    with pytest.raises(ValueError, match=match):
        multi_lora_delta(a["x"], a["A"], a["B"], a["s"], a["idx"], out=a["out"])


def test_triton_refuses_cpu_under_auto():
    x, A, B, s, idx = make_case(device="cpu")
    out = torch.zeros(x.shape[0], B.shape[1])
    with fa.use_backend("auto"):
        assert _registry.resolve("multi_lora_delta", x, A, B, s, idx, out)[0] == "torch"
    with fa.use_backend("triton"), pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(fa.ops.KernelUnavailableError, match="x is on the CPU"):
            multi_lora_delta(x, A, B, s, idx)


# ------------------------------------------------------------------------------------------------ models
ADAPTERS = {  # name: (rank, alpha, rslora, targets or None for the family's defaults)
    "small": (4, 8, False, None),
    "big": (64, 16, False, None),
    "one": (1, 3, True, None),
    "part": (16, 5, False, "first"),  # only some of the default targets
}
FAMILY_TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"],
                  "opt": ["q_proj", "v_proj", "fc1"]}


def multi_adapter_model(family="llama", dtype=torch.float32, seed=0):
    """A tiny model with the ADAPTERS (random A and B, different ranks, scalings and targets), eval mode."""
    torch.manual_seed(seed)
    targets = FAMILY_TARGETS[family]
    am = None
    for name, (r, alpha, rs, tm) in ADAPTERS.items():
        cfg = fa.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, init_lora_weights=False,
                            target_modules=targets[:1] if tm == "first" else targets)
        if am is None:
            am = fa.get_adapter_model(tiny_model(family, dtype=dtype), cfg, name)
        else:
            am.add_adapter(name, cfg)
    with torch.no_grad():  # B is random already (init_lora_weights=False); make the deltas clearly visible
        for p in am.adapter_parameters():
            p.mul_(2.0)
    return am.eval().to(DEV)


def alone(am, names, ids, mask):
    """Logits of each sequence run alone with its adapter (or the base model)."""
    rows = []
    for i, n in enumerate(names):
        kw = dict(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
        if n == "__base__":
            with am.disable_adapter():
                rows.append(am(**kw).logits)
        else:
            am.set_adapter(n)
            rows.append(am(**kw).logits)
    return torch.cat(rows)


NAMES = ["small", "__base__", "big", "one", "part", "small"]


@pytest.mark.filterwarnings("ignore:the LoRA targets include transformers Conv1D")
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_mixed_batch_equals_each_sequence_alone(family):
    am = multi_adapter_model(family)
    ids, mask = tiny_batch(len(NAMES), 9, left_pad=3)
    ids, mask = ids.to(DEV), mask.to(DEV)
    with torch.no_grad():
        mixed = am(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        ref = alone(am, NAMES, ids, mask)
        with am.disable_adapter():
            base = am(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(mixed[keep], ref[keep], rtol=1e-5, atol=1e-5)
    for i, n in enumerate(NAMES):  # every adapter changes its rows; __base__ rows are the base model's
        differs = not torch.allclose(mixed[i][keep[i]], base[i][keep[i]], atol=1e-3)
        assert differs == (n != "__base__"), n


def test_mixed_batch_triton_backend(triton_kernels):
    if triton_kernels is None:
        return  # ran in the interpreter child process (see the fixture)
    am = multi_adapter_model("llama")
    names = ["big", "__base__", "one", "part"]
    ids, mask = tiny_batch(len(names), 5, left_pad=2)
    ids, mask = ids.to(DEV), mask.to(DEV)
    with torch.no_grad():
        with fa.use_backend("triton"):
            got = am(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        with fa.use_backend("torch"):
            ref = am(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-4, atol=1e-4)


def test_mixed_batch_bf16_model_fp32_adapters():
    """PEFT's default dtype mix: bf16 base, fp32 adapters; the mixed batch casts like the single-adapter path."""
    torch.manual_seed(0)
    am = fa.get_adapter_model(tiny_model("llama", dtype=torch.bfloat16),
                              fa.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False), "x")
    am.add_adapter("y", fa.LoraConfig(r=2, lora_alpha=8, init_lora_weights=False))
    am.eval().to(DEV)
    assert am.base_model.model.layers[0].self_attn.q_proj.lora_A["x"].weight.dtype == torch.float32
    names = ["y", "x", "__base__"]
    ids, mask = tiny_batch(3, 6)
    with torch.no_grad():
        mixed = am(input_ids=ids.to(DEV), attention_mask=mask.to(DEV), adapter_names=names).logits
        ref = alone(am, names, ids.to(DEV), mask.to(DEV))
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), ref.float(), rtol=0.02, atol=0.02)


def test_mixed_batch_matches_peft_adapter_names():
    peft = pytest.importorskip("peft")
    am = multi_adapter_model("llama")
    pm = None
    for name, (r, alpha, rs, tm) in ADAPTERS.items():
        targets = FAMILY_TARGETS["llama"]
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, init_lora_weights=False,
                              target_modules=targets[:1] if tm == "first" else targets, task_type="CAUSAL_LM")
        if pm is None:
            pm = peft.get_peft_model(tiny_model("llama"), cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    pm = pm.eval().to(DEV)
    theirs = dict(pm.base_model.model.named_parameters())
    with torch.no_grad():
        for n, p in am.base_model.named_parameters():
            theirs[n].copy_(p)
    ids, mask = tiny_batch(len(NAMES), 7, left_pad=2)
    ids, mask = ids.to(DEV), mask.to(DEV)
    with torch.no_grad():
        ours = am(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        ref = pm(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beams2"])
def test_generate_mixed_equals_alone(beams):
    am = multi_adapter_model("llama")
    names = ["part", "__base__", "big"]
    ids, mask = tiny_batch(len(names), 6, seed=4)
    ids, mask = ids.to(DEV), mask.to(DEV)
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=beams, pad_token_id=0)
    with torch.no_grad():
        got = am.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
        for i, n in enumerate(names):
            one = dict(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], **kw)
            if n == "__base__":
                with am.disable_adapter():
                    ref = am.generate(**one)
            else:
                am.set_adapter(n)
                ref = am.generate(**one)
            assert torch.equal(got[i : i + 1, : ref.shape[1]], ref), n


def test_stacks_follow_weight_updates_and_deleted_adapters():
    am = multi_adapter_model("llama")
    names = ["small", "big"]
    ids, mask = tiny_batch(2, 5)
    ids, mask = ids.to(DEV), mask.to(DEV)
    with torch.no_grad():
        first = am(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for layer in am.base_model.model.layers:
            layer.self_attn.q_proj.lora_B["small"].weight.mul_(3.0)  # in place: the cached stacks must notice
        second = am(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        am.set_adapter("small")
        ref = am(input_ids=ids[:1], attention_mask=mask[:1]).logits
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(second[:1], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[1], second[1], rtol=1e-6, atol=1e-6)
    am.to(torch.float64)  # new storage and dtype: the stacks follow
    with torch.no_grad():
        third = am(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert third.dtype == torch.float64
    assert am.base_model.model.layers[0].self_attn.q_proj._stack_cache[1][0].dtype == torch.float64
    torch.testing.assert_close(third.float(), second, rtol=1e-4, atol=1e-4)
    am.delete_adapter("big")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['big'\]"):
        am(input_ids=ids, attention_mask=mask, adapter_names=names)


def test_disable_adapter_with_adapter_names_runs_base():
    am = multi_adapter_model("llama")
    ids, mask = tiny_batch(2, 5)
    ids, mask = ids.to(DEV), mask.to(DEV)
    with torch.no_grad(), am.disable_adapter():
        got = am(input_ids=ids, attention_mask=mask, adapter_names=["small", "big"]).logits
        base = am(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, base)


@pytest.mark.parametrize(
    "setup,names,exc,match",
    [
        (None, ["small", "nope"], ValueError, r"unknown adapter\(s\) \['nope'\].*'__base__' for no adapter"),
        (None, ["small"], ValueError, "adapter_names has 1 names but the batch has 2 sequences"),
        (None, ["small"] * 3, ValueError, "adapter_names has 3 names but the batch has 2 sequences"),
        (None, "small", TypeError, "must be a list of adapter names"),
        (None, ["small", 3], TypeError, "holds 3"),
        ("merge", ["small", "big"], ValueError, r"merged into the base weights.*unmerge_adapter"),
        ("train", ["small", "big"], ValueError, r"for inference: call model.eval\(\)"),
    ],
    ids=["unknown", "too-few", "too-many", "string", "non-string", "merged", "training"],
)
def test_mixed_batch_errors(setup, names, exc, match):
    am = multi_adapter_model("llama")
    ids, mask = tiny_batch(2, 5)
    if setup == "merge":
        am.set_adapter("small")
        am.merge_adapter()
    elif setup == "train":
        am.train()
    with pytest.raises(exc, match=match):
        am(input_ids=ids.to(DEV), attention_mask=mask.to(DEV), adapter_names=names)
    with pytest.raises(exc, match=match):
        am.generate(input_ids=ids.to(DEV), attention_mask=mask.to(DEV), adapter_names=names, max_new_tokens=1)


def test_adapter_names_on_a_non_lora_model_is_a_clear_error():
    am = fa.get_adapter_model(tiny_model("llama"), fa.BottleneckConfig(bottleneck_size=8)).eval()
    ids, mask = tiny_batch(2, 5)
    with pytest.raises(ValueError, match="adapter_names .* works with LoRA adapters"):
        am(input_ids=ids, attention_mask=mask, adapter_names=["default", "__base__"])


# ------------------------------------------------------------------------------------------------ benchmark
def test_benchmark_smoke_writes_the_table(tmp_path):
    """benchmarks/bench_multi_lora.py --smoke on the CPU: every provider of the issue's table runs and writes rows
    (times measured here mean nothing)."""
    import csv

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:  # `python -m pytest` has it (the cwd); the pytest script does not
        sys.path.insert(0, repo)
    from benchmarks import bench_multi_lora

    threads = torch.get_num_threads()
    try:
        rc = bench_multi_lora.run(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["op"] == "multi_lora"]
    assert rc == 0
    got = {(r["mode"], r["provider"]) for r in rows if r["metric"] in ("ms", "ms/token")}
    for case in ("prefill", "decode"):
        assert {(case, p) for p in ("no_adapter", "one_peft", "one", "mixed8_peft", "mixed8")} <= got
    assert {("generate", p) for p in ("no_adapter", "one_peft", "one")} <= got
    assert {(r["mode"], r["provider"]) for r in rows if r["metric"] == "x_one"} == {
        (c, p) for c in ("prefill", "decode") for p in ("mixed8", "mixed8_peft")}


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("M", [32, 2048], ids=["decode32", "prefill2048"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_real_shapes_all_backends(M, dtype):
    x, A, B, s, idx = make_case(M=M, K=4096, N=4096, ranks=(16, 8, 64, 1, 16, 16, 32, 4), dtype=dtype,
                                p_none=0.1, device="cuda")
    out0 = torch.randn(M, 4096, device="cuda", dtype=dtype)
    tol = 4 * EPS[dtype] * (out0.abs().max().item() + 1)
    for backend in ("triton", "cuda", "auto"):
        out = out0.clone()
        with fa.use_backend(backend):
            multi_lora_delta(x, A, B, s, idx, out=out)
        three_way(out.double() - out0.double(), x, A, B, s, idx, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_cuda_graph_capture(backend):
    """No host sync: the op captures into a CUDA graph and replays with new indices in the same buffer."""
    x, A, B, s, idx = make_case(M=32, K=512, N=256, ranks=(16,) * 8, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros(32, 256, device="cuda", dtype=torch.bfloat16)
    with fa.use_backend(backend):
        multi_lora_delta(x, A, B, s, idx, out=out)  # warm-up: compile / build outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.zero_()
            multi_lora_delta(x, A, B, s, idx, out=out)
    idx.copy_(torch.flip(idx, [0]))
    graph.replay()
    torch.cuda.synchronize()
    three_way(out, x, A, B, s, idx, atol=1e-2)
