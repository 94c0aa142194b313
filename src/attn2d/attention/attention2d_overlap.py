"""Attention2D-O, the overlapped Attention2D (paper Sec. 3.4: Algorithms 4, 5 and 6), with a derived backward.

Grid rows R x cols C (P = R C; square in the paper, any R x C here), p(r, c) has grid rank r*C + c; layout "cyclic"
as Attention2D-NO. All communication is point-to-point through attn2d.distributed.comm, and every async exchange is
posted BEFORE the compute it hides behind ("post, compute, wait"). Forward (Alg. 4): L1 the K/V permutation, the
K/V column ring of Alg. 5 with own q against each arriving block, the Q row ring of Alg. 6 with its pipelined
reduce-scatter of the partial (out, lse), the final AttnFix merge. Backward B0-B5 mirrors it with the global lse
and delta of each row. Steps, byte algebra and the exposed transfers: docs/algorithms.md#attention2d-o.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from attn2d.attention import kernels
from attn2d.attention.checks import check_call
from attn2d.attention.common import check_grid_shards, grid_rank, kv_moves, permute_kv, recv_like
from attn2d.attention.layout import Span
from attn2d.attention.merge import merge_into, merge_partials
from attn2d.attention.registry import AttentionImpl, Schedule, register, single_call_schedule
from attn2d.distributed import comm
from attn2d.distributed.comm import CommOp
from attn2d.distributed.grid import ProcessGrid, check_seq_len
from attn2d.dtypes import acc_dtype, wire_bytes

NAME = "attention2d_overlap"  # the name in error messages and the cross-rank input check
# op names as counted by attn2d.distributed.comm (CommStats.by_op) and predicted by comm_ops; *_TAIL: the last,
# exposed step of a pipelined ring
OP_KV_PERMUTE = "kv_transpose"  # Alg. 4 L1
OP_KV_RING = "kv_col_gather"  # Alg. 5
OP_Q_RING = "q_row_ring"  # Alg. 4 L3, Alg. 6
OP_OUT_SCATTER, OP_OUT_SCATTER_TAIL = "out_row_scatter", "out_row_scatter_tail"  # Alg. 6 L9
OP_QBUNDLE_RING = "qbundle_row_ring"  # B1, B3
OP_KV_RING_BWD = "kv_col_gather_bwd"  # B2
OP_DQ_SCATTER, OP_DQ_SCATTER_TAIL = "dq_row_scatter", "dq_row_scatter_tail"  # B3
OP_DKV_SCATTER, OP_DKV_SCATTER_TAIL = "dkv_col_scatter", "dkv_col_scatter_tail"  # B4
OP_DKV_PERMUTE = "dkv_transpose"  # B5
FWD_OPS = (OP_KV_PERMUTE, OP_KV_RING, OP_Q_RING, OP_OUT_SCATTER, OP_OUT_SCATTER_TAIL)
BWD_OPS = (OP_QBUNDLE_RING, OP_KV_RING_BWD, OP_DQ_SCATTER, OP_DQ_SCATTER_TAIL, OP_DKV_SCATTER, OP_DKV_SCATTER_TAIL,
           OP_DKV_PERMUTE)


# ------------------------------------------------------------------------------------------------ helpers
class _ColumnReduceScatter:
    """Backward B4: pipelined ring reduce-scatter of the dK_g/dV_g blocks (accumulation dtype) up the grid column.

    dkv: (R, 2, B, n, H, D), slot r' = contribution to the k_t block of grid row r'. Call ready(s) for
    s = 1..R-1 in order once block (r+s) % R is final on this rank; finish() returns this rank's (2, B, n, H, D)."""

    def __init__(self, grid: ProcessGrid, dkv: torch.Tensor, tail_exposed: bool):
        self.grid, self.dkv, self.tail_exposed = grid, dkv, tail_exposed
        self.up = grid.global_rank(grid.row - 1, grid.col)
        self.down = grid.global_rank(grid.row + 1, grid.col)
        self.handle, self.keep = None, None

    def ready(self, s: int) -> None:
        R, r = self.grid.rows, self.grid.row
        msg = self.dkv[(r + s) % R]  # (2, B, n, H, D)
        if s > 1:
            msg = msg + self.handle.wait()[0]  # partial of block (r+s) from the rows below
        recv = recv_like(msg)
        name = OP_DKV_SCATTER_TAIL if self.tail_exposed and s == R - 1 else OP_DKV_SCATTER
        self.keep = msg  # the send buffer must live until the exchange completes
        self.handle = comm.send_recv([(msg, self.up)], [(recv, self.down)], op=name, async_op=True,
                                     group=self.grid.col_group)

    def finish(self) -> torch.Tensor:
        own = self.dkv[self.grid.row]
        if self.grid.rows == 1:
            return own
        return own + self.handle.wait()[0]  # (2, B, n, H, D)


def column_ring(kv_t: torch.Tensor, grid: ProcessGrid, op: str):
    """Algorithm 5 L1-L4 (and the backward's B2): the K/V blocks of this grid column, this rank's own first. Each
    block is passed up the column (to p(r-1, c), the next one received from p(r+1, c)) before it is yielded, so
    the caller's compute on it hides the exchange. Yields (i, src, kv): step i, the grid row src = (r + i) % R the
    block comes from, and the block (2, B, n, H_kv, D)."""
    R, r, c = grid.rows, grid.row, grid.col
    up, down = grid.global_rank(r - 1, c), grid.global_rank(r + 1, c)  # Alg. 5 L1
    kv, handle = kv_t, None
    for i in range(R):  # Alg. 5 L2
        if i > 0:
            kv = handle.wait()[0]  # Alg. 5 L3
        if i < R - 1:  # Alg. 5 L4: pass it on before computing with it
            handle = comm.send_recv([(kv, up)], [(recv_like(kv), down)], op=op, async_op=True, group=grid.col_group)
        yield i, (r + i) % R, kv


def row_ring(q_n: torch.Tensor, grid: ProcessGrid, op: str):
    """Algorithm 6 L2-L4, L10 (and the backward's B3): the Q-side blocks of the other columns of this grid row.
    q_n is the first one (column (c+1) % C), already received (Alg. 4 L3-5, B1). Each block is passed left (to
    p(r, c-1), the next one received from p(r, c+1) into the second of two buffers) before it is yielded. Yields
    (i, src, block) for i = 1..C-1: the block of column src = (c + i) % C."""
    C, r, c = grid.cols, grid.row, grid.col
    left, right = grid.global_rank(r, c - 1), grid.global_rank(r, c + 1)  # Alg. 6 L1
    q_b, handle = recv_like(q_n), None
    for i in range(1, C):  # Alg. 6 L2
        if i > 1:
            handle.wait()  # Alg. 6 L3 (fills q_n, the buffer swapped in at L10)
        if i < C - 1:  # Alg. 6 L4
            handle = comm.send_recv([(q_n, left)], [(q_b, right)], op=op, async_op=True, group=grid.row_group)
        yield i, (c + i) % C, q_n
        q_n, q_b = q_b, q_n  # Alg. 6 L10


def pass_left(msg: torch.Tensor, grid: ProcessGrid, op: str):
    """One async step along the grid row: msg to p(r, c-1), a message of its shape from p(r, c+1) (the handle's
    wait() returns [received])."""
    r, c = grid.row, grid.col
    return comm.send_recv([(msg, grid.global_rank(r, c - 1))], [(recv_like(msg), grid.global_rank(r, c + 1))], op=op,
                          async_op=True, group=grid.row_group)


def kv_g_spans(grid: ProcessGrid, n: int) -> tuple[Span, ...]:
    """Positions of the block-ordered k_g of grid column c: block r' holds c + r'*C + j*P."""
    return tuple(Span(grid.col + rr * grid.cols, grid.size, n) for rr in range(grid.rows))


# ------------------------------------------------------------------------------------------------ forward
def gather_compute(q_p, kv_t, grid: ProcessGrid, causal: bool):
    """Algorithm 5 (GTHRCMPT), Sec. 3.4: K/V column ring overlapped with own q_p against each arriving block.

    kv_t: (2, B, n, H, D) this rank's k_t, v_t. Returns kv_g (2, B, N/C, H, D) in block order (positions
    kv_g_spans(grid, n)) and the merge (out, lse) of q_p against all of it, in the accumulation dtype."""
    R, C, P, r, c = grid.rows, grid.cols, grid.size, grid.row, grid.col
    n = q_p.shape[1]
    q_pos = Span(r + c * R, P, n)
    blocks, out, lse = [None] * R, None, None
    for i, src, kv in column_ring(kv_t, grid, OP_KV_RING):
        o_i, l_i = kernels.attn_forward(q_p, kv[0], kv[1], causal=causal, q_pos=q_pos, k_pos=Span(c + src * C, P, n))
        if i == 0:
            out, lse = o_i.to(acc_dtype(q_p.dtype)), l_i  # the running fp32 accumulator
        else:
            merge_into(out, lse, o_i, l_i)  # Alg. 5 L6 (fp32, in place)
        blocks[src] = kv
    kv_g = torch.cat(blocks, dim=2)  # (2, B, N/C, H, D): rows [r'n, (r'+1)n) = block of grid row r'
    return kv_g, out, lse


def gather_compute_scatter(q_n, kv_g, grid: ProcessGrid, causal: bool, out_dtype: torch.dtype):
    """Algorithm 6 (GTHRCMPTSCTR), Sec. 3.4: Q row ring + compute + pipelined reduce-scatter of the partials.

    q_n: (B, n, H, D) the Q block of column (c+1) % C (already received, Alg. 4 L3-5). Returns the (out, lse) of
    our own q_p over the keys of every other column, in the accumulation dtype."""
    R, C, P, r = grid.rows, grid.cols, grid.size, grid.row
    B, n, H, D = q_n.shape
    k_pos = kv_g_spans(grid, n)
    acc = acc_dtype(out_dtype)
    like = [torch.empty(B, H, n, dtype=acc), torch.empty(B, n, H, D, dtype=out_dtype)]  # wire: lse, out (q's dtype)
    h_s = None
    for i, src, q_i in row_ring(q_n, grid, OP_Q_RING):
        o_p, l_p = kernels.attn_forward(q_i, kv_g[0], kv_g[1], causal=causal, q_pos=Span(r + src * R, P, n),
                                        k_pos=k_pos)  # Alg. 6 L5 (staircase: R offset-causal pieces)
        if i > 1:
            l_r, o_r = comm.unpack(h_s.wait()[0], like)  # Alg. 6 L7
            o_p, l_p = merge_partials([o_p, o_r], [l_p, l_r])  # Alg. 6 L8 (fp32)
        sent = comm.pack([l_p.to(acc), o_p.to(out_dtype)])  # widest dtype first; lives until the exchange completes
        h_s = pass_left(sent, grid, OP_OUT_SCATTER if i < C - 1 else OP_OUT_SCATTER_TAIL)  # Alg. 6 L9
    l, o = comm.unpack(h_s.wait()[0], like)  # Alg. 6 L11
    return o, l


def attention2d_overlap_forward(q_p, k_p, v_p, grid: ProcessGrid, causal: bool):
    """Algorithm 4 (Attention2D-O forward), Sec. 3.4. Returns out_p (q's dtype), lse_p (accumulation dtype), kv_t."""
    C = grid.cols
    kv_t = permute_kv(torch.stack([k_p, v_p]), grid, op=OP_KV_PERMUTE)  # Alg. 4 L1, (2, B, n, H, D)
    if C > 1:  # Alg. 4 L2-3: first Q block in the background
        h_g = pass_left(q_p, grid, OP_Q_RING)
    kv_g, out1, lse1 = gather_compute(q_p, kv_t, grid, causal)  # Alg. 4 L4
    if C > 1:
        q_n = h_g.wait()[0]  # Alg. 4 L5
        out2, lse2 = gather_compute_scatter(q_n, kv_g, grid, causal, q_p.dtype)  # Alg. 4 L6
        merge_into(out1, lse1, out2, lse2)  # Alg. 4 L7, in place (fp32)
    lse_p = lse1.to(acc_dtype(q_p.dtype))
    return out1.to(q_p.dtype), lse_p, kv_t  # Alg. 4 L8


# ------------------------------------------------------------------------------------------------ backward
def attention2d_overlap_backward(dout_p, q_p, kv_t, out_p, lse_p, grid: ProcessGrid, causal: bool):
    """Attention2D-O backward (B0-B5, docs/algorithms.md#attention2d-o). Returns dq_p, dk_p, dv_p in the
    accumulation dtype."""
    R, C, P, r, c = grid.rows, grid.cols, grid.size, grid.row, grid.col
    B, n, H, D = q_p.shape
    acc = acc_dtype(q_p.dtype)
    delta_p = kernels.row_delta(dout_p, out_p)  # B0: rowsum(dout * out) of this rank's rows, (B, H, n) fp32
    own = [lse_p, delta_p, q_p, dout_p]  # widest dtype first: every view of a packed buffer stays aligned
    if C > 1:  # B1: first Q-side bundle in the background
        bundle = comm.pack(own)  # (bytes,) lse and delta fp32, then q, dout in q's dtype
        h_g = pass_left(bundle, grid, OP_QBUNDLE_RING)

    # B2: phase A, K/V column ring overlapped with own bundle against each block
    dq_own = torch.zeros(B, n, H, D, dtype=acc, device=q_p.device)
    Hkv = kv_t.shape[3]  # k/v heads (grouped-query attention: fewer than q's H)
    dkv = torch.zeros(R, 2, B, n, Hkv, D, dtype=acc, device=q_p.device)  # dK_g, dV_g by source grid row
    scatter = _ColumnReduceScatter(grid, dkv, tail_exposed=(C == 1))
    q_pos = Span(r + c * R, P, n)
    blocks = [None] * R
    for i, src, kv in column_ring(kv_t, grid, OP_KV_RING_BWD):
        dq, dk, dv = kernels.attn_backward(dout_p, q_p, kv[0], kv[1], None, lse_p, delta=delta_p, causal=causal,
                                           q_pos=q_pos, k_pos=Span(c + src * C, P, n))
        dq_own += dq
        dkv[src, 0] += dk
        dkv[src, 1] += dv
        blocks[src] = kv
        if C == 1 and i > 0:  # phase A is the last stage: block r+i is final, send it on
            scatter.ready(i)

    # B3: phase B, Q-side bundles along the row against k_g, dq partials pipelined back to their owners
    if C > 1:
        kv_g = torch.cat(blocks, dim=2)  # (2, B, N/C, H, D), block order
        k_pos = kv_g_spans(grid, n)
        h_s = None
        for i, src, b_i in row_ring(h_g.wait()[0], grid, OP_QBUNDLE_RING):  # b_i: bundle of column src
            lse, delta, q, do = comm.unpack(b_i, own)
            src_pos = Span(r + src * R, P, n)
            if i < C - 1:
                dq_i, dk, dv = kernels.attn_backward(do, q, kv_g[0], kv_g[1], None, lse, delta=delta, causal=causal,
                                                     q_pos=src_pos, k_pos=k_pos)
                dkv += torch.stack([dk, dv]).view(2, B, R, n, Hkv, D).permute(2, 0, 1, 3, 4, 5)  # (R, 2, B, n, Hkv, D)
            else:  # last bundle: block by block, so the column reduce-scatter (B4) hides behind the tiles
                dq_i = torch.zeros(B, n, H, D, dtype=acc, device=q_p.device)
                for s in list(range(1, R)) + [0]:
                    blk = (r + s) % R
                    dq_t, dk, dv = kernels.attn_backward(do, q, blocks[blk][0], blocks[blk][1], None, lse,
                                                         delta=delta, causal=causal, q_pos=src_pos,
                                                         k_pos=Span(c + blk * C, P, n))
                    dq_i += dq_t
                    dkv[blk, 0] += dk
                    dkv[blk, 1] += dv
                    if s > 0:
                        scatter.ready(s)
            if i > 1:
                dq_i = dq_i + h_s.wait()[0]  # partial of the same Q block from the columns to the right
            sent = dq_i  # the send buffer must live until the exchange completes
            h_s = pass_left(sent, grid, OP_DQ_SCATTER if i < C - 1 else OP_DQ_SCATTER_TAIL)
        dkv_t = scatter.finish()  # B4 done: (2, B, n, H, D)
        dq_own = dq_own + h_s.wait()[0]
    else:
        dkv_t = scatter.finish()
    dkv_p = permute_kv(dkv_t, grid, op=OP_DKV_PERMUTE, inverse=True)  # B5, (2, B, n, H, D)
    return dq_own, dkv_p[0], dkv_p[1]


class Attention2DOverlapFunction(torch.autograd.Function):
    """Attention2D-O with a hand-written backward that keeps only 1/P shards between the passes."""

    @staticmethod
    def forward(ctx, q, k, v, grid, causal):
        q_p, k_p, v_p = (t.contiguous() for t in (q, k, v))
        out_p, lse_p, kv_t = attention2d_overlap_forward(q_p, k_p, v_p, grid, causal)
        ctx.grid, ctx.causal = grid, causal
        ctx.save_for_backward(q_p, kv_t, out_p, lse_p)  # Alg. 4 L9: only 1/P shards
        return out_p

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q_p, kv_t, out_p, lse_p = ctx.saved_tensors
        dout_p = dout.to(q_p.dtype).contiguous()  # (B, n, H, D)
        dq, dk, dv = attention2d_overlap_backward(dout_p, q_p, kv_t, out_p, lse_p, ctx.grid, ctx.causal)
        return dq.to(q_p.dtype), dk.to(q_p.dtype), dv.to(q_p.dtype), None, None


def attention2d_overlap(q, k, v, grid: ProcessGrid, causal: bool = True, heads: int | None = None):
    """Attention2D-O (Algorithm 4, Sec. 3.4): this rank's cyclic shard q, k, v (B, N/P, H, D) -> out, same shape.

    Same API, layout and checks as attention2d (Attention2D-NO); differentiable."""
    check_grid_shards(NAME, q, k, v, grid)
    check_call(NAME, q, k, v, "cyclic", grid, causal, heads)
    return Attention2DOverlapFunction.apply(q, k, v, grid, bool(causal))


# ------------------------------------------------------------------------------------------------ analytic comm
def comm_ops(batch, seq_len, heads, head_dim, rows, cols, dtype, causal, rank=None, kv_heads=None) -> list[CommOp]:
    """Per-rank communication of Attention2D-O (forward and backward), op names as counted by comm
    (docs/algorithms.md#attention2d-o).

    rank: grid rank r*cols + c; None = a typical rank that is not a fixed point of the K/V transpose (if any).
    The volume does not depend on `causal`. Zero-message ops are left out (the implementation skips them)."""
    P = rows * cols
    check_seq_len(seq_len, P)
    e, a = wire_bytes(dtype)
    R, C, n = rows, cols, seq_len // P
    blk = batch * n * heads * head_dim  # elements of one (B, n, H, D) shard
    kvb = batch * n * (kv_heads or heads) * head_dim  # ... of one K or V shard (H_kv heads)
    lse = batch * heads * n  # elements of one (B, H, n) lse
    rank = grid_rank(rows, cols, rank)
    moves = kv_moves(rank // C, rank % C, R, C)

    ops: list[CommOp] = []

    def add(phase, name, group, size, nbytes, msgs, overlapped):
        if msgs > 0:
            ops.append(CommOp(phase, name, "p2p", group, size, nbytes * msgs, nbytes * msgs, msgs, msgs, overlapped))

    # forward
    add("fwd", OP_KV_PERMUTE, "pair", 2, 2 * kvb * e, int(moves), False)
    add("fwd", OP_KV_RING, "col", R, 2 * kvb * e, R - 1, True)
    add("fwd", OP_Q_RING, "row", C, blk * e, C - 1, True)
    add("fwd", OP_OUT_SCATTER, "row", C, blk * e + lse * a, max(C - 2, 0), True)
    add("fwd", OP_OUT_SCATTER_TAIL, "row", C, blk * e + lse * a, int(C > 1), False)
    # backward
    add("bwd", OP_QBUNDLE_RING, "row", C, 2 * blk * e + 2 * lse * a, C - 1, True)
    add("bwd", OP_KV_RING_BWD, "col", R, 2 * kvb * e, R - 1, True)
    add("bwd", OP_DQ_SCATTER, "row", C, blk * a, max(C - 2, 0), True)
    add("bwd", OP_DQ_SCATTER_TAIL, "row", C, blk * a, int(C > 1), False)
    if C > 1:
        add("bwd", OP_DKV_SCATTER, "col", R, 2 * kvb * a, R - 1, True)
    else:
        add("bwd", OP_DKV_SCATTER, "col", R, 2 * kvb * a, max(R - 2, 0), True)
        add("bwd", OP_DKV_SCATTER_TAIL, "col", R, 2 * kvb * a, int(R > 1), False)
    add("bwd", OP_DKV_PERMUTE, "pair", 2, 2 * kvb * a, int(moves), False)
    return ops


def schedule(seq_len: int, rows: int, cols: int) -> Schedule:
    """Alg. 5: `rows` steps of the own q_p against the arriving K/V block of grid row r' (positions c + r'*cols + jP),
    then Alg. 6: cols - 1 steps of the Q block of p(r, c+i) against k_g (a staircase: R offset-causal pieces)."""
    P = rows * cols
    if P == 1:
        return single_call_schedule(seq_len)
    n = seq_len // P

    def q_p(r, c):  # the column-major cyclic shard of p(r, c)
        return (Span(r + c * rows, P, n),)

    def k_t(r, c):  # the row-major shard of p(r, c) after Alg. 4 L1
        return (Span(c + r * cols, P, n),)

    sched = [[[(q_p(k // cols, k % cols), k_t((k // cols + i) % rows, k % cols))] for k in range(P)]
             for i in range(rows)]  # Alg. 5: K/V ring along the grid column
    sched += [[[(q_p(k // cols, (k % cols + i) % cols), (Span(k % cols, cols, seq_len // cols),))] for k in range(P)]
              for i in range(1, cols)]  # Alg. 6: Q ring along the grid row, against the gathered k_g
    return sched


register(AttentionImpl("attn2d_overlap", attention2d_overlap, layout="cyclic", schedule=schedule, comm_ops=comm_ops,
                       label="Attention2D-O"))

__all__ = ["attention2d_overlap", "attention2d_overlap_forward", "attention2d_overlap_backward",
           "Attention2DOverlapFunction", "comm_ops", "schedule", "column_ring", "gather_compute",
           "gather_compute_scatter", "FWD_OPS", "BWD_OPS"]
