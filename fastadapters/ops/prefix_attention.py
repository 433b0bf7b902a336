"""Functional prefix attention: checks and backend dispatch."""

from __future__ import annotations

import numbers

import torch

from ..kernels.prefix_attention_ref import prefix_attention_ref
from . import _registry
from ._utils import check_same, check_tensor, fmt_shape

_registry.register_reference("prefix_attention", prefix_attention_ref)
from . import prefix_attention_triton  # noqa: E402, F401  (registers the "triton" kernel; imports no triton until called)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over [prefix ; tokens], the prefix shared by the batch and seen by every query.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Hq a multiple of Hkv (GQA: query head h reads kv head
    h // (Hq // Hkv)); prefix_k, prefix_v: (Hkv, P, D), P >= 0, or both None. With causal=True the queries are
    the last Lq of the Lk positions (Lq <= Lk: decoding with a KV cache) and query i sees tokens up to its own
    position. key_padding_mask: (B, Lk) bool, True = real token; it never hides the prefix. scale defaults to
    1/sqrt(D). A query that sees no key returns 0. Softmax in fp32. Returns out (B, Hq, Lq, D) in q's dtype,
    and with return_lse also lse (B, Hq, Lq) (fp32, or float64 for float64 inputs; -inf for rows with no key).
    """
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if (Bk, Dk) != (B, D) or Hkv <= 0:
        raise ValueError(f"k has shape {fmt_shape(k.shape)} but q {fmt_shape(q.shape)} needs (B, Hkv, Lk, D) = "
                         f"({B}, Hkv, Lk, {D})")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v has shape {fmt_shape(v.shape)} but must match k {fmt_shape(k.shape)} (B, Hkv, Lk, D)")
    if Hq % Hkv:
        raise ValueError(f"q has {Hq} heads and k/v have {Hkv}: the query heads must be a multiple of the kv heads")
    if not isinstance(causal, bool):
        raise ValueError(f"causal={causal!r} must be a bool")
    if causal and Lq > Lk:
        raise ValueError(f"q has Lq={Lq} positions but k/v have Lk={Lk}: with causal=True the queries are the last "
                         "Lq of the Lk positions, so Lq <= Lk (append the new tokens to the KV cache first)")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("pass prefix_k and prefix_v together (or both None for no prefix)")
    if prefix_k is not None:
        check_tensor("prefix_k", prefix_k, 3)
        check_tensor("prefix_v", prefix_v, 3)
        P = prefix_k.shape[1]
        if prefix_k.shape[0] != Hkv or prefix_k.shape[2] != D:
            raise ValueError(f"prefix_k has shape {fmt_shape(prefix_k.shape)} but the attention expects "
                             f"(Hkv, P, D) = ({Hkv}, P, {D}) (one prefix per kv head, shared by the batch)")
        if tuple(prefix_v.shape) != tuple(prefix_k.shape):
            raise ValueError(f"prefix_v has shape {fmt_shape(prefix_v.shape)} but must match prefix_k "
                             f"{fmt_shape(prefix_k.shape)} = (Hkv, P, D) with P={P}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            what = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask)
            raise ValueError(f"key_padding_mask has dtype {what} but must be a bool tensor (True = real token); "
                             "convert an attention_mask with .bool()")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask has shape {fmt_shape(key_padding_mask.shape)} but the attention "
                             f"expects (B, Lk) = ({B}, {Lk}) (token keys only, not the prefix)")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not float(scale) > 0:
            raise ValueError(f"scale={scale!r} must be a positive float (or None for 1/sqrt(D))")
        scale = float(scale)
    check_same("q", q, {"k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v})
    check_same("q", q, {"key_padding_mask": key_padding_mask}, dtype=False)

    return _registry.dispatch("prefix_attention", q, k, v, prefix_k, prefix_v, causal, scale, key_padding_mask,
                              return_lse)
