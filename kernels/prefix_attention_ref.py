"""Pure-PyTorch reference for prefix attention: the spec a fused `prefix_attention` kernel is tested against.

Attention of q over [prefix ; tokens]: the learned prefix keys/values (one set per kv head, shared by the batch)
are seen by every query; token keys follow the causal rule and the padding mask. The scores are materialised
(O(Lq * (P + Lk)) memory): fine for a reference and for the CPU path, not for long sequences.

Conventions a kernel must match:
  * queries are the LAST Lq of the Lk token positions (decode with a KV cache), so with causal=True query i
    (0-based) sees tokens j <= Lk - Lq + i (bottom-right alignment), plus the whole prefix;
  * GQA: query head h reads kv head h // (Hq // Hkv) (HF's repeat_kv order);
  * key_padding_mask (B, Lk) bool, True = real token; it never hides the prefix;
  * a row that sees no key at all (P == 0 and every visible token padded) gives output 0 and lse -inf;
  * softmax in fp32 (float64 inputs stay float64); output in q's dtype, lse (B, Hq, Lq) in the compute dtype.
"""

from __future__ import annotations

import math

import torch


def prefix_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q [prefix_k; k]^T * scale + mask) [prefix_v; v].

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D); prefix_k, prefix_v: (Hkv, P, D) or None (P may be 0);
    key_padding_mask: (B, Lk) bool or None; scale defaults to 1/sqrt(D).
    Returns out (B, Hq, Lq, D) in q's dtype, and lse (B, Hq, Lq) (log-sum-exp of the scaled scores over every
    visible key, prefix included) when return_lse.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    compute = torch.promote_types(q.dtype, torch.float32)
    kk, vv = k.to(compute), v.to(compute)
    P = 0 if prefix_k is None else prefix_k.shape[1]
    if P:
        kk = torch.cat([prefix_k.to(compute).unsqueeze(0).expand(B, -1, -1, -1), kk], dim=2)
        vv = torch.cat([prefix_v.to(compute).unsqueeze(0).expand(B, -1, -1, -1), vv], dim=2)
    group = Hq // Hkv
    if group > 1:
        kk = kk.repeat_interleave(group, dim=1)
        vv = vv.repeat_interleave(group, dim=1)

    scores = torch.matmul(q.to(compute), kk.transpose(-1, -2)) * scale  # (B, Hq, Lq, P + Lk)

    visible = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        q_pos = torch.arange(Lk - Lq, Lk, device=q.device).unsqueeze(1)
        k_pos = torch.arange(Lk, device=q.device).unsqueeze(0)
        visible = visible & (k_pos <= q_pos)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.to(torch.bool)[:, None, None, :]
    if P:
        visible = torch.cat([visible.new_ones(B, 1, Lq, P), visible], dim=-1)
    scores = scores.masked_fill(~visible, float("-inf"))

    if scores.shape[-1] == 0:  # no key at all (P = 0, Lk = 0): every row sees nothing
        scores = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
        vv = vv.new_zeros((*vv.shape[:2], 1, vv.shape[-1]))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    has_key = torch.isfinite(row_max)
    row_max = torch.where(has_key, row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)  # exp(-inf) = 0 on hidden keys
    denom = p.sum(dim=-1, keepdim=True)
    safe_denom = torch.where(has_key, denom, torch.ones_like(denom))
    out = torch.matmul(p, vv) / safe_denom
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(has_key, row_max + torch.log(safe_denom), torch.full_like(denom, float("-inf")))
    return out, lse.squeeze(-1)
