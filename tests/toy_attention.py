"""A toy attention algorithm, registered from this one file (the registry's "one file per algorithm" promise).

All-gather attention: every rank gathers the K/V of all P ranks (contiguous layout) and attends its own queries
to the whole sequence; the backward reduce-scatters dK/dV. Exact, simple, O(N) bytes per rank like Ring.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attn2d.attention.layout import Span, layout_spans, positions
from attn2d.attention.registry import AttentionImpl, Schedule, register, single_call_schedule
from attn2d.distributed import comm
from attn2d.distributed.comm import CommOp
from attn2d.dtypes import wire_bytes

NAME, LAYOUT = "toy_allgather", "contiguous"
KV_OP, DKV_OP = "toy_kv_all_gather", "toy_dkv_reduce_scatter"


class _GatherKV(torch.autograd.Function):
    """(B, n, H_kv, D) shard -> (B, P n, H_kv, D) in rank order; backward: dK/dV summed and scattered."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather(x, group, dim=1, op=KV_OP)  # (B, P n, H_kv, D)

    @staticmethod
    def backward(ctx, g):
        blocks = g.chunk(comm.group_size(ctx.group), dim=1)  # P x (B, n, H_kv, D)
        return comm.reduce_scatter(blocks, ctx.group, op=DKV_OP), None


def toy_attention(q, k, v, *, grid, causal=True):
    """q, k, v (B, N/P, H, D) contiguous shards -> out (B, N/P, H, D)."""
    n, P = q.shape[1], grid.size
    kv = _GatherKV.apply(torch.stack([k, v]).flatten(0, 1), grid.group)  # (2B, N, H_kv, D)
    k_all, v_all = kv.unflatten(0, (2, q.shape[0])).unbind(0)  # (B, N, H_kv, D) each
    q_pos = positions(LAYOUT, n * P, grid)  # (n,)
    mask = q_pos[:, None] >= torch.arange(n * P)[None, :] if causal else None  # (n, N): key j visible to query i
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=k.shape[2] != q.shape[2])  # (B, H, n, D)
    return out.transpose(1, 2)  # (B, n, H, D)


def comm_ops(batch, seq_len, heads, head_dim, rows, cols, dtype, causal=True, rank=None, kv_heads=None):
    P = rows * cols
    if P == 1:
        return []
    e, a = wire_bytes(dtype)
    kv = 2 * batch * (seq_len // P) * (kv_heads or heads) * head_dim
    return [CommOp("fwd", KV_OP, "all_gather", "world", P, (P - 1) * kv * e, (P - 1) * kv * e, P - 1, steps=P - 1),
            CommOp("bwd", DKV_OP, "reduce_scatter", "world", P, (P - 1) * kv * e, (P - 1) * kv * e, P - 1,
                   steps=P - 1)]


def schedule(seq_len: int, rows: int, cols: int) -> Schedule:
    """One step: each rank's queries against the whole sequence."""
    P = rows * cols
    if P == 1:
        return single_call_schedule(seq_len)
    return [[[(layout_spans(LAYOUT, seq_len, k, P, 1), (Span(0, 1, seq_len),))] for k in range(P)]]


register(AttentionImpl(NAME, toy_attention, layout=LAYOUT, schedule=schedule, comm_ops=comm_ops,
                       label="Toy all-gather", ranks="ring"))
