"""Benchmark the local block-attention backends (attn2d.attention.kernels) beside torch's own SDPA.

First checks every backend against "math" (selection.self_check on tiny cases, then forward + backward of a small
case of the benchmarked shape vs float64 "math"), then times forward and forward+backward after a warm-up
(CUDA events on a GPU, perf_counter on CPU; median over iterations) and prints ms and TFLOP/s.
FLOPs: 4*B*H*N^2*D for the forward of a whole sequence, halved when causal; forward+backward = 3.5x forward.
With --block R,C,r,c the timed call is Attention2D's block of grid p(r, c): queries r (mod R) against keys c
(mod C), and the FLOPs count only visible (query, key) pairs: 4*B*H*D*pairs.

  python benchmarks/bench_kernels.py --device cpu --dtype float32 --seq 256 --heads 2 --head-dim 64
  python benchmarks/bench_kernels.py --device cuda --dtype bfloat16 --seq 16384 --heads 32 --head-dim 128 \
      --causal --out results/bench_kernels.jsonl          # what a GPU user runs
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime

import torch
import torch.nn.functional as F

from attn2d.attention import kernels, selection
from attn2d.attention.layout import Span
from attn2d.attention.planner import visible_mask
from attn2d.dtypes import SHORT, acc_dtype, as_dtype

DTYPE_NAMES = [str(dt).removeprefix("torch.") for dt in SHORT.values()]  # the --dtype choices: torch's names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--block", default=None, help="R,C,r,c: time Attention2D's block of p(r, c) on an R x C grid")
    p.add_argument("--backends", default=None, help="comma list; default: every backend available here")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--math-max-gib", type=float, default=4.0, help="skip 'math' if its score matrix is larger")
    p.add_argument("--out", default=None, help="append one JSON line per backend to this file")
    return p.parse_args(argv)


def block_positions(args):
    """(q_pos, k_pos, n_q, n_k, visible pairs) of the timed call."""
    n = args.seq
    if args.block is None:
        pairs = n * (n + 1) // 2 if args.causal else n * n
        return None, None, n, n, pairs
    R, C, r, c = (int(x) for x in args.block.split(","))
    if n % R or n % C or not (0 <= r < R and 0 <= c < C):
        raise SystemExit(f"--block {args.block}: need 0 <= r < R, 0 <= c < C and seq {n} divisible by R={R} and C={C}")
    qs, ks = Span(r, R, n // R), Span(c, C, n // C)
    if args.causal:  # keys at c + C*j <= query position, counted per query
        qp = qs.tensor()
        pairs = int(torch.clamp(torch.div(qp - c, C, rounding_mode="floor") + 1, 0, ks.n).sum())
    else:
        pairs = qs.n * ks.n
    return qs, ks, qs.n, ks.n, pairs


def timeit(fn, device, warmup, iters) -> float:
    """Median milliseconds of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check_backend(name, args, device, dtype) -> tuple[str, float | None]:
    """Self-check on tiny cases, then the benchmarked shape at seq <= 256 vs float64 math: (verdict, rel error)."""
    why = None if name == "math" else selection.self_check(name, device, dtype, args.head_dim)
    if why is not None:
        return f"FAILED self-check: {why}", None
    small = argparse.Namespace(**{**vars(args), "seq": min(args.seq, 256)})
    if args.block is not None:
        R, C = (int(x) for x in args.block.split(",")[:2])
        small.seq = max(small.seq // (R * C), 1) * R * C
    qs, ks, n_q, n_k, _ = block_positions(small)
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(args.batch, n_q, args.heads, args.head_dim, generator=gen).to(device, dtype) for _ in "ab")
    k, v = (torch.randn(args.batch, n_k, args.heads, args.head_dim, generator=gen).to(device, dtype) for _ in "ab")
    kw = dict(causal=args.causal, q_pos=qs, k_pos=ks)
    got = kernels.attn_forward(q, k, v, backend=name, **kw)
    got_g = kernels.attn_backward(dout, q, k, v, *got, backend=name, **kw)
    x64 = [t.double() for t in (q, k, v, dout)]
    ref = kernels.attn_forward(*x64[:3], backend="math", **kw)
    ref_g = kernels.attn_backward(x64[3], *x64[:3], *ref, backend="math", **kw)
    err = 0.0
    for a, b in zip((got[0], *got_g), (ref[0], *ref_g)):
        err = max(err, (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1e-30))
    return "ok", err


def bench_backend(name, args, device, dtype, q, k, v, dout, qs, ks):
    kw = dict(causal=args.causal, q_pos=qs, k_pos=ks, backend=name)
    fwd = timeit(lambda: kernels.attn_forward(q, k, v, **kw), device, args.warmup, args.iters)

    def fwd_bwd():
        out, lse = kernels.attn_forward(q, k, v, **kw)
        kernels.attn_backward(dout, q, k, v, out, lse, **kw)

    return fwd, timeit(fwd_bwd, device, args.warmup, args.iters)


def bench_torch_sdpa(args, device, q, k, v, dout, qs, ks):
    """torch's F.scaled_dot_product_attention (its own backend choice), autograd for the backward."""
    qt, kt, vt = (t.transpose(1, 2).detach() for t in (q, k, v))  # (B, H, L, D)
    mask = None
    if qs is not None and args.causal:
        mask = visible_mask(qs, ks, qs.n, ks.n, device)  # (Lq, Lk) positional
    causal = args.causal and mask is None

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal)

    qg, kg, vg = (t.clone().requires_grad_() for t in (qt, kt, vt))
    do = dout.transpose(1, 2)

    def fwd_bwd():
        F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=causal).backward(do)
        qg.grad = kg.grad = vg.grad = None

    return timeit(fwd, device, args.warmup, args.iters), timeit(fwd_bwd, device, args.warmup, args.iters)


def _fmt(x, spec: str) -> str:
    return format(x, spec) if x is not None else "-"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = as_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    qs, ks, n_q, n_k, pairs = block_positions(args)
    flops = 4.0 * args.batch * args.heads * args.head_dim * (
        pairs if args.block else args.seq ** 2 / (2 if args.causal else 1))
    names = args.backends.split(",") if args.backends else selection.available_backends(device, dtype, args.head_dim)
    math_gib = args.batch * args.heads * n_q * n_k * acc_dtype(dtype).itemsize / 2 ** 30
    if args.backends is None and "math" in names and math_gib > args.math_max_gib:
        print(f"skipping math: its score matrix would take {math_gib:.1f} GiB > --math-max-gib {args.math_max_gib}")
        names.remove("math")

    gen = torch.Generator().manual_seed(1)
    q, dout = (torch.randn(args.batch, n_q, args.heads, args.head_dim, generator=gen).to(device, dtype) for _ in "ab")
    k, v = (torch.randn(args.batch, n_k, args.heads, args.head_dim, generator=gen).to(device, dtype) for _ in "ab")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# {dev_name}, torch {torch.__version__}, {dtype}, B={args.batch} N={args.seq} H={args.heads} "
          f"D={args.head_dim} causal={args.causal} block={args.block or 'whole sequence'}")
    print(f"{'backend':<16}{'check':<10}{'rel err':>10}{'fwd ms':>11}{'TFLOP/s':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}")
    rows = []
    for name in [*names, "torch_sdpa"]:
        row = {"backend": name, "check": "n/a", "max_rel_err": None, "fwd_ms": None, "fwd_bwd_ms": None}
        try:
            if name == "torch_sdpa":
                row["fwd_ms"], row["fwd_bwd_ms"] = bench_torch_sdpa(args, device, q, k, v, dout, qs, ks)
            else:
                selection.resolve_backend(name, device=device, dtype=dtype, head_dim=args.head_dim)  # applies here?
                row["check"], row["max_rel_err"] = check_backend(name, args, device, dtype)
                if row["check"] == "ok":
                    row["fwd_ms"], row["fwd_bwd_ms"] = bench_backend(name, args, device, dtype, q, k, v, dout, qs, ks)
        except Exception as e:  # report and go on with the next backend
            row["check"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9 if row["fwd_ms"] else None
        row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9 if row["fwd_bwd_ms"] else None
        rows.append(row)
        print(f"{name:<16}{row['check'][:9]:<10}{_fmt(row['max_rel_err'], '.1e'):>10}"
              f"{_fmt(row['fwd_ms'], '.3f'):>11}{_fmt(row['fwd_tflops'], '.3f'):>9}"
              f"{_fmt(row['fwd_bwd_ms'], '.3f'):>12}{_fmt(row['fwd_bwd_tflops'], '.3f'):>9}")
        if row["check"] not in ("ok", "n/a"):
            print(f"    {row['check']}")
    if args.out:
        common = {"kind": "bench_kernels", "device": str(device), "device_name": dev_name, "dtype": str(dtype),
                  "batch": args.batch, "seq": args.seq, "heads": args.heads, "head_dim": args.head_dim,
                  "causal": args.causal, "block": args.block, "flops_fwd": flops, "torch": torch.__version__,
                  "time": datetime.now(UTC).isoformat(timespec="seconds")}
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({**common, **row}) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["check"] in ("ok", "n/a") for r in main()) else 1)
