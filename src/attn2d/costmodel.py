"""Performance model: the time of one training step for local, ring, attn2d (NO) and attn2d_overlap (O).

A step is priced from three parts, every assumption a number in one hardware profile (conf/hardware/*.yaml):

(a) Compute. Attention FLOPs are 4 B H D per (query, key) pair forward and 2.5x that backward (the FlashAttention
    convention: fwd = 2 matmuls, bwd = 5). Each algorithm's *schedule* (attention_schedule) says which blocks of
    positions every rank computes in every synchronous step, from the token layouts of attn2d.attention.layout;
    each block call is split into backend pieces exactly as attn2d.attention.kernels.block_pieces splits it
    (unmasked, causal, or explicit-mask pieces, fully masked ones skipped). A piece costs
    `attn_call_overhead_s` + flops / rate; a causal piece skips the fraction `attn_causal_skip` of its masked
    pairs (1 for FlashAttention's tile skipping); an explicit-mask piece (the staircase of a non-square grid whose
    steps the kernel layer does not re-stride, see kernels.MAX_RESTRIDE_PAIRS) runs the full block at the
    mask-capable kernel's rate. A step costs what its
    slowest rank computes, so causal halving and load balance (zigzag vs contiguous ring, cyclic 2-D layout)
    follow from the layouts. The rest of the model costs 6 x (matmul parameters) x tokens FLOPs (8 x with
    activation checkpointing, which also replays the attention forward and its communication), divided over the
    P ranks, at `matmul_flops_per_s`; AdamW is memory bound (bytes per parameter / memory bandwidth).
    Ranks that time-share CPU cores (`shared_cores`, the local CPU profile) get cores / ranks of their solo
    speed on every CPU term (FLOPs and software overheads alike).
(b) Communication. The volume and message count of every operation are NOT derived here: each algorithm module's
    `comm_ops(...)` (attn2d.distributed.comm.CommOp, the formulas the tests check against counted bytes) is
    priced op by op over an alpha-beta model of a hierarchical network. Ranks are packed onto nodes in order
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
    By default NCCL runs all-gather and reduce-scatter as rings (NCCL's tuning model only considers rings for them; trees are
    for all-reduce): (steps - inter_steps) intra-node alphas plus inter_steps = nodes_in_group - 1 inter-node
    alphas, as in NCCL's src/graph/tuning.cc. Point-to-point rings pay an inter-node alpha per step once any
    edge leaves a node (each step waits for its slowest edge).
(c) Overlap. Ops with `overlapped=True` run beside the compute steps of their phase: a pipeline of per-step
    max(compute, comm) with efficiency `overlap_efficiency` (1: perfect hiding, 0: serial).
    step_time(..., overlap=False) prices an implementation that does not overlap at all (every attention
    transfer serial: compute + communication), the baseline "Ring Attention without overlap". Gradient
    synchronisation (all-reduce, or FSDP all-gather + reduce-scatter) is priced with the same network model; with
    `grad_sync_overlap` it runs beside the backward compute.

The step time is n_layer x (attention fwd + bwd per layer) + rest-of-model compute + optimizer + exposed gradient
sync + per-layer / per-step software overhead + the benchmark timer's closing barrier; StepTime.breakdown() gives it
as additive terms (attention compute, exposed communication per op, grad sync, optimizer, overheads). P = 1 gives exactly the
local (single-device) time; the tests check that limit.

Profiles: conf/hardware/a100_4gpn.yaml and h100_1gpn.yaml (public specifications and stated assumptions, every
number with its source), local_cpu.yaml (measured by attn2d.calibrate). Validation against the local CPU sweep:
workflow/scripts/costmodel_validation.py; projection of the paper's cells: workflow/scripts/costmodel_projection.py;
grid advisor: attn2d.advise.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from attn2d.distributed import parallelize
from attn2d.distributed.comm import CommOp
from attn2d.distributed.placement import rank_nodes
from attn2d.model import GPTConfig

ALGORITHMS = ("local", "ring", "ring_contiguous", "attn2d", "attn2d_overlap")
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4, "fp64": 8, "float64": 8}
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}  # torch name -> ours


def short_dtype(name: str) -> str:
    """The cost model's dtype name ("bf16") for a torch one ("bfloat16"); other names unchanged."""
    return SHORT_DTYPE.get(name, name)
COLLECTIVE_ALGORITHMS = ("ring", "tree")
ATTN_BWD_FLOP_RATIO = 2.5  # FlashAttention convention: backward = 5 matmuls vs 2 forward


def repo_root() -> Path:
    """The repository root: $ATTN2D_ROOT, else the first parent of this file holding conf/ (editable install)."""
    if os.environ.get("ATTN2D_ROOT"):
        return Path(os.environ["ATTN2D_ROOT"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "conf").is_dir() or (parent / "pyproject.toml").is_file():
            return parent
    return Path.cwd()


# ============================================================================================== hardware profile
@dataclass(frozen=True)
class Link:
    """One alpha-beta link: time(steps, bytes) = call_s + steps * alpha_s + bytes / bw_bytes_per_s."""

    alpha_s: float
    bw_bytes_per_s: float
    call_s: float = 0.0  # per collective call (software), on top of the per-step alpha


@dataclass(frozen=True)
class Hardware:
    """A hardware profile (conf/hardware/NAME.yaml); every field is named there with its source."""

    name: str
    gpus_per_node: int
    # compute
    matmul_flops_per_s: float  # rest-of-model GEMMs (per rank, when it has the device to itself)
    attn_fwd_flops_per_s: float  # attention kernel forward, at head_dim `attn_ref_head_dim`
    attn_bwd_flops_per_s: float  # attention kernel backward
    attn_ref_head_dim: int = 128
    attn_head_dim_scale: dict = field(default_factory=dict)  # {head_dim: rate factor}, linear interpolation
    attn_mask_fwd_flops_per_s: float | None = None  # pieces with an explicit mask (staircase), default: as above
    attn_mask_bwd_flops_per_s: float | None = None
    causal_bottom_right: bool = True  # the kernel takes an offset (bottom-right) causal block in one call
    attn_causal_skip: float = 1.0  # fraction of the masked work a causal kernel call skips
    attn_call_overhead_s: float = 0.0  # per attention kernel call (launch, python)
    local_attn_fwd_flops_per_s: float | None = None  # the single-device kernel of "local", if it differs
    local_attn_bwd_flops_per_s: float | None = None
    local_attn_causal_skip: float | None = None
    layer_overhead_s: float = 0.0  # per layer and step, not proportional to FLOPs (norms, python, launches)
    comm_call_overhead_s: float = 0.0  # host time per communication call spent in the algorithm around it (packing,
    # reordering), not in the communication library
    attn_step_overhead_s: float = 0.0  # host time per synchronous attention step per rank (merging partials, slicing)
    sync_penalty_by_world: dict = field(default_factory=dict)  # {P: s} CPU: wall time added to each communication
    # call when the ranks arrive from CPU work on time-shared cores (measured), interpolated in P
    sync_penalty_scaling: str = "measured"  # "measured": interpolate sync_penalty_by_world in P; "oversubscription":
    # the smallest world's measured penalty per rank beyond a core, scaled by (P / cores - 1) (see sync_penalty)
    step_overhead_s: float = 0.0  # per step (loss, optimizer launch, python)
    overhead_by_world: dict = field(default_factory=dict)  # {P: (layer_s, step_s)} measured with P ranks sharing
    # the cores (CPU); replaces (layer, step overhead) / share, interpolated in P
    memory_bw_bytes_per_s: float = 1e12  # optimizer (memory bound)
    optimizer_bytes_per_param: float = 28.0  # AdamW fp32: read p, g, m, v; write p, m, v
    shared_cores: int | None = None  # CPU: cores shared by the ranks of a node (None: one device per rank)
    threads_per_rank: int = 1
    # network
    collective_base_latency_s: float = 0.0
    intra: Link = Link(1e-6, 1e11)
    inter: Link = Link(1e-5, 1e10)  # bw per NODE (all its NICs)
    inter_rank_bw_bytes_per_s: float | None = None  # per-rank NIC cap (GPU-NIC affinity); None: node bw
    kinds: dict = field(default_factory=dict)  # {kind: Link} per-kind override of the intra link (measured)
    kinds_by_world: dict = field(default_factory=dict)  # {world: {kind: Link}} measured at several world sizes
    overlap_efficiency: float = 1.0
    p2p_inter_efficiency: float = 1.0  # fraction of the inter-node bandwidth a point-to-point stream achieves
    # relative to collectives (NCCL send/recv opens fewer channels per peer than a ring collective); 1: the same
    placement: str | tuple = "row"  # which grid dimension lies inside a node (attn2d.distributed.placement): row,
    # col, or an explicit rank -> node list (grid rank k = process rank k, so a ring or the world group uses it too)
    collective_algorithm: str = "ring"  # inter-node latency of collectives: "ring" (nodes - 1 steps) or "tree"
    # (log2(nodes) steps: NCCL's tree all-reduce; PAT all-gather / reduce-scatter with one GPU per node)
    source: str = ""

    def __post_init__(self):
        from attn2d.distributed.placement import PLACEMENTS

        if isinstance(self.placement, list):  # an explicit rank -> node list (hashable, for the caches)
            object.__setattr__(self, "placement", tuple(int(x) for x in self.placement))
        if not isinstance(self.placement, tuple) and self.placement not in PLACEMENTS:
            raise ValueError(f"hardware {self.name!r}: placement {self.placement!r} unknown; known: "
                             f"{', '.join(PLACEMENTS)}, or a list of node ids, one per rank")
        if self.collective_algorithm not in COLLECTIVE_ALGORITHMS:
            raise ValueError(f"hardware {self.name!r}: collective_algorithm {self.collective_algorithm!r} unknown; "
                             f"known: {', '.join(COLLECTIVE_ALGORITHMS)}")

    def attn_rate(self, head_dim: int, phase: str, local: bool = False, mask: bool = False) -> float:
        """Attention FLOP/s for a head_dim, forward or backward: block kernel, `local` kernel or masked pieces."""
        base = {"fwd": self.attn_fwd_flops_per_s, "bwd": self.attn_bwd_flops_per_s}[phase]
        if mask:
            alt = self.attn_mask_fwd_flops_per_s if phase == "fwd" else self.attn_mask_bwd_flops_per_s
            base = alt or base
        elif local:
            alt = self.local_attn_fwd_flops_per_s if phase == "fwd" else self.local_attn_bwd_flops_per_s
            base = alt or base
        return base * _interp(self.attn_head_dim_scale, head_dim, self.attn_ref_head_dim)

    def causal_skip(self, local: bool = False) -> float:
        if local and self.local_attn_causal_skip is not None:
            return self.local_attn_causal_skip
        return self.attn_causal_skip

    def compute_share(self, ranks_on_node: int) -> float:
        """Fraction of one rank's solo compute rate it gets when `ranks_on_node` ranks run (CPU core sharing)."""
        if not self.shared_cores:
            return 1.0
        return min(1.0, self.shared_cores / (max(1, ranks_on_node) * self.threads_per_rank))

    def sync_penalty(self, world: int) -> float:
        """Wall time added to each communication call by ranks time-sharing cores (CPU profiles).

        "measured": sync_penalty_by_world interpolated in P. "oversubscription": a synchronising call waits until
        every rank has been scheduled again; with P ranks on C cores each core runs P/C of them in turn, so the
        wait grows with the ranks queued behind each core: penalty(P) = penalty(P0) x (P/C - 1) / (P0/C - 1),
        from the smallest measured world P0 > C (the microbenchmark at larger P, one short GEMM before each call,
        gives the scheduler too little work to queue; see results/tables/costmodel/validation_local.md)."""
        if not self.sync_penalty_by_world:
            return 0.0
        ws = sorted(self.sync_penalty_by_world)
        if self.sync_penalty_scaling == "oversubscription" and self.shared_cores:
            C = self.shared_cores * self.threads_per_rank
            ref = next((w for w in ws if w > C), None)
            if ref is not None:
                return self.sync_penalty_by_world[ref] * max(0.0, world / C - 1.0) / (ref / C - 1.0)
        return float(np.interp(world, ws, [self.sync_penalty_by_world[w] for w in ws]))

    def overheads(self, world: int, n_layer: int) -> float:
        """Per-step software time outside the FLOP terms: (step + n_layer x layer overhead), stretched by core
        sharing; from the per-world measurement when the profile has one (interpolated in the world size)."""
        if self.overhead_by_world and world > 1:
            ws = sorted(self.overhead_by_world)
            layer = float(np.interp(world, ws, [self.overhead_by_world[w][0] for w in ws]))
            step = float(np.interp(world, ws, [self.overhead_by_world[w][1] for w in ws]))
            return step + n_layer * layer
        return (self.step_overhead_s + n_layer * self.layer_overhead_s) / self.compute_share(min(world, self.gpus_per_node))

    def intra_link(self, kind: str, world: int | None = None) -> Link:
        """The on-node link of an op kind; with per-world measurements (CPU ranks time-sharing cores, where
        latency grows with the number of processes), interpolated linearly in the world size (clamped)."""
        if world is not None and self.kinds_by_world:
            pts = sorted((w, d[kind]) for w, d in self.kinds_by_world.items() if kind in d)
            if pts:
                ws = [float(w) for w, _ in pts]
                alpha = float(np.interp(world, ws, [lk.alpha_s for _, lk in pts]))
                inv_bw = float(np.interp(world, ws, [1.0 / lk.bw_bytes_per_s for _, lk in pts]))
                call = float(np.interp(world, ws, [lk.call_s for _, lk in pts]))
                return Link(alpha, 1.0 / inv_bw, call)
        k = self.kinds.get(kind)
        return k if k is not None else self.intra


def _interp(table: dict, x: float, ref: float) -> float:
    """Piecewise-linear factor from {x: factor}; 1 at `ref` when the table is empty; clamped at the ends."""
    if not table:
        return 1.0
    xs = sorted(float(k) for k in table)
    ys = [float(table[k]) for k in sorted(table, key=float)]
    return float(np.interp(x, xs, ys))


def _num(x) -> float | None:
    return float(x) if x is not None else None


def hardware_from_dict(d: dict, name: str | None = None) -> Hardware:
    """Build a Hardware from the nested profile dict (keys as in conf/hardware/*.yaml)."""
    c, n = d.get("compute", {}), d.get("network", {})
    intra, inter = n.get("intra", {}), n.get("inter", {})
    link = lambda v: Link(float(v["alpha_s"]), float(v["bw_bytes_per_s"]), float(v.get("call_s", 0.0)))  # noqa: E731
    kinds = {k: link(v) for k, v in (n.get("kinds") or {}).items()}
    by_world = {int(w): {k: link(v) for k, v in d.items()} for w, d in (n.get("kinds_by_world") or {}).items()}
    inter_eff = float(inter.get("efficiency", 1.0))
    return Hardware(
        name=name or d.get("name", "unnamed"),
        gpus_per_node=int(d["gpus_per_node"]),
        matmul_flops_per_s=float(c["matmul_flops_per_s"]),
        attn_fwd_flops_per_s=float(c["attn_fwd_flops_per_s"]),
        attn_bwd_flops_per_s=float(c["attn_bwd_flops_per_s"]),
        attn_ref_head_dim=int(c.get("attn_ref_head_dim", 128)),
        attn_head_dim_scale={int(k): float(v) for k, v in (c.get("attn_head_dim_scale") or {}).items()},
        attn_mask_fwd_flops_per_s=_num(c.get("attn_mask_fwd_flops_per_s")),
        attn_mask_bwd_flops_per_s=_num(c.get("attn_mask_bwd_flops_per_s")),
        causal_bottom_right=bool(c.get("causal_bottom_right", True)),
        attn_causal_skip=float(c.get("attn_causal_skip", 1.0)),
        attn_call_overhead_s=float(c.get("attn_call_overhead_s", 0.0)),
        local_attn_fwd_flops_per_s=_num(c.get("local_attn_fwd_flops_per_s")),
        local_attn_bwd_flops_per_s=_num(c.get("local_attn_bwd_flops_per_s")),
        local_attn_causal_skip=_num(c.get("local_attn_causal_skip")),
        layer_overhead_s=float(c.get("layer_overhead_s", 0.0)),
        comm_call_overhead_s=float(c.get("comm_call_overhead_s", 0.0)),
        attn_step_overhead_s=float(c.get("attn_step_overhead_s", 0.0)),
        sync_penalty_by_world={int(w): float(v) for w, v in (c.get("sync_penalty_by_world") or {}).items()},
        sync_penalty_scaling=str(c.get("sync_penalty_scaling", "measured")),
        step_overhead_s=float(c.get("step_overhead_s", 0.0)),
        overhead_by_world={int(w): (float(v["layer_overhead_s"]), float(v["step_overhead_s"]))
                           for w, v in (c.get("overhead_by_world") or {}).items()},
        memory_bw_bytes_per_s=float(c.get("memory_bw_bytes_per_s", 1e12)),
        optimizer_bytes_per_param=float(c.get("optimizer_bytes_per_param", 28.0)),
        shared_cores=int(c["shared_cores"]) if c.get("shared_cores") else None,
        threads_per_rank=int(c.get("threads_per_rank", 1)),
        collective_base_latency_s=float(n.get("collective_base_latency_s", 0.0)),
        intra=Link(float(intra.get("alpha_s", 1e-6)), float(intra.get("bw_bytes_per_s", 1e11)),
                   float(intra.get("call_s", 0.0))),
        inter=Link(float(inter.get("alpha_s", 1e-5)), float(inter.get("bw_bytes_per_s_per_node", 1e10)) * inter_eff),
        inter_rank_bw_bytes_per_s=(float(inter["bw_bytes_per_s_per_rank"]) * inter_eff
                                   if inter.get("bw_bytes_per_s_per_rank") else None),
        kinds=kinds,
        kinds_by_world=by_world,
        overlap_efficiency=float(d.get("overlap", {}).get("efficiency", 1.0)),
        p2p_inter_efficiency=float(inter.get("p2p_efficiency", 1.0)),
        placement=(tuple(int(x) for x in n["placement"]) if isinstance(n.get("placement"), list)
                   else str(n.get("placement", "row"))),
        collective_algorithm=str(n.get("collective_algorithm", "ring")),
        source=str(d.get("source", "")),
    )


def _load_conf(group: str, name_or_path: str | os.PathLike, what: str) -> tuple[str, dict]:
    """conf/GROUP/NAME.yaml (or a path to a .yaml) -> (its name: field or file stem, its dict)."""
    import yaml

    p = Path(name_or_path)
    if not p.suffix:
        p = repo_root() / "conf" / group / f"{name_or_path}.yaml"
    if not p.is_file():
        known = sorted(x.stem for x in (repo_root() / "conf" / group).glob("*.yaml"))
        raise FileNotFoundError(f"{what} {str(name_or_path)!r} not found at {p}; known: {', '.join(known) or 'none'}")
    with open(p) as f:
        d = yaml.safe_load(f) or {}
    return str(d.get("name", p.stem)), d


def load_hardware(name_or_path: str | os.PathLike, gpus_per_node: int | None = None) -> Hardware:
    """Load conf/hardware/NAME.yaml (or a path); `gpus_per_node` overrides the profile's."""
    name, d = _load_conf("hardware", name_or_path, "hardware profile")
    hw = hardware_from_dict(d, name=name)
    return replace(hw, gpus_per_node=gpus_per_node) if gpus_per_node else hw


# ============================================================================================== model shape
@dataclass(frozen=True)
class ModelShape(GPTConfig):
    """What the cost model needs of a GPT-3-like model: its attn2d.model.GPTConfig (shape, n_params) and a name."""

    name: str = ""


MODEL_KEYS = ("n_layer", "d_model", "n_head", "vocab_size", "head_dim", "n_kv_head", "mlp_ratio", "positions",
              "max_seq_len")


def model_from_dict(d: dict, name: str = "") -> ModelShape:
    kw = {k: d[k] for k in MODEL_KEYS if k in d and d[k] is not None}
    return ModelShape(name=name or str(d.get("name", "")), **kw)


def load_model(name_or_path: str | os.PathLike) -> ModelShape:
    """conf/model/NAME.yaml (written by the training code's owner) -> ModelShape."""
    name, d = _load_conf("model", name_or_path, "model config")
    return model_from_dict(d, name=name)


@dataclass(frozen=True)
class Workload:
    """One training-step configuration (what a benchmark cell fixes besides model, grid and hardware)."""

    seq_len: int
    batch_size: int = 1
    dtype: str = "bf16"
    causal: bool = True
    fsdp: bool = False  # ZeRO-3: params all-gathered fwd and bwd, grads reduce-scattered
    activation_checkpointing: bool = False
    grad_bytes: int = 4  # gradients communicated in fp32
    grad_sync_overlap: bool | None = None  # gradient sync beside the backward compute; None: with FSDP only
    # (attn2d.train all-reduces after backward; FSDP2 prefetches gathers and reduce-scatters during backward)

    @property
    def overlaps_grad_sync(self) -> bool:
        return self.fsdp if self.grad_sync_overlap is None else self.grad_sync_overlap

    @property
    def dtype_bytes(self) -> int:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {self.dtype!r} unknown; known: {', '.join(DTYPE_BYTES)}")
        return DTYPE_BYTES[self.dtype]


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


def _pair_peer(rank: int, rows: int, cols: int) -> int:
    """Peer of a "pair" op: Alg. 1 L1's column -> row-major permutation (the transpose peer on a square grid):
    p(r, c) sends its class t = r + c*rows to p(t // cols, t % cols)."""
    r, c = divmod(rank, cols)
    t = r + c * rows
    return (t // cols) * cols + t % cols


def op_edges(op: CommOp, rows: int, cols: int) -> tuple[list[tuple[int, int, float]], list[list[int]]]:
    """Directed edges (src, dst, bytes over the whole op) of `op` run by all its groups at once, and the groups.

    A ring op (all-gather, reduce-scatter, all-reduce, p2p ring) sends its bytes to the ring successor in group
    order; an all-to-all spreads them evenly over every other member; a pair op sends to the permutation peer."""
    P = rows * cols
    if op.group == "pair":
        edges, groups = [], []
        for k in range(P):
            peer = _pair_peer(k, rows, cols)
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
    """Alpha-beta time of one CommOp on the hierarchical network (see the module docstring), plus, with `glue`,
    the algorithm's host time around each call (`comm_call_overhead_s`, stretched when ranks share cores)."""
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
        # all-reduce)
        # tree: log2(nNodes) (NCCL tree all-reduce up and down; PAT all-gather / reduce-scatter)
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


# ============================================================================================== attention work
Call = tuple  # (query Spans, key Spans) of one kernel.attn_forward / attn_backward call (attn2d.attention.layout.Span)


def attention_schedule(algorithm: str, seq_len: int, rows: int, cols: int) -> list[list[list[Call]]]:
    """schedule[step][rank]: the algorithm's own schedule (attn2d.attention.get_attention(name).schedule)."""
    from attn2d.attention import get_attention

    impl = get_attention(algorithm)
    if impl.schedule is None:
        raise ValueError(f"attention {algorithm!r} registers no schedule, so the cost model cannot price its compute")
    return impl.schedule(seq_len, rows, cols)


def call_work(call: Call, causal: bool, bottom_right: bool = True) -> tuple[int, int, int, int]:
    """(backend calls, dense pairs of unmasked/causal pieces, masked pairs inside causal pieces, pairs of
    explicit-mask pieces) of one block call, split exactly as attn2d.attention.kernels.block_pieces splits it."""
    from attn2d.attention.kernels import block_pieces

    qs, ks = call
    nq, nk = sum(s.n for s in qs), sum(s.n for s in ks)
    pieces = block_pieces(qs, ks, nq, nk, causal=causal, bottom_right=bottom_right)
    dense = masked = mask = 0
    for p in pieces:
        lq, lk = p.n_q, p.n_k
        if p.kind == "full":
            dense += lq * lk
        elif p.kind == "causal":  # bottom-right: row i sees lk - lq + i + 1 keys
            dense += lq * lk
            masked += lq * (lq - 1) // 2
        else:
            mask += lq * lk
    return len(pieces), dense, masked, mask


@lru_cache(maxsize=4096)
def schedule_work(algorithm: str, seq_len: int, rows: int, cols: int, causal: bool, bottom_right: bool = True) -> tuple:
    """schedule_work[step][rank] = call_work summed over the rank's calls of that step (cached)."""
    out = []
    for step in attention_schedule(algorithm, seq_len, rows, cols):
        row = []
        for calls in step:
            w = [call_work(c, causal, bottom_right) for c in calls]
            row.append(tuple(sum(x[i] for x in w) for i in range(4)))
        out.append(tuple(row))
    return tuple(out)


def attention_step_times(algorithm: str, shape: ModelShape, wl: Workload, rows: int, cols: int, hw: Hardware,
                         phase: str) -> list[float]:
    """Per synchronous step, the time of its slowest rank (one layer, one phase)."""
    local = algorithm == "local"
    P = rows * cols
    share = hw.compute_share(min(P, hw.gpus_per_node))
    rate = hw.attn_rate(shape.d_head, phase, local=local) * share
    mask_rate = hw.attn_rate(shape.d_head, phase, mask=True) * share
    skip = hw.causal_skip(local)
    flop_per_pair = 4.0 * wl.batch_size * shape.n_head * shape.d_head * (1.0 if phase == "fwd" else ATTN_BWD_FLOP_RATIO)
    return list(_step_times(algorithm, wl.seq_len, rows, cols, wl.causal, hw.causal_bottom_right,
                            (hw.attn_call_overhead_s, hw.attn_step_overhead_s, share, skip),
                            flop_per_pair / rate, flop_per_pair / mask_rate))


@lru_cache(maxsize=65536)
def _step_times(algorithm, seq_len, rows, cols, causal, bottom_right, over, s_per_pair, s_per_mask_pair) -> tuple:
    """attention_step_times for scalar arguments (cached: the network sweeps re-price the same compute)."""
    call_s, step_s, share, skip = over
    times = []
    for step in schedule_work(algorithm, seq_len, rows, cols, causal, bottom_right):
        worst = 0.0
        for calls, dense, masked, mask in step:
            t = ((calls * call_s + step_s) / share
                 + (dense - skip * masked) * s_per_pair + mask * s_per_mask_pair)
            worst = max(worst, t)
        times.append(worst)
    return tuple(times)


def attention_flops(shape: ModelShape, wl: Workload) -> float:
    """Useful (visible-pair) attention FLOPs of one layer forward, whole sequence: 4 B H D x pairs."""
    n = wl.seq_len
    pairs = n * (n + 1) // 2 if wl.causal else n * n
    return 4.0 * wl.batch_size * shape.n_head * shape.d_head * pairs


# ============================================================================================== communication
def comm_ops_for(algorithm: str, shape: ModelShape, wl: Workload, rows: int, cols: int) -> list[CommOp]:
    """The algorithm module's own analytic CommOps (attn2d.attention.get_attention(name).comm_ops)."""
    if algorithm == "local" or rows * cols == 1:
        return []
    import torch

    from attn2d.attention import get_attention

    impl = get_attention(algorithm)
    if impl.comm_ops is None:
        raise ValueError(f"attention {algorithm!r} does not export comm_ops")
    dt = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[wl.dtype_bytes]
    if wl.dtype in ("fp16", "float16"):
        dt = torch.float16
    r, c = (rows, cols) if not algorithm.startswith("ring") else ring_grid(rows * cols)
    return list(impl.comm_ops(wl.batch_size, wl.seq_len, shape.n_head, shape.d_head, r, c, dt, wl.causal,
                                 kv_heads=shape.kv_heads))


def ring_grid(P: int) -> tuple[int, int]:
    """Ring Attention runs on a 1-D group: rows x cols = P x 1 (ring successor = next rank)."""
    return P, 1


def grad_sync_ops(shape: ModelShape, wl: Workload, P: int) -> list[CommOp]:
    """attn2d.distributed.parallelize.grad_sync_ops for a Workload (what training moves to sync gradients)."""
    return parallelize.grad_sync_ops(shape, P, fsdp=wl.fsdp, grad_bytes=wl.grad_bytes, param_bytes=wl.dtype_bytes)


# ============================================================================================== step time
def _pipeline(compute_steps: Sequence[float], comm_total: float, comm_steps: int, eff: float) -> float:
    """Compute steps with `comm_total` split evenly over `comm_steps` transfers running beside them: the
    transfer for step s+1 runs during the compute of step s (a ring's P compute steps hide its P-1 transfers).
    An overlapped pair costs max(c, m) + (1 - eff) min(c, m); transfers left without a compute step are serial."""
    c = list(compute_steps)
    if comm_total <= 0:
        return float(sum(c))
    k = max(1, comm_steps)
    m = comm_total / k
    pairs = min(k, len(c) - 1) if len(c) > 1 else min(k, len(c))
    t = sum(max(ci, m) + (1.0 - eff) * min(ci, m) for ci in c[:pairs])
    return t + sum(c[pairs:]) + (k - pairs) * m


@dataclass
class StepTime:
    """Breakdown of one predicted training step (seconds; attention numbers are summed over layers)."""

    algorithm: str
    rows: int
    cols: int
    nodes: int
    attn_fwd_compute_s: float
    attn_bwd_compute_s: float
    attn_fwd_comm_s: float  # all attention comm of the forward, priced (hidden or not)
    attn_bwd_comm_s: float
    attn_fwd_s: float  # wall time of the attention forward (comm exposed + overlapped pipeline)
    attn_bwd_s: float
    rest_compute_s: float
    optimizer_s: float
    grad_sync_s: float
    grad_sync_exposed_s: float
    overhead_s: float
    step_time_s: float
    ops: list = field(default_factory=list, repr=False)
    attn_exposed_by_op: dict = field(default_factory=dict, repr=False)  # {"phase.op": exposed s per step}

    @property
    def world(self) -> int:
        return self.rows * self.cols

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("ops")
        d.pop("attn_exposed_by_op")
        return d

    def breakdown(self) -> dict:
        """The step as additive terms (seconds, summing to step_time_s): attention compute (the checkpointing
        replay of the forward included), exposed attention communication per operation ("comm.<phase>.<op>",
        the replayed forward's counted twice), rest-of-model compute, exposed grad sync, optimizer, overheads."""
        exposed = sum(self.attn_exposed_by_op.values())
        out = {"attn_compute_s": self.attn_fwd_s + self.attn_bwd_s - exposed}
        out.update({f"comm.{k}": v for k, v in sorted(self.attn_exposed_by_op.items())})
        out.update({"rest_compute_s": self.rest_compute_s, "grad_sync_exposed_s": self.grad_sync_exposed_s,
                    "optimizer_s": self.optimizer_s, "overhead_s": self.overhead_s})
        return out


def attention_phases(algorithm: str, shape: ModelShape, wl: Workload, rows: int, cols: int, hw: Hardware,
                     ops: Sequence[CommOp] | None = None, priced: Sequence[OpTime] | None = None,
                     overlap: bool = True, exposed_by_op: dict | None = None) -> dict:
    """One layer's attention, per phase: (compute s, communication s priced, wall s) under the overlap model.
    rows x cols as the algorithm runs (ring: P x 1); ops default to the algorithm's comm_ops. overlap=False:
    every transfer is serial. `exposed_by_op` (if given) receives {(phase, op name): exposed s}: a serial op's
    whole time, an overlapped op's share (by its time) of what the pipeline adds to the compute."""
    ops = list(ops) if ops is not None else comm_ops_for(algorithm, shape, wl, rows, cols)
    priced = list(priced) if priced is not None else [price_op(op, rows, cols, hw) for op in ops]
    phases = {}
    for phase in ("fwd", "bwd"):
        steps = attention_step_times(algorithm, shape, wl, rows, cols, hw, phase)
        mine = [o for o in priced if o.phase == phase]
        serial = [o for o in mine if not (o.overlapped and overlap)]
        hidden = [o for o in mine if o.overlapped and overlap]
        exposed = sum(o.time_s for o in serial)
        hidden_t = sum(o.time_s for o in hidden)
        # overlapped transfers run beside the compute steps: spread over the n - 1 gaps of n steps (a ring's
        # P - 1 transfers beside its P steps; Attention2D-O's column then row transfers beside Alg. 5 and 6)
        pipe = _pipeline(steps, hidden_t, max(1, len(steps) - 1), hw.overlap_efficiency)
        wall = exposed + pipe
        phases[phase] = (sum(steps), exposed + hidden_t, wall)
        if exposed_by_op is not None:
            extra = max(0.0, pipe - sum(steps))
            for o in serial:
                exposed_by_op[(phase, o.name)] = exposed_by_op.get((phase, o.name), 0.0) + o.time_s
            for o in hidden:
                share = extra * o.time_s / hidden_t if hidden_t > 0 else 0.0
                exposed_by_op[(phase, o.name)] = exposed_by_op.get((phase, o.name), 0.0) + share
    return phases


def comm_calls(ops: Iterable[CommOp]) -> int:
    """Communication calls the algorithm makes for these ops (p2p: one per step; a collective: one per op)."""
    return sum(op.steps if op.kind == "p2p" else 1 for op in ops if op.group_size > 1)


def step_time(algorithm: str, shape: ModelShape, wl: Workload, rows: int, cols: int, hw: Hardware,
              comm_ops: Iterable[CommOp] | None = None, overlap: bool = True) -> StepTime:
    """Predicted time of one training step (forward + backward + optimizer) of `shape` on a rows x cols grid.

    comm_ops: the attention CommOps of ONE layer (both phases); default: the algorithm module's comm_ops.
    For ring/ring_contiguous the grid is the 1-D group of P = rows*cols ranks. overlap=False: the attention's
    transfers are not overlapped with its compute (e.g. Ring Attention without overlap)."""
    P = rows * cols
    if algorithm == "local" and P != 1:
        raise ValueError(f"algorithm 'local' runs on one device, but the grid {rows}x{cols} has {P} ranks")
    if algorithm.startswith("ring"):
        rows, cols = ring_grid(P)
    ops = list(comm_ops) if comm_ops is not None else comm_ops_for(algorithm, shape, wl, rows, cols)
    priced = [price_op(op, rows, cols, hw) for op in ops]
    share = hw.compute_share(min(P, hw.gpus_per_node))
    L = shape.n_layer

    by_op: dict = {}
    phases = attention_phases(algorithm, shape, wl, rows, cols, hw, ops, priced, overlap, by_op)

    ckpt = wl.activation_checkpointing
    tokens_per_rank = wl.batch_size * wl.seq_len / P
    rest_flops = (8.0 if ckpt else 6.0) * shape.matmul_params() * tokens_per_rank  # fwd 2, (recompute 2,) bwd 4
    rest = rest_flops / (hw.matmul_flops_per_s * share)
    rest_bwd = rest * (6.0 if ckpt else 4.0) / (8.0 if ckpt else 6.0)
    params_per_rank = shape.n_params() / (P if wl.fsdp else 1)
    optimizer = params_per_rank * hw.optimizer_bytes_per_param / (hw.memory_bw_bytes_per_s * share)
    gs = [price_op(op, P, 1, hw) for op in grad_sync_ops(shape, wl, P)]  # the world group, ranks in order
    grad = sum(o.time_s for o in gs)
    fwd_wall = phases["fwd"][2] * L
    bwd_wall = phases["bwd"][2] * L + (phases["fwd"][2] * L if ckpt else 0.0)  # checkpointing replays the fwd
    comm_fwd = phases["fwd"][1] * L
    comm_bwd = phases["bwd"][1] * L + (comm_fwd if ckpt else 0.0)
    if wl.overlaps_grad_sync:
        # gradient traffic uses the network while it is free of attention traffic, beside the compute:
        # FSDP over the whole step (prefetched gathers, reduce-scatters in backward), buckets over the backward
        window, busy = ((fwd_wall + bwd_wall + rest, comm_fwd + comm_bwd) if wl.fsdp
                        else (bwd_wall + rest_bwd, comm_bwd))
        grad_exposed = max(0.0, grad - hw.overlap_efficiency * max(0.0, window - busy))
    else:
        grad_exposed = grad
    # CPU time outside the FLOP terms (stretched like them when ranks share cores), and the benchmark timer's
    # closing barrier (attn2d.bench.StepTimer), priced as a zero-byte all-reduce over the world
    overhead = hw.overheads(P, L)
    if P > 1:
        overhead += price_op(CommOp("step", "timer_barrier", "all_reduce", "world", P, 0, 0, 1, 2 * (P - 1)),
                             P, 1, hw).time_s
    total = fwd_wall + bwd_wall + rest + optimizer + grad_exposed + overhead
    return StepTime(
        algorithm=algorithm, rows=rows, cols=cols, nodes=math.ceil(P / max(1, hw.gpus_per_node)),
        attn_fwd_compute_s=phases["fwd"][0] * L, attn_bwd_compute_s=phases["bwd"][0] * L,
        attn_fwd_comm_s=comm_fwd, attn_bwd_comm_s=comm_bwd,
        attn_fwd_s=fwd_wall, attn_bwd_s=bwd_wall, rest_compute_s=rest, optimizer_s=optimizer,
        grad_sync_s=grad, grad_sync_exposed_s=grad_exposed, overhead_s=overhead, step_time_s=total,
        ops=priced + gs,
        attn_exposed_by_op={f"{ph}.{name}": t * L * (2 if (ckpt and ph == "fwd") else 1)
                            for (ph, name), t in by_op.items()},
    )


def comm_volume_per_rank(ops: Iterable[CommOp], phase: str | None = None) -> int:
    """Bytes sent by one rank over the ops (optionally one phase)."""
    return sum(op.bytes_sent for op in ops if phase is None or op.phase == phase)


__all__ = ["Hardware", "Link", "ModelShape", "Workload", "StepTime", "OpTime", "load_hardware", "load_model",
           "hardware_from_dict", "model_from_dict", "price_op", "op_edges", "step_time", "comm_ops_for",
           "grad_sync_ops", "attention_schedule", "call_work", "schedule_work", "attention_step_times", "attention_flops",
           "ring_grid", "comm_volume_per_rank", "ALGORITHMS", "repo_root"]
