"""Which node each rank of a rows x cols process grid runs on (grid rank = r * cols + c).

One rule, used by the cost model (attn2d.costmodel op pricing), the grid advisor (attn2d.costmodel.advise), and anything
that puts ranks on machines. No cost-model imports here.

Placements:
- "row": a grid row's ranks are packed into a node: node = rank // ranks_per_node (ranks in launch order; the
  row group is on-node when cols <= ranks_per_node, the column group strides across nodes).
- "col": a grid column's ranks are packed into a node: node = (c * rows + r) // ranks_per_node (the column
  group is on-node, the row group strides).
- an explicit list: placement[rank] = node id (any hashable ints), one entry per rank.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

PLACEMENTS = ("row", "col")
Placement = str | Sequence[int]


def _check(rows: int, cols: int, ranks_per_node: int) -> None:
    if int(rows) < 1 or int(cols) < 1:
        raise ValueError(f"grid {rows}x{cols}: rows and cols must be >= 1")
    if int(ranks_per_node) < 1:
        raise ValueError(f"ranks_per_node {ranks_per_node} must be >= 1")


def node_of(rank: int, rows: int, cols: int, ranks_per_node: int, placement: Placement = "row") -> int:
    """The node of grid rank `rank` (= r * cols + c) under `placement` ("row", "col" or a rank -> node list)."""
    _check(rows, cols, ranks_per_node)
    P = rows * cols
    if not 0 <= rank < P:
        raise ValueError(f"rank {rank} is outside the {rows}x{cols} grid (0..{P - 1})")
    if isinstance(placement, str):
        if placement == "row":
            return rank // ranks_per_node
        if placement == "col":
            r, c = divmod(rank, cols)
            return (c * rows + r) // ranks_per_node
        raise ValueError(f"unknown placement {placement!r}; known: {', '.join(PLACEMENTS)}, or a list of "
                         f"{P} node ids (one per rank)")
    nodes = list(placement)
    if len(nodes) != P:
        raise ValueError(f"explicit placement has {len(nodes)} entries, but the {rows}x{cols} grid has {P} ranks")
    return int(nodes[rank])


def rank_nodes(rows: int, cols: int, ranks_per_node: int, placement: Placement = "row") -> list[int]:
    """[node_of(k) for every rank k]; an explicit list is validated (no node holds more than ranks_per_node)."""
    out = [node_of(k, rows, cols, ranks_per_node, placement) for k in range(rows * cols)]
    if not isinstance(placement, str):
        over = {n: c for n, c in Counter(out).items() if c > ranks_per_node}
        if over:
            raise ValueError(f"explicit placement puts more than ranks_per_node={ranks_per_node} ranks on node(s) "
                             f"{over}")
    return out


def describe(rows: int, cols: int, ranks_per_node: int, placement: Placement = "row") -> str:
    """One line: how many nodes a row group and a column group span under this placement."""
    nodes = rank_nodes(rows, cols, ranks_per_node, placement)
    row_span = max(len({nodes[r * cols + c] for c in range(cols)}) for r in range(rows))
    col_span = max(len({nodes[r * cols + c] for r in range(rows)}) for c in range(cols))
    name = placement if isinstance(placement, str) else "explicit"
    return (f"placement {name}: {len(set(nodes))} node(s); a grid row spans {row_span} node(s), a grid column "
            f"spans {col_span}")


__all__ = ["PLACEMENTS", "Placement", "node_of", "rank_nodes", "describe"]
