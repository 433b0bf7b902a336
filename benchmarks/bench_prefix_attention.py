"""Prefix attention: causal attention of L queries over [P prefix keys ; L keys], prefix shared by the batch.

Shape of a 7B-class layer in training: B=8, H=32, L=2048, D=128, P=30 virtual tokens.
Providers:
  floor            SDPA causal on the tokens alone (no prefix): what attention costs at least
  sdpa_lower_right SDPA on cat(prefix, k) with torch.nn.attention.bias.causal_lower_right (no dense mask)
  sdpa_mask        SDPA on cat(prefix, k) with a dense boolean (L, P+L) mask (what HF models do today)
  reference        fa.ops.prefix_attention on the "torch" backend
  fused            the "triton" backend (skipped with a note while no kernel is registered)

Napkin math: QK^T and PV over the visible pairs, 4*B*H*D*(L*(L+1)/2 + L*P) FLOPs forward; backward 2.5x that
(flash-style recompute), so fwd+bwd = 3.5x. P=30 adds ~3 % FLOPs at L=2048: a prefix kernel should sit within a
few % of the floor, while the cat costs a copy of K and V and the dense mask costs an extra (L, P+L) read and
loses the flash kernel.

    python -m benchmarks.bench_prefix_attention [--quick] [--smoke --device cpu] [--out DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import fastadapters as fa
from benchmarks import common

OP = "prefix_attention"
MODES = ("fwd", "fwd+bwd")


def presets(args) -> dict:
    if args.smoke:
        return {"shapes": [(1, 2, 64, 16, 4)]}
    if args.quick:
        return {"shapes": [(8, 32, 2048, 128, 30)]}
    return {"shapes": [(8, 32, 2048, 128, 30), (2, 32, 8192, 128, 30)]}


def attention_flops(B: int, H: int, L: int, D: int, P: int) -> dict[str, float]:
    """Useful FLOPs per mode of causal attention with P always-visible prefix keys."""
    fwd = 4.0 * B * H * D * (L * (L + 1) / 2 + L * P)
    return {"fwd": fwd, "fwd+bwd": 3.5 * fwd}


def prefix_mask(L: int, P: int, device: torch.device) -> torch.Tensor:
    """(L, P+L) bool, True = attend: every prefix column, and token j <= i."""
    return torch.ones(L, P + L, dtype=torch.bool, device=device).tril(P)


def bench_shape(rec: common.Recorder, B: int, H: int, L: int, D: int, P: int, dtype: torch.dtype,
                budget: dict[str, float], has_fused: bool) -> None:
    """Every provider at one shape; the floor is SDPA causal without the prefix."""
    device = rec.device
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

    def sdpa_on_cat(attn_mask: torch.Tensor) -> torch.Tensor:
        kc = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
        vc = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=attn_mask)

    def op(backend: str) -> torch.Tensor:
        with fa.use_backend(backend):
            return fa.ops.prefix_attention(q, k, v, pk, pv, causal=True)

    for name, fn in (("sdpa_lower_right", lambda: sdpa_on_cat(bias)), ("sdpa_mask", lambda: sdpa_on_cat(mask)),
                     ("reference", lambda: op("torch"))):
        common.measure(rec, name, shape, dtype, fn, grads, MODES, budget, flops=flops, floor=floor)
    if has_fused:
        try:
            op("triton")
        except fa.ops.KernelUnavailableError as e:
            rec.note(f"fused (triton) {shape}: skipped ({e})")
        else:
            common.measure(rec, "fused", shape, dtype, lambda: op("triton"), grads, MODES, budget, flops=flops,
                           floor=floor)


def run(argv: Sequence[str] | None = None) -> int:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    device, dtype, budget = common.setup(args)
    rec = common.Recorder(OP, device)
    has_fused = common.backend_available(OP, "triton")
    if not has_fused:
        rec.note("fused (triton): skipped, no triton kernel is registered for prefix_attention yet")
    for B, H, L, D, P in presets(args)["shapes"]:
        bench_shape(rec, B, H, L, D, P, dtype, budget, has_fused)
    return rec.finish(args.out)


if __name__ == "__main__":
    sys.exit(run())
