"""Grid advisor: the best rows x cols grid (square or not) and algorithm for a job, from the cost model.

    python -m attn2d.costmodel.advise gpus=64 gpus_per_node=4 model=gpt3_13b seq_len=65536 hardware=a100_4gpn

Arguments (key=value): gpus (required), model (conf/model option, required), seq_len (required), hardware
(conf/hardware option, default a100_4gpn), gpus_per_node (default: the profile's), n_kv_head (default: the model's;
fewer k/v heads than heads = grouped-query attention), batch_size (1), dtype (bf16),
causal (true), fsdp (false), activation_checkpointing (false), algorithms (comma list, default: the baseline ring
and every grid algorithm of the registry: ring,attn2d,attn2d_overlap), top (rows to print, default all).

Every grid rows x cols = gpus is tried for the grid algorithms (registry ranks "grid") under each placement of the
grid on the nodes (attn2d.distributed.placement: "row" = a grid row's ranks share a node, "col" = a grid column's;
one GPU per node: "row" only); a ring (ranks "ring") runs on the 1-D group of all gpus. Candidates whose sequence
does not split evenly are listed as not possible with the reason. The output is a table of predicted step times
(modelled, not measured), fastest first, with the speedup over ring, a line naming the best choice and why its
placement (which grid dimension's traffic stays on-node), and its confidence: in how many variants of the unknowns
the model cannot pin down (inter-node bandwidth x0.5 / x2, point-to-point efficiency 0.5, tree collectives) the same
choice stays the fastest (`robustness=false` skips this).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from attn2d.attention import ATTENTION, get_attention
from attn2d.costmodel.hardware import Link, load_hardware
from attn2d.costmodel.step import step_time
from attn2d.costmodel.workload import Workload, load_model
from attn2d.distributed.placement import PLACEMENTS, describe

# the speedups' baseline: the first registered ring (Ring Attention, zigzag); the default candidates add every
# grid algorithm, in registration order
BASELINE = next(n for n, impl in ATTENTION.items() if impl.ranks == "ring")
DEFAULT_ALGORITHMS = (BASELINE, *(n for n, impl in ATTENTION.items() if impl.ranks == "grid"))


@dataclass
class Option:
    algorithm: str
    rows: int
    cols: int
    step_time_s: float | None
    detail: dict | None = None
    reason: str = ""
    placement: str = "row"

    @property
    def grid(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def key(self) -> tuple:
        return (self.algorithm, self.rows, self.cols, self.placement)


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {v!r} (use true or false)")


def parse_args(argv: list[str]) -> dict:
    known = {"gpus", "gpus_per_node", "model", "seq_len", "hardware", "batch_size", "dtype", "causal", "fsdp",
             "activation_checkpointing", "algorithms", "top", "n_kv_head", "robustness"}
    args: dict = {"hardware": "a100_4gpn", "batch_size": "1", "dtype": "bf16", "causal": "true", "fsdp": "false",
                  "activation_checkpointing": "false", "algorithms": ",".join(DEFAULT_ALGORITHMS),
                  "robustness": "true"}
    for a in argv:
        if "=" not in a:
            raise SystemExit(f"argument {a!r} is not key=value; keys: {', '.join(sorted(known))}")
        k, v = a.split("=", 1)
        k = k.lstrip("-").replace("-", "_")
        if k not in known:
            raise SystemExit(f"unknown argument {k!r}; keys: {', '.join(sorted(known))}")
        args[k] = v
    missing = [k for k in ("gpus", "model", "seq_len") if k not in args]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}; e.g. python -m attn2d.costmodel.advise gpus=64 "
                         f"gpus_per_node=4 model=gpt3_13b seq_len=65536 hardware=a100_4gpn")
    return args


def grids(gpus: int) -> list[tuple[int, int]]:
    """Every rows x cols with rows * cols = gpus."""
    return [(r, gpus // r) for r in range(1, gpus + 1) if gpus % r == 0]


def advise(gpus: int, model, workload: Workload, hw, algorithms=DEFAULT_ALGORITHMS) -> list[Option]:
    """All candidate (algorithm, grid) options with their predicted step times, fastest first (impossible last)."""
    out: list[Option] = []
    for alg in algorithms:
        impl = get_attention(alg)
        if impl.ranks == "one" and gpus != 1:
            out.append(Option(alg, 1, 1, None, reason=f"{alg} runs on one GPU, not {gpus}"))
            continue
        shapes = grids(gpus) if impl.ranks == "grid" else [impl.cost_grid(gpus, 1)]
        places = PLACEMENTS if (impl.ranks == "grid" and hw.gpus_per_node > 1) else (hw.placement,)
        for r, c in shapes:
            why = impl.layout_problem(workload.seq_len, r * c)
            if why:
                out.append(Option(alg, r, c, None, reason=why))
                continue
            for pl in places:
                st = step_time(alg, model, workload, r, c, replace(hw, placement=pl))
                out.append(Option(alg, r, c, st.step_time_s, st.as_dict(), placement=pl))
    return sorted(out, key=lambda o: (o.step_time_s is None, o.step_time_s or 0.0))


def variants(hw) -> dict:
    """The unknowns the model cannot pin down (attn2d.costmodel.inverse sweeps them): name -> profile variant."""
    scale = lambda f: replace(hw, inter=Link(hw.inter.alpha_s, hw.inter.bw_bytes_per_s * f, hw.inter.call_s),  # noqa: E731
                              inter_rank_bw_bytes_per_s=(hw.inter_rank_bw_bytes_per_s * f
                                                         if hw.inter_rank_bw_bytes_per_s else None))
    return {"inter-node bandwidth x0.5": scale(0.5), "inter-node bandwidth x2": scale(2.0),
            "point-to-point at 0.5 of the collectives' bandwidth": replace(hw, p2p_inter_efficiency=0.5),
            "tree collectives": replace(hw, collective_algorithm="tree")}


def confidence(best: Option, gpus: int, model, workload: Workload, hw, algorithms) -> tuple[int, int, list[str]]:
    """(variants where `best` stays the fastest, variants tried, names of those where it does not)."""
    lost = []
    vs = variants(hw)
    for name, v in vs.items():
        top = next((o for o in advise(gpus, model, workload, v, algorithms) if o.step_time_s is not None), None)
        if top is None or top.key != best.key:
            lost.append(f"{name}: {top.algorithm} {top.grid} {top.placement}" if top else name)
    return len(vs) - len(lost), len(vs), lost


def why_placement(best: Option, options: list[Option], gpus_per_node: int) -> str:
    """Why the best option's placement: which grid dimension it keeps on-node, and what the other one costs."""
    if get_attention(best.algorithm).ranks != "grid" or gpus_per_node <= 1:
        return "placement: one GPU per node or a 1-D ring: every placement is the same"
    other = next((o for o in options if o.step_time_s is not None and o.algorithm == best.algorithm
                  and (o.rows, o.cols) == (best.rows, best.cols) and o.placement != best.placement), None)
    line = describe(best.rows, best.cols, gpus_per_node, best.placement)
    if other is not None:
        line += (f" (modelled {best.step_time_s:.4f} s); "
                 f"{describe(other.rows, other.cols, gpus_per_node, other.placement)}"
                 f" would take {other.step_time_s:.4f} s ({other.step_time_s / best.step_time_s:.2f}x), "
                 f"its attention communication ("
                 f"{best.detail['attn_fwd_comm_s'] + best.detail['attn_bwd_comm_s']:.4f} s vs "
                 f"{other.detail['attn_fwd_comm_s'] + other.detail['attn_bwd_comm_s']:.4f} s, modelled)")
    return line


def format_table(options: list[Option], top: int | None = None) -> str:
    ring = next((o.step_time_s for o in options if o.algorithm == BASELINE and o.step_time_s), None)
    lines = [f"{'algorithm':<16} {'grid':>7} {'step_time_s':>12} {'vs ring':>8} {'attn fwd+bwd':>13} "
             f"{'attn comm':>10} {'grad sync':>10} placement"]
    shown = [o for o in options if o.step_time_s is not None]
    if top:
        shown = shown[:top]
    for o in shown:
        d = o.detail or {}
        sp = f"{ring / o.step_time_s:7.2f}x" if ring else "      -"
        lines.append(f"{o.algorithm:<16} {o.grid:>7} {o.step_time_s:12.4f} {sp:>8} "
                     f"{d.get('attn_fwd_s', 0) + d.get('attn_bwd_s', 0):13.4f} "
                     f"{d.get('attn_fwd_comm_s', 0) + d.get('attn_bwd_comm_s', 0):10.4f} "
                     f"{d.get('grad_sync_exposed_s', 0):10.4f} {o.placement}")
    for o in options:
        if o.step_time_s is None:
            lines.append(f"{o.algorithm:<16} {o.grid:>7} {'not possible':>12}  ({o.reason})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    gpus = int(args["gpus"])
    gpn = int(args["gpus_per_node"]) if "gpus_per_node" in args else None
    hw = load_hardware(args["hardware"], gpus_per_node=gpn)
    model = load_model(args["model"])
    if "n_kv_head" in args:
        model = replace(model, n_kv_head=int(args["n_kv_head"]))
        model.check()
    wl = Workload(seq_len=int(args["seq_len"]), batch_size=int(args["batch_size"]), dtype=args["dtype"],
                  causal=_bool(args["causal"]), fsdp=_bool(args["fsdp"]),
                  activation_checkpointing=_bool(args["activation_checkpointing"]))
    algs = tuple(a.strip() for a in args["algorithms"].split(",") if a.strip())
    options = advise(gpus, model, wl, hw, algs)
    nodes = -(-gpus // hw.gpus_per_node)
    print(f"# modelled (attn2d.costmodel, profile {hw.name}): {model.name or args['model']}, {gpus} GPUs on {nodes} "
          f"node(s) x {hw.gpus_per_node}, seq_len {wl.seq_len}, batch {wl.batch_size}, {wl.dtype}, "
          f"causal={wl.causal}, fsdp={wl.fsdp}, activation_checkpointing={wl.activation_checkpointing}")
    print(format_table(options, int(args["top"]) if "top" in args else None))
    best = next((o for o in options if o.step_time_s is not None), None)
    if best is None:
        print("no candidate fits: change seq_len or gpus")
        return 1
    ring = next((o for o in options if o.algorithm == BASELINE and o.step_time_s), None)
    vs = f", {ring.step_time_s / best.step_time_s:.2f}x faster than ring ({ring.step_time_s:.4f} s)" if ring else ""
    print(f"best: {best.algorithm} on a {best.grid} grid (rows x cols), placement {best.placement}, predicted "
          f"{best.step_time_s:.4f} s per step{vs} (modelled)")
    print(f"why: {why_placement(best, options, hw.gpus_per_node)}")
    if _bool(args["robustness"]):
        kept, n, lost = confidence(best, gpus, model, wl, hw, algs)
        print(f"confidence: the same choice is the fastest in {kept} of {n} variants of the unknowns"
              + (f"; not under {'; '.join(lost)}" if lost else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
