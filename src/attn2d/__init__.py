"""attn2d: Attention2D (arXiv 2503.15758) and Ring Attention on torch.distributed.

The public attentions, each on this rank's shard (B, N/P, H, D) of q, k, v:
    attn2d.attention2d(q, k, v, grid, causal=True)          Attention2D-NO, cyclic layout, grid a ProcessGrid
    attn2d.attention2d_overlap(q, k, v, grid, causal=True)  Attention2D-O, same layout and API
    attn2d.ring_attention(q, k, v, group=None, causal=True, layout="zigzag")  Ring Attention over a process group
        (None: the world; a ProcessGrid: its group)
Configs pick them by name from the registry (attn2d.attention.get_attention).
"""
from __future__ import annotations

PUBLIC = ("attention2d", "attention2d_overlap", "ring_attention")


def __getattr__(name: str):
    if name in PUBLIC:
        # imported on first use: `import attn2d.records` and the report modules must not pull in torch
        from attn2d import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'attn2d' has no attribute {name!r}")


__all__ = list(PUBLIC)
