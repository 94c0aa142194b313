"""ProcessGrid: the rows x cols logical processor grid of Attention2D (paper Sec. 3.2).

Rank convention (ours, stated once): inside the grid's process group, rank = r * cols + c, where r is the
grid row (the query dimension) and c the grid column (the key/value dimension).

The paper's *token* layout is independent of this rank numbering: token i lives on p(r, c) with
(i mod P) = r + c * rows ("column-major cyclic"), see `attn2d.attention.layout`.
"""
from __future__ import annotations

import datetime
from collections import defaultdict
from dataclasses import dataclass, field

import torch.distributed as dist

from attn2d.distributed import comm, health


class GridError(ValueError):
    """A grid shape that does not fit the world, the sequence or the model."""


def parse_grid(spec: str) -> tuple[int, int]:
    """'4x2' -> (4, 2). Raises GridError naming the bad spec."""
    try:
        rows, cols = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise GridError(f"grid spec {spec!r} is not of the form ROWSxCOLS, e.g. '4x4'") from None
    return rows, cols


def check_grid(rows: int, cols: int, world_size: int) -> None:
    """Validate a grid against a world size; the message names every number involved."""
    if rows < 1 or cols < 1:
        raise GridError(f"grid {rows}x{cols} must have rows >= 1 and cols >= 1")
    if rows * cols != world_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        options = ", ".join(f"{d}x{world_size // d}" for d in divisors)
        raise GridError(
            f"grid {rows}x{cols} needs {rows * cols} ranks, but the world has {world_size}; "
            f"grids that fit {world_size} ranks: {options}"
        )


def check_seq_len(seq_len: int, world_size: int, multiple: int = 1, what: str = "grid", where: str | None = None
                  ) -> None:
    """Every rank must hold the same number of tokens: seq_len % (world_size * multiple) == 0 (GridError naming the
    numbers and the nearest valid seq_len; `where` replaces "evenly over the <what> of <world_size> ranks")."""
    need = world_size * multiple
    if seq_len % need != 0:
        lo, hi = (seq_len // need) * need, (seq_len // need + 1) * need
        where = where or (f"evenly over the {what} of {world_size} ranks"
                          f"{f' x {multiple} chunks' if multiple > 1 else ''}")
        raise GridError(f"seq_len {seq_len} cannot be split {where}: it must be a multiple of {need} "
                        f"(nearest: {lo or need} or {hi})")


def check_timeout(timeout_s, what: str = "timeout_s") -> datetime.timedelta:
    """A collective timeout in seconds (a finite number > 0) -> timedelta; GridError naming `what` and the value."""
    try:
        t = float(timeout_s)
    except (TypeError, ValueError):
        t = None
    if t is None or isinstance(timeout_s, bool) or not 0 < t < float("inf"):
        raise GridError(f"{what} {timeout_s!r} is not a number of seconds > 0 (e.g. 300)")
    return datetime.timedelta(seconds=t)


@dataclass
class ProcessGrid:
    """A rows x cols grid over `group` (default: the world). Builds the row and column subgroups.

    `row_group` holds the ranks with the same r (the paper's "row" all-gather of Q and reduce-scatter of O);
    `col_group` holds the ranks with the same c (the paper's "column" all-gather of K/V).
    Creating a ProcessGrid is a collective call: every rank of `group` must call it with the same shape. The ranks
    first exchange their shapes (one small all-gather), so a rank that asks for another grid gets a GridError naming
    it on every rank instead of a hang. The subgroups get `timeout_s` (default: the timeout of `group`, i.e. the
    world's `benchmark.timeout_s`), and every rank starts its heartbeat (attn2d.distributed.health), so a stalled
    rank ends the job with an error naming the group and the rank.
    """

    rows: int
    cols: int
    group: dist.ProcessGroup | None = None
    timeout_s: float | None = None
    rank: int = field(init=False)
    row: int = field(init=False)
    col: int = field(init=False)
    row_group: dist.ProcessGroup | None = field(init=False, repr=False)
    col_group: dist.ProcessGroup | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not dist.is_initialized():
            raise GridError("ProcessGrid needs torch.distributed to be initialised "
                            "(attn2d.distributed.init_distributed)")
        world = dist.get_world_size(self.group)
        timeout = health.group_timeout(self.group) if self.timeout_s is None else check_timeout(self.timeout_s)
        health.start_heartbeat(health.heartbeat_period(timeout.total_seconds()))
        self._check_agreement(world)
        check_grid(self.rows, self.cols, world)
        self.rank = dist.get_rank(self.group)
        self.row, self.col = divmod(self.rank, self.cols)
        # new_group is collective over the default group: every rank creates every subgroup, in the same order.
        ranks = self.global_ranks
        shape = f"{self.rows}x{self.cols}"
        row_groups, col_groups = [], []
        for r in range(self.rows):
            row_groups.append(dist.new_group([ranks[r * self.cols + c] for c in range(self.cols)], timeout=timeout))
            health.name_group(row_groups[-1], f"row group {r} of grid {shape}")
        for c in range(self.cols):
            col_groups.append(dist.new_group([ranks[r * self.cols + c] for r in range(self.rows)], timeout=timeout))
            health.name_group(col_groups[-1], f"column group {c} of grid {shape}")
        self.row_group = row_groups[self.row]
        self.col_group = col_groups[self.col]

    def _check_agreement(self, world: int) -> None:
        """Every rank of `group` asked for the same rows x cols (before any subgroup is made)."""
        shapes = comm.gather_ints([self.rows, self.cols], self.group, op="grid shape check")
        if len({tuple(s) for s in shapes}) == 1:
            return
        ranks = self.global_ranks
        by_shape: dict[str, list[int]] = defaultdict(list)
        for rank, (r, c) in zip(ranks, shapes):
            by_shape[f"{r}x{c}"].append(rank)
        parts = sorted(by_shape.items(), key=lambda kv: len(kv[1]))  # the odd one out first
        said = ", ".join(f"rank{'s' if len(rs) > 1 else ''} {health.fmt_ranks(rs)} ha{'ve' if len(rs) > 1 else 's'} "
                         f"grid {shape}" for shape, rs in parts)
        raise GridError(f"the ranks disagree on the process grid: {said}; every rank must build the same grid")

    @property
    def size(self) -> int:
        """P = rows * cols."""
        return self.rows * self.cols

    @property
    def global_ranks(self) -> list[int]:
        """Global (world) rank of each grid rank, in grid-rank order."""
        if self.group is None:
            return list(range(dist.get_world_size()))
        return dist.get_process_group_ranks(self.group)

    def grid_rank(self, r: int, c: int) -> int:
        """Rank inside `group` of processor p(r, c)."""
        return (r % self.rows) * self.cols + (c % self.cols)

    def global_rank(self, r: int, c: int) -> int:
        """World rank of processor p(r, c) (what point-to-point calls take)."""
        return self.global_ranks[self.grid_rank(r, c)]
