"""Attention2D-NO (paper Sec. 3.1-3.3: Algorithms 1, 2 and 7) on a rows x cols grid, with a derived backward.

Layout "cyclic" (Sec. 3.2): p(r, c) (grid rank r*C + c) holds positions r + c*R + j*P, j < N/P, of q, k, v, out.
Forward (Alg. 1): L1 K/V column -> row-major permutation, L2 row all-gather of q, L3 column all-gather of K/V, L4
one local kernel call (queries == r mod R against keys == c mod C), L5 the row reduce-scatter of the partial (out,
lse) of Alg. 7 as one all_to_all and a C-way AttnFix merge (Alg. 2). Backward: B0-B6, the global lse and delta of
each row make the blocks independent. Derivation, byte algebra and message counts: docs/algorithms.md#attention2d-no.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from attn2d.attention import kernels, merge
from attn2d.attention.checks import check_call
from attn2d.attention.common import check_grid_shards, grid_rank, kv_moves, kv_recv_peer, kv_send_peer, permute_kv
from attn2d.attention.layout import Span
from attn2d.attention.registry import AttentionImpl, Schedule, register, single_call_schedule
from attn2d.distributed import comm
from attn2d.distributed.comm import CommOp
from attn2d.distributed.grid import ProcessGrid, check_grid, check_seq_len
from attn2d.dtypes import wire_bytes

NAME = "attention2d"  # the name in error messages and the cross-rank input check
# op names as counted by attn2d.distributed.comm (CommStats.by_op) and predicted by comm_ops
OP_KV_PERMUTE = "kv_to_row_major"  # Alg. 1 L1
OP_Q_GATHER = "q_row_all_gather"  # Alg. 1 L2
OP_KV_GATHER = "kv_col_all_gather"  # Alg. 1 L3
OP_OUT_SCATTER = "out_row_reduce_scatter"  # Alg. 7
OP_QDO_GATHER = "qdo_row_all_gather"  # B1
OP_KV_GATHER_BWD = "kv_col_all_gather_bwd"  # B2
OP_DQ_SCATTER = "dq_row_reduce_scatter"  # B4
OP_DKV_SCATTER = "dkv_col_reduce_scatter"  # B5
OP_DKV_PERMUTE = "dkv_to_col_major"  # B6
FWD_OPS = (OP_KV_PERMUTE, OP_Q_GATHER, OP_KV_GATHER, OP_OUT_SCATTER)
BWD_OPS = (OP_QDO_GATHER, OP_KV_GATHER_BWD, OP_DQ_SCATTER, OP_DKV_SCATTER, OP_DKV_PERMUTE)


# ---------------------------------------------------------------------------------------------- layout helpers
def _to_position_order(blocks: torch.Tensor) -> torch.Tensor:
    """Gathered blocks (G, ..., B, n, H, D) from group ranks i -> (..., B, n*G, H, D) with row m = j*G + i (one copy).

    Block i row j of a row gather is position r + (i + j*C)*R, of a column gather c + (i + j*R)*C: in both cases
    sorted index m = j*G + i."""
    g, n = blocks.shape[0], blocks.shape[-3]
    x = blocks.movedim(0, -3)  # (..., B, n, G, H, D)
    return x.reshape(*x.shape[:-4], n * g, *x.shape[-2:])  # (..., B, n*G, H, D)


def _lse_to_position_order(blocks: torch.Tensor) -> torch.Tensor:
    """(G, B, H, n) -> (B, H, n*G) with row m = j*G + i."""
    g, b, h, n = blocks.shape
    return blocks.permute(1, 2, 3, 0).reshape(b, h, n * g)  # (B, H, n*G)


def _to_owner_blocks(x: torch.Tensor, g: int, dim: int) -> torch.Tensor:
    """Inverse of the position order, as a view: x with `dim` of size n*G (row m = j*G + i) -> (G, ..., n, ...),
    block i = the rows m = i mod G (those of group rank i)."""
    return x.unflatten(dim, (x.shape[dim] // g, g)).movedim(dim + 1, 0)


# ---------------------------------------------------------------------------------------------- steps
def _permute_kv(k_p: torch.Tensor, v_p: torch.Tensor, grid: ProcessGrid) -> torch.Tensor | tuple:
    """Algorithm 1 L1 (Sec. 3.2): common.permute_kv (column -> row-major cyclic) of K and V stacked in one
    buffer -> kv_t (2, B, N/P, H, D), positions c + r*C + j*P; the buffer the column gather sends as it is.
    A column of one rank (R = 1: no permutation, no gather) keeps the pair (k_p, v_p) as it is (no copy)."""
    if grid.rows == 1:
        return k_p, v_p
    kv = torch.stack([k_p, v_p])  # (2, B, N/P, H, D)
    if not kv_moves(grid.row, grid.col, grid.rows, grid.cols):  # fixed point (diagonal, 1-D grids)
        return kv
    return permute_kv(kv, grid, op=OP_KV_PERMUTE)


def gather_kv(kv_t, grid: ProcessGrid, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 L3: column all-gather of kv_t (2, B, N/P, H, D) -> k_g, v_g (B, N/C, H, D), positions
    Span(c, C, N/C), with one reordering copy; a column of one rank (R = 1) gathers nothing (kv_t's pair)."""
    if grid.rows == 1:
        return tuple(kv_t)
    kv_g = comm.all_gather_blocks(kv_t, grid.col_group, op=op)  # (R, 2, B, N/P, H, D)
    return _to_position_order(kv_g).unbind(0)  # (B, N/C, H, D) each


def row_reduce_scatter(out_g: torch.Tensor, lse_g: torch.Tensor,
                       grid: ProcessGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 7 (Sec. 3.3) as one all_to_all + a C-way AttnFix merge (fp32) of this rank's query rows.

    out_g (B, N/R, H, D), lse_g (B, H, N/R): partials of all queries of the grid row against this column's keys.
    Returns out_p (B, N/P, H, D) and lse_p (B, H, N/P) in fp32 (fp64 for fp64 inputs), final for this rank's rows;
    a row of one rank (C = 1) has nothing to merge: out_g (its dtype) and lse_g as they are."""
    cols = grid.cols
    if cols == 1:
        return out_g, lse_g
    parts = [_to_owner_blocks(lse_g, cols, 2), _to_owner_blocks(out_g, cols, 1)]  # (C, B, H, N/P), (C, B, N/P, H, D)
    send = comm.pack_blocks(parts)  # (C, bytes): lse first (the widest dtype), one copy of each
    received = comm.all_to_all_blocks(send, grid.row_group, op=OP_OUT_SCATTER)  # (C, bytes): partials of my rows
    lse_c, out_c = comm.unpack_blocks(received, [p[0] for p in parts])  # (C, B, H, N/P), (C, B, N/P, H, D)
    return merge.merge_partials(out_c, lse_c)


def _spans(grid: ProcessGrid, seq_len: int) -> tuple[Span, Span]:
    """Positions of q_g (queries == r mod R) and k_g (keys == c mod C), sorted."""
    return Span(grid.row, grid.rows, seq_len // grid.rows), Span(grid.col, grid.cols, seq_len // grid.cols)


def _scatter_dkv(dk_g, dv_g, grid: ProcessGrid):
    """B5 + B6 of the backward: column reduce-scatter of (dk_g, dv_g) (B, N/C, H_kv, D) to the row-major owners,
    then the inverse of Alg. 1 L1 -> (dk_p, dv_p) in the cyclic layout. A column of one rank (R = 1, where the
    permutation is the identity too) has nothing to move: dk_g, dv_g as they are."""
    rows = grid.rows
    if rows == 1 and not kv_moves(grid.row, grid.col, rows, grid.cols):
        return dk_g, dv_g
    # B5: key m = j*R + r' of k_g belongs to p(r', c) (row-major layout); one copy into the send buffer
    dkv_blocks = torch.stack([_to_owner_blocks(dk_g, rows, 1), _to_owner_blocks(dv_g, rows, 1)], 1)
    dkv_t = comm.reduce_scatter(dkv_blocks, grid.col_group, op=OP_DKV_SCATTER)  # (2, B, N/P, H, D)
    # B6: inverse of Alg. 1 L1: back to the column-major cyclic layout
    dkv_p = permute_kv(dkv_t, grid, op=OP_DKV_PERMUTE, inverse=True)  # (2, B, N/P, H, D)
    dk_p, dv_p = dkv_p.unbind(0)
    return dk_p, dv_p


def attention2d_forward(q_p, k_p, v_p, grid: ProcessGrid, causal: bool):
    """Algorithm 1 (Sec. 3.2) with Algorithm 7: returns out_p (B, N/P, H, D) in q's dtype, lse_p and kv_t
    (2, B, N/P, H, D; the pair k, v on a 1 x C grid), the row-major K/V the backward gathers again."""
    seq_len = q_p.shape[1] * grid.size
    kv_t = _permute_kv(k_p, v_p, grid)  # Alg. 1 L1: (2, B, N/P, H, D)
    q_g = _to_position_order(comm.all_gather_blocks(q_p, grid.row_group, op=OP_Q_GATHER))
    # q_g: (B, N/R, H, D), Alg. 1 L2
    k_g, v_g = gather_kv(kv_t, grid, op=OP_KV_GATHER)  # Alg. 1 L3: (B, N/C, H, D) each
    q_pos, k_pos = _spans(grid, seq_len)
    out_g, lse_g = kernels.attn_forward(q_g, k_g, v_g, causal=causal, q_pos=q_pos, k_pos=k_pos)  # Alg. 1 L4
    out_p, lse_p = row_reduce_scatter(out_g, lse_g, grid)  # Alg. 7: (B, N/P, H, D), (B, H, N/P)
    return out_p.to(q_p.dtype), lse_p, kv_t


def attention2d_backward(dout_p, q_p, kv_t, out_p, lse_p, grid: ProcessGrid, causal: bool):
    """Backward of Attention2D-NO (B0-B6, docs/algorithms.md#attention2d-no): (dq_p, dk_p, dv_p) in the
    accumulation dtype."""
    seq_len, cols = q_p.shape[1] * grid.size, grid.cols
    q_pos, k_pos = _spans(grid, seq_len)
    if cols == 1:  # a row of one rank: its rows are the whole block row; out is here, no delta, nothing to scatter
        k_g, v_g = gather_kv(kv_t, grid, op=OP_KV_GATHER_BWD)  # B2: (B, N, H, D) on a 1 x 1 grid
        dq_p, dk_g, dv_g = kernels.attn_backward(dout_p, q_p, k_g, v_g, out_p, lse_p, causal=causal, q_pos=q_pos,
                                                 k_pos=k_pos)  # B3
        return (dq_p, *_scatter_dkv(dk_g, dv_g, grid))  # B5, B6
    delta_p = kernels.row_delta(dout_p, out_p)  # B0: rowsum(dout * out) of this rank's rows, (B, H, N/P) fp32
    # B1: one row all-gather of (lse, delta, q, dout), widest dtype first
    like = [lse_p, delta_p, q_p, dout_p]
    gathered = comm.all_gather_blocks(comm.pack(like), grid.row_group, op=OP_QDO_GATHER)  # (C, bytes)
    lse_c, delta_c, q_c, do_c = comm.unpack_blocks(gathered, like)  # (C, B, H, N/P) x 2, (C, B, N/P, H, D) x 2
    lse_g, delta_g = _lse_to_position_order(lse_c), _lse_to_position_order(delta_c)  # (B, H, N/R)
    q_g, do_g = _to_position_order(q_c), _to_position_order(do_c)  # (B, N/R, H, D)
    # B2: K/V column all-gather again
    k_g, v_g = gather_kv(kv_t, grid, op=OP_KV_GATHER_BWD)  # (B, N/C, H, D) each
    # B3: the local block backward with the global lse and delta of the rows
    dq_g, dk_g, dv_g = kernels.attn_backward(do_g, q_g, k_g, v_g, None, lse_g, delta=delta_g, causal=causal,
                                             q_pos=q_pos, k_pos=k_pos)
    # B4: row reduce-scatter of dq: row m = j*C + c' of q_g belongs to p(r, c'); one copy into the send buffer
    dq_p = comm.reduce_scatter(_to_owner_blocks(dq_g, cols, 1), grid.row_group, op=OP_DQ_SCATTER)
    return (dq_p, *_scatter_dkv(dk_g, dv_g, grid))  # B5, B6


class Attention2DFunction(torch.autograd.Function):
    """Attention2D-NO with a hand-written backward that keeps only 1/P shards between the passes."""

    @staticmethod
    def forward(ctx, q_p, k_p, v_p, grid: ProcessGrid, causal: bool):
        out_p, lse_p, kv_t = attention2d_forward(q_p, k_p, v_p, grid, causal)
        kv = (kv_t,) if isinstance(kv_t, torch.Tensor) else kv_t  # the stacked buffer, or the pair of a 1-rank column
        ctx.save_for_backward(q_p, out_p, lse_p, *kv)  # SAVEFORBACKPROP: 1/P shards only
        ctx.grid, ctx.causal = grid, causal
        ctx.dtypes = (q_p.dtype, k_p.dtype, v_p.dtype)
        return out_p

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_p):
        q_p, out_p, lse_p, *kv = ctx.saved_tensors
        kv_t = kv[0] if len(kv) == 1 else tuple(kv)
        dq, dk, dv = attention2d_backward(dout_p.to(q_p.dtype), q_p, kv_t, out_p, lse_p, ctx.grid, ctx.causal)
        dq_t, dk_t, dv_t = ctx.dtypes
        return dq.to(dq_t), dk.to(dk_t), dv.to(dv_t), None, None


# ---------------------------------------------------------------------------------------------- public entry
def attention2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: ProcessGrid, causal: bool = True,
                heads: int | None = None) -> torch.Tensor:
    """Attention2D-NO (Algorithms 1, 2, 7). q, k, v: this rank's cyclic shard (B, N/P, H, D) -> out, same shape.

    The global sequence length is N = P * (N/P); every rank must pass the same shape. Differentiable.
    heads: q's head count, if known (checks the axis order); see attention/checks.py for every check."""
    check_grid_shards(NAME, q, k, v, grid)
    check_call(NAME, q, k, v, "cyclic", grid, causal, heads)
    return Attention2DFunction.apply(q, k, v, grid, bool(causal))


# ---------------------------------------------------------------------------------------------- analytic volume
def comm_ops(batch: int, seq_len: int, heads: int, head_dim: int, rows: int, cols: int, dtype, causal: bool = True,
             rank: int | None = None, kv_heads: int | None = None) -> list[CommOp]:
    """Per-rank communication of Attention2D-NO, op by op, forward then backward
    (docs/algorithms.md#attention2d-no).

    rank: grid rank r*cols + c (None: a typical rank whose K/V permutation moves data, if any does).
    kv_heads: heads of k and v (grouped-query attention; None = heads): every K/V and dK/dV term scales with it.
    Ops that move nothing for this rank (groups of one rank, a fixed point of the permutation) are left out, as
    comm does not count them. `causal` does not change the volume. The all_to_all of Alg. 7 is given
    steps = C - 1, like the paper's ring (conservative for a direct all-to-all)."""
    check_grid(rows, cols, rows * cols)
    world = rows * cols
    check_seq_len(seq_len, world)
    rank = grid_rank(rows, cols, rank)
    e, a = wire_bytes(dtype)  # input dtype bytes; lse and gradient accumulation bytes
    rows_p = batch * heads * (seq_len // world)  # (batch, head, position) rows of one shard
    vec = rows_p * head_dim * e  # bytes of one (B, N/P, H, D) shard in the input dtype
    vec_acc = rows_p * head_dim * a  # ... in the accumulation dtype
    lse = rows_p * a  # bytes of one (B, H, N/P) lse shard
    kv = vec // heads * (kv_heads or heads)  # bytes of one K or V shard (H_kv heads), input dtype
    kv_acc = vec_acc // heads * (kv_heads or heads)  # ... accumulation dtype
    moves_kv = kv_moves(*divmod(rank, cols), rows, cols)

    def coll(phase, name, kind, group, g, nbytes):
        return CommOp(phase, name, kind, group, g, (g - 1) * nbytes, (g - 1) * nbytes, g - 1, steps=g - 1)

    def p2p(phase, name, nbytes):
        return CommOp(phase, name, "p2p", "pair", 2, nbytes, nbytes, 1, steps=1)

    ops = []
    if moves_kv:
        ops.append(p2p("fwd", OP_KV_PERMUTE, 2 * kv))
    if cols > 1:
        ops.append(coll("fwd", OP_Q_GATHER, "all_gather", "row", cols, vec))
    if rows > 1:
        ops.append(coll("fwd", OP_KV_GATHER, "all_gather", "col", rows, 2 * kv))
    if cols > 1:
        ops.append(coll("fwd", OP_OUT_SCATTER, "all_to_all", "row", cols, vec + lse))
        ops.append(coll("bwd", OP_QDO_GATHER, "all_gather", "row", cols, 2 * vec + 2 * lse))
    if rows > 1:
        ops.append(coll("bwd", OP_KV_GATHER_BWD, "all_gather", "col", rows, 2 * kv))
    if cols > 1:
        ops.append(coll("bwd", OP_DQ_SCATTER, "reduce_scatter", "row", cols, vec_acc))
    if rows > 1:
        ops.append(coll("bwd", OP_DKV_SCATTER, "reduce_scatter", "col", rows, 2 * kv_acc))
    if moves_kv:
        ops.append(p2p("bwd", OP_DKV_PERMUTE, 2 * kv_acc))
    return ops


def schedule(seq_len: int, rows: int, cols: int) -> Schedule:
    """Alg. 1 L4: one synchronous step, one call per rank: queries == r (mod rows) against keys == c (mod cols)."""
    if rows * cols == 1:
        return single_call_schedule(seq_len)
    return [[[((Span(r, rows, seq_len // rows),), (Span(c, cols, seq_len // cols),))]
             for r, c in (divmod(k, cols) for k in range(rows * cols))]]


register(AttentionImpl("attn2d", attention2d, layout="cyclic", schedule=schedule, comm_ops=comm_ops,
                       label="Attention2D-NO"))

__all__ = ["attention2d", "attention2d_forward", "attention2d_backward", "Attention2DFunction", "comm_ops", "schedule",
           "kv_send_peer", "kv_recv_peer", "row_reduce_scatter", "FWD_OPS", "BWD_OPS"]
