"""Attention2D-NO: Algorithms 1, 2 and 7 (Sec. 3.1-3.3), with a hand-written backward, on a rows x cols grid.

Layout (paper Sec. 3.2, "cyclic"): with P = R*C (R = grid.rows, C = grid.cols, grid rank = r*C + c), processor
p(r, c) holds the positions r + c*R + j*P, j < N/P, of q, k, v and out (column-major cyclic).

Forward (Algorithm 1, non-overlapped):
  L1  K/V "column -> row-major" exchange: p(r, c) ends up with k_t, v_t = positions c + r*C + j*P. On a square
      grid this is the swap with the transpose peer p(c, r) (a no-op on the diagonal); on any grid it is a
      permutation: p(r, c) sends its class t = r + c*R to p(t // C, t % C) and receives class s = c + r*C from
      p(s % R, s // R) (K and V packed into one message). 1 x C and R x 1 grids: the identity, nothing moves.
  L2  row all-gather of q_p -> q_g = the N/R queries == r (mod R), Span(r, R, N/R).
  L3  column all-gather of (k_t, v_t), stacked in one buffer -> k_g, v_g = the N/C keys == c (mod C), Span(c, C, N/C).
  L4  ONE local kernels.attn_forward(q_g, k_g, v_g, q_pos, k_pos): positional causal mask. On a square grid it is
      causal (diagonal 0) when c <= r and strictly causal when c > r; on a non-square grid it is a staircase,
      which the kernel layer handles.
  L5  Algorithm 7 (row reduce-scatter of the partial results): query row m of q_g (position r + m*R) belongs to
      p(r, m mod C). The paper sends the (M, N, D) triples around the grid row in sqrt(P)-1 ring steps and merges
      them pairwise with AttnFix (Algorithm 2). We instead do ONE all_to_all of packed (out, lse) blocks, one
      block per destination, and then merge the C partials of our own rows in a single fp32 pass with
      merge.merge_partials. That pass is the k-way log-sum-exp form of AttnFix: (M, N, D) <-> (lse = M + log D,
      out = N / D), and AttnFix is associative and commutative, so the result is the same as the ring's pairwise
      merges in any order. The per-rank volume is the same as Alg. 7's ring ((C-1) blocks of N/P rows sent and
      received), with one scalar per row (lse) instead of two (M, D).
  Only the 1/P shards q_p, k_t, v_t, out_p, lse_p are saved for backward (the paper's SAVEFORBACKPROP).

Backward (the paper's Algorithm 3 was NOT FOUND; derived here [D]). For one head, with scale s, the global
row statistics lse and delta = rowsum(dO * O), and P = exp(s Q K^T + mask - lse):
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta 1^T),   dQ = s dS K,   dK = s dS^T Q.
Every entry of block (I_r, J_c), where I_r = queries == r (mod R) and J_c = keys == c (mod C), depends only on
Q_I, dO_I, lse_I, delta_I (rows) and K_J, V_J (columns). The blocks (I_r, J_c) tile the N x N matrix exactly
once, so
    dQ_{I_r} = sum over c of  s dS_{I_r,J_c} K_{J_c}               -> a sum over the grid row    (reduce-scatter)
    dK_{J_c} = sum over r of  s dS_{I_r,J_c}^T Q_{I_r},  dV_{J_c} = sum over r of P_{I_r,J_c}^T dO_{I_r}
                                                                    -> a sum over the grid column (reduce-scatter)
Steps: (B0) delta_p = rowsum(dout_p * out_p) of this rank's own rows (fp32), the only use of out in the backward;
(B1) row all-gather of (lse_p, delta_p, q_p, dout_p) packed in one buffer -> lse_g, delta_g, q_g, do_g;
(B2) column all-gather of (k_t, v_t) again (recompute instead of storing N/C-row buffers between passes);
(B3) ONE kernels.attn_backward(do_g, q_g, k_g, v_g, lse_g, delta_g, q_pos, k_pos) with the GLOBAL lse and delta of
the rows; (B4) row reduce-scatter (sum, fp32) of dq_g to the owners (row m -> column m mod C); (B5) column
reduce-scatter (sum, fp32) of the stacked (dk_g, dv_g) to their row-major owners (key m -> row m mod R); (B6) the
inverse of the L1 permutation, back to the cyclic layout; cast to the input dtypes. On grids with C = 1 (1 x 1 included) B0, B1 and B4
move nothing: the block's rows are this rank's own, so the kernel takes out itself (no delta, no stand-in), and
with R = 1 B2 and B5 are skipped too: on a 1 x 1 grid Attention2D is one kernel call each way. Everything is O(N/sqrt(P))
rows per rank. Sending delta (1 scalar per row) instead of out (D per row) makes B1 (C-1)(N/P)(2D e + 2 l) bytes
per head instead of (C-1)(N/P)(3D e + l). The kernel APIs take out, not delta: kernels.out_for_delta builds a
stand-in out' with rowsum(dO * out') = delta for them (see its docstring for why that is exact and safe).

Exact per-rank volume (what comm_ops predicts and the tests check; bytes sent = bytes received). Let n = N/P,
e = bytes of the input dtype, l = bytes of lse (4; 8 for float64), a = bytes of the gradient accumulation dtype
(4; 8 for float64), and delta_kv = 1 if the L1 permutation moves this rank's K/V (0 on the diagonal of a square
grid and everywhere on 1-D grids):
    forward  = B H n [ 2 D e delta_kv + (C-1) D e + 2 (R-1) D e + (C-1) (D e + l) ]
    backward = B H n [ (C-1) (2 D e + 2 l) + 2 (R-1) D e + (C-1) D a + 2 (R-1) D a + 2 D a delta_kv ]
Square grid (R = C = sqrt(P)), per head and sequence, in elements of the input dtype:
    forward  = [4 (sqrt(P)-1) + 2 delta_kv] N D / P + (sqrt(P)-1) (l/e) N / P
i.e. the paper's [4(sqrt(P)-1)+2] N H / P (its H = our head_dim D) plus the lse column of the reduce-scatter
(with bfloat16 inputs l/e = 2, exactly the paper's (H+2) per row for (M, D)). Messages: forward
delta_kv + 2 (C-1) + (R-1), backward 2 (C-1) + 2 (R-1) + delta_kv.

Grouped-query attention (k, v with H_kv heads, H a multiple of H_kv): K/V and dK/dV travel with H_kv heads, so
every K/V term above scales by H_kv / H (comm_ops(kv_heads=...)); the kernels expand the heads locally.

Memory: transient q_g, k_g, v_g (and do_g in backward) of N/sqrt(P) rows; saved: 1/P shards only.
CUDA: nothing here is device specific (NCCL collectives through attn2d.distributed.comm); not run on a GPU here.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from attn2d.attention import kernels, merge
from attn2d.attention.registry import AttentionImpl, Schedule, register, single_call_schedule
from attn2d.attention.checks import check_call
from attn2d.attention.common import (check_grid_shards, grid_rank, kv_moves, kv_recv_peer, kv_send_peer,
                                     permute_kv, wire_bytes)
from attn2d.attention.layout import Span
from attn2d.distributed import comm
from attn2d.distributed.comm import CommOp
from attn2d.distributed.grid import ProcessGrid, check_grid, check_seq_len

# op names as counted by attn2d.distributed.comm (CommStats.by_op) and predicted by comm_ops
FWD_OPS = ("kv_to_row_major", "q_row_all_gather", "kv_col_all_gather", "out_row_reduce_scatter")
BWD_OPS = ("qdo_row_all_gather", "kv_col_all_gather_bwd", "dq_row_reduce_scatter", "dkv_col_reduce_scatter",
           "dkv_to_col_major")


# ---------------------------------------------------------------------------------------------- layout helpers
def _to_position_order(blocks: torch.Tensor) -> torch.Tensor:
    """Gathered blocks (G, ..., B, n, H, D) from group ranks i -> (..., B, n*G, H, D) with row m = j*G + i.

    Block i row j of a row gather is position r + (i + j*C)*R, of a column gather c + (i + j*R)*C: in both cases
    sorted index m = j*G + i."""
    g, n = blocks.shape[0], blocks.shape[-3]
    x = blocks.movedim(0, -3)  # (..., B, n, G, H, D)
    return x.reshape(*x.shape[:-4], n * g, *x.shape[-2:])  # (..., B, n*G, H, D)


def _lse_to_position_order(blocks: torch.Tensor) -> torch.Tensor:
    """(G, B, H, n) -> (B, H, n*G) with row m = j*G + i."""
    g, b, h, n = blocks.shape
    return blocks.permute(1, 2, 3, 0).reshape(b, h, n * g)  # (B, H, n*G)


def _unpack(buf: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """comm.unpack of a row of a gathered uint8 buffer; copies the row first when its start is not aligned for
    the widest dtype (torch cannot view misaligned bytes as float). `like` is ordered widest dtype first."""
    if buf.storage_offset() % max(t.element_size() for t in like):
        buf = buf.clone()
    return comm.unpack(buf, like)


# ---------------------------------------------------------------------------------------------- forward pieces
def kv_to_row_major(k_p: torch.Tensor, v_p: torch.Tensor, grid: ProcessGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 L1 (Sec. 3.2): column-major -> row-major cyclic K/V, K and V packed in one message."""
    if not kv_moves(grid.row, grid.col, grid.rows, grid.cols):  # fixed point (diagonal, 1-D grids): no copy
        return k_p, v_p
    buf = permute_kv(comm.pack([k_p, v_p]), grid, op="kv_to_row_major")
    k_t, v_t = comm.unpack(buf, [k_p, v_p])  # (B, N/P, H, D) each: positions c + r*C + j*P
    return k_t, v_t


def gather_kv(k_t: torch.Tensor, v_t: torch.Tensor, grid: ProcessGrid, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 L3: column all-gather of the stacked (k_t, v_t) -> k_g, v_g, positions Span(c, C, N/C).
    A column of one rank (R = 1) gathers nothing: k_t, v_t themselves (no stacking copy)."""
    if grid.rows == 1:
        return k_t, v_t
    kv_t = torch.stack([k_t, v_t]).unsqueeze(0)  # (1, 2, B, N/P, H, D)
    kv_g = comm.all_gather(kv_t, grid.col_group, dim=0, op=op)  # (R, 2, B, N/P, H, D)
    k_g, v_g = _to_position_order(kv_g).unbind(0)  # (B, N/C, H, D) each
    return k_g, v_g


def row_reduce_scatter(out_g: torch.Tensor, lse_g: torch.Tensor, grid: ProcessGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 7 (Sec. 3.3) as one all_to_all + a C-way AttnFix merge (fp32) of this rank's query rows.

    out_g (B, N/R, H, D), lse_g (B, H, N/R): partials of all queries of the grid row against this column's keys.
    Returns out_p (B, N/P, H, D) and lse_p (B, H, N/P) in fp32 (fp64 for fp64 inputs), final for this rank's rows;
    a row of one rank (C = 1) has nothing to merge: out_g (its dtype) and lse_g as they are."""
    cols = grid.cols
    if cols == 1:
        return out_g, lse_g
    b, lq, h, d = out_g.shape
    out_blocks = out_g.reshape(b, lq // cols, cols, h, d)  # (B, N/P, C, H, D): row m = j*C + c' -> p(r, c')
    lse_blocks = lse_g.reshape(b, h, lq // cols, cols)  # (B, H, N/P, C)
    like = [lse_blocks[..., 0], out_blocks[:, :, 0]]  # widest dtype first (lse is fp32/fp64)
    sends = [comm.pack([lse_blocks[..., i], out_blocks[:, :, i]]) for i in range(cols)]
    received = comm.all_to_all(sends, grid.row_group, op="out_row_reduce_scatter")  # C x packed partials of my rows
    parts = [_unpack(buf, like) for buf in received]
    return merge.merge_partials([o for _, o in parts], [l for l, _ in parts])


def _spans(grid: ProcessGrid, seq_len: int) -> tuple[Span, Span]:
    """Positions of q_g (queries == r mod R) and k_g (keys == c mod C), sorted."""
    return Span(grid.row, grid.rows, seq_len // grid.rows), Span(grid.col, grid.cols, seq_len // grid.cols)


def attention2d_forward(q_p, k_p, v_p, grid: ProcessGrid, causal: bool):
    """Algorithm 1 (Sec. 3.2) with Algorithm 7: returns out_p (B, N/P, H, D) in q's dtype, lse_p, k_t, v_t."""
    seq_len = q_p.shape[1] * grid.size
    k_t, v_t = kv_to_row_major(k_p, v_p, grid)  # Alg. 1 L1: (B, N/P, H, D) each
    q_g = _to_position_order(comm.all_gather(q_p.unsqueeze(0), grid.row_group, dim=0, op="q_row_all_gather"))
    # q_g: (B, N/R, H, D), Alg. 1 L2
    k_g, v_g = gather_kv(k_t, v_t, grid, op="kv_col_all_gather")  # Alg. 1 L3: (B, N/C, H, D) each
    q_pos, k_pos = _spans(grid, seq_len)
    out_g, lse_g = kernels.attn_forward(q_g, k_g, v_g, causal=causal, q_pos=q_pos, k_pos=k_pos)  # Alg. 1 L4
    out_p, lse_p = row_reduce_scatter(out_g, lse_g, grid)  # Alg. 7: (B, N/P, H, D), (B, H, N/P)
    return out_p.to(q_p.dtype), lse_p, k_t, v_t


def attention2d_backward(dout_p, q_p, k_t, v_t, out_p, lse_p, grid: ProcessGrid, causal: bool):
    """Backward of Attention2D-NO (derived, see the module docstring): (dq_p, dk_p, dv_p) in fp32 (fp64)."""
    b, n, h, d = q_p.shape
    seq_len, rows, cols = n * grid.size, grid.rows, grid.cols
    q_pos, k_pos = _spans(grid, seq_len)
    if cols == 1:  # a row of one rank: its own rows are the whole block row; out is here, no delta, nothing to scatter
        k_g, v_g = gather_kv(k_t, v_t, grid, op="kv_col_all_gather_bwd")  # B2: (B, N, H, D) on a 1 x 1 grid
        dq_p, dk_g, dv_g = kernels.attn_backward(dout_p, q_p, k_g, v_g, out_p, lse_p, causal=causal, q_pos=q_pos,
                                                 k_pos=k_pos)  # B3
        return (dq_p, *_scatter_dkv(dk_g, dv_g, k_t, grid))  # B5, B6
    delta_p = kernels.row_delta(dout_p, out_p)  # B0: rowsum(dout * out) of this rank's rows, (B, H, N/P) fp32
    # B1: one row all-gather of (lse, delta, q, dout), widest dtype first
    like = [lse_p, delta_p, q_p, dout_p]
    buf = comm.pack(like).unsqueeze(0)  # (1, bytes)
    gathered = comm.all_gather(buf, grid.row_group, dim=0, op="qdo_row_all_gather")  # (C, bytes)
    parts = [_unpack(row, like) for row in gathered.unbind(0)]
    lse_g, delta_g = (_lse_to_position_order(torch.stack([p[i] for p in parts])) for i in (0, 1))  # (B, H, N/R)
    q_g, do_g = _to_position_order(torch.stack([torch.stack(p[2:]) for p in parts])).unbind(0)  # (B, N/R, H, D)
    # B2: K/V column all-gather again
    k_g, v_g = gather_kv(k_t, v_t, grid, op="kv_col_all_gather_bwd")  # (B, N/C, H, D) each
    # B3: the local block backward with the global lse and delta of the rows
    dq_g, dk_g, dv_g = kernels.attn_backward(do_g, q_g, k_g, v_g, None, lse_g, delta=delta_g, causal=causal,
                                             q_pos=q_pos, k_pos=k_pos)
    # B4: row reduce-scatter of dq: row m = j*C + c' of q_g belongs to p(r, c')
    dq_blocks = dq_g.reshape(b, n, cols, h, d)  # (B, N/P, C, H, D)
    dq_p = comm.reduce_scatter([dq_blocks[:, :, i] for i in range(cols)], grid.row_group, op="dq_row_reduce_scatter")
    return (dq_p, *_scatter_dkv(dk_g, dv_g, k_t, grid))  # B5, B6


def _scatter_dkv(dk_g, dv_g, k_t, grid: ProcessGrid):
    """B5 + B6 of the backward: column reduce-scatter of (dk_g, dv_g) (B, N/C, H_kv, D) to the row-major owners,
    then the inverse of Alg. 1 L1 -> (dk_p, dv_p) in the cyclic layout. A column of one rank (R = 1, where the
    permutation is the identity too) has nothing to move: dk_g, dv_g as they are."""
    rows = grid.rows
    if rows == 1 and not kv_moves(grid.row, grid.col, rows, grid.cols):
        return dk_g, dv_g
    b, n, d = k_t.shape[0], k_t.shape[1], k_t.shape[3]
    # B5: column reduce-scatter of (dk, dv): key m = j*R + r' of k_g belongs to p(r', c) (row-major layout)
    dkv_blocks = torch.stack([dk_g, dv_g]).reshape(2, b, n, rows, k_t.shape[2], d)  # (2, B, N/P, R, H_kv, D)
    dkv_t = comm.reduce_scatter([dkv_blocks[:, :, :, i] for i in range(rows)], grid.col_group,
                                op="dkv_col_reduce_scatter")  # (2, B, N/P, H, D)
    # B6: inverse of Alg. 1 L1: back to the column-major cyclic layout
    dkv_p = permute_kv(dkv_t, grid, op="dkv_to_col_major", inverse=True)  # (2, B, N/P, H, D)
    dk_p, dv_p = dkv_p.unbind(0)
    return dk_p, dv_p


class Attention2DFunction(torch.autograd.Function):
    """Attention2D-NO with a hand-written backward that keeps only 1/P shards between the passes."""

    @staticmethod
    def forward(ctx, q_p, k_p, v_p, grid: ProcessGrid, causal: bool):
        out_p, lse_p, k_t, v_t = attention2d_forward(q_p, k_p, v_p, grid, causal)
        ctx.save_for_backward(q_p, k_t, v_t, out_p, lse_p)  # SAVEFORBACKPROP: 1/P shards only
        ctx.grid, ctx.causal = grid, causal
        ctx.dtypes = (q_p.dtype, k_p.dtype, v_p.dtype)
        return out_p

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_p):
        q_p, k_t, v_t, out_p, lse_p = ctx.saved_tensors
        dq, dk, dv = attention2d_backward(dout_p.to(q_p.dtype), q_p, k_t, v_t, out_p, lse_p, ctx.grid, ctx.causal)
        dq_t, dk_t, dv_t = ctx.dtypes
        return dq.to(dq_t), dk.to(dk_t), dv.to(dv_t), None, None


# ---------------------------------------------------------------------------------------------- public entry
def attention2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: ProcessGrid, causal: bool = True,
                heads: int | None = None) -> torch.Tensor:
    """Attention2D-NO (Algorithms 1, 2, 7). q, k, v: this rank's cyclic shard (B, N/P, H, D) -> out, same shape.

    The global sequence length is N = P * (N/P); every rank must pass the same shape. Differentiable.
    heads: q's head count, if known (checks the axis order); see attention/checks.py for every check."""
    check_grid_shards("attention2d", q, k, v, grid)
    check_call("attention2d", q, k, v, "cyclic", grid, causal, heads)
    return Attention2DFunction.apply(q, k, v, grid, bool(causal))


# ---------------------------------------------------------------------------------------------- analytic volume
def comm_ops(batch: int, seq_len: int, heads: int, head_dim: int, rows: int, cols: int, dtype, causal: bool = True,
             rank: int | None = None, kv_heads: int | None = None) -> list[CommOp]:
    """Per-rank communication of Attention2D-NO, op by op, forward then backward (see the module docstring).

    rank: grid rank r*cols + c (None: a typical rank whose K/V permutation moves data, if any does).
    kv_heads: heads of k and v (grouped-query attention; None = heads): every K/V and dK/dV term scales with it.
    Ops that move nothing for this rank (groups of one rank, a fixed point of the permutation) are left out, as
    comm does not count them. `causal` does not change the volume. The all_to_all of Alg. 7 is given
    steps = C - 1, like the paper's ring (conservative for a direct all-to-all)."""
    check_grid(rows, cols, rows * cols)
    world = rows * cols
    check_seq_len(seq_len, world)
    rank = grid_rank(rows, cols, rank)
    e, acc = wire_bytes(dtype)  # input dtype bytes; lse and gradient accumulation bytes
    rows_p = batch * heads * (seq_len // world)  # (batch, head, position) rows of one shard
    vec = rows_p * head_dim * e  # bytes of one (B, N/P, H, D) shard in the input dtype
    vec_acc = rows_p * head_dim * acc  # ... in the accumulation dtype
    lse = rows_p * acc  # bytes of one (B, H, N/P) lse shard
    kv = vec // heads * (kv_heads or heads)  # bytes of one K or V shard (H_kv heads), input dtype
    kv_acc = vec_acc // heads * (kv_heads or heads)  # ... accumulation dtype
    moves_kv = kv_moves(*divmod(rank, cols), rows, cols)

    def coll(phase, name, kind, group, g, nbytes):
        return CommOp(phase, name, kind, group, g, (g - 1) * nbytes, (g - 1) * nbytes, g - 1, steps=g - 1)

    def p2p(phase, name, nbytes):
        return CommOp(phase, name, "p2p", "pair", 2, nbytes, nbytes, 1, steps=1)

    ops = []
    if moves_kv:
        ops.append(p2p("fwd", "kv_to_row_major", 2 * kv))
    if cols > 1:
        ops.append(coll("fwd", "q_row_all_gather", "all_gather", "row", cols, vec))
    if rows > 1:
        ops.append(coll("fwd", "kv_col_all_gather", "all_gather", "col", rows, 2 * kv))
    if cols > 1:
        ops.append(coll("fwd", "out_row_reduce_scatter", "all_to_all", "row", cols, vec + lse))
        ops.append(coll("bwd", "qdo_row_all_gather", "all_gather", "row", cols, 2 * vec + 2 * lse))
    if rows > 1:
        ops.append(coll("bwd", "kv_col_all_gather_bwd", "all_gather", "col", rows, 2 * kv))
    if cols > 1:
        ops.append(coll("bwd", "dq_row_reduce_scatter", "reduce_scatter", "row", cols, vec_acc))
    if rows > 1:
        ops.append(coll("bwd", "dkv_col_reduce_scatter", "reduce_scatter", "col", rows, 2 * kv_acc))
    if moves_kv:
        ops.append(p2p("bwd", "dkv_to_col_major", 2 * kv_acc))
    return ops


def schedule(seq_len: int, rows: int, cols: int) -> Schedule:
    """Alg. 1 L4: one synchronous step, one call per rank: queries == r (mod rows) against keys == c (mod cols)."""
    if rows * cols == 1:
        return single_call_schedule(seq_len)
    return [[[((Span(r, rows, seq_len // rows),), (Span(c, cols, seq_len // cols),))]
             for r, c in (divmod(k, cols) for k in range(rows * cols))]]


register(AttentionImpl("attn2d", attention2d, layout="cyclic", schedule=schedule, comm_ops=comm_ops,
                       label="Attention2D-NO"))

__all__ = ["attention2d", "attention2d_forward", "attention2d_backward", "Attention2DFunction", "comm_ops",
           "kv_to_row_major", "kv_send_peer", "kv_recv_peer", "row_reduce_scatter", "FWD_OPS", "BWD_OPS"]
