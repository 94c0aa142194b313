"""Benchmark the registered distributed attention algorithms (attn2d, attn2d_overlap, ring, ...) on P gloo ranks,
beside other people's rings (benchmarks/peer_rings.py: PyTorch's own ring when the running torch has it,
ring-flash-attention when installed on a GPU; each skipped with one line otherwise) and, on one rank, a direct
F.scaled_dot_product_attention call ("sdpa").

For each algorithm (and, for the 2-D ones, each grid) on P CPU processes (attn2d.testing.run_distributed, gloo):
  1. check: one forward + backward on the sharded inputs, unsharded and compared with the single-device result
     (torch SDPA on the whole sequence, same dtype, autograd): max abs error of out and of dq/dk/dv;
  2. count: bytes sent and messages of one forward and one forward + backward (attn2d.distributed.comm counts our
     algorithms; torch's functional collectives are counted from their arguments by OpCounter), beside the
     analytic prediction (the algorithm's comm_ops; max over ranks), and per pass the kernel calls (the CPU flash
     op and its backward, or the math backend's einsums are not kernels) and the other aten ops (OpCounter, a
     TorchDispatchMode; max over ranks);
  3. time, after a warm-up, in interleaved rounds: round j times every algorithm once (starting with the j-th, so
     none is always first), forward then forward + backward, each as --iters consecutive calls between two barriers
     (per-call mean; max over ranks), so a change of background load on a shared machine hits every algorithm
     alike. Reported: median, min and max over the
     --repeats rounds, and the CPU time of the same calls summed over the ranks (median; what the P ranks cost
     the machine, less sensitive to other jobs than wall time).
The table gives each algorithm's times, MB and messages per rank (counted / predicted), kernel calls and aten ops
per pass, and the speedup against the FASTEST ring present (by median fwd+bwd time, named in the table; also
as the median, min and max of the per-round ratios, which cancels load that drifts between rounds) and against
ours ("ring", zigzag), and bytes / ring bytes. Rings run on the 1-D group of all P ranks (grid "Px1").

  python benchmarks/bench_attention.py --world 4 --seq 2048 --heads 4 --head-dim 64 --repeats 5 --iters 3
  python benchmarks/bench_attention.py --world 9 --seq 2304 --algorithms attn2d,ring --grids 3x3 --out bench.jsonl
  python benchmarks/bench_attention.py --world 1 --seq 2048 --algorithms attn2d,ring   # vs direct SDPA

CPU only (gloo); timings on a shared CPU are indicative, the byte, message and call counts are exact.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F

from attn2d.attention import ATTENTION, get_attention, layout
from attn2d.attention.local import local_attention
from attn2d.distributed import ProcessGrid, count_comm
from attn2d.distributed.comm import total_comm
from attn2d.dtypes import TRAIN_DTYPES, as_dtype
from attn2d.testing import OpCounter, run_distributed, wire_bytes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_rings  # noqa: E402  benchmarks/peer_rings.py, importable once its folder is on the path

DEFAULT_ALGORITHMS = "attn2d,attn2d_overlap,ring,ring_contiguous"
ERR_TOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 5e-2}  # max abs error / max abs single-device value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=4, help="number of gloo ranks P")
    p.add_argument("--seq", type=int, default=1152, help="sequence length N")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=None,
                   help="k/v heads (grouped-query attention, dividing --heads); default: --heads")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=TRAIN_DTYPES)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--algorithms", default=DEFAULT_ALGORITHMS, help="comma list of registry names")
    p.add_argument("--grids", default=None, help="comma list RxC for the 2-D algorithms; default: the square grid of "
                                                 "--world (if any), then every other RxC = world")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median, min, max over them)")
    p.add_argument("--iters", type=int, default=1, help="consecutive calls timed together in each round")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="also run other people's rings (torch's own ring, ...) where available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole distributed run")
    p.add_argument("--out", default=None, help="append one JSON line per (algorithm, grid) to this file")
    return p.parse_args(argv)


def default_grids(world: int) -> list[tuple[int, int]]:
    pairs = [(r, world // r) for r in range(1, world + 1) if world % r == 0]
    square = [g for g in pairs if g[0] == g[1]]
    return square + [g for g in pairs if g[0] != g[1]]


def is_ring(name: str) -> bool:
    """A 1-D ring: a registered algorithm whose ranks are "ring", or a peer ring (every peer_rings entry is one)."""
    impl = ATTENTION.get(name)
    return impl.ranks == "ring" if impl is not None else name != "sdpa"


# ---------------------------------------------------------------------------------------------- what runs
@dataclass(frozen=True)
class Algo:
    """One benchmarked entry: ours (the registry), a peer ring, or the direct SDPA call (one rank)."""

    name: str
    layout: str
    fn: Callable  # fn(q, k, v, grid, causal) -> out (B, n, H, D)
    comm_ops: Callable | None  # the registry's comm_ops, None for the others
    ours: bool


def _sdpa(q, k, v, grid, causal):
    """Direct F.scaled_dot_product_attention on (B, H, N, D) views: the single-device baseline of --world 1."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def resolve(name: str, device: torch.device | None = None) -> Algo:
    if name == "sdpa":
        return Algo("sdpa", "full", _sdpa, None, False)
    if name in ATTENTION:
        impl = get_attention(name)
        return Algo(name, impl.layout, lambda q, k, v, grid, causal, f=impl.fn: f(q, k, v, grid=grid, causal=causal),
                    impl.comm_ops, True)
    peer = next(r for r in peer_rings.available(device or torch.device("cpu"))[0] if r.name == name)
    return Algo(name, peer.layout, lambda q, k, v, grid, causal, f=peer.fn: f(q, k, v, group=grid.group,
                                                                               causal=causal), None, False)


def plan(args) -> tuple[list[tuple[str, int, int]], list[str]]:
    """The (algorithm, rows, cols) runs and the lines saying what is skipped and why."""
    grids = default_grids(args.world)
    if args.grids:
        grids = [tuple(int(x) for x in g.lower().split("x")) for g in args.grids.split(",")]
    runs, notes = [], []
    names = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if args.peers:
        peers, why = peer_rings.available(torch.device("cpu"))
        notes += why
        if args.kv_heads not in (None, args.heads):
            notes += [f"skip {r.name}: wired for multi-head attention, --kv-heads is {args.kv_heads}" for r in peers]
        elif args.world > 1:
            names += [r.name for r in peers if r.name not in names]
        else:
            notes += [f"skip {r.name}: a ring of one rank (--world 1); sdpa is the baseline" for r in peers]
    if args.world == 1 and "sdpa" not in names:
        names.append("sdpa")
    for name in names:
        if name != "sdpa" and name not in ATTENTION and not any(r.name == name for r in
                                                                  peer_rings.available(torch.device("cpu"))[0]):
            notes.append(f"skip {name}: not registered (known: {', '.join(sorted(ATTENTION))}) nor a peer ring here")
            continue
        impl = ATTENTION.get(name)
        if impl is not None and impl.ranks == "one" and args.world != 1:
            notes.append(f"skip {name}: runs on one rank only, --world is {args.world}")
            continue
        if name == "sdpa" and args.world != 1:
            notes.append(f"skip sdpa: the single-device baseline, --world is {args.world}")
            continue
        for rows, cols in ([(args.world, 1)] if is_ring(name) or name == "sdpa" else grids):
            if rows * cols != args.world:
                notes.append(f"skip {name} {rows}x{cols}: {rows * cols} ranks, --world is {args.world}")
                continue
            try:
                layout.layout_spans(resolve(name).layout, args.seq, 0, rows, cols)
            except ValueError as e:
                notes.append(f"skip {name} {rows}x{cols}: {e}")
                continue
            runs.append((name, rows, cols))
    return runs, notes


def make_inputs(args):
    """Full q, dout (B, N, H, D) and k, v (B, N, H_kv, D), the same on every process (seeded)."""
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    kv_shape = (args.batch, args.seq, args.kv_heads or args.heads, args.head_dim)
    return [torch.randn(s, generator=g).to(as_dtype(args.dtype)) for s in (shape, kv_shape, kv_shape, shape)]


# ---------------------------------------------------------------------------------------------- the ranks
def _timed(fn, iters: int) -> tuple[float, float]:
    """This rank's (wall, CPU) seconds per call over `iters` calls between two barriers."""
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    c1 = time.process_time()
    dist.barrier()
    return (time.perf_counter() - t0) / iters, (c1 - c0) / iters


def worker(rank: int, world: int, args, runs):
    """On every rank: set up, check and count each run once, warm every run up, then time in interleaved rounds
    (round j times every run's forward and forward + backward once each), so that a change of background load on
    a shared machine hits every algorithm alike."""
    q_full, k_full, v_full, dout_full = make_inputs(args)
    grids, calls, results = {}, [], []
    for name, rows, cols in runs:
        if (rows, cols) not in grids:
            grids[(rows, cols)] = ProcessGrid(rows, cols)  # collective: same order on every rank
        grid, algo = grids[(rows, cols)], resolve(name)
        q, k, v = (layout.shard(x, grid, algo.layout).requires_grad_() for x in (q_full, k_full, v_full))
        dout = layout.shard(dout_full, grid, algo.layout)  # (B, N/P, H, D)

        def fwd(algo=algo, q=q, k=k, v=v, grid=grid):
            with torch.no_grad():
                return algo.fn(q, k, v, grid, args.causal)

        def fwd_bwd(algo=algo, q=q, k=k, v=v, dout=dout, grid=grid):
            algo.fn(q, k, v, grid, args.causal).backward(dout)
            q.grad = k.grad = v.grad = None

        out = algo.fn(q, k, v, grid, args.causal)  # the check (and a first warm-up)
        out.backward(dout)
        check = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
        q.grad = k.grad = v.grad = None
        with count_comm() as c_fwd, OpCounter() as o_fwd:
            fwd()
        with count_comm() as c_all:
            out = algo.fn(q, k, v, grid, args.causal)
            with OpCounter() as o_bwd:
                out.backward(dout)
        q.grad = k.grad = v.grad = None
        calls.append((fwd, fwd_bwd))
        results.append(dict(check=check, fwd=c_fwd.as_dict(), all=c_all.as_dict(), ops_fwd=o_fwd.as_dict(),
                            ops_bwd=o_bwd.as_dict(), wire=wire_bytes(fwd_bwd), t_fwd=[], t_all=[], c_fwd=[], c_all=[]))
    for fwd, fwd_bwd in calls:
        for _ in range(args.warmup):
            fwd()
            fwd_bwd()
    for j in range(args.repeats):
        order = list(zip(calls, results))
        for (fwd, fwd_bwd), res in order[j % len(order):] + order[:j % len(order)]:  # each round starts elsewhere
            for key, fn in (("fwd", fwd), ("all", fwd_bwd)):
                wall, cpu = _timed(fn, args.iters)
                res["t_" + key].append(wall)
                res["c_" + key].append(cpu)
    return results


def single_device(args):
    """The single-device result (torch SDPA on the whole sequence, same dtype) and its gradients."""
    q, k, v, dout = make_inputs(args)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = local_attention(q, k, v, causal=args.causal)
    out.backward(dout)
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def unshard(per_rank: list[torch.Tensor], lay: str, seq: int, rows: int, cols: int) -> torch.Tensor:
    full = torch.empty(per_rank[0].shape[0], seq, *per_rank[0].shape[2:], dtype=per_rank[0].dtype)
    for rk, x in enumerate(per_rank):
        full[:, layout.spans_tensor(layout.layout_spans(lay, seq, rk, rows, cols))] = x
    return full


def predicted(name, args, rows, cols) -> dict:
    """Max over ranks of the analytic bytes sent and messages, forward and forward + backward."""
    algo = resolve(name)
    if algo.comm_ops is None:
        return {}
    best = {"fwd_bytes": 0, "fwd_msgs": 0, "all_bytes": 0, "all_msgs": 0}
    for rk in range(rows * cols):
        ops = algo.comm_ops(args.batch, args.seq, args.heads, args.head_dim, rows, cols, as_dtype(args.dtype),
                               args.causal, rank=rk, kv_heads=args.kv_heads)
        f, a = total_comm(ops, "fwd"), total_comm(ops)
        for key, val in (("fwd_bytes", f["bytes_sent"]), ("fwd_msgs", f["messages"]),
                         ("all_bytes", a["bytes_sent"]), ("all_msgs", a["messages"])):
            best[key] = max(best[key], val)
    return best


def _spread(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def summarise(args, runs, per_rank) -> list[dict]:
    ref = single_device(args)
    rows_out = []
    for i, (name, rows, cols) in enumerate(runs):
        res = [per_rank[rk][i] for rk in range(args.world)]
        algo = resolve(name)
        err = {}
        for key in ("out", "dq", "dk", "dv"):
            got = unshard([r["check"][key] for r in res], algo.layout, args.seq, rows, cols)
            err[key] = (got.double() - ref[key].double()).abs().max().item()
            err[key + "_rel"] = err[key] / max(ref[key].double().abs().max().item(), 1e-30)
        t_fwd = [max(r["t_fwd"][j] for r in res) for j in range(args.repeats)]  # max over ranks, per round
        t_all = [max(r["t_all"][j] for r in res) for j in range(args.repeats)]
        c_all = [sum(r["c_all"][j] for r in res) for j in range(args.repeats)]  # summed over ranks, per round
        c_fwd = [sum(r["c_fwd"][j] for r in res) for j in range(args.repeats)]
        # bytes and messages: comm's count for ours, the functional collectives' for the peers
        fwd = {k: max(r["fwd"][k] + r["ops_fwd"][k] for r in res) for k in ("bytes_sent", "messages")}
        full = {k: max(r["all"][k] + r["ops_fwd"][k] + r["ops_bwd"][k] for r in res)
                for k in ("bytes_sent", "messages")}
        counted_total = sum(r["all"]["bytes_sent"] + r["ops_fwd"]["bytes_sent"] + r["ops_bwd"]["bytes_sent"]
                            for r in res)
        wire = res[0]["wire"]  # machine-wide: every rank read the same counter
        med, lo, hi = _spread(t_fwd)
        med_all, lo_all, hi_all = _spread(t_all)
        rows_out.append(dict(
            algorithm=name, grid=f"{rows}x{cols}", rows=rows, cols=cols,
            max_err_out=err["out"], max_err_grad=max(err["dq"], err["dk"], err["dv"]),
            check_ok=max(err[k + "_rel"] for k in ("out", "dq", "dk", "dv")) < ERR_TOL[args.dtype],
            time_fwd_s=med, time_fwd_bwd_s=med_all, time_fwd_min_max_s=[lo, hi],
            time_fwd_bwd_min_max_s=[lo_all, hi_all],
            times_fwd_s=t_fwd, times_fwd_bwd_s=t_all,
            cpu_fwd_s=statistics.median(c_fwd), cpu_fwd_bwd_s=statistics.median(c_all),
            bytes_fwd=fwd["bytes_sent"], msgs_fwd=fwd["messages"],
            bytes_fwd_bwd=full["bytes_sent"], msgs_fwd_bwd=full["messages"],
            bytes_fwd_bwd_all_ranks=counted_total, wire_bytes_fwd_bwd_all_ranks=wire,
            wire_vs_counted=wire / counted_total if wire is not None and counted_total else None,
            kernel_calls_fwd=max(r["ops_fwd"]["kernel_calls"] for r in res),
            kernel_calls_bwd=max(r["ops_bwd"]["kernel_calls"] for r in res),
            aten_ops_fwd=max(r["ops_fwd"]["aten_ops"] for r in res),
            aten_ops_bwd=max(r["ops_bwd"]["aten_ops"] for r in res),
            predicted=predicted(name, args, rows, cols),
            by_op_max={op: max(r["all"]["by_op"].get(op, {}).get("bytes_sent", 0) for r in res)
                       for op in sorted({op for r in res for op in r["all"]["by_op"]})},
        ))
    rings = [r for r in rows_out if is_ring(r["algorithm"])]
    fastest = min(rings, key=lambda r: r["time_fwd_bwd_s"]) if rings else None
    ours = next((r for r in rows_out if r["algorithm"] == "ring"), None)
    sdpa = next((r for r in rows_out if r["algorithm"] == "sdpa"), None)
    for r in rows_out:
        for key, base in (("fastest_ring", fastest), ("ring", ours), ("sdpa", sdpa)):
            r[f"vs_{key}"] = base["algorithm"] if base else None
            r[f"speedup_fwd_bwd_vs_{key}"] = base["time_fwd_bwd_s"] / r["time_fwd_bwd_s"] if base else None
            r[f"speedup_fwd_vs_{key}"] = base["time_fwd_s"] / r["time_fwd_s"] if base else None
            for t in ("fwd", "fwd_bwd"):  # per-round ratios: the rounds are interleaved, so drift cancels
                pairs = [b / x for b, x in zip(base[f"times_{t}_s"], r[f"times_{t}_s"])] if base else None
                r[f"speedup_{t}_vs_{key}_paired"] = list(_spread(pairs)) if pairs else None
        r["bytes_ratio_vs_ring"] = (r["bytes_fwd_bwd"] / ours["bytes_fwd_bwd"]
                                    if ours and ours["bytes_fwd_bwd"] else None)
    return rows_out


def table(rows_out) -> str:
    """One line per (algorithm, grid); counted / predicted side by side ('!' marks a mismatch)."""

    def pair(got, key, p, fmt):
        if not p:
            return f"{fmt(got)} / -"
        return f"{fmt(got)} / {fmt(p[key])}{'' if got == p[key] else '!'}"

    def mb(b):
        return f"{b / 1e6:.3f}"

    def ms(t):
        return f"{t * 1e3:.1f}"

    def x(v):
        return f"{v:.2f}x" if v else "-"

    def ratio(v):
        return f"{v:.2f}" if v else "-"

    def paired(v):  # [median, min, max] of the per-round speedups
        return f"{v[0]:.2f} ({v[1]:.2f}-{v[2]:.2f})" if v else "-"

    fastest = next((r["vs_fastest_ring"] for r in rows_out if r["vs_fastest_ring"]), None)
    base = "sdpa" if any(r["algorithm"] == "sdpa" for r in rows_out) else "fastest_ring"
    head = (f"{'algorithm':<15} {'grid':>4} {'fwd ms (min-max)':>18} {'fwd+bwd ms (min-max)':>21} {'CPU ms':>7} "
            f"{'MB/rank fwd+bwd':>17} {'msgs':>9} {'kernels':>7} {'aten ops':>9} "
            f"{'wire':>5} {('x sdpa' if base == 'sdpa' else 'x fastest'):>9} {'paired (min-max)':>18} {'x ring':>7} "
            f"{'x bytes':>7} "
            f"{'err out/grad':>15}")
    lines = [head, "-" * len(head)]
    for r in rows_out:
        p = r["predicted"]
        lo, hi = r["time_fwd_min_max_s"]
        lo2, hi2 = r["time_fwd_bwd_min_max_s"]
        lines.append(
            f"{r['algorithm']:<15} {r['grid']:>4} {ms(r['time_fwd_s']) + f' ({ms(lo)}-{ms(hi)})':>18} "
            f"{ms(r['time_fwd_bwd_s']) + f' ({ms(lo2)}-{ms(hi2)})':>21} {ms(r['cpu_fwd_bwd_s']):>7} "
            f"{pair(r['bytes_fwd_bwd'], 'all_bytes', p, mb):>17} {pair(r['msgs_fwd_bwd'], 'all_msgs', p, str):>9} "
            f"{str(r['kernel_calls_fwd']) + '+' + str(r['kernel_calls_bwd']):>7} "
            f"{str(r['aten_ops_fwd']) + '+' + str(r['aten_ops_bwd']):>9} {ratio(r['wire_vs_counted']):>5} "
            f"{x(r['speedup_fwd_bwd_vs_' + base]):>9} {paired(r['speedup_fwd_bwd_vs_' + base + '_paired']):>18} "
            f"{x(r['speedup_fwd_bwd_vs_ring']):>7} "
            f"{ratio(r['bytes_ratio_vs_ring']):>7} "
            f"{r['max_err_out']:.1e}/{r['max_err_grad']:.1e}{'' if r['check_ok'] else ' WRONG'}")
    lines.append(f"x {'sdpa' if base == 'sdpa' else 'fastest'} = {'sdpa' if base == 'sdpa' else fastest} fwd+bwd "
                 "median time / this one (a speedup); paired = median (min-max) over the rounds of the same "
                 "ratio within one round; x ring = the same against ours (ring, zigzag)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs, notes = plan(args)
    for n in notes:
        print(n)
    if not runs:
        print("nothing to run")
        return 1
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo"
    command = "python benchmarks/bench_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"P={args.world} N={args.seq} B={args.batch} H={args.heads} H_kv={args.kv_heads or args.heads} "
          f"D={args.head_dim} {args.dtype} causal={args.causal} warmup={args.warmup} repeats={args.repeats} "
          f"iters={args.iters}; {machine}")
    t0 = time.perf_counter()
    per_rank = run_distributed(args.world, worker, args, runs, timeout_s=args.timeout)
    rows_out = summarise(args, runs, per_rank)
    print(table(rows_out))
    print("times: median (min-max) over interleaved rounds of --iters calls, max over ranks; CPU ms = fwd+bwd CPU "
          "time summed over the ranks (median); MB and messages per rank: counted / predicted by the algorithm's "
          "comm_ops (max over ranks; '!' marks a mismatch; peers: counted from torch's functional collectives); "
          "kernels, aten ops: per forward + per backward (max over ranks); wire = loopback bytes sent during one "
          "fwd+bwd / the counted bytes, both over all ranks (an independent check: about 1.00 when the count is the "
          "traffic; headers and barriers add a little); x bytes = fwd+bwd bytes / ring's; err = "
          "max abs error of out and of dq/dk/dv vs single-device SDPA (WRONG: relative to the largest value "
          f">= {ERR_TOL[args.dtype]}).")
    print(f"(wall {time.perf_counter() - t0:.0f} s)")
    if args.out:
        stamp = datetime.now(UTC).isoformat()
        with open(args.out, "a") as f:
            for r in rows_out:
                f.write(json.dumps({"kind": "bench_attention", "at": stamp, "command": command, "machine": machine,
                                    "world": args.world, "seq_len": args.seq, "batch": args.batch,
                                    "heads": args.heads, "kv_heads": args.kv_heads or args.heads,
                                    "head_dim": args.head_dim, "dtype": args.dtype, "causal": args.causal,
                                    "repeats": args.repeats, "iters": args.iters, **r}) + "\n")
    keys = (("bytes_fwd", "fwd_bytes"), ("msgs_fwd", "fwd_msgs"), ("bytes_fwd_bwd", "all_bytes"),
            ("msgs_fwd_bwd", "all_msgs"))
    mismatch = [r for r in rows_out if r["predicted"] and any(r[a] != r["predicted"][b] for a, b in keys)]
    wrong = [r for r in rows_out if not r["check_ok"]]
    if wrong:
        print(f"WRONG (max error / max value >= {ERR_TOL[args.dtype]}): " +
              ", ".join(f"{r['algorithm']} {r['grid']}" for r in wrong))
    if mismatch:
        print("counted != predicted for: " + ", ".join(f"{r['algorithm']} {r['grid']}" for r in mismatch))
    return 1 if mismatch or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
