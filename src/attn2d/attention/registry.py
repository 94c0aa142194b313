"""The attention registry: everything the rest of the house needs to know about an algorithm, owned by the
algorithm's own module (it registers one `AttentionImpl`; nothing else switches on algorithm names).

Adding an algorithm = one module that calls `register(AttentionImpl(...))`, imported once (the built-in ones are
imported by attn2d.attention). Config validation, the planner, the cost model, the advisor and the figures read it
from here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from attn2d.attention.layout import Span, Spans, check_layout, layout_problem

Call = tuple[Spans, Spans]  # (query Spans, key Spans) of one kernels.attn_forward / attn_backward call
Schedule = list[list[list[Call]]]  # schedule[step][rank] = the calls rank makes in that synchronous step


@dataclass(frozen=True)
class AttentionImpl:
    """One attention algorithm.

    fn(q, k, v, *, grid, causal) -> out: q, k, v, out this rank's shard (B, N/P, H, D) in `layout`
        (attn2d.attention.layout); `grid` an attn2d.distributed.ProcessGrid (a ring uses only its group).
    layout: "cyclic" | "contiguous" | "zigzag" | "full"; it decides which seq_len fit (layout.check_layout).
    comm_ops(batch, seq_len, heads, head_dim, rows, cols, dtype, causal, rank=None, kv_heads=None) -> [CommOp]:
        the analytic per-rank communication, op by op, as attn2d.distributed.comm counts it (None: none).
    schedule(seq_len, rows, cols) -> Schedule: the block-attention calls of every rank in every synchronous step
        of the forward (the backward visits the same blocks in the same steps); the cost model prices it (None: the
        cost model and the advisor cannot price this algorithm and say so).
    label: the name tables and figures print.
    ranks: "grid" (rows x cols matters), "ring" (a 1-D group: the cost model runs it as P x 1), "one" (world 1).
    """

    name: str
    fn: Callable
    layout: str
    schedule: Callable[[int, int, int], Schedule] | None = None
    comm_ops: Callable | None = None
    label: str = ""
    ranks: str = "grid"

    def __post_init__(self):
        if self.ranks not in ("grid", "ring", "one"):
            raise ValueError(f"attention {self.name!r}: ranks {self.ranks!r} is not one of grid, ring, one")
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def check_layout(self, seq_len: int, world: int, where: str | None = None) -> None:
        """GridError when seq_len does not split over `world` ranks in this algorithm's layout."""
        check_layout(seq_len, world, self.layout, where)

    def layout_problem(self, seq_len: int, world: int) -> str:
        """'' when seq_len splits over `world` ranks in this layout, else why not (one line)."""
        return layout_problem(seq_len, world, self.layout)

    def cost_grid(self, rows: int, cols: int) -> tuple[int, int]:
        """The rows x cols the cost model prices this algorithm on (a ring: P x 1, ring successor = next rank)."""
        return (rows * cols, 1) if self.ranks == "ring" else (rows, cols)


ATTENTION: dict[str, AttentionImpl] = {}


def register(impl: AttentionImpl) -> AttentionImpl:
    """Add (or replace) `impl` under impl.name."""
    ATTENTION[impl.name] = impl
    return impl


def get_attention(name: str) -> AttentionImpl:
    if name not in ATTENTION:
        raise KeyError(f"unknown attention {name!r}; known: {', '.join(sorted(ATTENTION))}")
    return ATTENTION[name]


def distributed_names() -> list[str]:
    """The registered algorithms that run on more than one rank."""
    return sorted(n for n, impl in ATTENTION.items() if impl.ranks != "one")


def single_call_schedule(seq_len: int, rows: int = 1, cols: int = 1) -> Schedule:
    """One call over the whole sequence on one rank (single-device attention; any algorithm at P = 1)."""
    return [[[((Span(0, 1, seq_len),), (Span(0, 1, seq_len),))]]]


__all__ = ["ATTENTION", "AttentionImpl", "Call", "Schedule", "register", "get_attention", "distributed_names",
           "single_call_schedule"]
