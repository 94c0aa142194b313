"""Count FSDP2's own collectives with the same counter as the attention's (attn2d.distributed.comm).

FSDP2 (`torch.distributed.fsdp.fully_shard`) calls torch.distributed directly, so its parameter all-gathers and
gradient reduce-scatters bypass attn2d.distributed.comm. In torch 2.13 every one of them goes through the name
`dist` of the private module torch.distributed.fsdp._fully_shard._fsdp_collectives (`dist.all_gather_single`,
`dist.reduce_scatter_single`, and `dist.all_reduce` for replicated meshes). `counting_fsdp()` swaps that name for a
proxy that records each call (op names below, comm's conventions: an all-gather or reduce-scatter over g ranks
of a b-byte shard sends and receives (g-1) b bytes in g-1 messages; an all-reduce of b bytes 2 (g-1) b / g in
2 (g-1)) and forwards it unchanged. Where this torch lays FSDP out differently, `fsdp_counting_supported()` is
False and the caller falls back to the analytic volume (attn2d.distributed.parallelize.uncounted_fsdp_ops).
"""
from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from attn2d.distributed import comm

_MODULE = "torch.distributed.fsdp._fully_shard._fsdp_collectives"
GATHER, SCATTER, ALL_REDUCE = "fsdp_param_all_gather", "fsdp_grad_reduce_scatter", "fsdp_grad_all_reduce"
_COUNTED = {"all_gather_single": ("input_tensor", GATHER), "reduce_scatter_single": ("output", SCATTER),
            "all_reduce": ("tensor", ALL_REDUCE)}


@functools.lru_cache(maxsize=1)
def _module():
    """The patchable module, or None; checked once (its layout does not change while the process runs)."""
    try:
        mod = importlib.import_module(_MODULE)
    except ImportError:
        return None
    if getattr(mod, "dist", None) is not dist:
        return None
    for name, (arg, _) in _COUNTED.items():  # the argument each count reads must exist under that name
        if arg not in inspect.signature(getattr(dist, name)).parameters:
            return None
    return mod


def fsdp_counting_supported() -> bool:
    """True if FSDP2's collectives in this torch can be counted by `counting_fsdp`."""
    return _module() is not None


class _CountingDist:
    """torch.distributed, with the three collectives FSDP2 uses counted before they run."""

    def __getattr__(self, name):
        return _counted(name) if name in _COUNTED else getattr(dist, name)


@functools.cache
def _counted(name: str):
    """dist.<name>, recording its traffic first (built once per name, not per call)."""
    real = getattr(dist, name)
    arg, op = _COUNTED[name]
    sig = inspect.signature(real)

    def counted(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        t = bound.arguments[arg]
        g = dist.get_world_size(bound.arguments.get("group"))
        b = t.numel() * t.element_size()
        if g > 1:
            if name == "all_reduce":
                comm._record(op, 2 * (g - 1) * b // g, 2 * (g - 1) * b // g, 2 * (g - 1))
            else:
                comm._record(op, (g - 1) * b, (g - 1) * b, g - 1)
        return real(*args, **kwargs)

    return counted


@contextmanager
def counting_fsdp() -> Iterator[bool]:
    """Inside the block FSDP2's collectives are recorded in every active comm.count_comm(); yields whether they are
    (False: this torch's FSDP is laid out differently, nothing is patched)."""
    mod = _module()
    if mod is None or isinstance(mod.dist, _CountingDist):  # unsupported, or already counting (nested)
        yield mod is not None
        return
    mod.dist = _CountingDist()
    try:
        yield True
    finally:
        mod.dist = dist
