"""Multi-LoRA: 8 LoRA adapters mixed in one batch (issue 8's table), ours side by side with HF PEFT.

Two Llama-7B-shaped decoder layers with the lm_head (benchmarks/models.py, random weights), LoRA r=16 on q,k,v,o,
eight adapters loaded (random A and B; both libraries' adapters cast to the model dtype, bf16 on a GPU), one call:
  decode    one step of batch 32 x 1 token on a static KV cache holding a 512-token prompt (every call first
            rewinds the cache's length counter: one tiny fill per layer, the same for every provider)
  prefill   batch 32 x 512 tokens (no cache)
  generate  per-token time of greedy generate() at batch 1 (64 new tokens, 32-token prompt; prefill subtracted)
Providers (shape column: case=..., rows ms + x_floor against no_adapter):
  no_adapter                  the bare model: the floor
  one_peft / one              one adapter active, unmerged: PEFT / ours (backend auto)
  mixed8_peft / mixed8        each sequence its own adapter (adapter_names=[...]): PEFT / ours (backend auto)
  mixed8_triton, mixed8_cuda  decode only: our two kernel paths forced (Triton grouped kernels / the CUDA BGMV
                              extension), to see which one "auto" should pick
  *_graph                     decode only, CUDA: the step captured in a CUDA graph and replayed (no launch cost)
Ratio rows, metric "x_one": mixed / one adapter of the same library (issue goal <= 1.10; PEFT 5.3x decode);
x_floor of one / one_peft is the goal one <= 1.05 x no_adapter (decode, prefill, generate).
Also rows of provider "extension": metric "build_s", the C++/CUDA extension's build time (this run's, or the one
recorded when the cached build was made: the shape column gives its date), and "load_s", this run's load time.

    python -m benchmarks.bench_multi_lora [--preset smoke|quick|full] [--device cpu] [--out DIR]
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

import fastadapters as fa
from benchmarks import common, models

OP = "multi_lora"
N_ADAPTERS = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MIN_MS = 1e-6
PRESETS = {
    "smoke": {"size": "tiny", "layers": 2, "r": 4, "batch": 4, "prefill": 8, "ctx": 8, "prompt": 8, "new": 4,
              "reps": 1, "graphs": False},
    "quick": {"size": "llama7b", "layers": 2, "r": 16, "batch": 32, "prefill": 512, "ctx": 512, "prompt": 32,
              "new": 64, "reps": 2, "graphs": True},
    "full": {"size": "llama7b", "layers": 2, "r": 16, "batch": 32, "prefill": 512, "ctx": 512, "prompt": 32,
             "new": 128, "reps": 5, "graphs": True},
}


def adapter_names(n: int = N_ADAPTERS) -> list[str]:
    return [f"task{i}" for i in range(n)]


def ours(base: nn.Module, r: int, dtype: torch.dtype) -> fa.AdapterModel:
    """A copy of `base` with our 8 LoRA adapters (random weights), in `dtype`, eval mode."""
    am = None
    for name in adapter_names():
        cfg = fa.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
        if am is None:
            am = fa.get_adapter_model(copy.deepcopy(base), cfg, name)
        else:
            am.add_adapter(name, cfg)
    return am.to(dtype).eval()


def peft_like(base: nn.Module, am: fa.AdapterModel, r: int, dtype: torch.dtype) -> nn.Module:
    """HF PEFT's model with the same 8 adapters (weights copied from `am`), in `dtype`, eval mode."""
    import peft

    pm = None
    for name in adapter_names():
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    pm = pm.to(dtype).eval()
    theirs = dict(pm.base_model.model.named_parameters())
    with torch.no_grad():
        for n, p in am.base_model.named_parameters():
            if ".lora_" in n:
                theirs[n].copy_(p)
    return pm


def static_cache(model: nn.Module, batch: int, length: int, ctx: int, device: torch.device, ids: torch.Tensor):
    """A StaticCache of `length` slots holding the first `ctx` tokens of `ids` (run through `model` once)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=length)
    with torch.no_grad():
        model(input_ids=ids[:, :ctx], past_key_values=cache, use_cache=True,
              cache_position=torch.arange(ctx, device=device))
    return cache


def graphed(step: Callable[[], Any], enter: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], None]:
    """`step` captured in a CUDA graph (warm-up on a side stream, then capture) under `enter()`; returns replay."""
    with enter():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return graph.replay


def bench(rec: common.Recorder, ctx: common.Context, cfg: dict) -> None:
    """no_adapter first in each case (the floor), then one adapter and 8 mixed, PEFT's and ours."""
    from fastadapters import ext

    layers = ctx.layers or cfg["layers"]
    device, dtype, r, B = ctx.device, ctx.dtype, cfg["r"], cfg["batch"]
    t0 = time.perf_counter()
    mod = ext.load(build=device.type == "cuda")  # the CPU smoke run only imports a cached build
    seconds = time.perf_counter() - t0
    st = ext.status(load_cached=False)
    if mod is not None:  # the build time (this run's, or the one recorded with the cached build) and this load's
        if st["build_seconds"] is not None:
            rec.add("extension", "build", f"with_cuda={st['with_cuda']} built={st['built']}", dtype, "build_s",
                    st["build_seconds"])
        rec.add("extension", "load", f"with_cuda={st['with_cuda']} cached={st['cached']}", dtype, "load_s", seconds)
    else:
        rec.note(f"C++/CUDA extension not loaded ({st['error'] or 'not built'}): Triton / torch paths only")

    base = models.llama(cfg["size"], layers, device, dtype).requires_grad_(False).eval()
    vocab = base.config.vocab_size
    am = ours(base, r, dtype)
    pm = None
    try:
        pm = peft_like(base, am, r, dtype)
    except Exception as e:  # PEFT missing or incompatible: our rows still come
        rec.note(f"peft: skipped ({type(e).__name__}: {e})")
    names = adapter_names()
    mixed_names = [names[i % N_ADAPTERS] for i in range(B)]
    one = names[0]

    def use_one(model: nn.Module) -> nn.Module:
        model.set_adapter(one)
        return model

    no_grad = torch.no_grad
    auto: Callable[[], Any] = lambda: fa.use_backend("auto")  # noqa: E731
    calls: dict[str, tuple[nn.Module, dict, Callable[[], Any]]] = {"no_adapter": (base, {}, contextlib.nullcontext)}
    calls["one_peft"] = (pm, {}, contextlib.nullcontext)
    calls["one"] = (am, {}, auto)
    calls["mixed8_peft"] = (pm, {"adapter_names": mixed_names}, contextlib.nullcontext)
    calls["mixed8"] = (am, {"adapter_names": mixed_names}, auto)

    def shape(case: str, **kw: Any) -> str:
        extra = " ".join(f"{k}={v}" for k, v in kw.items())
        return f"case={case} layers={layers} r={r} adapters={N_ADAPTERS} {extra}"

    # ---- prefill: batch B x prefill tokens
    ids = models.random_ids(B, cfg["prefill"], vocab, device)
    timings: dict[str, common.Timing] = {}

    def run_case(case: str, providers: Sequence[str], make: Callable[[str], Callable[[], Any]], tokens: int,
                 label: str) -> None:
        for prov in providers:
            model = calls[prov][0]
            if model is None:
                continue

            def one_provider(prov: str = prov) -> None:
                fn = make(prov)
                t = common.bench(fn, device, **ctx.budget)
                timings[f"{case}/{prov}"] = t
                floor = timings.get(f"{case}/no_adapter") if prov != "no_adapter" else None
                common.record(rec, prov, case, label, dtype, t, peak=common.peak_memory(fn, device), tokens=tokens,
                              floor=floor)

            rec.run(f"{OP} {case} {prov}", one_provider)
        for lib in ("", "_peft"):
            mixed, single = timings.get(f"{case}/mixed8{lib}"), timings.get(f"{case}/one{lib}")
            if mixed and single:
                rec.add(f"mixed8{lib}", case, label, dtype, "x_one", mixed.p50 / single.p50, mixed.p20 / single.p50,
                        mixed.p80 / single.p50)

    def forward_call(prov: str, ids: torch.Tensor, **more: Any) -> Callable[[], Any]:
        model, kw, backend = calls[prov]
        if prov.startswith("one"):
            use_one(model)

        def call() -> Any:
            with no_grad(), backend():
                return model(input_ids=ids, use_cache=False, **kw, **more).logits

        return call

    providers = ["no_adapter", "one_peft", "one", "mixed8_peft", "mixed8"]
    run_case("prefill", providers, lambda p: forward_call(p, ids), B * cfg["prefill"],
             shape("prefill", B=B, L=cfg["prefill"], tokens=B * cfg["prefill"]))
    common.free_memory(device)

    # ---- decode: one step of B x 1 token on a static cache of ctx tokens
    length = cfg["ctx"] + 1
    step_ids = models.random_ids(B, 1, vocab, device, seed=2)
    pos = torch.tensor([cfg["ctx"]], device=device)
    prompt_ids = models.random_ids(B, cfg["ctx"], vocab, device, seed=3)
    caches: dict[int, Any] = {}

    def rewind(cache: Any) -> None:
        """Back to ctx cached tokens (a StaticCache counts its length up at every step): every call is alike."""
        for layer in cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(cfg["ctx"])

    def decode_call(prov: str) -> Callable[[], Any]:
        model, kw, backend = calls[prov]
        if prov.startswith("one"):
            use_one(model)
        if id(model) not in caches:  # one cache per model; each step rewrites the same slot, so every call is alike
            caches[id(model)] = static_cache(model, B, length, cfg["ctx"], device, prompt_ids)
        cache = caches[id(model)]

        def call() -> Any:
            rewind(cache)
            with no_grad(), backend():
                return model(input_ids=step_ids, past_key_values=cache, use_cache=True, cache_position=pos,
                             **kw).logits

        return call

    label = shape("decode", B=B, L=1, ctx=cfg["ctx"], tokens=B)
    run_case("decode", providers, decode_call, B, label)
    # our two kernel paths forced, for the auto choice
    for backend_name in ("triton", "cuda"):
        prov = f"mixed8_{backend_name}"
        calls[prov] = (am, {"adapter_names": mixed_names}, lambda b=backend_name: fa.use_backend(b))
        if device.type != "cuda":
            rec.note(f"{prov}: GPU only")
            continue
        try:
            with no_grad(), fa.use_backend(backend_name):
                decode_call(prov)()
        except fa.ops.KernelUnavailableError as e:
            rec.note(f"{prov}: skipped ({e})")
            continue
        run_case("decode", [prov], decode_call, B, label)

    # CUDA graphs of the decode step: ours (one, mixed) and the floor
    if device.type == "cuda" and cfg["graphs"]:
        for prov in ("no_adapter", "one", "mixed8"):
            model, kw, backend = calls[prov]
            if prov == "one":
                use_one(model)
            cache = caches.get(id(model))
            if cache is None:
                continue

            def step(model: nn.Module = model, cache: Any = cache) -> Any:
                rewind(cache)
                with no_grad():
                    return (model.base_model if isinstance(model, fa.AdapterModel) else model)(
                        input_ids=step_ids, past_key_values=cache, use_cache=True, cache_position=pos).logits

            def enter(prov: str = prov, model: nn.Module = model, backend=backend) -> contextlib.ExitStack:
                stack = contextlib.ExitStack()
                stack.enter_context(backend())
                if prov == "mixed8":  # the per-call setup (names -> index tensor) stays outside the graph
                    stack.enter_context(model._methods["LORA"].mixed_batch(model, mixed_names, B))
                return stack

            try:
                replay = graphed(step, enter)
            except Exception as e:  # capture is an experiment: a note, the eager rows stand
                rec.note(f"{prov}_graph: capture failed ({type(e).__name__}: {str(e)[:200]})")
                continue
            prov_g = f"{prov}_graph"

            def timed(prov_g: str = prov_g, replay: Callable[[], None] = replay) -> None:
                t = common.bench(replay, device, **ctx.budget)
                timings[f"decode/{prov_g}"] = t
                common.record(rec, prov_g, "decode", label, dtype, t, tokens=B,
                              floor=timings.get("decode/no_adapter_graph") if prov_g != "no_adapter_graph" else None)

            rec.run(f"{OP} decode {prov_g}", timed)
        mixed, single = timings.get("decode/mixed8_graph"), timings.get("decode/one_graph")
        if mixed and single:
            rec.add("mixed8_graph", "decode", label, dtype, "x_one", mixed.p50 / single.p50)
    caches.clear()
    common.free_memory(device)

    # ---- generate: per-token time at batch 1 (one adapter, unmerged)
    gen_ids = models.random_ids(1, cfg["prompt"], vocab, device, seed=4)
    new = cfg["new"]
    label = shape("generate", B=1, prompt=cfg["prompt"], new=new, tokens=1)
    gen_floor: dict[str, common.Timing] = {}
    for prov in ("no_adapter", "one_peft", "one"):
        model, _, backend = calls[prov]
        if model is None:
            continue
        if prov.startswith("one"):
            use_one(model)

        def make(n: int, model: nn.Module = model, backend=backend) -> Callable[[], None]:
            def call() -> None:
                with no_grad(), backend():
                    model.generate(input_ids=gen_ids, attention_mask=torch.ones_like(gen_ids), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, pad_token_id=0)

            return call

        def one_provider(prov: str = prov, make=make) -> None:
            full = common.bench(make(new), device, reps=cfg["reps"], warmup=1)
            first = common.bench(make(1), device, reps=cfg["reps"], warmup=1)
            per_token = full.map(lambda ms: max(ms - first.p50, MIN_MS) / (new - 1))
            if prov == "no_adapter":
                gen_floor["t"] = per_token
            common.record(rec, prov, "generate", label, dtype, per_token, tokens=1, floor=gen_floor.get("t")
                          if prov != "no_adapter" else None, metric="ms/token")

        rec.run(f"{OP} generate {prov}", one_provider)


def run(argv: Sequence[str] | None = None) -> int:
    """The driver (benchmarks/run.py) with this op only; `argv` takes the driver's options (--smoke, --out, ...)."""
    from benchmarks.run import main_for

    return main_for("multi_lora", argv)


if __name__ == "__main__":
    sys.exit(run())
