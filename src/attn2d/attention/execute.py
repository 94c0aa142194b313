"""Running a plan's pieces (planner.block_pieces) on a backend (backends.py): one backend call per piece, rows
met by several pieces merged in place in the accumulation dtype (merge.merge_into), dq / dk / dv summed over the
pieces. A plan that is one piece over the whole block returns the backend's output as is (no buffer, no copy).
"""
from __future__ import annotations

import math

import torch

from attn2d.attention.merge import merge_into
from attn2d.attention.planner import Piece, write_plan
from attn2d.dtypes import acc_dtype


def call_forward(impl, mask_impl, p: Piece, q, k, v, scale):
    """One backend forward for piece p (its rows and keys already sliced): mask pieces go to mask_impl."""
    b = mask_impl if p.kind == "mask" else impl
    return b.forward(q, k, v, scale=scale, causal=p.kind == "causal",
                     mask=p.mask(q.device) if p.kind == "mask" else None)


def call_backward(impl, mask_impl, p: Piece, dout, q, k, v, out, lse, scale):
    """One backend backward for piece p, as call_forward."""
    b = mask_impl if p.kind == "mask" else impl
    return b.backward(dout, q, k, v, out, lse, scale=scale, causal=p.kind == "causal",
                      mask=p.mask(q.device) if p.kind == "mask" else None)


def forward_pieces(q, k, v, pieces, scale, impl, mask_impl):
    """(out in q's dtype, lse in the accumulation dtype) of the block made of `pieces`."""
    acc = acc_dtype(q.dtype)
    b, n_q, h, d = q.shape
    pieces = tuple(pieces)
    sch = write_plan(pieces, n_q, k.shape[1])
    if sch.whole:
        p = pieces[0]
        o, l = call_forward(impl, mask_impl, p, q, k[:, p.keys], v[:, p.keys], scale)
        return o.to(q.dtype), l.to(acc)
    merges = any(sch.q_seen)
    alloc = torch.empty if sch.rows_written else torch.zeros
    out = alloc(b, n_q, h, d, dtype=acc if merges else q.dtype, device=q.device)  # (B, Lq, H, D)
    lse = torch.empty(b, h, n_q, dtype=acc, device=q.device)  # (B, H, Lq)
    if not sch.rows_written:
        lse.fill_(-math.inf)  # rows no piece touches see no key
    for p, seen in zip(pieces, sch.q_seen):
        o, l = call_forward(impl, mask_impl, p, q[:, p.rows], k[:, p.keys], v[:, p.keys], scale)
        if seen:
            merge_into(out[:, p.rows], lse[:, :, p.rows], o, l, empty_rows=p.kind == "mask")
        else:
            out[:, p.rows] = o
            lse[:, :, p.rows] = l
    return out.to(q.dtype), lse


def backward_pieces(dout, q, k, v, out, lse, pieces, scale, impl, mask_impl):
    """(dq, dk, dv) in the accumulation dtype of the block made of `pieces`, given the rows' global out and lse."""
    acc = acc_dtype(q.dtype)
    lse = lse_for_backward(lse)
    pieces = tuple(pieces)
    sch = write_plan(pieces, q.shape[1], k.shape[1])
    if sch.whole:
        p = pieces[0]
        return tuple(g.to(acc) for g in call_backward(impl, mask_impl, p, dout, q, k[:, p.keys], v[:, p.keys], out,
                                                       lse, scale))
    alloc_q = torch.empty if sch.rows_written else torch.zeros
    alloc_k = torch.empty if sch.keys_written else torch.zeros
    dq = alloc_q(q.shape, dtype=acc, device=q.device)  # (B, Lq, H, D)
    dk = alloc_k(k.shape, dtype=acc, device=q.device)  # (B, Lk, H, D)
    dv = alloc_k(v.shape, dtype=acc, device=q.device)
    for p, q_seen, k_seen in zip(pieces, sch.q_seen, sch.k_seen):
        rows, keys = p.rows, p.keys
        g = call_backward(impl, mask_impl, p, dout[:, rows], q[:, rows], k[:, keys], v[:, keys], out[:, rows],
                           lse[:, :, rows], scale)
        if q_seen:
            dq[:, rows].add_(g[0])
        else:
            dq[:, rows] = g[0]
        if k_seen:
            dk[:, keys].add_(g[1])
            dv[:, keys].add_(g[2])
        else:
            dk[:, keys] = g[1]
            dv[:, keys] = g[2]
    return dq, dk, dv


def lse_for_backward(lse: torch.Tensor) -> torch.Tensor:
    """The lse the backends' backward takes: accumulation dtype, +inf (not -inf) on rows that see no key, so that
    P = exp(S - lse) is 0 there instead of NaN. Returns lse itself when there is nothing to change."""
    lse = lse.to(acc_dtype(lse.dtype))
    return lse.masked_fill(lse == -math.inf, math.inf)

