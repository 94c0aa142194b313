"""Performance model: the time of one training step of any registered attention algorithm (attn2d.attention.registry).

A step is priced from three parts, every assumption a number in one hardware profile (conf/hardware/*.yaml):

(a) Compute. Attention FLOPs are 4 B H D per (query, key) pair forward and 2.5x that backward (the FlashAttention
    convention: fwd = 2 matmuls, bwd = 5). Each algorithm's *schedule* (its registry entry's, compute.py) says
    which blocks of positions every rank computes in every synchronous step, from the token layouts of
    attn2d.attention.layout; each block call is split into backend pieces exactly as
    attn2d.attention.kernels.block_pieces splits it (unmasked, causal, or explicit-mask pieces, fully masked ones
    skipped). A piece costs `attn_call_overhead_s` + flops / rate; a causal piece skips the fraction
    `attn_causal_skip` of its masked pairs (1 for FlashAttention's tile skipping); an explicit-mask piece (the
    staircase of a non-square grid whose steps the kernel layer does not re-stride, see kernels.MAX_RESTRIDE_PAIRS)
    runs the full block at the mask-capable kernel's rate. A step costs what its slowest rank computes, so causal
    halving and load balance (zigzag vs contiguous ring, cyclic 2-D layout)
    follow from the layouts. The rest of the model costs 6 x (matmul parameters) x tokens FLOPs (8 x with
    activation checkpointing, which also replays the attention forward and its communication), divided over the
    P ranks, at `matmul_flops_per_s`; AdamW is memory bound (bytes per parameter / memory bandwidth).
    Ranks that time-share CPU cores (`shared_cores`, the local CPU profile) get cores / ranks of their solo
    speed on every CPU term (FLOPs and software overheads alike).
(b) Communication. The volume and message count of every operation are NOT derived here: each algorithm module's
    `comm_ops(...)` (attn2d.distributed.comm.CommOp, the formulas the tests check against counted bytes) is
    priced op by op (network.py) over an alpha-beta model of a hierarchical network. Ranks are packed onto nodes
    in order
    (node = rank // gpus_per_node) with grid rank = r * cols + c, so a row group is contiguous and a column group
    strides across nodes. For every op all its groups run at once (all grid rows together, ...); the op's edges
    (ring successor for all-gather / reduce-scatter / p2p rings, every pair for all-to-all, the column -> row-major
    permutation for "pair") are laid on the nodes, and
        t = base_latency + alpha-steps + max( max over nodes  (bytes leaving the node) / node NIC bandwidth,
                                              max over groups and nodes (bytes the group sends off the node)
                                                  / (its members on the node x per-GPU NIC bandwidth),
                                              max over ranks  (bytes leaving the rank on-node) / intra bandwidth )
    (GPU-NIC affinity: a collective's channels use its members' NICs; a point-to-point stream counts as a group
    of one, its GPU's NIC.)
    `collective_algorithm` "ring" (default) or "tree" sets the inter-node latency of collectives: ring
    nodes - 1 inter-node alphas, tree ceil(log2 nodes) (NCCL's tree all-reduce; PAT all-gather / reduce-scatter,
    which NCCL uses with one GPU per node); the bandwidth term is the same (an assumption).
    `p2p_inter_efficiency` scales the inter-node bandwidth of point-to-point streams (ring p2p, Attention2D-O):
    an unknown (NCCL send/recv uses fewer channels per peer than a collective), 1 by default.
    By default NCCL runs all-gather and reduce-scatter as rings (NCCL's tuning model only considers rings for them;
    trees are for all-reduce): (steps - inter_steps) intra-node alphas plus inter_steps = nodes_in_group - 1 inter-node
    alphas, as in NCCL's src/graph/tuning.cc. Point-to-point rings pay an inter-node alpha per step once any
    edge leaves a node (each step waits for its slowest edge).
(c) Overlap (step.py). Ops with `overlapped=True` run beside the compute steps of their phase: a pipeline of per-step
    max(compute, comm) with efficiency `overlap_efficiency` (1: perfect hiding, 0: serial).
    step_time(..., overlap=False) prices an implementation that does not overlap at all (every attention
    transfer serial: compute + communication), the baseline "Ring Attention without overlap". Gradient
    synchronisation (all-reduce, or FSDP all-gather + reduce-scatter) is priced with the same network model; with
    `grad_sync_overlap` it runs beside the backward compute.

The step time is n_layer x (attention fwd + bwd per layer) + rest-of-model compute + optimizer + exposed gradient
sync + per-layer / per-step software overhead + the benchmark timer's closing barrier; StepTime.breakdown() gives it
as additive terms (attention compute, exposed communication per op, grad sync, optimizer, overheads). P = 1 gives
exactly the single-device time; the tests check that limit.

Profiles (hardware.py: HardwareProfile is the files' schema): conf/hardware/a100_4gpn.yaml and h100_1gpn.yaml
(public specifications and stated assumptions, every number with its source), local_cpu.yaml (measured by
attn2d.costmodel.calibrate). Validation against the local CPU sweep: workflow/scripts/costmodel_validation.py;
projection of the paper's cells: workflow/scripts/costmodel_projection.py; grid advisor: attn2d.costmodel.advise;
the paper's unknowns: attn2d.costmodel.inverse.
"""
from __future__ import annotations

from attn2d.costmodel.compute import (
    ATTN_BWD_FLOP_RATIO,
    attention_flops,
    attention_schedule,
    attention_step_times,
    call_work,
    schedule_work,
)
from attn2d.costmodel.hardware import Hardware, HardwareProfile, Link, load_hardware, read_profile, repo_root
from attn2d.costmodel.network import (
    OpTime,
    comm_calls,
    comm_ops_for,
    comm_volume_per_rank,
    grad_sync_ops,
    op_edges,
    price_op,
)
from attn2d.costmodel.step import StepTime, _pipeline, attention_phases, step_time
from attn2d.costmodel.workload import Workload, load_model
from attn2d.distributed.comm import CommOp

__all__ = ["ATTN_BWD_FLOP_RATIO", "CommOp", "Hardware", "HardwareProfile", "Link", "OpTime", "StepTime", "Workload",
           "_pipeline", "attention_flops", "attention_phases", "attention_schedule", "attention_step_times",
           "call_work", "comm_calls", "comm_ops_for", "comm_volume_per_rank", "grad_sync_ops", "load_hardware",
           "load_model", "op_edges", "price_op", "read_profile", "repo_root",
           "schedule_work", "step_time"]
