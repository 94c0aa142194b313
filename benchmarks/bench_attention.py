"""Benchmark the registered distributed attention algorithms (attn2d, attn2d_overlap, ring, ...) on P gloo ranks.

For each algorithm (and, for the 2-D ones, each grid) on P CPU processes (attn2d.testing.run_distributed, gloo):
  1. check: one forward + backward on the sharded inputs, unsharded and compared with the single-device result
     (torch SDPA on the whole sequence, same dtype, autograd): max abs error of out and of dq/dk/dv;
  2. time: forward, and forward + backward, after a warm-up; each repeat is barrier, call, barrier on every rank,
     a repeat's time is the max over ranks, the reported time is the median over repeats (also min and max in the
     JSONL); the repeats run in interleaved rounds over all algorithms, so load changes on a shared machine hit
     every algorithm alike;
  3. count: bytes sent and messages of one forward and one forward + backward (attn2d.distributed.comm counts
     every rank; max over ranks), beside the algorithm's analytic prediction (its comm_ops, max over ranks).
The table gives, per algorithm and grid, the times, MB sent and messages per rank (counted / predicted), and the
ratio against ring (zigzag): ring time / time (a speedup, as the paper's "Speedup over Ring Attn") and bytes /
ring bytes. Ring runs on the 1-D group of all P ranks (grid "Px1").

  python benchmarks/bench_attention.py --world 4 --seq 1152 --heads 4 --head-dim 64
  python benchmarks/bench_attention.py --world 9 --seq 1152 --algorithms attn2d,ring --grids 3x3 --out bench.jsonl

CPU only (gloo); timings on a shared CPU are indicative, the byte and message counts are exact.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.distributed as dist

from attn2d.attention import ATTENTION, get_attention, layout
from attn2d.attention.local import local_attention
from attn2d.distributed import ProcessGrid, count_comm
from attn2d.distributed.comm import total_comm
from attn2d.testing import run_distributed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
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
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--algorithms", default=DEFAULT_ALGORITHMS, help="comma list of registry names")
    p.add_argument("--grids", default=None, help="comma list RxC for the 2-D algorithms; default: the square grid of "
                                                 "--world (if any), then every other RxC = world")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole distributed run")
    p.add_argument("--out", default=None, help="append one JSON line per (algorithm, grid) to this file")
    return p.parse_args(argv)


def default_grids(world: int) -> list[tuple[int, int]]:
    pairs = [(r, world // r) for r in range(1, world + 1) if world % r == 0]
    square = [g for g in pairs if g[0] == g[1]]
    return square + [g for g in pairs if g[0] != g[1]]


def is_ring(name: str) -> bool:
    return name.startswith("ring")


def plan(args) -> tuple[list[tuple[str, int, int]], list[str]]:
    """The (algorithm, rows, cols) runs and the lines saying what is skipped and why."""
    grids = default_grids(args.world)
    if args.grids:
        grids = [tuple(int(x) for x in g.lower().split("x")) for g in args.grids.split(",")]
    runs, notes = [], []
    for name in [a.strip() for a in args.algorithms.split(",") if a.strip()]:
        if name not in ATTENTION:
            notes.append(f"skip {name}: not registered (known: {', '.join(sorted(ATTENTION))})")
            continue
        impl = ATTENTION[name]
        if impl.needs_world == "one" and args.world != 1:
            notes.append(f"skip {name}: runs on one rank only, --world is {args.world}")
            continue
        for rows, cols in ([(args.world, 1)] if is_ring(name) else grids):
            if rows * cols != args.world:
                notes.append(f"skip {name} {rows}x{cols}: {rows * cols} ranks, --world is {args.world}")
                continue
            try:
                layout.layout_spans(impl.layout, args.seq, 0, rows, cols)
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
    return [torch.randn(s, generator=g).to(DTYPES[args.dtype]) for s in (shape, kv_shape, kv_shape, shape)]


def _timed_once(fn) -> float:
    """This rank's seconds for one call between two barriers."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def worker(rank: int, world: int, args, runs):
    """On every rank: set up, check and count each run once, warm every run up, then time in interleaved rounds
    (round j times every run's forward and forward + backward once), so that a change of background load on a
    shared machine hits every algorithm alike."""
    q_full, k_full, v_full, dout_full = make_inputs(args)
    grids, calls, results = {}, [], []
    for name, rows, cols in runs:
        if (rows, cols) not in grids:
            grids[(rows, cols)] = ProcessGrid(rows, cols)  # collective: same order on every rank
        grid, impl = grids[(rows, cols)], get_attention(name)
        q, k, v = (layout.shard(x, grid, impl.layout).requires_grad_() for x in (q_full, k_full, v_full))
        dout = layout.shard(dout_full, grid, impl.layout)  # (B, N/P, H, D)

        def fwd(impl=impl, q=q, k=k, v=v, grid=grid):
            return impl.fn(q, k, v, grid=grid, causal=args.causal)

        def fwd_bwd(fwd=fwd, q=q, k=k, v=v, dout=dout):
            fwd().backward(dout)
            q.grad = k.grad = v.grad = None

        with count_comm() as c_fwd:
            out = fwd()
        with count_comm() as c_all:
            fwd().backward(dout)
        check = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
        q.grad = k.grad = v.grad = None
        calls.append((fwd, fwd_bwd))
        results.append(dict(check=check, fwd=c_fwd.as_dict(), all=c_all.as_dict(), t_fwd=[], t_all=[]))
    for fwd, fwd_bwd in calls:
        for _ in range(args.warmup):
            fwd()
            fwd_bwd()
    for _ in range(args.repeats):
        for (fwd, fwd_bwd), res in zip(calls, results):
            res["t_fwd"].append(_timed_once(fwd))
            res["t_all"].append(_timed_once(fwd_bwd))
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
    impl = get_attention(name)
    if impl.comm_volume is None:
        return {}
    best = {"fwd_bytes": 0, "fwd_msgs": 0, "all_bytes": 0, "all_msgs": 0}
    for rk in range(rows * cols):
        ops = impl.comm_volume(args.batch, args.seq, args.heads, args.head_dim, rows, cols, DTYPES[args.dtype],
                               args.causal, rank=rk, kv_heads=args.kv_heads)
        f, a = total_comm(ops, "fwd"), total_comm(ops)
        for key, val in (("fwd_bytes", f["bytes_sent"]), ("fwd_msgs", f["messages"]),
                         ("all_bytes", a["bytes_sent"]), ("all_msgs", a["messages"])):
            best[key] = max(best[key], val)
    return best


def summarise(args, runs, per_rank) -> list[dict]:
    ref = single_device(args)
    rows_out = []
    for i, (name, rows, cols) in enumerate(runs):
        res = [per_rank[rk][i] for rk in range(args.world)]
        lay = get_attention(name).layout
        err = {}
        for key in ("out", "dq", "dk", "dv"):
            got = unshard([r["check"][key] for r in res], lay, args.seq, rows, cols)
            err[key] = (got.double() - ref[key].double()).abs().max().item()
            err[key + "_rel"] = err[key] / max(ref[key].double().abs().max().item(), 1e-30)
        t_fwd = [max(r["t_fwd"][j] for r in res) for j in range(args.repeats)]  # max over ranks, per repeat
        t_all = [max(r["t_all"][j] for r in res) for j in range(args.repeats)]
        rows_out.append(dict(
            algorithm=name, grid=f"{rows}x{cols}", rows=rows, cols=cols,
            max_err_out=err["out"], max_err_grad=max(err["dq"], err["dk"], err["dv"]),
            check_ok=max(err[k + "_rel"] for k in ("out", "dq", "dk", "dv")) < ERR_TOL[args.dtype],
            time_fwd_s=statistics.median(t_fwd), time_fwd_bwd_s=statistics.median(t_all),
            time_fwd_min_max_s=[min(t_fwd), max(t_fwd)], time_fwd_bwd_min_max_s=[min(t_all), max(t_all)],
            bytes_fwd=max(r["fwd"]["bytes_sent"] for r in res), msgs_fwd=max(r["fwd"]["messages"] for r in res),
            bytes_fwd_bwd=max(r["all"]["bytes_sent"] for r in res), msgs_fwd_bwd=max(r["all"]["messages"] for r in res),
            predicted=predicted(name, args, rows, cols),
            by_op_max={op: max(r["all"]["by_op"].get(op, {}).get("bytes_sent", 0) for r in res)
                       for op in sorted({op for r in res for op in r["all"]["by_op"]})},
        ))
    ring = next((r for r in rows_out if r["algorithm"] == "ring"), None) or \
        next((r for r in rows_out if is_ring(r["algorithm"])), None)
    for r in rows_out:
        r["vs"] = ring["algorithm"] if ring else None
        r["speedup_fwd_bwd_vs_ring"] = ring["time_fwd_bwd_s"] / r["time_fwd_bwd_s"] if ring else None
        r["speedup_fwd_vs_ring"] = ring["time_fwd_s"] / r["time_fwd_s"] if ring else None
        r["bytes_ratio_vs_ring"] = r["bytes_fwd_bwd"] / ring["bytes_fwd_bwd"] if ring and ring["bytes_fwd_bwd"] else None
    return rows_out


def table(rows_out) -> str:
    """One line per (algorithm, grid); counted / predicted side by side ('!' marks a mismatch)."""

    def pair(got, key, p, fmt):
        if not p:
            return f"{fmt(got)} / -"
        return f"{fmt(got)} / {fmt(p[key])}{'' if got == p[key] else '!'}"

    mb = lambda b: f"{b / 1e6:.3f}"  # noqa: E731
    head = (f"{'algorithm':<16} {'grid':>5} {'fwd ms':>8} {'fwd+bwd ms':>10} {'MB/rank fwd':>19} "
            f"{'MB/rank fwd+bwd':>19} {'msgs fwd':>9} {'msgs fwd+bwd':>12} {'x ring time':>11} {'x ring bytes':>12} "
            f"{'max err out/grad':>17}")
    lines = [head, "-" * len(head)]
    for r in rows_out:
        p = r["predicted"]
        speed = f"{r['speedup_fwd_bwd_vs_ring']:.2f}x" if r["speedup_fwd_bwd_vs_ring"] else "-"
        ratio = f"{r['bytes_ratio_vs_ring']:.2f}" if r["bytes_ratio_vs_ring"] else "-"
        lines.append(
            f"{r['algorithm']:<16} {r['grid']:>5} {r['time_fwd_s'] * 1e3:8.1f} {r['time_fwd_bwd_s'] * 1e3:10.1f} "
            f"{pair(r['bytes_fwd'], 'fwd_bytes', p, mb):>19} {pair(r['bytes_fwd_bwd'], 'all_bytes', p, mb):>19} "
            f"{pair(r['msgs_fwd'], 'fwd_msgs', p, str):>9} {pair(r['msgs_fwd_bwd'], 'all_msgs', p, str):>12} {speed:>11} {ratio:>12} "
            f"{r['max_err_out']:.1e}/{r['max_err_grad']:.1e}{'' if r['check_ok'] else ' WRONG'}")
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
    print(f"P={args.world} N={args.seq} B={args.batch} H={args.heads} H_kv={args.kv_heads or args.heads} "
          f"D={args.head_dim} {args.dtype} "
          f"causal={args.causal} warmup={args.warmup} repeats={args.repeats}; {machine}")
    t0 = time.perf_counter()
    per_rank = run_distributed(args.world, worker, args, runs, timeout_s=args.timeout)
    rows_out = summarise(args, runs, per_rank)
    print(table(rows_out))
    print("MB and messages per rank: counted / predicted by the algorithm's comm_ops (max over ranks; '!' marks a "
          "mismatch); x ring time = ring fwd+bwd time / this fwd+bwd time; x ring bytes = fwd+bwd bytes / ring's; "
          "max err = max abs error of out and of dq/dk/dv vs single-device SDPA (WRONG: relative to the largest value "
          f">= {ERR_TOL[args.dtype]}).")
    print(f"(wall {time.perf_counter() - t0:.0f} s)")
    if args.out:
        stamp = datetime.now(timezone.utc).isoformat()
        with open(args.out, "a") as f:
            for r in rows_out:
                f.write(json.dumps({"kind": "bench_attention", "at": stamp, "machine": machine, "world": args.world,
                                    "seq_len": args.seq, "batch": args.batch, "heads": args.heads,
                                    "kv_heads": args.kv_heads or args.heads,
                                    "head_dim": args.head_dim, "dtype": args.dtype, "causal": args.causal,
                                    "repeats": args.repeats, **r}) + "\n")
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
