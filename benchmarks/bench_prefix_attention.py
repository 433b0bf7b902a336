"""Prefix attention: causal attention of L queries over [P prefix keys ; L keys], prefix shared by the batch.

Shape of a 7B-class layer in training: B=8, H=32, L=2048, D=128, P=30 virtual tokens.
Providers, each in fwd / bwd / fwd+bwd:
  floor            SDPA causal on the tokens alone (no prefix): what attention costs at least
  sdpa_lower_right SDPA on cat(prefix, k) with torch.nn.attention.bias.causal_lower_right (no dense mask)
  sdpa_mask        SDPA on cat(prefix, k) with a dense boolean (L, P+L) mask (what HF models do today)
  flex_attention   torch.compile'd FlexAttention on cat(prefix, k) with a prefix + causal block mask (CUDA only:
                   no backward on the CPU; skipped with a note where it does not compile)
  reference        fa.ops.prefix_attention on the "torch" backend
  fused            the "triton" backend ("cuda" too where registered; skipped with a note while no kernel is
                   registered or it refuses the inputs)

Napkin math: QK^T and PV over the visible pairs, 4*B*H*D*(L*(L+1)/2 + L*P) FLOPs forward; backward 2.5x that
(flash-style recompute), so fwd+bwd = 3.5x. P=30 adds ~3 % FLOPs at L=2048: a prefix kernel should sit within a
few % of the floor, while the cat costs a copy of K and V and the dense mask costs an extra (L, P+L) read and
loses the flash kernel.

    python -m benchmarks.bench_prefix_attention [--preset smoke|quick|full] [--device cpu] [--out DIR]   (driver)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import fastadapters as fa
from benchmarks import common

OP = "prefix_attention"
MODES = common.MODES
PRESETS = {  # shapes (B, H, L, D, P)
    "smoke": {"shapes": [(1, 2, 64, 16, 4)]},
    "quick": {"shapes": [(8, 32, 2048, 128, 30)]},
    "full": {"shapes": [(8, 32, 2048, 128, 30), (2, 32, 8192, 128, 30)]},
}


def attention_flops(B: int, H: int, L: int, D: int, P: int) -> dict[str, float]:
    """Useful FLOPs per mode of causal attention with P always-visible prefix keys."""
    fwd = 4.0 * B * H * D * (L * (L + 1) / 2 + L * P)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}


def prefix_mask(L: int, P: int, device: torch.device) -> torch.Tensor:
    """(L, P+L) bool, True = attend: every prefix column, and token j <= i."""
    return torch.ones(L, P + L, dtype=torch.bool, device=device).tril(P)


def prefix_mask_mod(P: int) -> Callable:
    """FlexAttention mask_mod of the same rule on [prefix ; tokens] keys: a prefix key, or token kv - P <= q."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < P) | (kv_idx <= q_idx + P)

    return mask_mod


def flex_call(q: torch.Tensor, kc: Callable[[], torch.Tensor], vc: Callable[[], torch.Tensor], L: int,
              P: int) -> Callable[[], torch.Tensor]:
    """torch.compile'd flex_attention of q over kc(), vc() (B, H, P+L, D) with the prefix block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(prefix_mask_mod(P), None, None, L, P + L, device=q.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, kc(), vc(), block_mask=block_mask)


def bench_shape(rec: common.Recorder, ctx: common.Context, B: int, H: int, L: int, D: int, P: int) -> None:
    """Every provider at one shape; the floor is SDPA causal without the prefix."""
    device, dtype, budget = ctx.device, ctx.dtype, ctx.budget
    torch.manual_seed(0)
    shape = f"B={B} H={H} L={L} D={D} P={P}"

    def t(*s: int) -> torch.Tensor:
        return torch.randn(*s, device=device, dtype=dtype, requires_grad=True)

    q, k, v = t(B, H, L, D), t(B, H, L, D), t(B, H, L, D)
    pk, pv = t(H, P, D), t(H, P, D)
    flops = attention_flops(B, H, L, D, P)
    floor = common.measure(rec, "floor", f"B={B} H={H} L={L} D={D} P=0", dtype,
                           lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], MODES,
                           budget, flops=attention_flops(B, H, L, D, 0))
    grads = [q, k, v, pk, pv]
    bias = causal_lower_right(L, P + L)
    mask = prefix_mask(L, P, device)

    def kc() -> torch.Tensor:
        return torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)

    def vc() -> torch.Tensor:
        return torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)

    def op(backend: str) -> torch.Tensor:
        with fa.use_backend(backend):
            return fa.ops.prefix_attention(q, k, v, pk, pv, causal=True)

    providers: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("sdpa_lower_right", lambda: F.scaled_dot_product_attention(q, kc(), vc(), attn_mask=bias)),
        ("sdpa_mask", lambda: F.scaled_dot_product_attention(q, kc(), vc(), attn_mask=mask)),
        ("reference", lambda: op("torch")),
    ]
    providers += [(name, lambda b=backend: op(b)) for name, backend in common.fused_providers(rec, op)]
    if device.type != "cuda":
        rec.note("flex_attention: skipped, FlexAttention has no backward on the CPU")
    else:
        try:
            flex = flex_call(q, kc, vc, L, P)
            flex().sum().backward()  # compiles forward and backward here, so a failure is a skip, not an error
        except Exception as e:  # torch.compile / inductor refusing this shape or this machine
            rec.note(f"flex_attention: skipped, it did not compile ({type(e).__name__}: {str(e)[:200]})")
        else:
            providers.append(("flex_attention", flex))
    for name, fn in providers:
        common.measure(rec, name, shape, dtype, fn, grads, MODES, budget, flops=flops, floor=floor)


def bench(rec: common.Recorder, ctx: common.Context, cfg: dict) -> None:
    """Every provider at each (B, H, L, D, P) of the preset `cfg` (see PRESETS)."""
    for B, H, L, D, P in cfg["shapes"]:
        bench_shape(rec, ctx, B, H, L, D, P)


def run(argv: Sequence[str] | None = None) -> int:
    """The driver (benchmarks/run.py) with this op only; `argv` takes the driver's options."""
    from benchmarks.run import main_for

    return main_for("prefix_attention", argv)


if __name__ == "__main__":
    sys.exit(run())
