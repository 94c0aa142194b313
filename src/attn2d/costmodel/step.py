"""One training step: attention per phase under the overlap model, the rest of the model, the optimizer, the
gradient sync and the overheads, as additive terms (StepTime)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from attn2d.attention import get_attention
from attn2d.costmodel.compute import attention_step_times
from attn2d.costmodel.hardware import Hardware
from attn2d.costmodel.network import OpTime, comm_ops_for, grad_sync_ops, price_op
from attn2d.costmodel.workload import Workload
from attn2d.distributed.comm import CommOp
from attn2d.model import GPTConfig


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


def attention_phases(algorithm: str, shape: GPTConfig, wl: Workload, rows: int, cols: int, hw: Hardware,
                     ops: Sequence[CommOp] | None = None, priced: Sequence[OpTime] | None = None,
                     overlap: bool = True, exposed_by_op: dict | None = None) -> dict:
    """One layer's attention, per phase: (compute s, communication s priced, wall s) under the overlap model.
    rows x cols as the algorithm runs (impl.cost_grid); ops default to the algorithm's comm_ops. overlap=False:
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


def step_time(algorithm: str, shape: GPTConfig, wl: Workload, rows: int, cols: int, hw: Hardware,
              comm_ops: Iterable[CommOp] | None = None, overlap: bool = True) -> StepTime:
    """Predicted time of one training step (forward + backward + optimizer) of `shape` on a rows x cols grid.

    comm_ops: the attention CommOps of ONE layer (both phases); default: the algorithm module's comm_ops.
    The grid is the one the algorithm is priced on (impl.cost_grid: a ring's 1-D group of P = rows*cols ranks).
    overlap=False: the attention's transfers are not overlapped with its compute (e.g. Ring Attention without
    overlap)."""
    impl = get_attention(algorithm)
    P = rows * cols
    if impl.ranks == "one" and P != 1:
        raise ValueError(f"algorithm {algorithm!r} runs on one device, but the grid {rows}x{cols} has {P} ranks")
    rows, cols = impl.cost_grid(rows, cols)
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
