"""Helpers shared by the distributed algorithms (attention2d, attention2d_overlap, ring).

- input checks of the (B, N/P, H, D) shards, with the calling algorithm's name in every message;
- receive buffers for comm.send_recv;
- the K/V column -> row-major cyclic permutation of Algorithm 1 L1 / Algorithm 4 L1 (Sec. 3.2, 3.4) and its
  inverse, shared by Attention2D-NO and Attention2D-O so that both move K/V (and dK/dV) the same way.
"""
from __future__ import annotations

import torch

from attn2d.distributed import comm
from attn2d.distributed.grid import ProcessGrid


def recv_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous receive buffer shaped like x (gloo and comm.send_recv need contiguous buffers)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------------- input checks
def check_qkv(algo: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v are 4-D (B, N/P, H, D) floating tensors of one dtype on one device; messages start with `algo`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{algo}: {name} has shape {tuple(t.shape)}; expected 4 dims (B, N/P, H, D)")
        if not t.is_floating_point():
            raise ValueError(f"{algo}: {name} has dtype {t.dtype}; expected a floating dtype")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{algo}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{algo}: q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def check_shapes(algo: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v (B, N/P, H_kv, D) of one shape; q (B, N/P, H, D) with H a multiple of H_kv (grouped-query attention;
    H_kv = H is plain multi-head attention)."""
    if k.shape[2] != v.shape[2] or q.shape[2] % k.shape[2]:
        raise ValueError(f"{algo}: heads differ: q has {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]}; k and v need "
                         "one head count that divides q's (grouped-query attention)")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{algo}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must have one shape "
                         "(B, N/P, H, D) but for the heads: every rank holds N/P positions of each")


def check_grid_shards(algo: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid) -> None:
    """The checks of the 2-D algorithms: a ProcessGrid, check_qkv, check_shapes, >= 1 position."""
    if not isinstance(grid, ProcessGrid):
        raise TypeError(f"{algo} needs an attn2d.distributed.ProcessGrid, got {type(grid).__name__}")
    check_qkv(algo, q, k, v)
    check_shapes(algo, q, k, v)
    if q.shape[1] < 1:
        raise ValueError(f"{algo}: the local shard holds {q.shape[1]} positions; the sequence must have at least "
                         f"one position per rank (a multiple of P = {grid.rows}x{grid.cols} = {grid.size})")


# ---------------------------------------------------------------------------------------------- K/V permutation
def kv_send_peer(r: int, c: int, rows: int, cols: int) -> tuple[int, int]:
    """Alg. 1 L1: p(r, c) holds column-major class t = r + c*rows; its row-major owner is p(t // cols, t % cols)."""
    t = r + c * rows
    return t // cols, t % cols


def kv_recv_peer(r: int, c: int, rows: int, cols: int) -> tuple[int, int]:
    """Alg. 1 L1: p(r, c) needs row-major class s = c + r*cols, held (column-major) by p(s % rows, s // rows)."""
    s = c + r * cols
    return s % rows, s // rows


def kv_moves(r: int, c: int, rows: int, cols: int) -> bool:
    """False when p(r, c) already holds its row-major K/V (diagonal of a square grid, every rank of a 1-D grid)."""
    return kv_send_peer(r, c, rows, cols) != (r, c)


def permute_kv(x: torch.Tensor, grid: ProcessGrid, op: str, inverse: bool = False) -> torch.Tensor:
    """Alg. 1 / Alg. 4 L1 (inverse=False: column -> row-major) or its inverse (the backward's dK/dV return) on one
    packed or stacked tensor; one blocking exchange. A fixed point moves (and counts) nothing and returns x."""
    r, c, rows, cols = grid.row, grid.col, grid.rows, grid.cols
    if not kv_moves(r, c, rows, cols):
        return x
    to, frm = kv_send_peer(r, c, rows, cols), kv_recv_peer(r, c, rows, cols)
    if inverse:
        to, frm = frm, to
    return comm.send_recv([(x, grid.global_rank(*to))], [(recv_like(x), grid.global_rank(*frm))], op=op,
                          group=grid.group)[0]


def grid_rank(rows: int, cols: int, rank: int | None) -> int:
    """comm_ops' rank argument: checked to lie in the grid; None -> the first rank whose K/V permutation moves data
    (a typical off-diagonal rank), or 0 where none does."""
    world = rows * cols
    if rank is None:
        moving = [k for k in range(world) if kv_moves(*divmod(k, cols), rows, cols)]
        rank = moving[0] if moving else 0
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in the {rows}x{cols} grid (0..{world - 1})")
    return rank


__all__ = ["recv_like", "check_qkv", "check_grid_shards",
           "kv_send_peer", "kv_recv_peer", "kv_moves", "permute_kv", "grid_rank"]
