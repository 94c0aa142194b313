"""Inside a rank of an emulated cluster (attn2d.distributed.netns): its NIC byte counters and the check that it runs
on the node grid.placement puts it on. Outside an emulated cluster both do nothing.

The launcher (netns.Cluster.rank_env) tells a rank where it is through the environment variables named here.
"""
from __future__ import annotations

import os
from pathlib import Path

from attn2d.distributed.placement import Placement, node_of

WIRE_ENV = "ATTN2D_WIRE_IFACES"  # "<node>:<iface>,...": the NICs whose counters this rank reports
NODE_ENV = "ATTN2D_NODE"  # the emulated node this rank was started on
PER_NODE_ENV = "ATTN2D_RANKS_PER_NODE"  # ranks per emulated node


def read_wire() -> dict[str, dict[str, int]]:
    """This rank's NIC counters (the NICs named in ATTN2D_WIRE_IFACES), {} outside an emulated cluster."""
    out = {}
    for item in filter(None, os.environ.get(WIRE_ENV, "").split(",")):
        _, dev = item.split(":", 1)
        base = Path("/sys/class/net") / dev / "statistics"
        out[item] = {"tx": int((base / "tx_bytes").read_text()), "rx": int((base / "rx_bytes").read_text())}
    return out


def wire_delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
    """Bytes each NIC sent and received between two read_wire() calls."""
    return {k: {d: after[k][d] - before[k][d] for d in ("tx", "rx")} for k in after}


def check_node(rank: int, rows: int, cols: int, placement: Placement) -> None:
    """Inside an emulated cluster (ATTN2D_NODE set): raise if this rank was started on another node than
    `placement` puts it on (the launcher and the training config disagree)."""
    if NODE_ENV not in os.environ:
        return
    per_node = int(os.environ.get(PER_NODE_ENV, os.environ.get("LOCAL_WORLD_SIZE", "1")))
    want = node_of(rank, rows, cols, per_node, placement)
    if want != int(os.environ[NODE_ENV]):
        raise RuntimeError(f"rank {rank} runs on emulated node {os.environ[NODE_ENV]}, but grid.placement "
                           f"{placement!r} puts it on node {want} ({per_node} rank(s) per node)")


__all__ = ["WIRE_ENV", "NODE_ENV", "PER_NODE_ENV", "read_wire", "wire_delta", "check_node"]
