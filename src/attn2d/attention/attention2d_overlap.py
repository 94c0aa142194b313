"""Attention2D-O: the overlapped variant of Attention2D (Algorithms 4, 5 and 6, paper Sec. 3.4), forward and backward.

Grid: rows R x cols C (P = R C; square in the paper, any R x C here), p(r, c) has grid rank r*C + c.
Layout "cyclic" (as Attention2D-NO): p(r, c) holds q_p, k_p, v_p at positions r + c*R + j*P, j < n = N/P.
All communication is point-to-point through attn2d.distributed.comm; every async exchange is posted BEFORE the
compute it hides behind ("post, compute, wait").

Forward (Algorithm 4):
  L1  K/V column -> row-major exchange: p(r, c) gets k_t, v_t at positions c + r*C + j*P. Square grid: with the
      transpose peer p(c, r), skipped on the diagonal. R x C grid: the residue rho = c + r*C is held by
      p(rho % R, rho // R); our own residue sigma = r + c*R goes to p(sigma // C, sigma % C). (1 x C and R x 1:
      identity, nothing sent.)                                                              [op kv_transpose]
  L3  post the first Q shift along the grid row (send q_p left, receive the right neighbour's) [op q_row_ring]
  L4  Alg. 5 GTHRCMPT: K/V ring up the grid column (send up, receive from below), overlapped with own q_p
      (positions Span(r + c*R, P, n)) against each arriving block of grid row r' (Span(c + r'*C, P, n)),
      merged on the fly in fp32, in place (merge.merge_into).                                          [op kv_col_gather]
      k_g, v_g = the R blocks in block order: positions (Span(c + r'*C, P, n) for r' < R), the keys == c (mod C).
  L6  Alg. 6 GTHRCMPTSCTR: at step i = 1..C-1 this rank holds the Q block of column (c+i) % C (double buffered,
      the next one already in flight), computes it against k_g, adds the partial (out, lse) received from the
      right neighbour (the same Q block, one step earlier) and passes it left: a pipelined reduce-scatter. After
      C-1 steps the partial of our own q_p over every other column has arrived.
                                                        [ops q_row_ring, out_row_scatter, out_row_scatter_tail]
  L7  merge with the L4 result (fp32); out_p in q's dtype. Saved for backward: q_p, k_t, v_t, out_p, lse_p (1/P).
The staircase mask of Alg. 6 L5 (q stride P against the keys == c mod C, stride C) is given to the kernel layer as
positions. Keeping k_g in block order, with k_pos a tuple of R Spans of stride P, lets kernels.attn_forward split
the call into R offset-causal pieces, one per (q block, kv block) pair: the paper's remedy for FlashAttention, no
explicit mask. An interleaved k_g (one Span(c, C, N/C)) would be just as exact but becomes one explicit-mask call.

Backward (derived here; the paper's is not available). With the FINAL out and lse of each query row, every
(query block, key block) tile's gradient is independent: P = exp(S - lse), delta = rowsum(dout * out),
dV += P^T dO, dS = P (dO V^T - delta) scale, dQ += dS K, dK += dS^T Q (kernels.attn_backward). p(r, c) owns the
tile Q_g(r) x K_g(c) (queries = r mod R, keys = c mod C), exactly as in the forward, and runs it as:
  B0  delta_p = rowsum(dout_p * out_p) (fp32) of its own rows: out is used nowhere else, so it never travels
  B1  post the first shift of the Q-side bundle (lse_p, delta_p, q_p, dout_p), packed into one message, along the
      grid row                                                                              [op qbundle_row_ring]
  B2  phase A (mirror of Alg. 5): K/V ring up the column again (recompute, nothing gathered was saved),
      overlapped with own bundle against each arriving K/V block: dq_own accumulates locally (fp32), dk/dv go
      into this rank's fp32 dK_g/dV_g (one slot per block).                                [op kv_col_gather_bwd]
  B3  phase B (mirror of Alg. 6): bundle of column (c+i) % C against k_g: its dq partial (fp32) is added to the
      one arriving from the right and passed left (pipelined reduce-scatter, like the forward's out partials);
      dk/dv accumulate into dK_g/dV_g. After C-1 steps our own dq from every other column has arrived; add dq_own.
                                                     [ops qbundle_row_ring, dq_row_scatter, dq_row_scatter_tail]
  B4  column reduce-scatter ring of dK_g/dV_g (fp32, dk and dv stacked into one message) back to the owner of each
      k_t block: step s sends block (r+s) % R up, adding the partial of block (r+s+1) % R from below. It is
      pipelined with the LAST compute stage: with C > 1 the last bundle of B3 is computed block by block in the
      order r+1, ..., r+R-1, r, each reduce-scatter step posted as soon as its block is final (own block last, so
      every step hides behind a tile); with C == 1, B2 is the last stage and step s follows block r+s (the final
      step is exposed).                                            [ops dkv_col_scatter, dkv_col_scatter_tail]
  B5  inverse of L1 (fp32 dk, dv in one message)                                            [op dkv_transpose]
  Gradients are accumulated and sent in fp32 (fp64 for fp64 inputs) and cast to the input dtype at the end.

Per-rank volume (n = N/P, per batch*head: b = element size, f = 4 (8 for fp64)): forward
  kv_transpose 2nD b (off-fixed-point ranks), kv_col_gather (R-1) 2nD b, q_row_ring (C-1) nD b,
  out_row_scatter[_tail] (C-1) n (D b + f)  -- the partial out travels in q's dtype, its lse in fp32;
backward qbundle_row_ring (C-1) n (2 D b + 2 f), kv_col_gather_bwd (R-1) 2nD b, dq_row_scatter[_tail] (C-1) nD f,
  dkv_col_scatter[_tail] (R-1) 2nD f, dkv_transpose 2nD f. Messages: one per ring step (K with V, out with lse,
  q with dout, lse and delta, dk with dv packed). Bytes AND messages equal Attention2D-NO's comm_ops for every rank
  and phase (tested); what differs is how they move: here neighbour-to-neighbour ring steps in a fixed order, each
  overlapped with a compute, there one collective per step (all_gather, all_to_all, reduce_scatter) that NCCL can
  route by topology. The partial output carries one scalar per row (lse = M + log D) instead of the paper's (M, D).
Exposed (not overlapped) steps: kv_transpose, the last out/dq scatter step, dkv_transpose, and with C == 1 the last
dkv step. Everything else has a compute between its post and its wait (tested by tracing the schedule).
Where overlap can really help: CUDA + NCCL (P2P on NCCL's own stream, compute on the default one; not run on a GPU
here). On gloo/CPU the transport threads compete with compute for the same cores, so the schedule is correct but
hides little.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from attn2d.attention import kernels
from attn2d.attention.registry import AttentionImpl, Schedule, register, single_call_schedule
from attn2d.attention.checks import check_call
from attn2d.attention.common import acc_dtype, check_grid_shards, grid_rank, kv_moves, permute_kv, recv_like, wire_bytes
from attn2d.attention.layout import Span
from attn2d.attention.merge import merge_into, merge_partials
from attn2d.distributed import comm
from attn2d.distributed.comm import CommOp
from attn2d.distributed.grid import ProcessGrid, check_seq_len

# ------------------------------------------------------------------------------------------------ helpers
class _ColumnReduceScatter:
    """Backward B4: pipelined ring reduce-scatter of the fp32 dK_g/dV_g blocks up the grid column.

    dkv: (R, 2, B, n, H, D), slot r' = contribution to the k_t block of grid row r'. Call ready(s) for
    s = 1..R-1 in order once block (r+s) % R is final on this rank; finish() returns this rank's (2, B, n, H, D)."""

    def __init__(self, grid: ProcessGrid, dkv: torch.Tensor, op: str, tail_exposed: bool):
        self.grid, self.dkv, self.op, self.tail_exposed = grid, dkv, op, tail_exposed
        self.up = grid.global_rank(grid.row - 1, grid.col)
        self.down = grid.global_rank(grid.row + 1, grid.col)
        self.handle, self.keep = None, None

    def ready(self, s: int) -> None:
        R, r = self.grid.rows, self.grid.row
        msg = self.dkv[(r + s) % R]  # (2, B, n, H, D)
        if s > 1:
            msg = msg + self.handle.wait()[0]  # partial of block (r+s) from the rows below
        recv = recv_like(msg)
        name = self.op + ("_tail" if self.tail_exposed and s == R - 1 else "")
        self.keep = msg  # the send buffer must live until the exchange completes
        self.handle = comm.send_recv([(msg, self.up)], [(recv, self.down)], op=name, async_op=True,
                                     group=self.grid.col_group)

    def finish(self) -> torch.Tensor:
        own = self.dkv[self.grid.row]
        if self.grid.rows == 1:
            return own
        return own + self.handle.wait()[0]  # (2, B, n, H, D)


# ------------------------------------------------------------------------------------------------ forward
def gather_compute(q_p, kv_t, grid: ProcessGrid, causal: bool):
    """Algorithm 5 (GTHRCMPT), Sec. 3.4: K/V column ring overlapped with own q_p against each arriving block.

    kv_t: (2, B, n, H, D) this rank's k_t, v_t. Returns kv_g (2, B, N/C, H, D) in block order (positions
    kv_g_spans(grid, n)) and the fp32 merge (out, lse) of q_p against all of it."""
    R, C, P, r, c = grid.rows, grid.cols, grid.size, grid.row, grid.col
    n = q_p.shape[1]
    up, down = grid.global_rank(r - 1, c), grid.global_rank(r + 1, c)  # Alg. 5 L1
    q_pos = Span(r + c * R, P, n)
    blocks, kv, handle, out, lse = [None] * R, kv_t, None, None, None
    for i in range(R):  # Alg. 5 L2; the block held now comes from grid row (r + i) % R
        if i > 0:
            kv = handle.wait()[0]  # Alg. 5 L3
        if i < R - 1:  # Alg. 5 L4: pass it on before computing with it
            handle = comm.send_recv([(kv, up)], [(recv_like(kv), down)], op="kv_col_gather", async_op=True,
                                    group=grid.col_group)
        src = (r + i) % R
        o_i, l_i = kernels.attn_forward(q_p, kv[0], kv[1], causal=causal, q_pos=q_pos, k_pos=Span(c + src * C, P, n))
        if i == 0:
            out, lse = o_i.to(acc_dtype(q_p.dtype)), l_i  # the running fp32 accumulator
        else:
            merge_into(out, lse, o_i, l_i)  # Alg. 5 L6 (fp32, in place)
        blocks[src] = kv
    kv_g = torch.cat(blocks, dim=2)  # (2, B, N/C, H, D): rows [r'n, (r'+1)n) = block of grid row r'
    return kv_g, out, lse


def kv_g_spans(grid: ProcessGrid, n: int) -> tuple[Span, ...]:
    """Positions of the block-ordered k_g of grid column c: block r' holds c + r'*C + j*P."""
    return tuple(Span(grid.col + rr * grid.cols, grid.size, n) for rr in range(grid.rows))


def gather_compute_scatter(q_n, kv_g, grid: ProcessGrid, causal: bool, out_dtype: torch.dtype):
    """Algorithm 6 (GTHRCMPTSCTR), Sec. 3.4: Q row ring + compute + pipelined reduce-scatter of the partials.

    q_n: (B, n, H, D) the Q block of column (c+1) % C (already received, Alg. 4 L3-5). Returns the fp32 (out, lse)
    of our own q_p over the keys of every other column."""
    R, C, P, r, c = grid.rows, grid.cols, grid.size, grid.row, grid.col
    B, n, H, D = q_n.shape
    left, right = grid.global_rank(r, c - 1), grid.global_rank(r, c + 1)  # Alg. 6 L1
    k_pos = kv_g_spans(grid, n)
    acc = acc_dtype(out_dtype)
    like = [torch.empty(B, H, n, dtype=acc), torch.empty(B, n, H, D, dtype=out_dtype)]  # wire: lse, out (q's dtype)
    q_b = recv_like(q_n)
    h_g = h_s = sent = None
    for i in range(1, C):  # Alg. 6 L2; q_n is the Q block of column (c + i) % C
        if i > 1:
            h_g.wait()  # Alg. 6 L3 (fills q_n, the buffer swapped in at L10)
        if i < C - 1:  # Alg. 6 L4
            h_g = comm.send_recv([(q_n, left)], [(q_b, right)], op="q_row_ring", async_op=True, group=grid.row_group)
        src = (c + i) % C
        o_p, l_p = kernels.attn_forward(q_n, kv_g[0], kv_g[1], causal=causal, q_pos=Span(r + src * R, P, n),
                                        k_pos=k_pos)  # Alg. 6 L5 (staircase: R offset-causal pieces)
        if i > 1:
            l_r, o_r = comm.unpack(h_s.wait()[0], like)  # Alg. 6 L7
            o_p, l_p = merge_partials([o_p, o_r], [l_p, l_r])  # Alg. 6 L8 (fp32)
        sent = comm.pack([l_p.to(acc), o_p.to(out_dtype)])  # widest dtype first: every view stays aligned
        op = "out_row_scatter" if i < C - 1 else "out_row_scatter_tail"
        h_s = comm.send_recv([(sent, left)], [(recv_like(sent), right)], op=op, async_op=True,
                             group=grid.row_group)  # Alg. 6 L9
        q_n, q_b = q_b, q_n  # Alg. 6 L10
    l, o = comm.unpack(h_s.wait()[0], like)  # Alg. 6 L11
    return o, l


def _forward(q_p, k_p, v_p, grid: ProcessGrid, causal: bool):
    """Algorithm 4 (Attention2D-O forward), Sec. 3.4. Returns out_p (q's dtype), lse_p (fp32), kv_t."""
    C, r, c = grid.cols, grid.row, grid.col
    kv_t = permute_kv(torch.stack([k_p, v_p]), grid, op="kv_transpose")  # Alg. 4 L1, (2, B, n, H, D)
    if C > 1:  # Alg. 4 L2-3: first Q block in the background
        left, right = grid.global_rank(r, c - 1), grid.global_rank(r, c + 1)
        q_n = recv_like(q_p)
        h_g = comm.send_recv([(q_p, left)], [(q_n, right)], op="q_row_ring", async_op=True, group=grid.row_group)
    kv_g, out1, lse1 = gather_compute(q_p, kv_t, grid, causal)  # Alg. 4 L4
    if C > 1:
        h_g.wait()  # Alg. 4 L5
        out2, lse2 = gather_compute_scatter(q_n, kv_g, grid, causal, q_p.dtype)  # Alg. 4 L6
        merge_into(out1, lse1, out2, lse2)  # Alg. 4 L7, in place (fp32)
    lse_p = lse1.to(acc_dtype(q_p.dtype))
    return out1.to(q_p.dtype), lse_p, kv_t  # Alg. 4 L8


# ------------------------------------------------------------------------------------------------ backward
def _backward(dout_p, q_p, kv_t, out_p, lse_p, grid: ProcessGrid, causal: bool):
    """Attention2D-O backward (B1-B5 of the module docstring). Returns dq_p, dk_p, dv_p in fp32 (fp64)."""
    R, C, P, r, c = grid.rows, grid.cols, grid.size, grid.row, grid.col
    B, n, H, D = q_p.shape
    acc = acc_dtype(q_p.dtype)
    left, right = grid.global_rank(r, c - 1), grid.global_rank(r, c + 1)
    up, down = grid.global_rank(r - 1, c), grid.global_rank(r + 1, c)
    delta_p = kernels.row_delta(dout_p, out_p)  # B0: rowsum(dout * out) of this rank's rows, (B, H, n) fp32
    own = [lse_p, delta_p, q_p, dout_p]  # widest dtype first: every view of a packed buffer stays aligned
    if C > 1:  # B1: first Q-side bundle in the background
        bundle = comm.pack(own)  # (bytes,) lse and delta fp32, then q, dout in q's dtype
        b_n = recv_like(bundle)
        h_g = comm.send_recv([(bundle, left)], [(b_n, right)], op="qbundle_row_ring", async_op=True,
                             group=grid.row_group)

    # B2: phase A, K/V column ring overlapped with own bundle against each block
    dq_own = torch.zeros(B, n, H, D, dtype=acc, device=q_p.device)
    Hkv = kv_t.shape[3]  # k/v heads (grouped-query attention: fewer than q's H)
    dkv = torch.zeros(R, 2, B, n, Hkv, D, dtype=acc, device=q_p.device)  # dK_g, dV_g by source grid row
    scatter = _ColumnReduceScatter(grid, dkv, "dkv_col_scatter", tail_exposed=(C == 1))
    q_pos = Span(r + c * R, P, n)
    blocks, kv, handle = [None] * R, kv_t, None
    for i in range(R):
        if i > 0:
            kv = handle.wait()[0]
        if i < R - 1:
            handle = comm.send_recv([(kv, up)], [(recv_like(kv), down)], op="kv_col_gather_bwd",
                                    async_op=True, group=grid.col_group)
        src = (r + i) % R
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
        h_g.wait()
        b_b = recv_like(b_n)
        h_s = sent = None
        for i in range(1, C):  # b_n: bundle of column (c + i) % C
            if i > 1:
                h_g.wait()
            if i < C - 1:
                h_g = comm.send_recv([(b_n, left)], [(b_b, right)], op="qbundle_row_ring", async_op=True,
                                     group=grid.row_group)
            lse, delta, q, do = comm.unpack(b_n, own)
            src_pos = Span(r + ((c + i) % C) * R, P, n)
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
            sent = dq_i
            op = "dq_row_scatter" if i < C - 1 else "dq_row_scatter_tail"
            h_s = comm.send_recv([(sent, left)], [(recv_like(sent), right)], op=op, async_op=True,
                                 group=grid.row_group)
            b_n, b_b = b_b, b_n
        dkv_t = scatter.finish()  # B4 done: (2, B, n, H, D)
        dq_own = dq_own + h_s.wait()[0]
    else:
        dkv_t = scatter.finish()
    dkv_p = permute_kv(dkv_t, grid, op="dkv_transpose", inverse=True)  # B5, (2, B, n, H, D)
    return dq_own, dkv_p[0], dkv_p[1]


class Attention2DOverlap(torch.autograd.Function):
    """Attention2D-O as an autograd Function (Algorithms 4-6 forward; derived backward, see module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, grid, causal):
        q_p, k_p, v_p = (t.contiguous() for t in (q, k, v))
        out_p, lse_p, kv_t = _forward(q_p, k_p, v_p, grid, causal)
        ctx.grid, ctx.causal = grid, causal
        ctx.save_for_backward(q_p, kv_t, out_p, lse_p)  # Alg. 4 L9: only 1/P shards
        return out_p

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q_p, kv_t, out_p, lse_p = ctx.saved_tensors
        dout_p = dout.to(q_p.dtype).contiguous()  # (B, n, H, D)
        dq, dk, dv = _backward(dout_p, q_p, kv_t, out_p, lse_p, ctx.grid, ctx.causal)
        return dq.to(q_p.dtype), dk.to(q_p.dtype), dv.to(q_p.dtype), None, None


def attention2d_overlap(q, k, v, grid: ProcessGrid, causal: bool = True, heads: int | None = None):
    """Attention2D-O (Algorithm 4, Sec. 3.4): this rank's cyclic shard q, k, v (B, N/P, H, D) -> out, same shape.

    Same API, layout and checks as attention2d (Attention2D-NO); differentiable (backward: module docstring)."""
    check_grid_shards("attention2d_overlap", q, k, v, grid)
    check_call("attention2d_overlap", q, k, v, "cyclic", grid, causal, heads)
    return Attention2DOverlap.apply(q, k, v, grid, bool(causal))


# ------------------------------------------------------------------------------------------------ analytic comm
def comm_ops(batch, seq_len, heads, head_dim, rows, cols, dtype, causal, rank=None, kv_heads=None) -> list[CommOp]:
    """Per-rank communication of Attention2D-O (forward and backward), op names as counted by comm.

    rank: grid rank r*cols + c; None = a typical rank that is not a fixed point of the K/V transpose (if any).
    The volume does not depend on `causal`. Zero-message ops are left out (the implementation skips them)."""
    P = rows * cols
    check_seq_len(seq_len, P)
    b, f = wire_bytes(dtype)
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
    add("fwd", "kv_transpose", "pair", 2, 2 * kvb * b, int(moves), False)
    add("fwd", "kv_col_gather", "col", R, 2 * kvb * b, R - 1, True)
    add("fwd", "q_row_ring", "row", C, blk * b, C - 1, True)
    add("fwd", "out_row_scatter", "row", C, blk * b + lse * f, max(C - 2, 0), True)
    add("fwd", "out_row_scatter_tail", "row", C, blk * b + lse * f, int(C > 1), False)
    # backward
    add("bwd", "qbundle_row_ring", "row", C, 2 * blk * b + 2 * lse * f, C - 1, True)
    add("bwd", "kv_col_gather_bwd", "col", R, 2 * kvb * b, R - 1, True)
    add("bwd", "dq_row_scatter", "row", C, blk * f, max(C - 2, 0), True)
    add("bwd", "dq_row_scatter_tail", "row", C, blk * f, int(C > 1), False)
    if C > 1:
        add("bwd", "dkv_col_scatter", "col", R, 2 * kvb * f, R - 1, True)
    else:
        add("bwd", "dkv_col_scatter", "col", R, 2 * kvb * f, max(R - 2, 0), True)
        add("bwd", "dkv_col_scatter_tail", "col", R, 2 * kvb * f, int(R > 1), False)
    add("bwd", "dkv_transpose", "pair", 2, 2 * kvb * f, int(moves), False)
    return ops


def _registry_fn(q, k, v, *, grid, causal=True):
    return attention2d_overlap(q, k, v, grid, causal)


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


register(AttentionImpl("attn2d_overlap", _registry_fn, layout="cyclic", schedule=schedule, comm_ops=comm_ops,
                       label="Attention2D-O"))
