"""Block attention with positional causal masking: the API every distributed algorithm calls.

Conventions: q (B, Lq, H, D), k, v (B, Lk, H_kv, D) with H a multiple of H_kv (grouped-query attention); q_pos,
k_pos the global positions of the rows and keys as Spans (attn2d.attention.layout; None: 0..L-1), key j visible
to query i iff k_pos[j] <= q_pos[i]. out (B, Lq, H, D) in q's dtype; lse (B, H, Lq) in the accumulation dtype
(attn2d.dtypes.acc_dtype), natural log, -inf for a row that sees no key (out = 0 there). The backward takes the
final (merged) out and lse of the whole row and returns this block's contribution dq, dk, dv in the accumulation
dtype: P_block = exp(S_block - lse_global) and delta = rowsum(dout * out_global) make blocks independent.

How a block becomes backend calls: planner.py (docs/algorithms.md#piece-planner); running them: execute.py;
which backend: selection.py. Entry points: attn_forward / attn_backward (a block's result), and for a caller that
keeps running accumulators (Ring Attention) attn_forward_into (merge into (out, lse) in place, only the rows the
pieces touch) and attn_backward_into (dq added in place, key gradients handed back per piece).
"""
from __future__ import annotations

import math

import torch

from attn2d.attention.execute import backward_pieces, call_backward, call_forward, forward_pieces, lse_for_backward
from attn2d.attention.merge import merge_into
from attn2d.attention.planner import block_pieces  # kernels.block_pieces: what the cost model imports
from attn2d.attention.selection import plan, resolve_backend  # kernels.resolve_backend: calibrate's import
from attn2d.dtypes import acc_dtype


def _check(q, k, v):
    if (q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]
            or q.shape[2] % k.shape[2]):
        raise ValueError(f"attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "expected q (B, Lq, H, D) and k, v (B, Lk, H_kv, D) with H a multiple of H_kv")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device: {q.dtype}/{k.dtype}/{v.dtype}, "
                         f"{q.device}/{k.device}/{v.device}")


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Grouped-query attention: k, v (B, Lk, H_kv, D) -> (B, Lk, H, D), query head h using k/v head h // g
    (g = H / H_kv, as Llama's repeat_kv). A copy; the kernels see plain multi-head attention."""
    g = q.shape[2] // k.shape[2]
    if g == 1:
        return k, v, 1
    return k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2), g


def _sum_groups(dx: torch.Tensor, g: int) -> torch.Tensor:
    """(B, Lk, H, D) gradients of the expanded k or v -> (B, Lk, H_kv, D): the sum over each head's group."""
    if g == 1:
        return dx
    b, n, h, d = dx.shape
    return dx.view(b, n, h // g, g, d).sum(3)


def attn_forward(q, k, v, *, causal: bool, q_pos=None, k_pos=None, scale: float | None = None, backend: str = "auto"):
    """Block attention -> (out (B, Lq, H, D), lse (B, H, Lq)). k, v may have fewer heads (grouped-query)."""
    _check(q, k, v)
    k, v, _ = _expand_kv(q, k, v)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    pieces, impl, mask_impl = plan(q, k, causal, q_pos, k_pos, backend)
    return forward_pieces(q, k, v, pieces, scale, impl, mask_impl)


def row_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dout * out) (B, H, Lq) in the accumulation dtype, from dout, out (B, Lq, H, D): what a caller
    sends instead of out (attn_backward(..., out=None, delta=...))."""
    acc = acc_dtype(out.dtype)
    return (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()


def out_for_delta(dout: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A stand-in for `out` (B, Lq, H, D) with rowsum(dout * out) = delta (B, H, Lq), in dout's dtype: what a
    caller that holds delta but not out (Attention2D's backward) hands the kernels, which all take out.
    out' = dO_hat * delta / (m |dO_hat|^2), dO_hat = dO / m, m = max |dO| of the row; why it is exact and cannot
    overflow or cancel: docs/algorithms.md#the-delta-stand-in."""
    d = dout.to(acc_dtype(dout.dtype))  # (B, Lq, H, D)
    m = d.abs().amax(-1)  # (B, Lq, H)
    u = d / torch.where(m > 0, m, 1.0).unsqueeze(-1)  # (B, Lq, H, D), max |u| = 1 per nonzero row
    coef = torch.where(m > 0, delta.to(d.dtype).transpose(1, 2) / (m * u.square().sum(-1)).clamp_min(1e-300), 0.0)
    return (u * coef.unsqueeze(-1)).to(dout.dtype)  # (B, Lq, H, D), in dout's dtype as the kernels take it


def attn_backward(dout, q, k, v, out, lse, *, causal: bool, q_pos=None, k_pos=None, scale: float | None = None,
                  backend: str = "auto", delta=None):
    """This block's (dq, dk, dv) given the global out/lse of its query rows (accumulation dtype).

    Instead of out, a caller may pass out=None and delta = rowsum(dout * out) (B, H, Lq) of the global out."""
    _check(q, k, v)
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # (B, H, Lq)
    if out is None:
        if delta is None or delta.shape != lse_shape:
            raise ValueError(f"out=None needs delta of shape (B, H, Lq) = {lse_shape}, got "
                             f"{None if delta is None else tuple(delta.shape)}")
        out = out_for_delta(dout, delta)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != lse_shape:
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must be q's shape {tuple(q.shape)}, "
                         f"lse {tuple(lse.shape)} must be (B, H, Lq) = {lse_shape}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k, v, g = _expand_kv(q, k, v)
    pieces, impl, mask_impl = plan(q, k, causal, q_pos, k_pos, backend)
    dq, dk, dv = backward_pieces(dout, q, k, v, out, lse, pieces, scale, impl, mask_impl)
    return dq, _sum_groups(dk, g), _sum_groups(dv, g)


def _rows(x: torch.Tensor, sl: slice, dim: int = 1) -> torch.Tensor:
    """x restricted to the rows `sl` of dimension `dim`; x itself when `sl` is all of them (no view op)."""
    if sl.start == 0 and sl.step == 1 and sl.stop >= x.shape[dim]:
        return x
    return x[(slice(None),) * dim + (sl,)]


def attn_forward_into(out, lse, q, k, v, *, causal: bool, q_pos=None, k_pos=None, scale: float | None = None,
                      backend: str = "auto") -> None:
    """Merge this block's attention into the running (out, lse) of its query rows, in place: out (B, Lq, H, D) and
    lse (B, H, Lq) in the accumulation dtype (-inf rows: nothing seen yet). One backend call per piece of the
    (cached) plan and an in-place fp32 merge of only the rows that piece covers (merge.merge_into)."""
    _check(q, k, v)
    k, v, _ = _expand_kv(q, k, v)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    pieces, impl, mask_impl = plan(q, k, causal, q_pos, k_pos, backend)
    for p in pieces:
        o, l = call_forward(impl, mask_impl, p, _rows(q, p.rows), _rows(k, p.keys), _rows(v, p.keys), scale)
        merge_into(_rows(out, p.rows), _rows(lse, p.rows, 2), o, l, empty_rows=p.kind == "mask")


def attn_backward_into(dq, dout, q, k, v, out, lse, *, causal: bool, q_pos=None, k_pos=None,
                       scale: float | None = None,
                       backend: str = "auto") -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """This block's backward with the global out and lse of its rows: dq (B, Lq, H, D, accumulation dtype) is added
    to in place; the key gradients come back per piece as [(keys, dk, dv)] (keys: a slice of the block's keys; dk,
    dv (B, |keys|, H_kv, D) in the accumulation dtype) for the caller to add where its dK/dV accumulator lives (the
    ring adds them to an accumulator that arrives while the kernel runs). lse: as lse_for_backward returns it
    (converted once per pass by the caller, not per block)."""
    _check(q, k, v)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k, v, g = _expand_kv(q, k, v)
    pieces, impl, mask_impl = plan(q, k, causal, q_pos, k_pos, backend)
    parts = []
    for p in pieces:
        rows = p.rows
        gq, gk, gv = call_backward(impl, mask_impl, p, _rows(dout, rows), _rows(q, rows), _rows(k, p.keys),
                                    _rows(v, p.keys), _rows(out, rows), _rows(lse, rows, 2), scale)
        _rows(dq, rows).add_(gq)
        parts.append((p.keys, _sum_groups(gk, g), _sum_groups(gv, g)))
    return parts


__all__ = ["attn_forward", "attn_backward", "attn_forward_into", "attn_backward_into", "row_delta", "out_for_delta",
           "lse_for_backward", "block_pieces", "resolve_backend"]
