"""The public attentions' checks of what callers get wrong silently: layout, axis order, and ranks that disagree.

`check_call(algo, q, k, v, layout, grid_or_group, causal, heads)` is called at each public entry (after the
local shape checks of common.py) and raises ValueError naming the value given and the one needed:
- heads (optional, the caller's or the model's declared head count): q's dim 2 must be it; a (B, H, N/P, D) tensor
  is named as such;
- the ShardInfo tag of shards made by attn2d.attention.shard (layout.py): its layout, sequence dim and grid must
  be the algorithm's;
- the descriptor check: one all-gather of a small int64 descriptor (algorithm, B, N/P, heads, kv heads, head dim,
  dtype, causal, layout, grid) over the group, so every rank learns what every other passed and all raise the
  same error naming the rank that differs. Done on the first call per distinct local signature (and group) and
  cached, so steady-state steps pay nothing. A rank whose signature changes after its first call while the
  others' do not is caught by the group timeout (health.CollectiveError), not here.
"""
from __future__ import annotations

import zlib
from collections import defaultdict

import torch
import torch.distributed as dist

from attn2d.attention.layout import LAYOUTS, grid_shape, shard_info
from attn2d.distributed import comm
from attn2d.distributed.grid import ProcessGrid
from attn2d.distributed.health import fmt_ranks, group_ranks
from attn2d.dtypes import SHORT


class RankMismatchError(ValueError):
    """The ranks of a group passed different inputs; every rank raises the same one."""


_FLOAT_DTYPES = tuple(SHORT.values())  # dtype codes of the descriptor
_FIELDS = ("algorithm", "batch", "positions per rank (N/P)", "heads", "k/v heads", "head dim", "dtype", "causal",
           "layout", "grid")
_ALGOS = ("attention2d", "attention2d_overlap", "ring_attention")  # names the messages can decode
_CHECKED: set = set()


def check_heads(algo: str, q: torch.Tensor, heads: int | None) -> None:
    """q is (B, N/P, H, D) with H = heads (skipped when heads is None)."""
    if heads is None or q.dim() != 4 or q.shape[2] == heads:
        return
    hint = ("; it looks like (B, H, N/P, D): pass q.transpose(1, 2) (and k, v)" if q.shape[1] == heads else "")
    raise ValueError(f"{algo}: q has shape {tuple(q.shape)} but heads={heads}: the shards must be (B, N/P, H, D) "
                     f"with the heads at dim 2{hint}")


def check_tags(algo: str, tensors: dict, layout: str, grid_or_group) -> None:
    """Tensors made by attn2d.attention.shard carry their layout and grid: they must be this call's."""
    rank, rows, cols = grid_shape(grid_or_group)
    for name, t in tensors.items():
        info = shard_info(t)
        if info is None:
            continue
        if info.layout != layout:
            raise ValueError(f"{algo}: {name} is a {info.layout!r} shard (made by attn2d.attention.shard), but "
                             f"{algo} needs the {layout!r} layout: shard it with layout={layout!r}")
        if info.dim != 1:
            raise ValueError(f"{algo}: {name} was sharded along dim {info.dim}, but the sequence must be dim 1 "
                             f"(B, N/P, H, D): shard with dim=1 (transpose (B, H, N, D) tensors first)")
        # cyclic positions depend on rows and cols; the ring layouts only on P and the rank
        if layout == "cyclic":
            same_grid = (info.rows, info.cols) == (rows, cols)
        else:
            same_grid = info.rows * info.cols == rows * cols
        if not same_grid or info.rank != rank:
            raise ValueError(f"{algo}: {name} was sharded for rank {info.rank} of grid {info.rows}x{info.cols}, but "
                             f"this call runs on rank {rank} of grid {rows}x{cols}: shard it with this call's grid")


def _dtype_code(dt: torch.dtype) -> int:
    return _FLOAT_DTYPES.index(dt) if dt in _FLOAT_DTYPES else -1


def _show(field: int, value: int, names: dict) -> str:
    if field == 0:
        return names.get(value, "another algorithm")
    if field == 6:
        return str(_FLOAT_DTYPES[value]).removeprefix("torch.") if 0 <= value < len(_FLOAT_DTYPES) else "another dtype"
    if field == 7:
        return str(bool(value))
    if field == 8:
        return LAYOUTS[value] if 0 <= value < len(LAYOUTS) else "?"
    if field == 9:
        return f"{value >> 16}x{value & 0xFFFF}"
    return str(value)


def check_agreement(algo: str, q: torch.Tensor, k: torch.Tensor, layout: str, grid_or_group, causal: bool) -> None:
    """Every rank of the group passes the same algorithm, shapes, dtype, causal flag, layout and grid (see the
    module docstring). Raises RankMismatchError on every rank, naming the ranks that differ."""
    if not dist.is_initialized():
        return
    group = grid_or_group.group if isinstance(grid_or_group, ProcessGrid) else grid_or_group
    if comm.group_size(group) == 1:
        return
    _, rows, cols = grid_shape(grid_or_group)
    code = zlib.crc32(algo.encode()) & 0x7FFFFFFF
    desc = (code, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], _dtype_code(q.dtype), int(causal),
            LAYOUTS.index(layout), (rows << 16) | cols)
    key = (id(group), desc)
    if key in _CHECKED:
        return
    every = [tuple(d) for d in comm.gather_ints(desc, group, op=f"{algo} input check")]
    if len(set(every)) > 1:
        ranks = group_ranks(group)
        differ = [i for i in range(len(desc)) if len({d[i] for d in every}) > 1]
        names = {zlib.crc32(a.encode()) & 0x7FFFFFFF: a for a in (*_ALGOS, algo)}
        by_desc: dict[tuple, list[int]] = defaultdict(list)
        for rank, d in zip(ranks, every):
            by_desc[d].append(rank)
        parts = sorted(by_desc.items(), key=lambda kv: len(kv[1]))  # the odd one out first
        said = "; ".join(
            f"rank{'s' if len(rs) > 1 else ''} {fmt_ranks(rs)} ha{'ve' if len(rs) > 1 else 's'} "
            + ", ".join(f"{_FIELDS[i]} {_show(i, d[i], names)}" for i in differ) for d, rs in parts)
        raise RankMismatchError(f"{algo}: the ranks disagree on the inputs: {said}; every rank must pass shards of one "
                         "shape and dtype (B, N/P, H, D) to the same call")
    _CHECKED.add(key)


def check_call(algo: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, grid_or_group,
               causal: bool, heads: int | None = None) -> None:
    """All of this module's checks, in order: heads, shard tags, cross-rank agreement."""
    check_heads(algo, q, heads)
    check_tags(algo, {"q": q, "k": k, "v": v}, layout, grid_or_group)
    check_agreement(algo, q, k, layout, grid_or_group, causal)


__all__ = ["RankMismatchError", "check_call", "check_heads", "check_tags", "check_agreement"]
