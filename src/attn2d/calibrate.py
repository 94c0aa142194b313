"""Measure a machine's kernel rates and link parameters and write a cost-model hardware profile.

    python -m attn2d.calibrate --world 4 9 --out conf/hardware/local_cpu.yaml    # this machine: gloo on CPU
    torchrun --nproc-per-node 4 --nnodes 2 -m attn2d.calibrate --out conf/hardware/mine.yaml   # a GPU allocation

What is measured (every number goes into the profile with a comment naming the machine and the date; timings are
minima over repeats, since a shared machine's other tenants only ever add time):
- compute, one rank alone (`threads` torch threads, the inputs' dtype): GEMM rate of linear layers forward +
  backward (the rest of the model); the block attention kernel of attn2d.attention.kernels (what ring and
  attn2d call) forward and backward on unmasked, causal, offset-causal and explicit-mask blocks, split into
  backend pieces as the algorithms' calls are: a non-negative fit of t = calls x overhead + (dense - skip x masked)
  x flops / rate + mask x flops / mask_rate; the same for torch SDPA (the `local` algorithm); AdamW's step
  (memory bound); a small GPT's per-layer and per-step time not explained by its FLOPs.
- with all `world` ranks busy at once, for each world size given: how many ranks the cores serve at full speed
  (shared_cores); the small GPT's overheads again (cores time-shared); a ring of point-to-point messages and
  all-gather, reduce-scatter, all-to-all and all-reduce over the world group and over concurrent pairs, each kind
  fitted as t = call + steps x alpha + bytes_sent / bandwidth (relative error, non-negative); the extra wall time
  a synchronisation costs when ranks arrive from CPU work (sync penalty); GEMMs beside an asynchronous ring
  transfer (overlap efficiency).
- the algorithms themselves (ring, attn2d, attn2d_overlap) on 4 ranks at a tiny sequence (N = 48, far below the
  validation sweep's): the host time they spend around transfers and per synchronous step, beyond everything
  above (a two-parameter non-negative fit).

On CPU the ranks are spawned here (attn2d.testing.run_distributed, gloo). Under torchrun/srun (RANK set) it runs
in place on NCCL and measures intra-node pairs (ranks 0, 1) and inter-node pairs (ranks 0, gpus_per_node):
that path is written from the torch.distributed API and has NOT been run on a GPU here.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from attn2d.costmodel import ATTN_BWD_FLOP_RATIO
from attn2d.records import cpu_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


# ============================================================================================== timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, min_time_s: float = 0.05, repeats: int = 5) -> float:
    """Minimum over `repeats` of the mean time of fn() (after one warm-up call), each repeat >= min_time_s.
    The minimum: a shared machine's other tenants only ever add time."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(min_time_s / once))
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t0) / n)
    return min(out)


def nnls_rel(X, t) -> np.ndarray:
    """Non-negative least squares of t ~ X c in RELATIVE error (rows weighted by 1/t), by trying every subset of
    columns (a handful of parameters) and keeping the best feasible one."""
    import itertools

    X, t = np.asarray(X, float), np.asarray(t, float)
    W = X / t[:, None]
    one = np.ones_like(t)
    best, best_c = float("inf"), np.zeros(X.shape[1])
    cols = [i for i in range(X.shape[1]) if X[:, i].any()]
    for r in range(1, len(cols) + 1):
        for sub in itertools.combinations(cols, r):
            c, *_ = np.linalg.lstsq(W[:, sub], one, rcond=None)
            if (c < 0).any():
                continue
            res = float(np.sum((W[:, sub] @ c - one) ** 2))
            if res < best:
                best, best_c = res, np.zeros(X.shape[1])
                best_c[list(sub)] = c
    return best_c


def fit_line(x, y) -> tuple[float, float]:
    """Least squares y = a + b x with a, b >= 0 (a refit through the origin if a < 0): -> (a, b)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    A = np.stack([np.ones_like(x), x], 1)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    if a < 0:
        a, b = 0.0, float((x @ y) / (x @ x))
    if b <= 0:
        a, b = float(np.mean(y)), 1e-30
    return float(a), float(b)


def fit_attention(samples: list[tuple[int, int, int, int, float]], flop_per_pair: float) -> dict:
    """samples: (calls, dense pairs, masked pairs inside causal pieces, explicit-mask pairs, time), as
    costmodel.call_work counts them. Non-negative least squares (relative error) of
        t = calls * overhead + (dense - skip * masked) * flop_per_pair / rate + mask * flop_per_pair / mask_rate
    -> {rate, overhead_s, causal_skip, mask_rate}."""
    X = np.array([[c, d * flop_per_pair, -m * flop_per_pair, k * flop_per_pair] for c, d, m, k, _ in samples], float)
    t = np.array([x[-1] for x in samples], float)
    over, inv_rate, skip_inv, inv_mask = nnls_rel(X, t)
    inv_rate = max(inv_rate, 1e-30)
    return {"rate": 1.0 / inv_rate, "overhead_s": float(over), "causal_skip": float(min(1.0, skip_inv / inv_rate)),
            "mask_rate": 1.0 / inv_mask if inv_mask > 0 else 1.0 / inv_rate}


# ============================================================================================== compute
def measure_gemm(device, dtype, threads: int, quick: bool) -> dict:
    """Linear layer forward + backward (3 GEMMs, 6 flops per weight and token): rate and per-layer overhead."""
    torch.manual_seed(0)
    xs, ys = [], []
    sizes = [(256, 64), (512, 128), (1024, 128), (1024, 256), (2048, 256)] if not quick else [(256, 64), (1024, 128), (1024, 256)]
    if device.type == "cuda":
        sizes = [(4096, 1024), (8192, 2048), (8192, 4096), (16384, 4096)]
    for tokens, d in sizes:
        lin = torch.nn.Linear(d, 4 * d, device=device, dtype=dtype)
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)

        def step():
            lin(x).sum().backward()

        t = timeit(step, device)
        xs.append(6.0 * tokens * d * 4 * d)
        ys.append(t)
    a, b = fit_line(xs, ys)
    return {"matmul_flops_per_s": 1.0 / b, "linear_overhead_s": a, "points": list(zip(xs, ys))}


def _attn_calls(device, quick: bool) -> list[tuple]:
    """Block calls (query Spans, key Spans) like the algorithms' ones: unmasked, causal squares, offset causal
    staircases (ring / attn2d square grids) and strided staircases that need an explicit mask (non-square grids,
    Alg. 6 of the overlapped variant)."""
    from attn2d.attention.layout import Span as S

    sizes = [32, 64, 128, 256] if quick else [32, 64, 128, 256, 512]
    if device.type == "cuda":
        sizes = [2048, 4096, 8192, 16384]
    calls = []
    for L in sizes:
        calls.append(((S(0, 1, L),), (S(0, 1, L),), False))  # unmasked
        calls.append(((S(0, 1, L),), (S(0, 1, L),), True))  # causal square
        calls.append(((S(L, 1, L),), (S(0, 1, 2 * L),), True))  # offset causal (bottom-right)
        calls.append(((S(1, 4, L),), (S(2, 3, (4 * L) // 3),), True))  # strided staircase -> explicit mask
    return calls


def measure_block_attention(device, dtype, quick: bool, heads: int = 4, head_dim: int = 16) -> dict:
    """attn2d.attention.kernels forward and backward (the kernels ring and attn2d call) on block calls split into
    backend pieces exactly as the algorithms' calls are (costmodel.call_work)."""
    from attn2d.attention import kernels
    from attn2d.attention.backends import BACKENDS
    from attn2d.costmodel import call_work

    name = kernels.resolve_backend("auto", device=device, dtype=dtype, head_dim=head_dim)
    bottom_right = BACKENDS[name].causal_bottom_right
    fwd, bwd = [], []
    for qs, ks, causal in _attn_calls(device, quick):
        nq, nk = sum(x.n for x in qs), sum(x.n for x in ks)
        q = torch.randn(1, nq, heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(1, nk, heads, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        kw = dict(causal=causal, q_pos=qs, k_pos=ks)
        out, lse = kernels.attn_forward(q, k, v, **kw)
        dout = torch.randn_like(out)
        tf = timeit(lambda: kernels.attn_forward(q, k, v, **kw), device)
        tb = timeit(lambda: kernels.attn_backward(dout, q, k, v, out, lse, **kw), device)
        calls, dense, masked, mask = call_work((qs, ks), causal, bottom_right)
        u = heads * head_dim
        fwd.append((calls, dense * u, masked * u, mask * u, tf))
        bwd.append((calls, dense * u, masked * u, mask * u, tb))
    return {"backend": name, "bottom_right": bottom_right, "heads": heads, "head_dim": head_dim,
            "fwd": fit_attention(fwd, 4.0), "bwd": fit_attention(bwd, 4.0 * ATTN_BWD_FLOP_RATIO),
            "points_fwd": fwd, "points_bwd": bwd}


def measure_local_attention(device, dtype, quick: bool, heads: int = 4, head_dim: int = 16) -> dict:
    """torch SDPA (the `local` algorithm) forward, and forward + backward through autograd."""
    from attn2d.attention.local import local_attention

    sizes = [64, 128, 256, 512] if quick else [64, 128, 256, 512, 1024]
    if device.type == "cuda":
        sizes = [4096, 8192, 16384]
    fwd, bwd = [], []
    for L in sizes:
        q, k, v = (torch.randn(1, L, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        for causal in (False, True):
            with torch.no_grad():
                tf = timeit(lambda: local_attention(q, k, v, causal=causal), device)

            def fb():
                local_attention(q, k, v, causal=causal).sum().backward()

            tfb = timeit(fb, device)
            u = heads * head_dim
            masked = L * (L - 1) // 2 if causal else 0
            fwd.append((1, L * L * u, masked * u, 0, tf))
            bwd.append((1, L * L * u, masked * u, 0, max(tfb - tf, 1e-9)))
    return {"fwd": fit_attention(fwd, 4.0), "bwd": fit_attention(bwd, 4.0 * ATTN_BWD_FLOP_RATIO)}


def measure_optimizer(device, quick: bool) -> dict:
    """AdamW step on fp32 parameters: effective memory bandwidth at 28 bytes per parameter."""
    n = 1 << (20 if quick else 22)
    if device.type == "cuda":
        n = 1 << 26
    p = torch.nn.Parameter(torch.randn(n, device=device))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4)
    t = timeit(opt.step, device)
    return {"memory_bw_bytes_per_s": 28.0 * n / t, "seconds_per_param": t / n}


def measure_model_overhead(device, dtype, rates: dict, quick: bool, share: float = 1.0,
                           shapes=None) -> dict | None:
    """Per-layer and per-step time of a small GPT (attn2d.model, local attention, one rank) that the FLOP terms
    above do not explain: fit (measured - predicted) = step + n_layer x layer over a few shapes. With share < 1
    (called on every rank of a world at once: the ranks time-share the cores) the FLOP terms are predicted at
    share x the solo rates, and the fit is the overhead as it is under that contention."""
    try:
        from attn2d.attention.local import local_attention
        from attn2d.model import GPT, GPTConfig
    except ImportError:
        return None
    from attn2d.costmodel import ModelShape

    rows = []
    if shapes is None:
        shapes = ([(1, 64, 4, 256), (2, 64, 4, 256), (4, 64, 4, 256), (2, 128, 4, 512)]
                  if not quick else [(1, 64, 4, 256), (3, 64, 4, 256)])
    for n_layer, d, h, n in shapes:
        cfg = GPTConfig(n_layer=n_layer, d_model=d, n_head=h, vocab_size=256)
        model = GPT(cfg, lambda q, k, v: local_attention(q, k, v, causal=True)).to(device=device, dtype=dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        idx = torch.randint(0, 256, (1, n), device=device)
        pos = torch.arange(n, device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            logits = model(idx, pos)
            torch.nn.functional.cross_entropy(logits.reshape(-1, 256).float(), idx.reshape(-1)).backward()
            opt.step()

        t = timeit(step, device, min_time_s=0.2)
        shape = ModelShape(n_layer=n_layer, d_model=d, n_head=h, vocab_size=256)
        d_h = shape.d_head
        pairs = n * (n + 1) / 2
        skip = rates["local_fwd"]["causal_skip"]
        work = n * n - skip * (n * n - pairs)
        attn = n_layer * (4 * h * d_h * work / rates["local_fwd"]["rate"]
                          + 4 * ATTN_BWD_FLOP_RATIO * h * d_h * work / rates["local_bwd"]["rate"]) / share
        rest = 6.0 * shape.matmul_params() * n / rates["matmul"] / share
        opt_t = shape.n_params() * rates["optimizer_s_per_param"] / share
        rows.append((n_layer, t - attn - rest - opt_t, t))
    a, b = fit_line([r[0] for r in rows], [r[1] for r in rows])
    return {"step_overhead_s": a, "layer_overhead_s": b, "points": rows}


# ============================================================================================== communication
def _comm_sizes(device, quick: bool) -> list[int]:
    if device.type == "cuda":
        return [1 << 16, 1 << 20, 1 << 24, 1 << 27]
    return [1 << 12, 1 << 16, 1 << 19, 1 << 21] if quick else [1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22]


def _barrier_time(fn, device, iters: int, repeats: int = 5) -> float:
    """Time per call of a collective fn: the mean over `iters` calls, max over ranks (everyone waits for the
    slowest), minimum over `repeats` (other tenants of a shared machine only ever add time)."""
    import torch.distributed as dist

    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        t = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        best = min(best, float(t))
    return best


def _pairs(world: int, stride: int) -> list[list[int]]:
    """Disjoint pairs (i, i + stride): stride 1 pairs neighbours (same node), stride gpus_per_node crosses nodes."""
    pairs, used = [], set()
    for i in range(world):
        if i not in used and i + stride < world and i + stride not in used:
            pairs.append([i, i + stride])
            used |= {i, i + stride}
    return pairs


def comm_worker(rank: int, world: int, quick: bool, device_str: str, dtype_name: str, threads: int,
                pair_stride: int = 1, rates: dict | None = None) -> dict:
    """Run on every rank: measures concurrent compute, the ring p2p, collectives and overlap. Rank 0's dict wins.

    pair_stride: the "pair" groups are (i, i + pair_stride), all busy at once. rates (CPU): also measure the small
    GPT's per-layer / per-step overhead with every rank running it at once (the cores time-shared)."""
    import torch.distributed as dist

    from attn2d.distributed import comm

    torch.set_num_threads(threads)
    device = torch.device(device_str)
    res: dict = {"world": world}
    # ---- compute with every rank busy
    d, tokens = (128, 1024) if device.type == "cpu" else (4096, 8192)
    lin = torch.nn.Linear(d, 4 * d, device=device)
    x = torch.randn(tokens, d, device=device, requires_grad=True)

    def gemm():
        lin(x).sum().backward()

    dist.barrier()
    tg = timeit(gemm, device, min_time_s=0.2)
    res["concurrent_gemm_flops_per_s"] = 6.0 * tokens * d * 4 * d / tg

    # ---- groups: the world, and pairs {0,1}, {2,3}, ... (all pairs busy at once)
    pairs = _pairs(world, pair_stride)
    pair_groups = [dist.new_group(p) for p in pairs]  # collective: every rank creates every group
    my_pair = next((g for p, g in zip(pairs, pair_groups) if rank in p), None)
    kinds = {}
    iters = 3 if quick else 6
    for nbytes in _comm_sizes(device, quick):
        n = nbytes // 4
        buf = torch.randn(n, device=device)
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        rbuf = torch.empty_like(buf)
        t = _barrier_time(lambda: comm.send_recv([(buf, nxt)], [(rbuf, prv)], op="cal"), device, iters)
        kinds.setdefault("p2p", []).append((1, nbytes, t))
        for gname, group, g in (("world", None, world), ("pair", my_pair, 2)):
            if gname == "pair" and not pairs:
                continue
            if gname == "pair" and group is None:  # a rank without a pair joins the 4 timed barriers below
                for _ in range(4):
                    _barrier_time(lambda: None, device, iters)
                continue
            blk = torch.randn(n // g if n >= g else 1, device=device)
            bytes_sent = (g - 1) * blk.numel() * 4
            t = _barrier_time(lambda: comm.all_gather(blk, group, op="cal"), device, iters)
            kinds.setdefault("all_gather", []).append((g - 1, bytes_sent, t))
            kinds.setdefault(f"all_gather_{gname}", []).append((g - 1, bytes_sent, t))
            blocks = [blk.clone() for _ in range(g)]
            t = _barrier_time(lambda: comm.reduce_scatter(blocks, group, op="cal"), device, iters)
            kinds.setdefault("reduce_scatter", []).append((g - 1, bytes_sent, t))
            t = _barrier_time(lambda: comm.all_to_all(blocks, group, op="cal"), device, iters)
            kinds.setdefault("all_to_all", []).append((g - 1, bytes_sent, t))
            flat = torch.randn(max(g, n), device=device)
            t = _barrier_time(lambda: comm.all_reduce(flat, group, op="cal"), device, iters)
            kinds.setdefault("all_reduce", []).append((2 * (g - 1), 2 * (g - 1) * flat.numel() * 4 // g, t))
    res["kinds"] = kinds
    # ---- overlap: GEMMs beside an async ring transfer of about the same duration
    n = (1 << 20) // 4 if device.type == "cpu" else (1 << 26) // 4
    buf, rbuf = torch.randn(n, device=device), torch.empty(n, device=device)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    t_m = _barrier_time(lambda: comm.send_recv([(buf, nxt)], [(rbuf, prv)], op="cal"), device, iters)
    reps = max(1, round(t_m / tg))

    def compute():
        for _ in range(reps):
            gemm()

    t_c = _barrier_time(compute, device, iters)

    def both():
        h = comm.send_recv([(buf, nxt)], [(rbuf, prv)], op="cal", async_op=True)
        compute()
        h.wait()

    t_b = _barrier_time(both, device, iters)
    eff = (t_c + t_m - t_b) / min(t_c, t_m) if min(t_c, t_m) > 0 else 0.0
    res["overlap"] = {"compute_s": t_c, "comm_s": t_m, "both_s": t_b, "efficiency": float(np.clip(eff, 0.0, 1.0))}
    if device.type == "cpu":  # the cost of a synchronisation between ranks that time-share the cores
        lin = torch.nn.Linear(64, 64)
        xs = torch.randn(16, 64)
        flag = torch.zeros(1)

        def task():
            for _ in range(20):
                lin(xs)

        def sync():
            dist.all_reduce(flag)

        def mixed():
            task()
            sync()

        t_task = _barrier_time(task, device, iters)  # every rank at once, no synchronisation inside
        t_sync = _barrier_time(sync, device, iters)
        t_mixed = _barrier_time(mixed, device, iters)
        res["sync_penalty"] = {"task_s": t_task, "sync_s": t_sync, "mixed_s": t_mixed,
                               "penalty_s": max(0.0, t_mixed - t_task - t_sync)}
    if rates is not None and device.type == "cpu":
        dist.barrier()
        share = min(1.0, (os.cpu_count() or 1) / (world * threads))
        res["overhead"] = measure_model_overhead(device, DTYPES[dtype_name], rates, quick, share=share,
                                                 shapes=[(1, 64, 4, 64), (2, 64, 4, 64), (4, 64, 4, 64)])
        dist.barrier()
    return res


GLUE_CASES = (("ring", 4, 1), ("attn2d", 2, 2), ("attn2d_overlap", 2, 2))  # world 4
GLUE_SEQ_LEN = 48  # far below the local sweep's 144..576: a micro-benchmark, not a validation cell


def algorithm_worker(rank: int, world: int, cases, seq_len: int, heads: int, head_dim: int, reps: int,
                     threads: int) -> dict:
    """Each algorithm's attention alone, forward + backward on tiny shards: the minimum over `reps` of the slowest
    rank's time (everything but the glue around the transfers is priced by the other measurements)."""
    import torch.distributed as dist

    from attn2d.attention import get_attention, layout
    from attn2d.distributed import ProcessGrid

    torch.set_num_threads(threads)
    out, grids = {}, {}
    for alg, rows, cols in cases:
        grid = grids.setdefault((rows, cols), ProcessGrid(rows, cols))
        impl = get_attention(alg)
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, seq_len, heads, head_dim, generator=g) for _ in range(4))
        q, k, v = (layout.shard(x, grid, impl.layout).requires_grad_() for x in (q, k, v))  # (B, N/P, H, D)
        do = layout.shard(do, grid, impl.layout)
        best = float("inf")
        for r in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            impl.fn(q, k, v, grid=grid, causal=True).backward(do)
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if r:
                best = min(best, float(t))
        out[alg] = best
    return out


def fit_glue(measured: dict, hw, heads: int, head_dim: int) -> dict:
    """Host time the algorithms spend outside kernels and the communication library: per communication call
    (packing, reordering) and per synchronous attention step (merging partials, slicing blocks). Non-negative
    least squares of (measured - modelled attention time without them) = (calls x glue + steps x step) / share."""
    import itertools

    from attn2d import costmodel as cm

    shape = cm.ModelShape(n_layer=1, d_model=heads * head_dim, n_head=heads, vocab_size=8)
    wl = cm.Workload(seq_len=GLUE_SEQ_LEN, dtype="fp32")
    share = hw.compute_share(4)
    rows = []
    for alg, r, c in GLUE_CASES:
        ops = cm.comm_ops_for(alg, shape, wl, r, c)
        ph = cm.attention_phases(alg, shape, wl, r, c, hw, ops)
        steps = 2 * len(cm.attention_schedule(alg, GLUE_SEQ_LEN, r, c))  # forward and backward
        rows.append((alg, measured[alg], ph["fwd"][2] + ph["bwd"][2], cm.comm_calls(ops), steps))
    X = np.array([[n / share, k / share] for *_, n, k in rows], float)
    y = np.array([m - p for _, m, p, *_ in rows], float)
    best, coef = float(np.sum(y ** 2)), np.zeros(2)
    for sub in ([0], [1], [0, 1]):
        c, *_ = np.linalg.lstsq(X[:, sub], y, rcond=None)
        if (c < 0).any():
            continue
        res = float(np.sum((X[:, sub] @ c - y) ** 2))
        if res < best:
            best, coef = res, np.zeros(2)
            coef[sub] = c
    return {"comm_call_overhead_s": float(coef[0]), "attn_step_overhead_s": float(coef[1]), "cases": rows}


def fit_kind(points: list[tuple[int, int, float]]) -> dict:
    """points (steps, bytes_sent per rank, time): t = call + steps*alpha + bytes/bw, non-negative, in relative
    error (the small messages of a CPU-scale run matter as much as the large ones)."""
    X = np.array([[1.0, s, b] for s, b, _ in points], float)
    t = np.array([p[2] for p in points], float)
    call, alpha, inv_bw = nnls_rel(X, t)
    pred = X @ np.array([call, alpha, inv_bw])
    err = float(np.median(np.abs(pred - t) / t))
    return {"call_s": float(call), "alpha_s": float(alpha), "bw_bytes_per_s": float(1.0 / inv_bw) if inv_bw > 0 else 1e15,
            "median_rel_err": err}


# ============================================================================================== profile
KINDS = ("p2p", "all_gather", "reduce_scatter", "all_to_all", "all_reduce")


def calibrate(worlds, threads: int = 1, dtype: str = "fp32", quick: bool = False, device: str = "cpu",
              heads: int = 4, head_dim: int = 16) -> dict:
    """All measurements on this machine -> the raw numbers the profile is rendered from.

    worlds: world sizes (an int or a list) at which `world` gloo ranks are spawned for the shared measurements;
    on a CPU whose cores the ranks share, latencies grow with the number of processes, so the profile keeps one
    fit per world size and the cost model interpolates between them."""
    from attn2d.testing import run_distributed

    worlds = [worlds] if isinstance(worlds, int) else list(worlds)
    torch.set_num_threads(threads)
    dev, dt = torch.device(device), DTYPES[dtype]
    t0 = time.time()
    gemm = measure_gemm(dev, dt, threads, quick)
    block = measure_block_attention(dev, dt, quick, heads, head_dim)
    local = measure_local_attention(dev, dt, quick, heads, head_dim)
    optm = measure_optimizer(dev, quick)
    rates = {"matmul": gemm["matmul_flops_per_s"], "local_fwd": local["fwd"], "local_bwd": local["bwd"],
             "optimizer_s_per_param": optm["seconds_per_param"]}
    overhead = measure_model_overhead(dev, dt, rates, quick)
    dist_res, fits, shared = {}, {}, []
    solo = gemm["matmul_flops_per_s"]
    for w in worlds:
        dist_res[w] = run_distributed(w, comm_worker, quick, device, dtype, threads, 1, rates, timeout_s=600)[0]
        fits[w] = {k: fit_kind(v) for k, v in dist_res[w]["kinds"].items() if k in KINDS}
        shared.append(w * dist_res[w]["concurrent_gemm_flops_per_s"] / solo)
    cores = os.cpu_count() or 1
    shared_cores = int(min(cores, max(1, round(statistics.median(shared))))) if min(worlds) > 1 else None
    algos = run_distributed(4, algorithm_worker, GLUE_CASES, GLUE_SEQ_LEN, heads, head_dim, 4 if quick else 30,
                            threads, timeout_s=600)[0]
    return {
        "gemm": gemm, "block": block, "local": local, "optimizer": optm, "overhead": overhead,
        "dist": dist_res, "fits": fits, "worlds": worlds, "shared_cores": shared_cores,
        "shared_cores_raw": shared, "algorithms": algos, "elapsed_s": time.time() - t0,
        "machine": f"{socket.gethostname()} ({cpu_model()}, {cores} cpus)",
        "date": datetime.date.today().isoformat(), "threads": threads, "dtype": dtype,
    }


def calibrate_allocation(args) -> None:
    """Under torchrun / srun (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE set): NCCL on the GPUs of an allocation.

    Rank 0 measures the kernels on its GPU; every rank joins two rounds of shared measurements, pairs inside a node
    (stride 1) and pairs across nodes (stride = GPUs per node); rank 0 writes the profile. Written from the
    torch.distributed API; NOT run on a GPU here."""
    import json

    import torch.distributed as dist

    from attn2d.distributed import init_distributed

    info = init_distributed()
    dev, dt = info.device, DTYPES["bf16" if info.device.type == "cuda" else args.dtype]
    gpn = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
    m: dict = {"world": info.world_size, "threads": args.threads, "dtype": str(dt).replace("torch.", ""),
               "date": datetime.date.today().isoformat(), "gpus_per_node": gpn,
               "machine": f"{socket.gethostname()} x {info.world_size // gpn} nodes "
                          f"({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else cpu_model()})"}
    if info.rank == 0:
        m["gemm"] = measure_gemm(dev, dt, args.threads, args.quick)
        m["block"] = measure_block_attention(dev, dt, args.quick, args.heads, args.head_dim)
        m["local"] = measure_local_attention(dev, dt, args.quick, args.heads, args.head_dim)
        m["optimizer"] = measure_optimizer(dev, args.quick)
    dist.barrier()
    intra = comm_worker(info.rank, info.world_size, args.quick, str(dev), args.dtype, args.threads, pair_stride=1)
    inter = (comm_worker(info.rank, info.world_size, args.quick, str(dev), args.dtype, args.threads, pair_stride=gpn)
             if info.world_size > gpn else None)
    if info.rank != 0:
        return
    m["intra"] = {k: fit_kind(v) for k, v in intra["kinds"].items()}
    m["inter"] = {k: fit_kind(v) for k, v in inter["kinds"].items()} if inter else None
    m["overlap"] = intra["overlap"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".raw.json").write_text(json.dumps(m, indent=1, default=float))
    src = f"measured by python -m attn2d.calibrate on {m['machine']} {m['date']}"
    pair_inter = (m["inter"] or {}).get("all_gather_pair")
    lines = [f"# Cost-model profile measured on an allocation (NCCL). Every number: {src}",
             f"name: {args.name or out.stem}", f"source: \"{src}\"", f"gpus_per_node: {gpn}", "compute:",
             f"  matmul_flops_per_s: {m['gemm']['matmul_flops_per_s']:.4g}  # (measured)",
             f"  attn_fwd_flops_per_s: {m['block']['fwd']['rate']:.4g}  # (measured)",
             f"  attn_bwd_flops_per_s: {m['block']['bwd']['rate']:.4g}  # (measured)",
             f"  attn_causal_skip: {m['block']['fwd']['causal_skip']:.3f}  # (measured)",
             f"  attn_call_overhead_s: {m['block']['fwd']['overhead_s']:.4g}  # (measured)",
             f"  memory_bw_bytes_per_s: {m['optimizer']['memory_bw_bytes_per_s']:.4g}  # AdamW step (measured)",
             "network:", "  collective_base_latency_s: 0.0  # folded into the alphas",
             f"  intra:  # NCCL all-gather over pairs of neighbouring ranks (measured)",
             f"    alpha_s: {m['intra']['all_gather_pair']['alpha_s']:.4g}",
             f"    bw_bytes_per_s: {m['intra']['all_gather_pair']['bw_bytes_per_s']:.4g}",
             f"  inter:  # NCCL all-gather over pairs (i, i + {gpn}), all at once; node bw = {gpn} x pair bw (measured)",
             f"    alpha_s: {pair_inter['alpha_s'] if pair_inter else 1e-5:.4g}",
             f"    bw_bytes_per_s_per_node: {gpn * pair_inter['bw_bytes_per_s'] if pair_inter else 1e10:.4g}",
             f"    bw_bytes_per_s_per_rank: {pair_inter['bw_bytes_per_s'] if pair_inter else 1e10:.4g}",
             "overlap:", f"  efficiency: {m['overlap']['efficiency']:.3f}  # (measured)"]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def _sync_penalty(m: dict) -> list[str]:
    got = {w: d.get("sync_penalty") for w, d in m["dist"].items() if d.get("sync_penalty")}
    if not got:
        return []
    lines = ["  sync_penalty_by_world:  # extra wall time per communication call when ranks arrive from CPU work on "
             "time-shared cores: (GEMM task + all-reduce) - task - all-reduce, every rank at once (measured)"]
    for w, o in sorted(got.items()):
        lines.append(f"    {w}: {o['penalty_s']:.4g}  # task {o['task_s']:.3g} s, sync {o['sync_s']:.3g} s, "
                     f"both {o['mixed_s']:.3g} s")
    lines.append("  sync_penalty_scaling: oversubscription  # the smallest oversubscribed world's penalty x (P/cores - 1) "
                 "(attn2d.costmodel.Hardware.sync_penalty; evidence: results/tables/costmodel/validation_timeshare.md)")
    return lines


def _overhead_by_world(m: dict) -> list[str]:
    got = {w: d.get("overhead") for w, d in m["dist"].items() if d.get("overhead")}
    if not got:
        return []
    lines = ["  overhead_by_world:  # the same small-GPT fit with every rank of a world running it at once (the cores "
             "time-shared): used instead of the two lines above / share, interpolated in P (measured)"]
    for w, o in sorted(got.items()):
        lines += [f"    {w}: {{layer_overhead_s: {max(0.0, o['layer_overhead_s']):.4g}, "
                  f"step_overhead_s: {max(0.0, o['step_overhead_s']):.4g}}}"]
    return lines


def render_profile(m: dict, name: str) -> str:
    """The measured profile as commented YAML (every number says where it comes from)."""
    host = m["machine"].split(" ")[0]
    worlds = " ".join(str(w) for w in m["worlds"])
    src = f"measured by python -m attn2d.calibrate --world {worlds} on {host} {m['date']}"
    w0 = m["worlds"][0]
    fit0 = m["fits"][w0]
    ov = m["overhead"] or {"step_overhead_s": 0.0, "layer_overhead_s": 0.0}
    o = m["dist"][w0]["overlap"]
    b, loc = m["block"], m["local"]
    lines = [
        f"# Cost-model profile of this machine: {m['machine']}, gloo over loopback.",
        f"# Every number below, unless its comment says otherwise: {src}",
        f"# ({m['threads']} torch thread(s) per rank, {m['dtype']} tensors; shared measurements with {worlds} ranks at once;",
        f"#  calibration took {m['elapsed_s']:.0f} s). Re-measure: snakemake calibrate (writes results/calibration/local_cpu.yaml).",
        f"name: {name}",
        f"source: \"{src}\"",
        "gpus_per_node: 1024  # one machine: every rank is on this node (no inter-node link)",
        "peak_tflops: null  # no vendor peak for a CPU here (the benchmark's MFU stays null)",
        "compute:",
        f"  matmul_flops_per_s: {m['gemm']['matmul_flops_per_s']:.4g}  # nn.Linear fwd+bwd, one rank alone, fit (measured)",
        f"  attn_fwd_flops_per_s: {b['fwd']['rate']:.4g}  # kernels.attn_forward, backend {b['backend']}, fit (measured)",
        f"  attn_bwd_flops_per_s: {b['bwd']['rate']:.4g}  # kernels.attn_backward, fit (measured)",
        f"  attn_mask_fwd_flops_per_s: {b['fwd']['mask_rate']:.4g}  # pieces with an explicit mask (measured)",
        f"  attn_mask_bwd_flops_per_s: {b['bwd']['mask_rate']:.4g}  # (measured)",
        f"  causal_bottom_right: {str(b['bottom_right']).lower()}  # a property of backend {b['backend']} (attn2d.attention.backends)",
        f"  attn_causal_skip: {b['fwd']['causal_skip']:.3f}  # fraction of masked work a causal piece skips (measured)",
        f"  attn_call_overhead_s: {b['fwd']['overhead_s']:.4g}  # per backend call, fit intercept (measured)",
        f"  local_attn_fwd_flops_per_s: {loc['fwd']['rate']:.4g}  # torch SDPA (the 'local' algorithm), fit (measured)",
        f"  local_attn_bwd_flops_per_s: {loc['bwd']['rate']:.4g}  # torch SDPA backward via autograd (measured)",
        f"  local_attn_causal_skip: {loc['fwd']['causal_skip']:.3f}  # (measured)",
        f"  attn_ref_head_dim: {b['head_dim']}  # head_dim of the measured attention calls ({b['heads']} heads; the tiny model's)",
        "  attn_head_dim_scale: {}  # not measured: the rates are taken as independent of head_dim",
        f"  layer_overhead_s: {max(0.0, ov['layer_overhead_s']):.4g}  # GPT step time per layer not explained by FLOPs, 1-rank fit (measured)",
        f"  step_overhead_s: {max(0.0, ov['step_overhead_s']):.4g}  # same fit, per step (measured)",
        *_overhead_by_world(m),
        *_sync_penalty(m),
        f"  comm_call_overhead_s: {m.get('glue', {}).get('comm_call_overhead_s', 0.0):.4g}  # host time per communication call around the transfer (pack, reorder): fit, see next line (measured)",
        f"  attn_step_overhead_s: {m.get('glue', {}).get('attn_step_overhead_s', 0.0):.4g}  # host time per synchronous attention step (merge, slicing): ring, attn2d, attn2d_overlap attention alone at N={GLUE_SEQ_LEN} on 4 ranks minus the model without these two terms, non-negative fit (measured)",
        f"  memory_bw_bytes_per_s: {m['optimizer']['memory_bw_bytes_per_s']:.4g}  # AdamW step at 28 B/param (measured)",
        "  optimizer_bytes_per_param: 28  # AdamW fp32: read p, g, m, v; write p, m, v",
        f"  shared_cores: {m['shared_cores'] or 'null'}  # ranks served at full speed at once = world x concurrent / solo GEMM rate, median over worlds (measured: {', '.join(f'{x:.2f}' for x in m['shared_cores_raw'])})",
        f"  threads_per_rank: {m['threads']}  # torch threads per rank during the measurements",
        "network:",
        "  collective_base_latency_s: 0.0  # folded into the per-kind alphas below",
        f"  intra:  # point-to-point ring, {w0} ranks at once (measured; fit median rel. err {fit0['p2p']['median_rel_err']:.0%})",
        f"    call_s: {fit0['p2p']['call_s']:.4g}",
        f"    alpha_s: {fit0['p2p']['alpha_s']:.4g}",
        f"    bw_bytes_per_s: {fit0['p2p']['bw_bytes_per_s']:.4g}",
        "  inter:  # unused: one node",
        "    alpha_s: 1.0e-3  # placeholder, never priced",
        "    bw_bytes_per_s_per_node: 1.0e9  # placeholder, never priced",
        f"  kinds:  # per op kind at {w0} ranks: t = call + steps*alpha + bytes_sent/bw over world and pair groups, all ranks busy (measured)",
    ]
    for k in KINDS:
        if k in fit0:
            f = fit0[k]
            lines += [f"    {k}:  # fit median rel. err {f['median_rel_err']:.0%} (measured)",
                      f"      call_s: {f['call_s']:.4g}", f"      alpha_s: {f['alpha_s']:.4g}",
                      f"      bw_bytes_per_s: {f['bw_bytes_per_s']:.4g}"]
    if len(m["worlds"]) > 1:
        lines.append("  kinds_by_world:  # the same fits at each world size; the cost model interpolates in P (measured)")
        for w in m["worlds"]:
            lines.append(f"    {w}:")
            for k in KINDS:
                if k in m["fits"][w]:
                    f = m["fits"][w][k]
                    lines += [f"      {k}:  # fit median rel. err {f['median_rel_err']:.0%}",
                              f"        call_s: {f['call_s']:.4g}",
                              f"        alpha_s: {f['alpha_s']:.4g}",
                              f"        bw_bytes_per_s: {f['bw_bytes_per_s']:.4g}"]
    lines += [
        "overlap:",
        f"  efficiency: {o['efficiency']:.3f}  # GEMMs beside an async ring transfer at {w0} ranks: compute {o['compute_s']:.4g} s, "
        f"comm {o['comm_s']:.4g} s, both {o['both_s']:.4g} s (measured)",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[4],
                    help="ranks to spawn for the shared measurements (gloo); several sizes: one fit each")
    ap.add_argument("--out", default="conf/hardware/local_cpu.yaml")
    ap.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (as the runs use)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--heads", type=int, default=4, help="heads of the measured attention calls (tiny model: 4)")
    ap.add_argument("--head-dim", type=int, default=16, help="head_dim of the measured attention calls (tiny: 16)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes (tests)")
    args = ap.parse_args(argv)
    if "RANK" in os.environ:
        calibrate_allocation(args)
        return
    m = calibrate(args.world, threads=args.threads, dtype=args.dtype, quick=args.quick, heads=args.heads,
                  head_dim=args.head_dim)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    from attn2d.costmodel import hardware_from_dict

    hw0 = hardware_from_dict(yaml.safe_load(render_profile(m, "tmp")))  # everything but the glue
    m["glue"] = fit_glue(m["algorithms"], hw0, args.heads, args.head_dim)
    text = render_profile(m, args.name or out.stem)
    out.write_text(text)
    raw = out.with_suffix(".raw.json")
    import json

    raw.write_text(json.dumps(m, indent=1, default=float))
    print(text)
    print(f"wrote {out} (raw measurements: {raw})")


if __name__ == "__main__":
    main()
