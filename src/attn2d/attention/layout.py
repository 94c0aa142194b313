"""Token layouts: which global sequence positions each rank holds, and shard/unshard of full tensors.

Layouts (P ranks, sequence length N, every rank holds N/P tokens in increasing position order):
- "cyclic": Attention2D's column-major cyclic layout (paper Sec. 3.2): token i lives on p(r, c) with
  (i mod P) = r + c * rows. With grid rank = r * cols + c, p(r, c) holds positions r + c*rows + j*P, j < N/P.
- "contiguous": rank k holds positions [k N/P, (k+1) N/P).
- "zigzag": the sequence is cut into 2P chunks; rank k holds chunk k then chunk 2P-1-k (causal load balance
  for Ring Attention, as in Megatron context parallelism).
- "full": every rank holds the whole sequence (single-device attention).

Positions are described by `Span`s (arithmetic progressions: start, step, n) so kernels can recognise causal
structure without looking at tensors; `positions()` turns them into a LongTensor.

`shard()` tags the tensor it returns with a `ShardInfo` (layout, grid, rank, seq_len, dim), a plain Python attribute
(`shard_info(x)` reads it). The distributed attentions and `unshard` check it when present and name the layout given
and the one needed. The tag lives on that tensor object: in-place methods and no-op conversions keep it
(`requires_grad_()`, `.contiguous()` / `.to()` of a tensor that already is so), anything that makes a new tensor
drops it (arithmetic, `.to(other dtype)`, `.clone()`, `.detach()`, views such as `.transpose()`); an untagged
tensor is checked only by shape and, across ranks, by the attentions' descriptor check (attention/checks.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from attn2d.distributed.grid import ProcessGrid, check_seq_len

LAYOUTS = ("cyclic", "contiguous", "zigzag", "full")
CHUNKS_PER_RANK = {"cyclic": 1, "contiguous": 1, "zigzag": 2, "full": 1}  # seq_len must be a multiple of P x this


def check_layout(seq_len: int, world: int, layout: str, where: str | None = None) -> None:
    """The one divisibility rule: every rank holds the same number of positions of `layout` (GridError naming the
    numbers and the nearest valid seq_len). `where` replaces "evenly over the <layout> layout of <world> ranks"."""
    if layout == "full":
        return
    check_seq_len(seq_len, world, multiple=CHUNKS_PER_RANK[layout], what=f"{layout} layout", where=where)


def layout_problem(seq_len: int, world: int, layout: str) -> str:
    """check_layout as a reason string ('' when seq_len fits), for planners that list every problem at once."""
    try:
        check_layout(seq_len, world, layout)
    except ValueError as e:
        return str(e)
    return ""


@dataclass(frozen=True)
class Span:
    """Positions start + step * i for i in range(n)."""

    start: int
    step: int
    n: int

    def tensor(self, device=None) -> torch.Tensor:
        return self.start + self.step * torch.arange(self.n, device=device)

    @property
    def last(self) -> int:
        return self.start + self.step * (self.n - 1)


Spans = tuple[Span, ...]
GridOrGroup = ProcessGrid | dist.ProcessGroup | None


@dataclass(frozen=True)
class ShardInfo:
    """How `shard()` made a tensor: its layout, the grid (rows x cols; a plain group is P x 1), this rank's grid
    rank, the full sequence length and the sequence dim."""

    layout: str
    rows: int
    cols: int
    rank: int
    seq_len: int
    dim: int


_TAG = "_attn2d_shard"


def shard_info(x: torch.Tensor) -> ShardInfo | None:
    """The ShardInfo `shard()` put on x, or None (not made by shard(), or a new tensor since)."""
    return getattr(x, _TAG, None)


def grid_shape(grid_or_group: GridOrGroup) -> tuple[int, int, int]:
    """(rank, rows, cols) of this process; a plain group is treated as a P x 1 grid."""
    if isinstance(grid_or_group, ProcessGrid):
        return grid_or_group.rank, grid_or_group.rows, grid_or_group.cols
    world = dist.get_world_size(grid_or_group) if dist.is_initialized() else 1
    rank = dist.get_rank(grid_or_group) if dist.is_initialized() else 0
    return rank, world, 1


def layout_spans(layout: str, seq_len: int, rank: int, rows: int, cols: int = 1) -> Spans:
    """The positions held by grid rank `rank` (= r * cols + c) of a rows x cols grid, as Spans."""
    world = rows * cols
    if layout == "full":
        return (Span(0, 1, seq_len),)
    if layout == "cyclic":
        check_layout(seq_len, world, layout)
        r, c = divmod(rank, cols)
        return (Span(r + c * rows, world, seq_len // world),)
    if layout == "contiguous":
        check_layout(seq_len, world, layout)
        n = seq_len // world
        return (Span(rank * n, 1, n),)
    if layout == "zigzag":
        check_layout(seq_len, world, layout)
        n = seq_len // (2 * world)
        return (Span(rank * n, 1, n), Span((2 * world - 1 - rank) * n, 1, n))
    raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")


def spans_tensor(spans: Spans, device=None) -> torch.Tensor:
    return torch.cat([s.tensor(device) for s in spans])


def positions(layout: str, seq_len: int, grid_or_group: GridOrGroup = None, device=None) -> torch.Tensor:
    """Global positions (LongTensor, local order) of this rank's shard."""
    rank, rows, cols = grid_shape(grid_or_group)
    return spans_tensor(layout_spans(layout, seq_len, rank, rows, cols), device)


def shard(x: torch.Tensor, grid_or_group: GridOrGroup, layout: str, dim: int = 1) -> torch.Tensor:
    """This rank's shard of the full tensor `x` (sequence along `dim`), tagged with its ShardInfo."""
    rank, rows, cols = grid_shape(grid_or_group)
    pos = spans_tensor(layout_spans(layout, x.shape[dim], rank, rows, cols), x.device)
    out = x.index_select(dim, pos).contiguous()
    setattr(out, _TAG, ShardInfo(layout, rows, cols, rank, x.shape[dim], dim % x.dim()))
    return out


def unshard(x_local: torch.Tensor, grid_or_group: GridOrGroup, layout: str, dim: int = 1) -> torch.Tensor:
    """Gather every rank's shard and put the tokens back in sequence order (not counted: a utility, not
    part of any algorithm). Differentiable only through this rank's own shard."""
    info = shard_info(x_local)
    if info is not None and info.layout != layout:
        raise ValueError(f"unshard: the tensor is a {info.layout!r} shard (made by attn2d.attention.shard), but "
                         f"layout={layout!r} was given; pass layout={info.layout!r}")
    rank, rows, cols = grid_shape(grid_or_group)
    world = rows * cols
    if layout == "full" or world == 1:
        return x_local
    group = grid_or_group.group if isinstance(grid_or_group, ProcessGrid) else grid_or_group
    parts = [torch.empty_like(x_local).contiguous() for _ in range(world)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    parts[rank] = x_local
    seq_len = x_local.shape[dim] * world
    pos = torch.cat([spans_tensor(layout_spans(layout, seq_len, k, rows, cols)) for k in range(world)])
    inverse = torch.empty_like(pos)
    inverse[pos] = torch.arange(seq_len)
    return torch.cat(parts, dim=dim).index_select(dim, inverse.to(x_local.device))
