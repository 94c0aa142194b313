"""Hardware profiles: the runtime `Hardware` the cost model prices with, and `HardwareProfile`, the schema of
conf/hardware/NAME.yaml (an OmegaConf structured config: loading validates keys and types against it, and
attn2d.costmodel.calibrate writes a measured profile by dumping one)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING, OmegaConf

from attn2d.distributed.placement import PLACEMENTS

COLLECTIVE_ALGORITHMS = ("ring", "tree")


def repo_root() -> Path:
    """The repository root: $ATTN2D_ROOT, else the first parent of this file holding conf/ (editable install)."""
    if os.environ.get("ATTN2D_ROOT"):
        return Path(os.environ["ATTN2D_ROOT"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "conf").is_dir() or (parent / "pyproject.toml").is_file():
            return parent
    return Path.cwd()


def conf_path(group: str, name_or_path: str | os.PathLike, what: str) -> Path:
    """conf/GROUP/NAME.yaml, or a path to a .yaml; FileNotFoundError naming the known options."""
    p = Path(name_or_path)
    if not p.suffix:
        p = repo_root() / "conf" / group / f"{name_or_path}.yaml"
    if not p.is_file():
        known = sorted(x.stem for x in (repo_root() / "conf" / group).glob("*.yaml"))
        raise FileNotFoundError(f"{what} {str(name_or_path)!r} not found at {p}; known: {', '.join(known) or 'none'}")
    return p


# ============================================================================================== the file's schema
@dataclass
class LinkConf:
    alpha_s: float = MISSING
    bw_bytes_per_s: float = MISSING
    call_s: float = 0.0


@dataclass
class OverheadConf:
    layer_overhead_s: float = MISSING
    step_overhead_s: float = MISSING


@dataclass
class ComputeConf:
    """compute: the fields of Hardware with the same names."""

    matmul_flops_per_s: float = MISSING
    attn_fwd_flops_per_s: float = MISSING
    attn_bwd_flops_per_s: float = MISSING
    attn_ref_head_dim: int = 128
    attn_head_dim_scale: dict[int, float] = field(default_factory=dict)
    attn_mask_fwd_flops_per_s: float | None = None
    attn_mask_bwd_flops_per_s: float | None = None
    causal_bottom_right: bool = True
    causal_tile: int = 0
    attn_causal_skip: float = 1.0
    attn_call_overhead_s: float = 0.0
    local_attn_fwd_flops_per_s: float | None = None
    local_attn_bwd_flops_per_s: float | None = None
    local_attn_causal_skip: float | None = None
    layer_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    overhead_by_world: dict[int, OverheadConf] = field(default_factory=dict)
    sync_penalty_by_world: dict[int, float] = field(default_factory=dict)
    sync_penalty_scaling: str = "measured"
    comm_call_overhead_s: float = 0.0
    attn_step_overhead_s: float = 0.0
    memory_bw_bytes_per_s: float = 1e12
    optimizer_bytes_per_param: float = 28.0
    shared_cores: int | None = None
    threads_per_rank: int = 1


@dataclass
class InterConf:
    """network.inter: per node and per NIC; `efficiency` scales both bandwidths (achieved / line rate)."""

    alpha_s: float = 1e-5
    bw_bytes_per_s_per_node: float = 1e10
    bw_bytes_per_s_per_rank: float | None = None
    efficiency: float = 1.0
    p2p_efficiency: float = 1.0
    public_nic_GBps: list[float] | None = None  # achieved GB/s per NIC of public systems (the inverse search)


@dataclass
class NetworkConf:
    placement: Any = "row"  # row | col | a list of node ids, one per rank
    collective_algorithm: str = "ring"
    collective_base_latency_s: float = 0.0
    intra: LinkConf = field(default_factory=lambda: LinkConf(1e-6, 1e11))
    inter: InterConf = field(default_factory=InterConf)
    kinds: dict[str, LinkConf] = field(default_factory=dict)
    kinds_by_world: dict[int, dict[str, LinkConf]] = field(default_factory=dict)


@dataclass
class OverlapConf:
    efficiency: float = 1.0


@dataclass
class HardwareProfile:
    """conf/hardware/NAME.yaml as written (every number's source is a comment there)."""

    gpus_per_node: int = MISSING
    name: str | None = None
    source: str = ""
    peak_tflops: float | None = None  # per GPU, the benchmark's MFU reference (not used by the cost model)
    compute: ComputeConf = field(default_factory=ComputeConf)
    network: NetworkConf = field(default_factory=NetworkConf)
    overlap: OverlapConf = field(default_factory=OverlapConf)


# ============================================================================================== the runtime profile
@dataclass(frozen=True)
class Link:
    """One alpha-beta link: time(steps, bytes) = call_s + steps * alpha_s + bytes / bw_bytes_per_s."""

    alpha_s: float
    bw_bytes_per_s: float
    call_s: float = 0.0  # per collective call (software), on top of the per-step alpha


@dataclass(frozen=True)
class Hardware:
    """A hardware profile as the cost model prices with it (load_hardware builds it from a HardwareProfile;
    the file names every field's source)."""

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
    causal_tile: int = 0  # > 0: the kernels cut causal squares into strips of this many rows (planner._strips)
    attn_causal_skip: float = 1.0  # fraction of the masked work a causal kernel call skips
    attn_call_overhead_s: float = 0.0  # per attention kernel call (launch, python)
    local_attn_fwd_flops_per_s: float | None = None  # the single-device kernel, if it differs
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
        if isinstance(self.placement, list):  # an explicit rank -> node list (hashable, for the caches)
            object.__setattr__(self, "placement", tuple(int(x) for x in self.placement))
        if not isinstance(self.placement, tuple) and self.placement not in PLACEMENTS:
            raise ValueError(f"hardware {self.name!r}: placement {self.placement!r} unknown; known: "
                             f"{', '.join(PLACEMENTS)}, or a list of node ids, one per rank")
        if self.collective_algorithm not in COLLECTIVE_ALGORITHMS:
            raise ValueError(f"hardware {self.name!r}: collective_algorithm {self.collective_algorithm!r} unknown; "
                             f"known: {', '.join(COLLECTIVE_ALGORITHMS)}")

    @classmethod
    def from_profile(cls, p: HardwareProfile, name: str | None = None) -> Hardware:
        """The runtime profile of a HardwareProfile (inter-node bandwidths x `network.inter.efficiency`)."""
        c, n = p.compute, p.network
        eff = n.inter.efficiency
        compute = {k: getattr(c, k) for k in ComputeConf.__dataclass_fields__}
        compute["overhead_by_world"] = {int(w): (o.layer_overhead_s, o.step_overhead_s)
                                        for w, o in c.overhead_by_world.items()}
        compute["shared_cores"] = c.shared_cores or None
        for k in ("attn_head_dim_scale", "sync_penalty_by_world"):
            compute[k] = dict(compute[k])
        return cls(
            name=name or p.name or "unnamed", gpus_per_node=p.gpus_per_node, **compute,
            collective_base_latency_s=n.collective_base_latency_s, intra=_link(n.intra),
            inter=Link(n.inter.alpha_s, n.inter.bw_bytes_per_s_per_node * eff),
            inter_rank_bw_bytes_per_s=(n.inter.bw_bytes_per_s_per_rank * eff
                                       if n.inter.bw_bytes_per_s_per_rank else None),
            kinds={k: _link(v) for k, v in n.kinds.items()},
            kinds_by_world={int(w): {k: _link(v) for k, v in d.items()} for w, d in n.kinds_by_world.items()},
            overlap_efficiency=p.overlap.efficiency, p2p_inter_efficiency=n.inter.p2p_efficiency,
            placement=tuple(n.placement) if isinstance(n.placement, (list, tuple)) else str(n.placement),
            collective_algorithm=n.collective_algorithm, source=p.source)

    def attn_rate(self, head_dim: int, phase: str, local: bool = False, mask: bool = False) -> float:
        """Attention FLOP/s for a head_dim, forward or backward: block kernel, single-device kernel or masked
        pieces."""
        base = {"fwd": self.attn_fwd_flops_per_s, "bwd": self.attn_bwd_flops_per_s}[phase]
        if mask:
            alt = self.attn_mask_fwd_flops_per_s if phase == "fwd" else self.attn_mask_bwd_flops_per_s
            base = alt or base
        elif local:
            alt = self.local_attn_fwd_flops_per_s if phase == "fwd" else self.local_attn_bwd_flops_per_s
            base = alt or base
        return base * _interp(self.attn_head_dim_scale, head_dim)

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
        share = self.compute_share(min(world, self.gpus_per_node))
        return (self.step_overhead_s + n_layer * self.layer_overhead_s) / share

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


def _link(lk: LinkConf | dict) -> Link:
    if isinstance(lk, dict):  # a value two mappings deep (kinds_by_world): OmegaConf leaves it a plain dict
        lk = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LinkConf), lk))
    return Link(lk.alpha_s, lk.bw_bytes_per_s, lk.call_s)


def _interp(table: dict, x: float) -> float:
    """Piecewise-linear factor from {x: factor}; 1 when the table is empty; clamped at the ends."""
    if not table:
        return 1.0
    xs = sorted(float(k) for k in table)
    ys = [float(table[k]) for k in sorted(table, key=float)]
    return float(np.interp(x, xs, ys))


def read_profile(path: str | os.PathLike) -> HardwareProfile:
    """A conf/hardware YAML file, validated against the HardwareProfile schema."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HardwareProfile), OmegaConf.load(path)))


def load_hardware(name_or_path: str | os.PathLike, gpus_per_node: int | None = None) -> Hardware:
    """Load conf/hardware/NAME.yaml (or a path); `gpus_per_node` overrides the profile's."""
    p = conf_path("hardware", name_or_path, "hardware profile")
    prof = read_profile(p)
    hw = Hardware.from_profile(prof, name=prof.name or p.stem)
    return replace(hw, gpus_per_node=gpus_per_node) if gpus_per_node else hw
