"""Data parallelism over the sequence-parallel ranks: how parameter gradients are synchronised, and what that moves.

Every rank of the sequence-parallel group holds the whole model and a shard of the sequence, so every parameter
gradient is a sum over ranks:
- replicated parameters: gradients summed by one counted all-reduce per GRAD_BUCKET_BYTES bucket (op
  "grad_all_reduce", `reduce_gradients`);
- FSDP2 (fully_shard, ZeRO-3, `fsdp_sharder`): each block's parameters all-gathered in forward and again in
  backward, the root's once; gradients reduce-scattered per unit (ops "fsdp_param_all_gather",
  "fsdp_grad_reduce_scatter"), counted by attn2d.distributed.fsdp_counter.
`grad_sync_ops` is the analytic volume of both, the one formula training's fallback counts, the tests check the
counters against and the cost model prices.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from attn2d.distributed import comm
from attn2d.distributed.comm import CommOp
from attn2d.distributed.fsdp_counter import GATHER, SCATTER, counting_fsdp, fsdp_counting_supported
from attn2d.dtypes import acc_dtype, itemsize

GRAD_BUCKET_BYTES = 64 * 2**20  # gradients are summed in buckets of at most 64 MiB


# ---------------------------------------------------------------------------------------------- analytic volume
def fsdp_units(shape) -> list[tuple[int, int]]:
    """(parameter count, all-gathers per step) of each FSDP unit of GPT(shape), a GPTConfig: every block is
    gathered in the forward and again in the backward (reshard_after_forward), the root (embeddings, final
    LayerNorm) once."""
    block = shape.block_params()
    return [(block, 2)] * shape.n_layer + [(shape.n_params() - shape.n_layer * block, 1)]


def grad_sync_ops(shape, P: int, fsdp: bool = False, grad_bytes: int = 4, param_bytes: int = 4) -> list[CommOp]:
    """Per-rank gradient synchronisation of a GPTConfig `shape` over P ranks.

    Replicated: 2 (P-1)/P x gradient bytes per rank, 2 (P-1) messages per bucket (a ring all-reduce). FSDP, per
    unit (`fsdp_units`, without FSDP's padding of shards to a multiple of P): parameters (param_bytes each)
    gathered (P-1)/P x as often as the unit is, gradients reduce-scattered (P-1)/P x once, P-1 messages per call."""
    if P <= 1:
        return []
    n = shape.n_params()
    g = grad_bytes * n
    if not fsdp:
        v = 2 * (P - 1) * g // P
        buckets = max(1, math.ceil(g / GRAD_BUCKET_BYTES))
        return [CommOp("grad", "grad_all_reduce", "all_reduce", "world", P, v, v, 2 * (P - 1) * buckets,
                       2 * (P - 1) * buckets)]
    units = fsdp_units(shape)
    gathered = sum(p * times for p, times in units) * param_bytes * (P - 1) // P
    gathers = sum(times for _, times in units) * (P - 1)
    scattered = n * grad_bytes * (P - 1) // P
    scatters = len(units) * (P - 1)
    return [CommOp("grad", GATHER, "all_gather", "world", P, gathered, gathered, gathers, gathers),
            CommOp("grad", SCATTER, "reduce_scatter", "world", P, scattered, scattered, scatters, scatters)]


def uncounted_fsdp_ops(shape, P: int, dtype: str) -> list[CommOp]:
    """FSDP's analytic traffic of one step, for a run to add to its counts where this torch's FSDP collectives
    cannot be counted (fsdp_counter); [] where they are."""
    if fsdp_counting_supported():
        return []
    return grad_sync_ops(shape, P, fsdp=True, grad_bytes=acc_dtype(dtype).itemsize, param_bytes=itemsize(dtype))


# ---------------------------------------------------------------------------------------------- FSDP2
def fsdp_sharder(device: torch.device, dtype: str) -> Callable[..., None]:
    """FSDP2 over all ranks (= the sequence-parallel group): `shard(block)` for each block, then `shard(model,
    root=True)`. Shards parameters, gradients and optimizer state.

    Gradients are reduce-scattered as a SUM (divide factor 1, sum-only collectives) because each rank's loss is
    already its share of the global mean. bf16 runs gather bf16 parameters and reduce in fp32. Blocks are
    resharded after the forward (gathered again in the backward), the root is not."""
    # the world group itself (its timeout, benchmark.timeout_s): init_device_mesh makes a new group with torch's
    # default timeout where a CUDA host runs gloo
    mesh = DeviceMesh.from_group(dist.group.WORLD, device.type)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                              reduce_dtype=None if dtype == "float64" else torch.float32)

    def shard(module: torch.nn.Module, root: bool = False) -> None:
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=not root)
        if root:
            for m in module.modules():
                if isinstance(m, FSDPModule):
                    m.set_gradient_divide_factor(1.0)
                    if hasattr(m, "set_force_sum_reduction_for_comms"):  # torch >= 2.8; gloo has no PREMUL_SUM
                        m.set_force_sum_reduction_for_comms(True)

    return shard


# ---------------------------------------------------------------------------------------------- replicated
def reduce_gradients(model: torch.nn.Module, group) -> None:
    """Sum every parameter gradient over the sequence-parallel group: whole gradients packed in order into buckets
    of at most GRAD_BUCKET_BYTES (a new one at each dtype change), one counted all-reduce per bucket."""
    if comm.group_size(group) == 1:
        return
    params = list(model.parameters())
    for p in params:
        if p.grad is None:  # every rank must reduce the same buffers
            p.grad = torch.zeros_like(p)
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        nbytes = p.grad.numel() * p.grad.element_size()
        if not buckets or size + nbytes > GRAD_BUCKET_BYTES or buckets[-1][0].dtype != p.grad.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p.grad)
        size += nbytes
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])  # (sum numel,)
        comm.all_reduce(flat, group, op="grad_all_reduce")
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))


@contextlib.contextmanager
def synced_gradients(model: torch.nn.Module, group, fsdp: bool) -> Iterator[None]:
    """Around a forward and backward: afterwards every gradient is the sum over `group`. With FSDP2 it reduce-
    scatters inside the backward, its collectives counted like the attention's (fsdp_counter); without, the
    gradients are all-reduced in buckets when the block ends (not when it raises)."""
    with counting_fsdp() if fsdp else contextlib.nullcontext():
        yield
    if not fsdp:
        reduce_gradients(model, group)


__all__ = ["GRAD_BUCKET_BYTES", "fsdp_units", "grad_sync_ops", "uncounted_fsdp_ops", "fsdp_sharder",
           "reduce_gradients", "synced_gradients"]
