"""Counted communication: every byte the attention code sends goes through this module.

Counting convention (per rank, what the analytic formulas in the algorithm modules predict):
- all_gather of a block of b bytes over a group of g ranks: sent = received = (g - 1) * b, messages = g - 1
  (what a ring or direct algorithm moves per device; NCCL and gloo move the same volume).
- reduce_scatter of g blocks of b bytes each: sent = received = (g - 1) * b, messages = g - 1. On gloo it runs
  as an all_to_all and a local sum, since gloo's own reduce_scatter all-reduces the whole g * b buffer (twice
  these bytes on the wire: the "wire" column of benchmarks/bench_attention.py, tests/test_foundation.py).
- all_to_all: sent = bytes of the blocks addressed to other ranks, received = bytes from other ranks,
  messages = number of non-empty blocks sent to other ranks.
- point-to-point: each isend counts its bytes and one message; each irecv counts its bytes received.
Groups of one rank move nothing and count nothing. Sends to self are local copies and count nothing.

All buffers handed to torch.distributed are made contiguous here (gloo silently corrupts memory otherwise).
A collective that fails or times out raises health.CollectiveError naming the op, the group, its ranks and the
rank that stopped answering (see attn2d.distributed.health).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from attn2d.distributed import health


@dataclass
class CommStats:
    """Bytes and messages of this rank, in total and by operation name."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    by_op: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))

    def add(self, op: str, sent: int, received: int, messages: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.messages += messages
        row = self.by_op[op]
        row[0] += sent
        row[1] += received
        row[2] += messages

    def as_dict(self) -> dict:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "messages": self.messages,
            "by_op": {k: {"bytes_sent": v[0], "bytes_received": v[1], "messages": v[2]} for k, v in self.by_op.items()},
        }


_ACTIVE: list[CommStats] = []
# torch 2.13 renamed the tensor collectives (the old names warn); keep both working.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@contextlib.contextmanager
def count_comm() -> Iterator[CommStats]:
    """Count this rank's communication inside the block (nests; backward passes run inside count too)."""
    stats = CommStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)


def _record(op: str, sent: int, received: int, messages: int) -> None:
    for stats in _ACTIVE:
        stats.add(op, sent, received, messages)


@contextlib.contextmanager
def guarded(op: str, group: dist.ProcessGroup | None) -> Iterator[None]:
    """Re-raise a backend failure (timeout, reset connection) of collective `op` on `group` as a CollectiveError."""
    try:
        yield
    except health.CollectiveError:
        raise
    except RuntimeError as e:  # DistBackendError, DistNetworkError, gloo's and NCCL's RuntimeErrors
        raise health.collective_error(op, group, e) from e


def gather_ints(values: Sequence[int], group: dist.ProcessGroup | None, op: str = "descriptor") -> list[list[int]]:
    """Every rank's list of ints (the same length on every rank), in group-rank order. Not counted: a check, not
    part of any algorithm. On the group's device (NCCL needs CUDA tensors)."""
    g = group_size(group)
    if g == 1:
        return [list(values)]
    backend = str(dist.get_backend(group))
    dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend and "gloo" not in backend else "cpu"
    x = torch.tensor(list(values), dtype=torch.int64, device=dev)
    out = torch.empty(g * x.numel(), dtype=torch.int64, device=dev)
    with guarded(op, group):
        _ALL_GATHER(out, x, group=group)
    return out.view(g, -1).tolist()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _is_gloo(group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """True if a collective on `group` with tensors on `device` runs on gloo (a CPU tensor and a gloo backend)."""
    return device.type == "cpu" and "gloo" in str(dist.get_backend(group))


# ---------------------------------------------------------------------------------------------- packing
def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors of any dtypes into one flat uint8 buffer (one message instead of several)."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(buf: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of `pack`: split a flat uint8 buffer into tensors shaped and typed like `like`."""
    out, offset = [], 0
    for t in like:
        n = _nbytes(t)
        out.append(buf[offset : offset + n].view(t.dtype).reshape(t.shape))
        offset += n
    if offset != buf.numel():
        raise ValueError(f"unpack: buffer has {buf.numel()} bytes but the templates need {offset}")
    return out


def unpack_blocks(buf: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`unpack` of every row of a (g, bytes) buffer at once: [(g, *like_i.shape) tensors in like_i's dtype], views
    of buf (a part whose offset in the row is not aligned for its dtype is copied first)."""
    out, offset, g = [], 0, buf.shape[0]
    for t in like:
        n, size = _nbytes(t), t.element_size()
        part = buf[:, offset : offset + n]  # (g, n) bytes
        if part.storage_offset() % size or buf.stride(0) % size:
            part = part.contiguous()
        out.append(part.view(t.dtype).view(g, *t.shape))
        offset += n
    if offset != buf.shape[1]:
        raise ValueError(f"unpack_blocks: rows have {buf.shape[1]} bytes but the templates need {offset}")
    return out


def pack_blocks(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The (g, bytes) uint8 buffer whose row j is pack([p[j] for p in parts]), from parts (g, *shape_i) of any
    dtypes and strides, with one copy per part: the send buffer of a collective moving several tensors per
    peer in one message."""
    g, like = parts[0].shape[0], [p[0] for p in parts]
    buf = torch.empty(g, sum(_nbytes(t) for t in like), dtype=torch.uint8, device=parts[0].device)
    views = unpack_blocks(buf, like)
    if not all(v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for v in views):
        return torch.stack([pack([p[j] for p in parts]) for j in range(g)])  # a part not aligned in the row
    for p, dst in zip(parts, views):
        dst.copy_(p)
    return buf


# ---------------------------------------------------------------------------------------------- collectives
def all_gather_blocks(x: torch.Tensor, group: dist.ProcessGroup | None, op: str = "all_gather") -> torch.Tensor:
    """Every rank's `x` stacked in group-rank order: (g, *x.shape), the collective's own output buffer (no copy
    after the collective; a caller that reorders the rows does its one copy from here)."""
    g = group_size(group)
    if g == 1:
        return x.unsqueeze(0)
    x = x.contiguous()
    out = torch.empty(g * x.numel(), dtype=x.dtype, device=x.device)  # (g * numel,)
    with guarded(op, group):
        _ALL_GATHER(out, x.reshape(-1), group=group)
    _record(op, (g - 1) * _nbytes(x), (g - 1) * _nbytes(x), g - 1)
    return out.view(g, *x.shape)  # (g, *x.shape)


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 0, op: str = "all_gather") -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in group-rank order (dim 0: a view of the output buffer)."""
    if group_size(group) == 1:
        return x
    blocks = all_gather_blocks(x, group, op)  # (g, *x.shape)
    if dim == 0:
        return blocks.view(-1, *x.shape[1:])
    return torch.cat(blocks.unbind(0), dim=dim)  # x.shape with dim scaled by g


def _stacked(blocks: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """g blocks of one shape as one contiguous (g, *block) buffer: a stacked tensor (any strides) is copied at
    most once, a sequence is stacked (one copy)."""
    if isinstance(blocks, torch.Tensor):
        return blocks.contiguous()
    return torch.stack(list(blocks))


def reduce_scatter(blocks: Sequence[torch.Tensor] | torch.Tensor, group: dist.ProcessGroup | None,
                   op: str = "reduce_scatter") -> torch.Tensor:
    """Sum over ranks of blocks[my_rank]: rank i receives sum_j blocks_j[i]. All blocks have one shape; `blocks`
    may be one (g, *block) tensor of any strides (copied once into the send buffer)."""
    g = group_size(group)
    if len(blocks) != g:
        raise ValueError(f"reduce_scatter needs {g} blocks (one per rank of the group), got {len(blocks)}")
    if g == 1:
        return blocks[0].clone()
    inp = _stacked(blocks)  # (g, *block)
    out = torch.empty(inp.shape[1:], dtype=inp.dtype, device=inp.device)  # (*block)
    with guarded(op, group):
        if _is_gloo(group, inp.device):  # gloo's reduce_scatter is an all_reduce of all g blocks: twice the bytes
            received = torch.empty_like(inp)  # (g, *block): block i from rank i
            dist.all_to_all_single(received, inp, group=group)
            torch.sum(received, 0, out=out)
        else:
            _REDUCE_SCATTER(out.view(-1), inp.view(-1), group=group)
    _record(op, (g - 1) * _nbytes(out), (g - 1) * _nbytes(out), g - 1)
    return out


def all_to_all_blocks(x: torch.Tensor, group: dist.ProcessGroup | None, op: str = "all_to_all") -> torch.Tensor:
    """x (g, *block), any strides: x[j] goes to rank j; returns (g, *block), row i received from rank i (x is
    copied once into the send buffer unless contiguous). Every rank passes the same shape and dtype."""
    g = group_size(group)
    if x.shape[0] != g:
        raise ValueError(f"all_to_all needs {g} blocks (one per rank of the group), got {x.shape[0]}")
    if g == 1:
        return x
    inp = x.contiguous()  # (g, *block)
    out = torch.empty_like(inp)
    with guarded(op, group):
        dist.all_to_all_single(out, inp, group=group)
    b = _nbytes(inp[0])
    _record(op, (g - 1) * b, (g - 1) * b, g - 1 if b else 0)
    return out


def all_to_all(blocks: Sequence[torch.Tensor], group: dist.ProcessGroup | None,
               op: str = "all_to_all") -> list[torch.Tensor]:
    """blocks[j] goes to rank j; returns the list of blocks received, indexed by source rank (all_to_all_blocks
    of the stacked blocks)."""
    g = group_size(group)
    if len(blocks) != g:
        raise ValueError(f"all_to_all needs {g} blocks (one per rank of the group), got {len(blocks)}")
    if g == 1:
        return [blocks[0]]
    return list(all_to_all_blocks(torch.stack(list(blocks)), group, op).unbind(0))


# ---------------------------------------------------------------------------------------------- point to point
class P2PHandle:
    """The pending receives of a batch of point-to-point ops; `wait()` returns the received tensors."""

    def __init__(self, works: list, received: list[torch.Tensor], op: str = "send_recv", group=None):
        self._works, self.received, self._op, self._group = works, received, op, group

    def wait(self) -> list[torch.Tensor]:
        with guarded(self._op, self._group):
            for w in self._works:
                w.wait()
        self._works = []
        return self.received


def send_recv(
    sends: Sequence[tuple[torch.Tensor, int]],
    recvs: Sequence[tuple[torch.Tensor, int]],
    op: str = "send_recv",
    async_op: bool = False,
    group: dist.ProcessGroup | None = None,
) -> P2PHandle | list[torch.Tensor]:
    """Post all `sends` (tensor, dst global rank) and `recvs` (buffer, src global rank) as one batch.

    Every rank must post matching ops in the same order (batch_isend_irecv's rule). A send to self is matched
    with the receive from self (same order) and done as a local copy. With async_op=True returns a P2PHandle."""
    me = dist.get_rank() if dist.is_initialized() else 0
    self_sends = [t for t, dst in sends if dst == me]
    self_recvs = [b for b, src in recvs if src == me]
    if len(self_sends) != len(self_recvs):
        raise ValueError(f"send_recv: {len(self_sends)} sends to self but {len(self_recvs)} receives from self")
    for t, b in zip(self_sends, self_recvs):
        b.copy_(t)
    ops, received = [], [b for b, _ in recvs]
    sent_bytes = recv_bytes = messages = 0
    for t, dst in sends:
        if dst != me:
            ops.append(dist.P2POp(dist.isend, t.contiguous(), dst, group=group))
            sent_bytes += _nbytes(t)
            messages += 1
    for b, src in recvs:
        if src != me:
            if not b.is_contiguous():
                raise ValueError("send_recv: receive buffers must be contiguous")
            ops.append(dist.P2POp(dist.irecv, b, src, group=group))
            recv_bytes += _nbytes(b)
    with guarded(op, group):
        works = dist.batch_isend_irecv(ops) if ops else []
    _record(op, sent_bytes, recv_bytes, messages)
    handle = P2PHandle(works, received, op, group)
    return handle if async_op else handle.wait()


# ---------------------------------------------------------------------------------------------- analytic volumes
@dataclass(frozen=True)
class CommOp:
    """One communication step of an algorithm, as predicted analytically for one rank.

    `name` is the op name the implementation passes to this module (the key of CommStats.by_op), so a test can
    compare prediction and count op by op; the cost model prices each CommOp over its network model."""

    phase: str  # "fwd" | "bwd"
    name: str  # op name as counted, e.g. "q_row_all_gather"
    kind: str  # "all_gather" | "reduce_scatter" | "all_to_all" | "p2p"
    group: str  # "row" | "col" | "world" | "pair"
    group_size: int  # ranks taking part (2 for a pair)
    bytes_sent: int  # by this rank
    bytes_received: int  # by this rank
    messages: int  # sent by this rank
    steps: int = 1  # sequential latency steps (ring all-gather over g ranks: g - 1)
    overlapped: bool = False  # hidden behind compute by the algorithm's schedule


def total_comm(ops: Sequence[CommOp], phase: str | None = None) -> dict:
    """Sum predicted ops (optionally one phase) into the same shape as CommStats.as_dict()."""
    stats = CommStats()
    for op in ops:
        if phase is None or op.phase == phase:
            stats.add(op.name, op.bytes_sent, op.bytes_received, op.messages)
    return stats.as_dict()


# ---------------------------------------------------------------------------------------------- all-reduce
def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None, op: str = "all_reduce") -> torch.Tensor:
    """Sum `x` over the group, in place (x must be contiguous); returns x. Not used by the attention algorithms:
    the training loop reduces parameter gradients with it (op "grad_all_reduce").

    Counted as a ring all-reduce (reduce-scatter then all-gather) of b bytes over g ranks:
    sent = received = 2 (g - 1) / g * b (rounded down), messages = 2 (g - 1)."""
    g = group_size(group)
    if g == 1:
        return x
    if not x.is_contiguous():
        raise ValueError("all_reduce: the tensor must be contiguous (it is reduced in place)")
    with guarded(op, group):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    volume = 2 * (g - 1) * _nbytes(x) // g
    _record(op, volume, volume, 2 * (g - 1))
    return x
