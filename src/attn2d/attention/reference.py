"""Single-device float64 reference attention: the oracle every distributed algorithm is tested against."""
from __future__ import annotations

import math

import torch


def reference_attention(q, k, v, causal: bool = True, scale: float | None = None):
    """Exact softmax attention in float64 on full sequences.

    q: (B, N, H, D), k, v: (B, N_k, H_kv, D) with H a multiple of H_kv (grouped-query attention: query head h
    uses k/v head h // (H / H_kv)). Causal: query i sees key j <= i (top-left).
    Returns out (B, N, H, D) float64 and lse (B, H, N) float64 (natural log; -inf for a row with no key)."""
    g = q.shape[2] // k.shape[2]
    q64, k64, v64 = q.double(), k.double().repeat_interleave(g, dim=2), v.double().repeat_interleave(g, dim=2)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale  # (B, H, N, N_k)
    if causal:
        n_q, n_k = q.shape[1], k.shape[1]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, N)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, v64)  # (B, N, H, D)
    return out, lse
