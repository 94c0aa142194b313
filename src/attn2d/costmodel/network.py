"""Communication pricing: every CommOp of an algorithm (its own `comm_ops`) or of the gradient sync, laid on the
nodes of a hierarchical alpha-beta network (see attn2d.costmodel)."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from attn2d.attention import get_attention
from attn2d.attention.common import kv_send_peer
from attn2d.costmodel.hardware import Hardware
from attn2d.costmodel.workload import Workload
from attn2d.distributed import parallelize
from attn2d.distributed.comm import CommOp
from attn2d.distributed.placement import rank_nodes
from attn2d.dtypes import as_dtype
from attn2d.model import GPTConfig


def comm_ops_for(algorithm: str, shape: GPTConfig, wl: Workload, rows: int, cols: int) -> list[CommOp]:
    """The algorithm module's own analytic CommOps (attn2d.attention.get_attention(name).comm_ops) on the grid it
    is priced on (impl.cost_grid)."""
    if rows * cols == 1:
        return []
    impl = get_attention(algorithm)
    if impl.ranks == "one":
        return []
    if impl.comm_ops is None:
        raise ValueError(f"attention {algorithm!r} does not export comm_ops")
    r, c = impl.cost_grid(rows, cols)
    return list(impl.comm_ops(wl.batch_size, wl.seq_len, shape.n_head, shape.d_head, r, c, as_dtype(wl.dtype),
                              wl.causal, kv_heads=shape.kv_heads))


def grad_sync_ops(shape: GPTConfig, wl: Workload, P: int) -> list[CommOp]:
    """attn2d.distributed.parallelize.grad_sync_ops for a Workload (what training moves to sync gradients)."""
    return parallelize.grad_sync_ops(shape, P, fsdp=wl.fsdp, grad_bytes=wl.grad_bytes, param_bytes=wl.dtype_bytes)


def comm_calls(ops: Iterable[CommOp]) -> int:
    """Communication calls the algorithm makes for these ops (p2p: one per step; a collective: one per op)."""
    return sum(op.steps if op.kind == "p2p" else 1 for op in ops if op.group_size > 1)


def comm_volume_per_rank(ops: Iterable[CommOp], phase: str | None = None) -> int:
    """Bytes sent by one rank over the ops (optionally one phase)."""
    return sum(op.bytes_sent for op in ops if phase is None or op.phase == phase)


# ============================================================================================== placement
def _grid_groups(group: str, rows: int, cols: int) -> list[list[int]]:
    """Every group of this kind on the grid, each as a ring-ordered list of ranks (rank = r*cols + c)."""
    P = rows * cols
    if group == "row":
        return [[r * cols + c for c in range(cols)] for r in range(rows)]
    if group == "col":
        return [[r * cols + c for r in range(rows)] for c in range(cols)]
    if group == "world":
        return [list(range(P))]
    raise ValueError(f"unknown group {group!r}; known: row, col, world, pair")


def op_edges(op: CommOp, rows: int, cols: int) -> tuple[list[tuple[int, int, float]], list[list[int]]]:
    """Directed edges (src, dst, bytes over the whole op) of `op` run by all its groups at once, and the groups.

    A ring op (all-gather, reduce-scatter, all-reduce, p2p ring) sends its bytes to the ring successor in group
    order; an all-to-all spreads them evenly over every other member; a pair op sends to the permutation peer."""
    P = rows * cols
    if op.group == "pair":
        edges, groups = [], []
        for k in range(P):
            pr, pc = kv_send_peer(*divmod(k, cols), rows, cols)  # Alg. 1 L1: column -> row-major permutation peer
            peer = pr * cols + pc
            if peer != k:
                edges.append((k, peer, float(op.bytes_sent)))
                groups.append(sorted({k, peer}))
        return edges, groups
    groups = _grid_groups(op.group, rows, cols)
    if op.group_size != len(groups[0]):
        raise ValueError(f"op {op.name!r}: group {op.group!r} of a {rows}x{cols} grid has {len(groups[0])} ranks, "
                         f"but the op says group_size {op.group_size}")
    edges = []
    for g in groups:
        n = len(g)
        if n < 2:
            continue
        if op.kind == "all_to_all":
            share = op.bytes_sent / (n - 1)
            edges += [(a, b, share) for a in g for b in g if a != b]
        else:
            edges += [(g[i], g[(i + 1) % n], float(op.bytes_sent)) for i in range(n)]
    return edges, groups


# ============================================================================================== pricing
@dataclass(frozen=True)
class OpTime:
    name: str
    phase: str
    kind: str
    group: str
    overlapped: bool
    latency_s: float
    bandwidth_s: float
    inter_node: bool
    nodes_in_group: int

    @property
    def time_s(self) -> float:
        return self.latency_s + self.bandwidth_s


@lru_cache(maxsize=65536)
def _op_loads(op: CommOp, rows: int, cols: int, G: int, placement: str) -> tuple[float, float, float, int, bool]:
    """The network loads of `op` on the grid under a placement (they do not depend on link speeds, so cached):
    (max bytes a rank sends on-node, max bytes leaving a node, max bytes per NIC of a group's members on a node
    leaving it, nodes spanned by a group, whether any edge leaves a node)."""
    node = rank_nodes(rows, cols, G, placement).__getitem__
    edges, groups = op_edges(op, rows, cols)
    group_of = {k: i for i, g in enumerate(groups) for k in g}
    node_out: dict[int, float] = {}  # bytes leaving each node (all groups: they share its NICs)
    group_node_out: dict[tuple[int, int], float] = {}  # bytes leaving a node from one group
    rank_intra: dict[int, float] = {}
    for a, b, nbytes in edges:
        if node(a) != node(b):
            node_out[node(a)] = node_out.get(node(a), 0.0) + nbytes
            key = (group_of[a], node(a)) if op.kind != "p2p" else (a, node(a))  # a p2p stream is one GPU's
            group_node_out[key] = group_node_out.get(key, 0.0) + nbytes
        else:
            rank_intra[a] = rank_intra.get(a, 0.0) + nbytes
    # GPU-NIC affinity: a collective's channels use the NICs of its members on that node; a p2p stream uses its
    # own GPU's NIC
    nic = 0.0
    for (gid, nd), nbytes in group_node_out.items():
        members = 1 if op.kind == "p2p" else sum(1 for k in groups[gid] if node(k) == nd)
        nic = max(nic, nbytes / min(members, G))
    nodes_in_group = max((len({node(k) for k in g}) for g in groups), default=1)
    return (max(rank_intra.values(), default=0.0), max(node_out.values(), default=0.0), nic, nodes_in_group,
            bool(node_out))


def price_op(op: CommOp, rows: int, cols: int, hw: Hardware, glue: bool = True) -> OpTime:
    """Alpha-beta time of one CommOp on the hierarchical network (see attn2d.costmodel), plus, with `glue`, the
    algorithm's host time around each call (`comm_call_overhead_s`, stretched when ranks share cores)."""
    if op.group_size <= 1 or (op.bytes_sent == 0 and op.bytes_received == 0 and op.messages == 0):
        return OpTime(op.name, op.phase, op.kind, op.group, op.overlapped, 0.0, 0.0, False, 1)
    G = max(1, hw.gpus_per_node)
    max_intra, max_node_out, max_nic_load, nodes_in_group, inter = _op_loads(op, rows, cols, G, hw.placement)
    link = hw.intra_link(op.kind, rows * cols)
    t_bw = max_intra / link.bw_bytes_per_s
    if inter:
        eff = hw.p2p_inter_efficiency if op.kind == "p2p" else 1.0
        t_bw = max(t_bw, max_node_out / (hw.inter.bw_bytes_per_s * eff))
        if hw.inter_rank_bw_bytes_per_s:
            t_bw = max(t_bw, max_nic_load / (hw.inter_rank_bw_bytes_per_s * eff))
    steps = max(1, op.steps)
    twice = 2 if op.kind == "all_reduce" else 1
    n_calls = max(1, steps // max(1, (op.group_size - 1) * twice))  # collectives bundled in one op (buckets, units)
    if op.kind in ("all_gather", "reduce_scatter", "all_reduce") and inter:
        # NCCL tuning.cc: a ring crosses nodes in nInterSteps = nNodes - 1 of its steps (2 (nNodes - 1) for an
        # all-reduce); tree: log2(nNodes) (NCCL tree all-reduce up and down; PAT all-gather / reduce-scatter)
        hops = (nodes_in_group - 1 if hw.collective_algorithm == "ring"
                else math.ceil(math.log2(max(2, nodes_in_group))))
        inter_steps = min(steps, hops * twice * n_calls)
        lat = (steps - inter_steps) * link.alpha_s + inter_steps * hw.inter.alpha_s
    elif inter:
        lat = steps * hw.inter.alpha_s  # a p2p ring step (or an all-to-all round) waits for its slowest edge
    else:
        lat = steps * link.alpha_s
    lat += hw.collective_base_latency_s * n_calls if op.kind != "p2p" else 0.0
    calls = steps if op.kind == "p2p" else n_calls
    lat += link.call_s * calls  # the communication library's software cost per call (measured on CPU)
    if glue and hw.comm_call_overhead_s:
        lat += calls * hw.comm_call_overhead_s / hw.compute_share(min(rows * cols, G))
    if hw.sync_penalty_by_world:
        lat += calls * hw.sync_penalty(rows * cols)
    return OpTime(op.name, op.phase, op.kind, op.group, op.overlapped, lat, t_bw, inter, nodes_in_group)
