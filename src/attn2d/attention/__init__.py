"""Attention algorithms and the registry the model and the configs pick them from.

Every registered implementation has one calling convention:
    impl.fn(q, k, v, grid=grid, causal=causal) -> out
with q, k, v, out this rank's shard (B, N/P, H, D) in the layout `impl.layout` (see layout.py), and
`grid` an attn2d.distributed.ProcessGrid (ring and local only use grid.group / its size).
`impl.comm_volume(...)` gives the analytic per-rank communication (see each algorithm's module).
The distributed entries also take `heads=` and check layout tags, axis order and cross-rank agreement
(attention/checks.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from attn2d.attention.layout import positions, shard, unshard
from attn2d.attention.local import local_attention


@dataclass(frozen=True)
class AttentionImpl:
    name: str
    fn: Callable  # fn(q, k, v, *, grid, causal) -> out (B, N/P, H, D)
    layout: str  # "cyclic" | "contiguous" | "zigzag" | "full"
    comm_volume: Callable | None = None  # comm_ops(batch, seq_len, heads, head_dim, rows, cols, dtype, causal,
    #                                                rank=None, kv_heads=None) -> list[CommOp]
    needs_world: str = "any"  # "one": only world size 1


ATTENTION: dict[str, AttentionImpl] = {}


def register(impl: AttentionImpl) -> AttentionImpl:
    ATTENTION[impl.name] = impl
    return impl


def get_attention(name: str) -> AttentionImpl:
    if name not in ATTENTION:
        raise KeyError(f"unknown attention {name!r}; known: {', '.join(sorted(ATTENTION))}")
    return ATTENTION[name]


register(AttentionImpl("local", lambda q, k, v, *, grid=None, causal=True: local_attention(q, k, v, causal=causal),
                       layout="full", needs_world="one"))

# Distributed algorithms register themselves on import (kept optional while they are being built).
for _mod in ("attn2d.attention.attention2d", "attn2d.attention.ring", "attn2d.attention.attention2d_overlap"):
    try:
        __import__(_mod)
    except ModuleNotFoundError as _e:
        if _e.name != _mod:
            raise

__all__ = ["ATTENTION", "AttentionImpl", "get_attention", "register", "local_attention", "positions", "shard", "unshard"]
