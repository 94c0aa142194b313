"""Attention algorithms and the registry the model and the configs pick them from (attention/registry.py).

Built in: "local" (single-device, local.py), "ring" and "ring_contiguous" (ring.py), "attn2d" (attention2d.py,
Attention2D-NO), "attn2d_overlap" (attention2d_overlap.py, Attention2D-O). Each module registers itself when
imported here. The public functions attention2d, attention2d_overlap and ring_attention are these modules' own.
"""
from __future__ import annotations

from attn2d.attention.attention2d import attention2d
from attn2d.attention.attention2d_overlap import attention2d_overlap
from attn2d.attention.layout import positions, shard, unshard
from attn2d.attention.local import local_attention
from attn2d.attention.registry import ATTENTION, AttentionImpl, get_attention, register
from attn2d.attention.ring import ring_attention

__all__ = ["ATTENTION", "AttentionImpl", "get_attention", "register", "attention2d", "attention2d_overlap",
           "ring_attention", "local_attention", "positions", "shard", "unshard"]
