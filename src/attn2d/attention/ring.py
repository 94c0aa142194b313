"""Ring Attention (Liu, Zaharia, Abbeel, arXiv 2310.01889), the paper's 1-D baseline (Sec. 2), on a 1-D group of P
ranks, with a hand-written backward.

Layouts "zigzag" (2P chunks, rank k holds chunks k and 2P-1-k: causal load balance) or "contiguous". Forward: K/V
circulate around the ring (send to rank+1, receive from rank-1), each exchange posted before the compute it hides
behind, every step merged into an accumulator in place (AttnFix, Alg. 2). Backward: K/V circulate again with the
dK/dV accumulators riding one step behind, then one message returns each accumulator to its owner. Steps, message
layout and volume: docs/algorithms.md#ring-attention.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from attn2d.attention import kernels
from attn2d.attention.checks import check_call
from attn2d.attention.common import check_qkv, check_shapes
from attn2d.attention.layout import Spans, layout_spans
from attn2d.attention.registry import AttentionImpl, Schedule, register, single_call_schedule
from attn2d.distributed import comm
from attn2d.distributed.comm import CommOp
from attn2d.distributed.grid import GridError, ProcessGrid, check_seq_len
from attn2d.dtypes import acc_dtype, wire_bytes

NAME = "ring_attention"  # the name in error messages and the cross-rank input check
LAYOUTS = ("zigzag", "contiguous")
# op names as counted by attn2d.distributed.comm (CommStats.by_op) and predicted by comm_ops
OP_KV_RING = "kv_ring"
OP_KV_DKV_RING = "kv_dkv_ring"
OP_DKV_TO_OWNER = "dkv_to_owner"
FWD_OPS = (OP_KV_RING,)
BWD_OPS = (OP_KV_DKV_RING, OP_DKV_TO_OWNER)


# ---------------------------------------------------------------------------------------------- the ring
@dataclass(frozen=True)
class Ring:
    """This rank's place in the 1-D ring over `group`: rank i of P, global ranks of its neighbours."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    next: int  # global rank of (rank + 1) % P: where K/V go
    prev: int  # global rank of (rank - 1) % P: where K/V come from

    @staticmethod
    def of(group: dist.ProcessGroup | None) -> Ring:
        if not dist.is_initialized():
            if group is not None:
                raise ValueError(f"{NAME}: a process group was given but torch.distributed is not initialised")
            return Ring(None, 0, 1, 0, 0)
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"{NAME}: this process (world rank {dist.get_rank()}) is not in the group {ranks}")
        size = len(ranks)
        return Ring(group, rank, size, ranks[(rank + 1) % size], ranks[(rank - 1) % size])


def step_spans(layout: str, seq_len: int, rank: int, world: int, step: int) -> tuple[Spans, Spans]:
    """(q_pos, k_pos) of the block rank `rank` computes at ring step `step`: its own positions against the
    positions of source rank (rank - step) mod P."""
    own = layout_spans(layout, seq_len, rank, world, 1)
    return own, layout_spans(layout, seq_len, (rank - step) % world, world, 1)


@functools.lru_cache(maxsize=1024)
def ring_plan(layout: str, seq_len: int, rank: int, world: int) -> tuple[tuple[Spans, Spans], ...]:
    """step_spans of every step of this rank, planned once per (layout, seq_len, rank, world). The kernel layer
    caches the calls each step makes (zigzag, causal: one per step; step 0 one causal call on the two local chunks,
    a step whose source rank is lower: every query against the first chunk received, else the second local chunk
    of queries against both chunks received)."""
    return tuple(step_spans(layout, seq_len, rank, world, s) for s in range(world))


# ---------------------------------------------------------------------------------------------- forward loop
def ring_attention_forward(q, k, v, ring: Ring, causal: bool, layout: str):
    """Forward ring: out (B, n, H, D) in q's dtype, lse (B, H, n) in the accumulation dtype.

    K/V circulate in two preallocated buffers (receive into one while computing on the other); the running (out,
    lse) is accumulated in place in fp32, only on the rows each step touches (kernels.attn_forward_into)."""
    P, i = ring.size, ring.rank
    plan = ring_plan(layout, q.shape[1] * P, i, P)
    if P == 1:
        return kernels.attn_forward(q, k, v, causal=causal, q_pos=plan[0][0], k_pos=plan[0][1])
    bufs = (torch.stack([k, v]), torch.empty((2, *k.shape), dtype=k.dtype, device=k.device))  # (2, B, n, H_kv, D)
    out = lse = None
    for s in range(P):
        kv, spare = bufs[s % 2], bufs[(s + 1) % 2]  # kv: K/V of source rank (i - s) mod P
        handle = None
        if s < P - 1:  # post the exchange for step s+1 before computing step s
            handle = comm.send_recv([(kv, ring.next)], [(spare, ring.prev)], op=OP_KV_RING, async_op=True,
                                    group=ring.group)
        q_pos, k_pos = plan[s]
        if s == 0:
            out, lse = kernels.attn_forward(q, kv[0], kv[1], causal=causal, q_pos=q_pos, k_pos=k_pos)
            out = out.to(acc_dtype(q.dtype))  # fp32 (B, n, H, D); the kernel's own output for fp32 inputs
        else:
            kernels.attn_forward_into(out, lse, q, kv[0], kv[1], causal=causal, q_pos=q_pos, k_pos=k_pos)
        if handle is not None:
            handle.wait()
    return out.to(q.dtype), lse


# ---------------------------------------------------------------------------------------------- backward loop
class _Message:
    """One backward ring message buffer: [dK/dV accumulator (acc dtype) | K/V (input dtype)] as flat bytes, with
    typed views of both parts (acc first: the widest dtype, aligned). Two of them alternate: the one received at
    step s, after this rank has added its dK/dV, is what it sends at step s+1 (no packing copy)."""

    def __init__(self, kv_shape, dtype, acc, device):
        n = math.prod(kv_shape)
        self.raw = torch.empty(n * (acc.itemsize + dtype.itemsize), dtype=torch.uint8, device=device)
        self.dkv = self.raw[: n * acc.itemsize].view(acc).view(kv_shape)  # (2, B, n, H_kv, D)
        self.kv = self.raw[n * acc.itemsize:].view(dtype).view(kv_shape)  # (2, B, n, H_kv, D)

    def part(self, s: int, P: int) -> torch.Tensor:
        """What travels at step s: K/V only (s = 0), dK/dV only (s = P-1), both in between."""
        return self.kv if s == 0 else self.dkv if s == P - 1 else self.raw


def ring_attention_backward(dout, q, k, v, out, lse, ring: Ring, causal: bool, layout: str):
    """Backward ring: (dq, dk, dv) of this rank's shard in the accumulation dtype."""
    P, i = ring.size, ring.rank
    plan = ring_plan(layout, q.shape[1] * P, i, P)
    if P == 1:
        return kernels.attn_backward(dout, q, k, v, out, lse, causal=causal, q_pos=plan[0][0], k_pos=plan[0][1])
    acc = acc_dtype(q.dtype)
    kv_shape = (2, *k.shape)
    bufs = (_Message(kv_shape, k.dtype, acc, q.device), _Message(kv_shape, k.dtype, acc, q.device))
    torch.stack([k, v], out=bufs[0].kv)  # K/V of my own block
    lse_b = kernels.lse_for_backward(lse)  # once per pass
    dq = None
    for s in range(P):
        cur, nxt = bufs[s % 2], bufs[(s + 1) % 2]  # cur: K/V of block b = (i - s) mod P (+ acc of block b + 1)
        handle = comm.send_recv([(cur.part(s, P), ring.next)], [(nxt.part(s, P), ring.prev)], op=OP_KV_DKV_RING,
                                async_op=True, group=ring.group)  # receives K/V of b - 1 and the acc of block b
        q_pos, k_pos = plan[s]
        if s == 0:
            dq, dk_b, dv_b = kernels.attn_backward(dout, q, cur.kv[0], cur.kv[1], out, lse_b, causal=causal,
                                                   q_pos=q_pos, k_pos=k_pos)  # dq: fp32 (B, n, H, D), mine
            handle.wait()
            nxt.dkv[0].copy_(dk_b)  # the accumulator of my block starts with my contribution
            nxt.dkv[1].copy_(dv_b)
            continue
        parts = kernels.attn_backward_into(dq, dout, q, cur.kv[0], cur.kv[1], out, lse_b, causal=causal,
                                           q_pos=q_pos, k_pos=k_pos)
        handle.wait()
        for keys, dk_b, dv_b in parts:  # add my part to the accumulator of block b (ranks b .. i-1 so far)
            nxt.dkv[0][:, keys].add_(dk_b)
            nxt.dkv[1][:, keys].add_(dv_b)
    # the accumulator of block i+1 is complete: return it to its owner, receive mine
    done, free = bufs[P % 2], bufs[(P + 1) % 2]
    comm.send_recv([(done.dkv, ring.next)], [(free.dkv, ring.prev)], op=OP_DKV_TO_OWNER, group=ring.group)
    return dq, free.dkv[0], free.dkv[1]


# ---------------------------------------------------------------------------------------------- autograd
class RingAttentionFunction(torch.autograd.Function):
    """Ring Attention with a hand-written backward (K/V ring again, dK/dV accumulators riding along)."""

    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, causal: bool, layout: str):
        out, lse = ring_attention_forward(q, k, v, ring, causal, layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.causal, ctx.layout = ring, causal, layout
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.to(q.dtype).contiguous()
        dq, dk, dv = ring_attention_backward(dout, q, k, v, out, lse, ctx.ring, ctx.causal, ctx.layout)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# ---------------------------------------------------------------------------------------------- public entry
def _validate(q, k, v, ring: Ring, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{NAME}: unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    check_qkv(NAME, q, k, v)
    check_shapes(NAME, q, k, v)
    n, P = q.shape[1], ring.size
    if n < 1:
        raise ValueError(f"{NAME}: the local shard holds {n} positions; every rank needs at least one")
    if layout == "zigzag" and n % 2:
        lo, hi = (n * P) // (2 * P) * 2 * P, ((n * P) // (2 * P) + 1) * 2 * P
        raise GridError(f"{NAME} (zigzag layout): the local shard holds {n} positions, so seq_len = {P} x {n} "
                        f"= {n * P} is not a multiple of 2P = {2 * P} (zigzag cuts the sequence into 2P chunks, two "
                        f"per rank); use a seq_len that is a multiple of {2 * P} (nearest: {lo or 2 * P} or {hi}) "
                        "or layout='contiguous'")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   group: dist.ProcessGroup | ProcessGrid | None = None, causal: bool = True, layout: str = "zigzag",
                   heads: int | None = None) -> torch.Tensor:
    """Ring Attention (Sec. 2 baseline). q, k, v: this rank's shard (B, N/P, H, D) in `layout` ("zigzag" or
    "contiguous") over `group` (a process group, a ProcessGrid: any shape, only its group matters, or None: the
    world) -> out, same shape and dtype. Differentiable.

    Every rank of the group must call it with the same shape; N = P * (N/P). heads: q's head count, if known
    (checks the axis order); see attention/checks.py for every check."""
    if isinstance(group, ProcessGrid):
        group = group.group
    ring = Ring.of(group)
    _validate(q, k, v, ring, layout)
    check_call(NAME, q, k, v, layout, group, causal, heads)
    return RingAttentionFunction.apply(q, k, v, ring, bool(causal), layout)


def _registered(layout: str):
    def fn(q, k, v, *, grid=None, causal: bool = True):
        return ring_attention(q, k, v, group=grid, causal=causal, layout=layout)

    fn.__name__ = fn.__qualname__ = f"ring_attention_{layout}"
    return fn


# ---------------------------------------------------------------------------------------------- analytic volume
def comm_ops(batch: int, seq_len: int, heads: int, head_dim: int, rows: int, cols: int, dtype, causal: bool = True,
             rank: int | None = None, layout: str = "zigzag", kv_heads: int | None = None) -> list[CommOp]:
    """Per-rank communication of Ring Attention, op by op, forward then backward (docs/algorithms.md#ring-attention).
    kv_heads: heads of k and v (grouped-query attention; None = heads): only K/V and dK/dV circulate.

    The ring runs over all P = rows * cols ranks (the grid's shape does not matter). Every rank moves the same
    bytes, and neither `causal` nor `layout` changes the volume (masked blocks still circulate); `layout` only
    decides which seq_len is valid (zigzag: a multiple of 2P). P = 1: nothing moves, []."""
    P = rows * cols
    if rows < 1 or cols < 1:
        raise GridError(f"grid {rows}x{cols} must have rows >= 1 and cols >= 1")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    check_seq_len(seq_len, P, multiple=2 if layout == "zigzag" else 1, what=f"{layout} ring")
    if rank is not None and not 0 <= rank < P:
        raise ValueError(f"rank {rank} is not in the ring of {P} ranks ({rows}x{cols}; 0..{P - 1})")
    if P == 1:
        return []
    e, a = wire_bytes(dtype)
    h_kv = kv_heads or heads
    kv = 2 * batch * (seq_len // P) * h_kv * head_dim * e  # one K/V message (bytes)
    dkv = 2 * batch * (seq_len // P) * h_kv * head_dim * a  # one dK/dV accumulator (bytes)
    return [
        CommOp("fwd", OP_KV_RING, "p2p", "world", P, (P - 1) * kv, (P - 1) * kv, P - 1, steps=P - 1, overlapped=True),
        CommOp("bwd", OP_KV_DKV_RING, "p2p", "world", P, (P - 1) * (kv + dkv), (P - 1) * (kv + dkv), P, steps=P,
               overlapped=True),
        CommOp("bwd", OP_DKV_TO_OWNER, "p2p", "world", P, dkv, dkv, 1, steps=1, overlapped=False),
    ]


# ---------------------------------------------------------------------------------------------- schedule
def schedule(seq_len: int, rows: int, cols: int, layout: str = "zigzag") -> Schedule:
    """P steps on the P = rows * cols ranks of the ring; at step s rank i holds the K/V of rank (i - s) mod P."""
    P = rows * cols
    if P == 1:
        return single_call_schedule(seq_len)
    spans = [layout_spans(layout, seq_len, k, P, 1) for k in range(P)]
    return [[[(spans[i], spans[(i - s) % P])] for i in range(P)] for s in range(P)]


register(AttentionImpl("ring", _registered("zigzag"), layout="zigzag", schedule=schedule, comm_ops=comm_ops,
                       label="Ring Attention", ranks="ring"))
register(AttentionImpl("ring_contiguous", _registered("contiguous"), layout="contiguous",
                       schedule=functools.partial(schedule, layout="contiguous"),
                       comm_ops=functools.partial(comm_ops, layout="contiguous"),
                       label="Ring Attention (contiguous)", ranks="ring"))

__all__ = ["ring_attention", "ring_attention_forward", "ring_attention_backward", "RingAttentionFunction", "Ring",
           "step_spans", "ring_plan", "comm_ops", "schedule", "FWD_OPS", "BWD_OPS", "LAYOUTS"]
