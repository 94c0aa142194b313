"""Single-device attention (the `local` registry entry): torch's fused scaled_dot_product_attention."""
from __future__ import annotations

import torch.nn.functional as F


def local_attention(q, k, v, causal: bool = True):
    """q, k, v: (B, N, H, D) -> out (B, N, H, D); causal is top-left (query i sees keys j <= i)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)  # (B, N, H, D)
