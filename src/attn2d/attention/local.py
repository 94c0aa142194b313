"""Single-device attention (the `local` registry entry): torch's fused scaled_dot_product_attention."""
from __future__ import annotations

import torch.nn.functional as F

from attn2d.attention.registry import AttentionImpl, register, single_call_schedule


def local_attention(q, k, v, causal: bool = True):
    """q (B, N, H, D), k, v (B, N, H_kv, D) -> out (B, N, H, D); causal is top-left (query i sees keys j <= i).
    H_kv < H: grouped-query attention (query head h uses k/v head h // (H / H_kv))."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)  # (B, N, H, D)


def _local(q, k, v, *, grid=None, causal: bool = True):
    return local_attention(q, k, v, causal=causal)


register(AttentionImpl("local", _local, layout="full", schedule=single_call_schedule, label="single device",
                       ranks="one"))
