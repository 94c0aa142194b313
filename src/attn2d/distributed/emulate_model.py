"""The cost model on an emulated cluster (attn2d.distributed.netns): a hardware profile built from the configured
link rate (nothing fitted to the emulated timings), what gloo puts on the wire, and predicted vs measured per cell.

- Profile: this machine's measured CPU profile (conf/hardware/local_cpu.yaml: compute, same-node gloo over
  loopback) with the node network replaced by the shaper's rate: per NIC rate/8 x TCP_PAYLOAD (the share of a
  1514-byte Ethernet frame that is TCP payload, 1448 bytes with timestamps); a node has one NIC (shared) or one per
  rank (rails). No latency is emulated, so the inter-node alpha is 0.
- gloo's own reduce_scatter is an all-reduce of the whole buffer and sends twice the logical bytes. Our
  reduce-scatters go as an all_to_all on gloo (attn2d.distributed.comm), so only torch FSDP's gradient
  reduce-scatter, which calls gloo directly, is priced and predicted at twice its bytes (GLOO_WIRE_FACTOR).
- Wire bytes: the bytes of every op edge (attn2d.costmodel.op_edges) between ranks on different nodes
  (attn2d.distributed.placement), summed per sending node. veth counts GSO super-packets (headers once per up to
  64 KiB), so its counters are the payload within about 1%; tbf charges every segment's headers, hence the
  payload rate above.
"""
from __future__ import annotations

import statistics
from dataclasses import replace

from attn2d.attention import get_attention
from attn2d.costmodel import (
    CommOp,
    Hardware,
    Link,
    Workload,
    comm_ops_for,
    grad_sync_ops,
    load_hardware,
    op_edges,
    step_time,
)
from attn2d.distributed.fsdp_counter import SCATTER as FSDP_GRAD_SCATTER
from attn2d.distributed.netns import rate_bytes_per_s
from attn2d.distributed.placement import rank_nodes
from attn2d.dtypes import acc_dtype
from attn2d.model import GPTConfig

TCP_PAYLOAD = 1448 / 1514  # payload bytes per Ethernet frame byte (MSS 1448 with TCP timestamps, MTU 1500)
GLOO_WIRE_FACTOR = {FSDP_GRAD_SCATTER: 2.0}  # by op name: bytes gloo sends / bytes the op logically moves


def emulated_hardware(rate: str, nic: str, ranks_per_node: int, placement="row", base: str = "local_cpu") -> Hardware:
    """The profile of an emulated cluster: `base`'s compute and same-node links, the shaper's rate between nodes."""
    hw = load_hardware(base)
    per_nic = rate_bytes_per_s(rate) * TCP_PAYLOAD
    nics = ranks_per_node if nic == "rails" else 1
    return replace(hw, name=f"emulated_{rate}_{nic}_{ranks_per_node}pn", gpus_per_node=int(ranks_per_node),
                   inter=Link(0.0, per_nic * nics), inter_rank_bw_bytes_per_s=per_nic if nic == "rails" else None,
                   placement=placement if isinstance(placement, str) else "row",
                   source=f"built from the configured rate {rate} per NIC ({nic}, {ranks_per_node} rank(s) per node) "
                          f"x TCP payload share {TCP_PAYLOAD:.3f}; compute and same-node links: {base}")


def gloo_ops(ops) -> list[CommOp]:
    """The ops as gloo sends them (FSDP's reduce_scatter: twice the bytes)."""
    out = []
    for op in ops:
        f = GLOO_WIRE_FACTOR.get(op.name, 1.0)
        out.append(replace(op, bytes_sent=int(op.bytes_sent * f), bytes_received=int(op.bytes_received * f))
                   if f != 1.0 else op)
    return out


def _record_setup(rec):
    c, cfg = rec.cell, rec.header.get("config") or {}
    b = cfg.get("benchmark") or {}
    shape = GPTConfig.from_mapping(cfg.get("model") or {}, name=str(c.get("model")))
    dtype = str(c.get("dtype") or "float32")
    wl = Workload(seq_len=int(c["seq_len"]), batch_size=int(c["batch_size"]), dtype=dtype,
                  causal=bool((cfg.get("attention") or {}).get("causal", True)), fsdp=bool(b.get("fsdp", False)),
                  activation_checkpointing=bool(b.get("activation_checkpointing", False)),
                  grad_bytes=acc_dtype(dtype).itemsize)  # gradients in the accumulation dtype
    return shape, wl, str(c["attention"]), int(c["rows"]), int(c["cols"])


def step_ops(alg: str, shape, wl: Workload, rows: int, cols: int) -> list[tuple[CommOp, int, int, int]]:
    """(op, times per step, rows, cols of the grid it runs on) for one training step: attention ops of every layer
    (the forward twice with checkpointing) and the gradient sync over the world in rank order."""
    r, k = get_attention(alg).cost_grid(rows, cols)
    L = shape.n_layer
    out = [(op, L * (2 if (wl.activation_checkpointing and op.phase == "fwd") else 1), r, k)
           for op in comm_ops_for(alg, shape, wl, r, k)]
    return out + [(op, 1, rows * cols, 1) for op in grad_sync_ops(shape, wl, rows * cols)]


def predicted_node_tx(alg, shape, wl, rows, cols, ranks_per_node, placement="row", gloo: bool = True
                      ) -> dict[int, float]:
    """Bytes each node sends to other nodes per step (payload, as the veth counters see it)."""
    nodes = rank_nodes(rows, cols, ranks_per_node, placement)  # grid rank -> node (ring: rank order, same ranks)
    tx: dict[int, float] = {n: 0.0 for n in set(nodes)}
    for op, times, r, k in step_ops(alg, shape, wl, rows, cols):
        (o,) = gloo_ops([op]) if gloo else (op,)
        edges, _ = op_edges(o, r, k)
        for a, b, nbytes in edges:
            if nodes[a] != nodes[b]:
                tx[nodes[a]] += nbytes * times
    return tx


def validate_record(rec) -> dict:
    """One row: the emulated cell, measured vs predicted step time, counted vs predicted bytes, measured vs
    predicted wire bytes (the busiest node's transmit, and the sum over nodes)."""
    em = rec.header["emulation"]
    shape, wl, alg, rows, cols = _record_setup(rec)
    pl, G, nic = em.get("placement", "row"), int(em["ranks_per_node"]), str(em["nic"])
    hw = emulated_hardware(em["rate"], nic, G, pl)
    r, k = get_attention(alg).cost_grid(rows, cols)
    ops = comm_ops_for(alg, shape, wl, r, k)
    st = step_time(alg, shape, wl, rows, cols, hw, comm_ops=gloo_ops(ops))
    measured = statistics.median(s["step_time_s"] for s in rec.steps)
    counted = statistics.median(s.get("comm_bytes_sent") or 0 for s in rec.steps)
    pred_bytes = sum(op.bytes_sent * t for op, t, *_ in step_ops(alg, shape, wl, rows, cols))
    node_tx: dict[int, float] = {}
    for key, d in em["wire_bytes_per_step"].items():
        n = int(key.split(":")[0][1:])
        node_tx[n] = node_tx.get(n, 0.0) + d["tx"]
    pred_tx = predicted_node_tx(alg, shape, wl, rows, cols, G, pl)
    nodes = len(node_tx)
    return {
        "cell": rec.path.parent.name, "algorithm": alg, "grid": f"{rows}x{cols}", "P": rows * cols,
        "seq_len": wl.seq_len, "nodes": nodes, "ranks_per_node": G, "nic": nic, "rate": em["rate"],
        "placement": pl if isinstance(pl, str) else "explicit", "measured_s": measured,
        "predicted_s": st.step_time_s, "rel_error": (st.step_time_s - measured) / measured,
        "pred_comm_s": st.attn_fwd_comm_s + st.attn_bwd_comm_s + st.grad_sync_exposed_s,
        "counted_bytes": counted, "predicted_bytes": pred_bytes,
        "wire_busiest_node_tx": max(node_tx.values()), "pred_busiest_node_tx": max(pred_tx.values()),
        "wire_total_tx": sum(node_tx.values()), "pred_total_tx": sum(pred_tx.values()),
        "wire_rel_error": (sum(pred_tx.values()) - sum(node_tx.values())) / max(1.0, sum(node_tx.values())),
        "load_avg": em.get("load_avg_1min_before"),
    }


__all__ = ["TCP_PAYLOAD", "GLOO_WIRE_FACTOR", "FSDP_GRAD_SCATTER", "emulated_hardware", "gloo_ops", "step_ops",
           "predicted_node_tx", "validate_record"]
