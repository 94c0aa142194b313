"""The inverse question (modelled): which settings of the paper's unknowns reproduce its stated maxima.

The paper states two numbers only: "up to 5x" over Ring Attention on 64 A100s (16 nodes x 4) and "up to 9.4x" on
64 H100s (64 nodes x 1). Everything else about its set-up is NOT FOUND (paper-notes.md Sec. 5), so each unknown is
a named parameter here:
- discrete (a `Scenario`): the baseline Ring (our zigzag, or contiguous as in Liu et al., each with or without
  compute/communication overlap), the collective algorithm (NCCL ring or tree), the inter-node bandwidth of
  point-to-point streams relative to collectives (the paper blames Attention2D-O's slowness on its p2p rings not
  exploiting the topology; Ring Attention is p2p too), grid placement (a grid row or a
  grid column inside a node), NIC layout (one NIC per GPU, or one shared by the node), FSDP and activation
  checkpointing on or off, the attention kernel rate (a factor on the profile's) and the overlap efficiency;
- continuous: the achieved inter-node bandwidth per NIC (node bandwidth = NICs x that).
For each scenario `solve` finds the bandwidth intervals over which the model's largest speedup over the cells of
the paper's figure (Attention2D-NO and -O over the scenario's baseline, 64 GPUs) rounds to the stated number: "5x"
as stated to the unit, [4.5, 5.5); "9.4x" to a tenth, [9.35, 9.45). None when no bandwidth in the searched range
(0.25 to 4000 GB/s per NIC) gets there. `both` keeps the settings the two clusters share (baseline, collectives,
FSDP, checkpointing, p2p, kernel, overlap) that reproduce both maxima, ordered by distance from public NIC specs;
`region_samples` / `plausible_point` read that region back for the projection's band. Fitted to nothing but the
two stated numbers; every output is modelled. The grid sweep holds kernel rate and overlap efficiency at the
profiles' values (workflow/scripts/costmodel_inverse.py varies them one at a time around the plausible point).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import brentq

from attn2d.attention import ATTENTION
from attn2d.costmodel.hardware import Hardware, Link
from attn2d.costmodel.step import step_time
from attn2d.costmodel.workload import Workload
from attn2d.model import GPTConfig

# name -> (algorithm, overlapped): every registered ring (ranks "ring"), with and without overlap
BASELINES = {f"{name}{suffix}": (name, overlapped) for name, impl in ATTENTION.items() if impl.ranks == "ring"
             for suffix, overlapped in (("", True), ("_nooverlap", False))}
NIC_LAYOUTS = ("per_gpu", "shared")
P2P_LEVELS = (1.0, 0.5, 0.25)  # point-to-point / collective inter-node bandwidth (an unknown; see Hardware)
BW_RANGE_GBPS = (0.25, 4000.0)  # per NIC, achieved; the search range ("whatever the network")


@dataclass(frozen=True)
class Target:
    """A stated maximum: `value` as printed, and the interval of values that print as it."""

    hardware: str
    experiment: str
    gpus: int
    value: float
    lo: float
    hi: float

    @classmethod
    def stated(cls, hardware: str, experiment: str, gpus: int, text: str) -> Target:
        """From the number as the paper prints it ("5", "9.4"): the half-unit of its last digit either side."""
        decimals = len(text.split(".")[1]) if "." in text else 0
        half = 0.5 * 10.0 ** -decimals
        v = float(text)
        return cls(hardware, experiment, gpus, v, v - half, v + half)


@dataclass(frozen=True)
class Scenario:
    """One combination of the discrete unknowns (defaults: our profiles' assumptions)."""

    baseline: str = "ring"
    collective_algorithm: str = "ring"
    placement: str = "row"
    nics: str = "per_gpu"
    fsdp: bool = True
    activation_checkpointing: bool = True
    p2p_efficiency: float = 1.0  # inter-node point-to-point bandwidth / collective bandwidth
    kernel_x: float = 1.0
    overlap_efficiency: float | None = None  # None: the profile's

    def __post_init__(self):
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline {self.baseline!r} unknown; known: {', '.join(BASELINES)}")
        if self.nics not in NIC_LAYOUTS:
            raise ValueError(f"nics {self.nics!r} unknown; known: {', '.join(NIC_LAYOUTS)}")


@dataclass(frozen=True)
class Cell:
    """One bar of the paper's figure: a model, a sequence length, the grid and the Attention2D variants drawn."""

    model: GPTConfig
    seq_len: int
    rows: int
    cols: int
    algorithms: tuple = ("attn2d", "attn2d_overlap")
    batch_size: int = 1
    dtype: str = "bf16"


def profile(base: Hardware, sc: Scenario, nic_GBps: float) -> Hardware:
    """The base profile with the scenario's unknowns and `nic_GBps` (achieved, GB/s per direction) per NIC."""
    nic = nic_GBps * 1e9
    nics = base.gpus_per_node if sc.nics == "per_gpu" else 1
    return replace(
        base, inter=Link(base.inter.alpha_s, nic * nics, base.inter.call_s), inter_rank_bw_bytes_per_s=nic,
        placement=sc.placement, collective_algorithm=sc.collective_algorithm, p2p_inter_efficiency=sc.p2p_efficiency,
        attn_fwd_flops_per_s=base.attn_fwd_flops_per_s * sc.kernel_x,
        attn_bwd_flops_per_s=base.attn_bwd_flops_per_s * sc.kernel_x,
        attn_mask_fwd_flops_per_s=(base.attn_mask_fwd_flops_per_s or base.attn_fwd_flops_per_s) * sc.kernel_x,
        attn_mask_bwd_flops_per_s=(base.attn_mask_bwd_flops_per_s or base.attn_bwd_flops_per_s) * sc.kernel_x,
        overlap_efficiency=base.overlap_efficiency if sc.overlap_efficiency is None else sc.overlap_efficiency)


def workload(cell: Cell, sc: Scenario) -> Workload:
    return Workload(seq_len=cell.seq_len, batch_size=cell.batch_size, dtype=cell.dtype, fsdp=sc.fsdp,
                    activation_checkpointing=sc.activation_checkpointing)


def cell_speedups(hw: Hardware, sc: Scenario, cell: Cell) -> dict:
    """{algorithm: baseline step time / its step time} for one cell on a scenario's profile (modelled)."""
    wl = workload(cell, sc)
    alg, overlapped = BASELINES[sc.baseline]
    t_base = step_time(alg, cell.model, wl, cell.rows, cell.cols, hw, overlap=overlapped).step_time_s
    return {a: t_base / step_time(a, cell.model, wl, cell.rows, cell.cols, hw).step_time_s for a in cell.algorithms}


def p2p_threshold(base: Hardware, sc: Scenario, cells: Sequence[Cell], level: float,
                  nic_GBps: float = BW_RANGE_GBPS[0]) -> float | None:
    """The largest point-to-point efficiency at which the modelled maximum (at the slowest network, where it
    peaks) still reaches `level`; None if even 1/64 of the collectives' bandwidth does not."""
    g = lambda e: max_speedup(base, replace(sc, p2p_efficiency=e), nic_GBps, cells) - level  # noqa: E731
    if g(1.0) >= 0:
        return 1.0
    if g(1 / 64) < 0:
        return None
    return float(brentq(g, 1 / 64, 1.0, xtol=1e-3))


def max_speedup(base: Hardware, sc: Scenario, nic_GBps: float, cells: Sequence[Cell]) -> float:
    """The figure's largest bar (what "up to" states) at this bandwidth."""
    hw = profile(base, sc, nic_GBps)
    return max(max(cell_speedups(hw, sc, c).values()) for c in cells)


@dataclass(frozen=True)
class Solution:
    """Where the stated maximum is reproduced: the bandwidth intervals (GB/s per NIC; empty: nowhere), and the
    modelled maximum at the ends of the searched range (what it tends to with a slow / a fast network)."""

    intervals: tuple
    speedup_slow_net: float
    speedup_fast_net: float
    speedup_peak: float

    @property
    def hull(self) -> tuple | None:
        return (self.intervals[0][0], self.intervals[-1][1]) if self.intervals else None


def solve(f: Callable[[float], float], lo: float, hi: float, bw_range=BW_RANGE_GBPS, n: int = 33,
          xtol: float = 1e-3) -> Solution:
    """The intervals of {b : lo <= f(b) < hi}, found on a log grid of `n` bandwidths with their ends refined by
    Brent's method (scipy) where f crosses lo or hi between grid points; a band crossed between two grid points
    (both outside it) gives an interval between its two crossings."""
    bs = np.geomspace(*bw_range, n)
    ys = np.array([f(b) for b in bs])
    inside = (ys >= lo) & (ys < hi)

    def cross(i: int, j: int, level: float) -> float:
        a, b = sorted((math.log(bs[i]), math.log(bs[j])))
        return math.exp(brentq(lambda x: f(math.exp(x)) - level, a, b, xtol=xtol))

    def edge(i_out: int, i_in: int) -> float:
        return cross(i_out, i_in, lo if ys[i_out] < lo else hi)

    out = []
    i = 0
    while i < n:
        if inside[i]:
            j = i
            while j + 1 < n and inside[j + 1]:
                j += 1
            out.append((float(bs[i]) if i == 0 else edge(i - 1, i), float(bs[j]) if j == n - 1 else edge(j + 1, j)))
            i = j + 1
            continue
        if i + 1 < n and not inside[i + 1] and min(ys[i], ys[i + 1]) < lo and max(ys[i], ys[i + 1]) >= hi:
            out.append(tuple(sorted((cross(i, i + 1, lo), cross(i, i + 1, hi)))))
        i += 1
    return Solution(tuple(out), float(ys[0]), float(ys[-1]), float(ys.max()))


def scenarios(gpus_per_node: int, **fixed) -> list[Scenario]:
    """Every combination of the discrete unknowns (placement and NIC layout only matter with > 1 GPU per node)."""
    multi = gpus_per_node > 1
    axes = dict(baseline=tuple(BASELINES), collective_algorithm=("ring", "tree"),
                placement=("row", "col") if multi else ("row",), nics=NIC_LAYOUTS if multi else ("per_gpu",),
                fsdp=(True, False), activation_checkpointing=(True, False), p2p_efficiency=P2P_LEVELS)
    axes.update({k: (v,) for k, v in fixed.items()})
    keys = list(axes)
    return [Scenario(**dict(zip(keys, vals))) for vals in itertools.product(*(axes[k] for k in keys))]


def invert(base: Hardware, target: Target, cells: Sequence[Cell], scs: Sequence[Scenario],
           n_scan: int = 33) -> list[dict]:
    """One row per scenario: its unknowns, the bandwidth interval reproducing `target` (or none), and what the
    model's maximum tends to with a slow and a fast network."""
    rows = []
    for sc in scs:
        sol = solve(lambda b, sc=sc: max_speedup(base, sc, b, cells), target.lo, target.hi, n=n_scan)
        nics = base.gpus_per_node if sc.nics == "per_gpu" else 1
        h = sol.hull
        rows.append({
            "hardware": target.hardware, "stated": target.value, "stated_lo": target.lo, "stated_hi": target.hi,
            **{k: getattr(sc, k) for k in Scenario.__dataclass_fields__},
            "nics_per_node": nics,
            "nic_GBps_min": h[0] if h else None, "nic_GBps_max": h[1] if h else None,
            "node_GBps_min": h[0] * nics if h else None, "node_GBps_max": h[1] * nics if h else None,
            "nic_GBps_intervals": " ".join(f"[{a:.4g},{b:.4g}]" for a, b in sol.intervals) or "none",
            "intervals": sol.intervals,
            "reproduces": bool(sol.intervals),
            "max_speedup_slow_net": sol.speedup_slow_net, "max_speedup_fast_net": sol.speedup_fast_net,
            "max_speedup_peak": sol.speedup_peak, "source": "modelled",
        })
    return rows


SHARED = ("baseline", "collective_algorithm", "fsdp", "activation_checkpointing", "p2p_efficiency", "kernel_x",
          "overlap_efficiency")


def both(rows: Sequence[dict], spec_GBps: dict) -> list[dict]:
    """Settings of the unknowns the two clusters share (baseline, collective algorithm, FSDP, checkpointing, kernel
    and overlap factors) under which BOTH stated maxima are reproduced (each cluster by some bandwidth, and for
    A100 some placement / NIC layout). `spec_GBps[hardware]` = (low, high) achieved GB/s per NIC of public
    2024-2025 systems; `in_spec` says whether the implied interval meets it, `spec_distance` how far off it is
    (|log| of the nearest ratio, 0 inside), summed over the clusters (the plausibility order)."""
    by_key: dict = {}
    for r in rows:
        if r["reproduces"]:
            by_key.setdefault(tuple(r[k] for k in SHARED), {}).setdefault(r["hardware"], []).append(r)
    hws = sorted({r["hardware"] for r in rows})
    out = []
    for key, per_hw in by_key.items():
        if set(per_hw) != set(hws):
            continue
        entry = dict(zip(SHARED, key))
        dist_total = 0.0
        for hw in hws:
            lo_s, hi_s = spec_GBps[hw]
            best = min(per_hw[hw], key=lambda r: _spec_distance(r, lo_s, hi_s))
            d = _spec_distance(best, lo_s, hi_s)
            dist_total += d
            tag = hw.split("_")[0]
            entry.update({f"{tag}_placement": best["placement"], f"{tag}_nics": best["nics"],
                          f"{tag}_nic_GBps_intervals": best["nic_GBps_intervals"],
                          f"{tag}_nic_GBps_min": best["nic_GBps_min"], f"{tag}_nic_GBps_max": best["nic_GBps_max"],
                          f"{tag}_node_GBps_min": best["node_GBps_min"], f"{tag}_node_GBps_max": best["node_GBps_max"],
                          f"{tag}_in_spec": d == 0.0})
        entry["spec_distance"] = dist_total
        entry["source"] = "modelled"
        out.append(entry)
    return sorted(out, key=lambda e: (e["spec_distance"], _preference(e)))


def _spec_distance(r: dict, lo_s: float, hi_s: float) -> float:
    """|log| of how far the nearest reproducing interval lies from the public range (0 if they meet)."""
    d = math.inf
    for a, b in r["intervals"]:
        d = min(d, math.log(lo_s / b) if b < lo_s else (math.log(a / hi_s) if a > hi_s else 0.0))
    return d


def _preference(e: dict) -> tuple:
    """Tie-break among equally plausible settings: the profiles' own assumptions first (collectives' bandwidth
    for p2p, our zigzag ring with overlap, NCCL rings, FSDP and checkpointing on as in the benchmark)."""
    return (-e["p2p_efficiency"], list(BASELINES).index(e["baseline"]), e["collective_algorithm"] != "ring",
            not e["fsdp"], not e["activation_checkpointing"])


# ---------------------------------------------------------------------------------------------- reading the table
def _intervals(text) -> list[tuple[float, float]]:
    """ "[a,b] [c,d]" (the CSV's nic_GBps_intervals) -> [(a, b), (c, d)]; "none" -> []."""
    if not isinstance(text, str) or text == "none":
        return []
    return [tuple(float(x) for x in part.strip("[]").split(",")) for part in text.split()]


def _scenario(r: dict, **over) -> Scenario:
    kw = {k: r[k] for k in Scenario.__dataclass_fields__ if k in r}
    kw.update(over)
    ov = kw.get("overlap_efficiency")
    kw["overlap_efficiency"] = None if ov is None or (isinstance(ov, float) and math.isnan(ov)) else float(ov)
    for k in ("fsdp", "activation_checkpointing"):
        kw[k] = bool(kw[k]) if not isinstance(kw[k], str) else kw[k].lower() == "true"
    for k in ("p2p_efficiency", "kernel_x"):
        kw[k] = float(kw[k])
    return Scenario(**kw)


def region_samples(table) -> dict:
    """{hardware: [(Scenario, GB/s per NIC)]}: samples of the region consistent with the stated maxima, from the
    inverse table (a DataFrame of paper_inverse.csv): every scenario row whose shared setting reproduces BOTH
    maxima (if none does: each cluster's own reproducing rows), at both ends and the geometric middle of each
    of its intervals."""
    rows = [r for r in table.to_dict("records") if r["hardware"] != "both" and str(r["reproduces"]) == "True"
            and r.get("sweep", "grid") == "grid"]
    keys = {tuple(str(r[k]) for k in SHARED) for r in table.to_dict("records") if r["hardware"] == "both"}
    out: dict = {}
    for r in rows:
        if keys and tuple(str(r[k]) for k in SHARED) not in keys:
            continue
        sc = _scenario(r)
        for a, b in _intervals(r["nic_GBps_intervals"]):
            out.setdefault(r["hardware"], []).extend((sc, x) for x in (a, math.sqrt(a * b), b))
    return out


def plausible_point(table, spec_GBps: dict) -> dict:
    """{hardware: (Scenario, GB/s per NIC)}: the most plausible point, the first (nearest the public specs) row
    reproducing both, at the bandwidth of its interval nearest the geometric middle of the public range; None
    if no setting reproduces both."""
    both_rows = [r for r in table.to_dict("records") if r["hardware"] == "both"]
    if not both_rows:
        return {}
    top = both_rows[0]
    out = {}
    for hw, (lo, hi) in spec_GBps.items():
        tag = hw.split("_")[0]
        mid = math.sqrt(lo * hi)
        best = min(((min(max(mid, a), b)) for a, b in _intervals(top[f"{tag}_nic_GBps_intervals"])),
                   key=lambda x: abs(math.log(x / mid)))
        out[hw] = (_scenario(top, placement=top[f"{tag}_placement"], nics=top[f"{tag}_nics"]), best)
    return out


__all__ = ["region_samples", "plausible_point", "BASELINES", "NIC_LAYOUTS", "Target", "Scenario", "Cell", "Solution",
           "profile", "cell_speedups", "max_speedup", "solve", "scenarios", "invert", "both"]
