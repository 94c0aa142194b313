"""Data parallelism over the sequence-parallel ranks: how parameter gradients are synchronised, and what that moves.

Every rank of the sequence-parallel group holds the whole model and a shard of the sequence, so every parameter
gradient is a sum over ranks:
- replicated parameters: gradients summed by one counted all-reduce per GRAD_BUCKET_BYTES bucket (op
  "grad_all_reduce");
- FSDP2 (fully_shard, ZeRO-3): each block's parameters all-gathered in forward and again in backward, the root's
  once; gradients reduce-scattered per unit (ops "fsdp_param_all_gather", "fsdp_grad_reduce_scatter").
`grad_sync_ops` is the analytic volume of both, the one formula training's counters and the cost model agree on.
"""
from __future__ import annotations

import math

from attn2d.distributed.comm import CommOp

GRAD_BUCKET_BYTES = 64 * 2**20  # gradients are summed in buckets of at most 64 MiB


def grad_sync_ops(shape, P: int, fsdp: bool = False, grad_bytes: int = 4, param_bytes: int = 4) -> list[CommOp]:
    """Per-rank gradient synchronisation of a GPTConfig `shape` over P ranks.

    Replicated: 2 (P-1)/P x gradient bytes per rank, 2 (P-1) messages per bucket (a ring all-reduce). FSDP:
    parameters (param_bytes each) gathered (P-1)/P x (2 x blocks + root) and gradients reduce-scattered
    (P-1)/P x all, per unit."""
    if P <= 1:
        return []
    n = shape.n_params()
    g = grad_bytes * n
    if not fsdp:
        v = 2 * (P - 1) * g // P
        buckets = max(1, math.ceil(g / GRAD_BUCKET_BYTES))
        return [CommOp("grad", "grad_all_reduce", "all_reduce", "world", P, v, v, 2 * (P - 1) * buckets,
                       2 * (P - 1) * buckets)]
    block = n - shape.vocab_size * shape.d_model - 2 * shape.d_model  # parameters inside the blocks
    root = n - block
    gathered = (2 * block + root) * param_bytes * (P - 1) // P
    units = shape.n_layer + 1
    gv = n * grad_bytes * (P - 1) // P
    calls = (2 * shape.n_layer + 1) * (P - 1)
    return [CommOp("grad", "fsdp_param_all_gather", "all_gather", "world", P, gathered, gathered, calls, calls),
            CommOp("grad", "fsdp_grad_reduce_scatter", "reduce_scatter", "world", P, gv, gv, units * (P - 1),
                   units * (P - 1))]


__all__ = ["GRAD_BUCKET_BYTES", "grad_sync_ops"]
