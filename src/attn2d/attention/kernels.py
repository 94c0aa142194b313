"""Local block attention returning (out, lse), and its backward given the GLOBAL out and lse.

Every distributed algorithm computes attention of a block of queries against a block of keys whose global
positions are given as Spans (see layout.py). The causal rule is positional: key j is visible to query i iff
k_pos[j] <= q_pos[i]. Position defaults are 0..L-1 for both (top-left alignment).

Conventions: q (B, Lq, H, D), k, v (B, Lk, H, D); out (B, Lq, H, D) in q's dtype; lse (B, H, Lq) float32
(float64 for float64 inputs), natural log, -inf for a row that sees no key (out = 0 there).
The backward takes the final (merged) out and lse of the whole row, and the incoming dout, and returns this
block's contribution dq, dk, dv in float32 (float64 for float64 inputs): the usual trick that lets blocks be
differentiated independently, since P_block = exp(S_block - lse_global) and delta = rowsum(dout * out_global).
"""
from __future__ import annotations

import math

import torch

from attn2d.attention.layout import Span, Spans, spans_tensor

BACKENDS = ("math",)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm_spans(pos: Spans | Span | None, n: int) -> Spans:
    if pos is None:
        return (Span(0, 1, n),)
    spans = (pos,) if isinstance(pos, Span) else tuple(pos)
    if sum(s.n for s in spans) != n:
        raise ValueError(f"positions describe {sum(s.n for s in spans)} tokens but the block has {n}")
    return spans


def visible_mask(q_pos: Spans | Span | None, k_pos: Spans | Span | None, n_q: int, n_k: int, device=None) -> torch.Tensor:
    """Boolean (Lq, Lk) causal visibility: k_pos[j] <= q_pos[i]."""
    qp = spans_tensor(_norm_spans(q_pos, n_q), device)
    kp = spans_tensor(_norm_spans(k_pos, n_k), device)
    return kp.unsqueeze(0) <= qp.unsqueeze(1)


def _check(q, k, v):
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "expected q (B, Lq, H, D) and k, v (B, Lk, H, D)")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device: {q.dtype}/{k.dtype}/{v.dtype}, {q.device}/{k.device}/{v.device}")


def _scores(q, k, scale, causal, q_pos, k_pos):
    acc = _acc_dtype(q.dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale  # (B, H, Lq, Lk)
    if causal:
        s = s.masked_fill(~visible_mask(q_pos, k_pos, q.shape[1], k.shape[1], q.device), float("-inf"))
    return s


def attn_forward(q, k, v, *, causal: bool, q_pos=None, k_pos=None, scale: float | None = None, backend: str = "auto"):
    """Block attention -> (out (B, Lq, H, D), lse (B, H, Lq))."""
    _check(q, k, v)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = _scores(q, k, scale, causal, q_pos, k_pos)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Lq)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.to(p.dtype))  # (B, Lq, H, D)
    return out.to(q.dtype), lse


def attn_backward(dout, q, k, v, out, lse, *, causal: bool, q_pos=None, k_pos=None, scale: float | None = None,
                  backend: str = "auto"):
    """This block's (dq, dk, dv) given the global out/lse of its query rows (accumulation dtype)."""
    _check(q, k, v)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    acc = _acc_dtype(q.dtype)
    s = _scores(q, k, scale, causal, q_pos, k_pos)
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).to(acc)
    p = torch.exp(s - lse_safe.unsqueeze(-1))  # (B, H, Lq, Lk), global probabilities
    do, o = dout.to(acc), out.to(acc)
    delta = (do * o).sum(-1).transpose(1, 2)  # (B, H, Lq)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)  # (B, Lk, H, D)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, v.to(acc))  # (B, H, Lq, Lk)
    ds = p * (dp - delta.unsqueeze(-1)) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.to(acc))  # (B, Lq, H, D)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.to(acc))  # (B, Lk, H, D)
    return dq, dk, dv
