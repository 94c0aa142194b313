"""Attention algorithms and the registry the model and the configs pick them from (attention/registry.py).

Built in: "local" (single-device), "ring" and "ring_contiguous" (ring.py), "attn2d" (attention2d.py, Attention2D-NO),
"attn2d_overlap" (attention2d_overlap.py, Attention2D-O). Each module registers itself when imported here.
"""
from __future__ import annotations

from attn2d.attention import attention2d as _attention2d  # noqa: F401  (registers "attn2d")
from attn2d.attention import attention2d_overlap as _attention2d_overlap  # noqa: F401  (registers "attn2d_overlap")
from attn2d.attention import local as _local  # noqa: F401  (registers "local")
from attn2d.attention import ring as _ring  # noqa: F401  (registers "ring", "ring_contiguous")
from attn2d.attention.layout import positions, shard, unshard
from attn2d.attention.local import local_attention
from attn2d.attention.registry import ATTENTION, AttentionImpl, get_attention, register

__all__ = ["ATTENTION", "AttentionImpl", "get_attention", "register", "local_attention", "positions", "shard", "unshard"]
