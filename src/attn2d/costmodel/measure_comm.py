"""Measurements with every rank of a world busy at once (run on each rank: attn2d.testing.run_distributed on CPU,
or in place under torchrun / srun): concurrent compute, point-to-point and collectives per op kind, overlap,
the synchronisation penalty of time-shared cores, and each algorithm's attention alone (its host glue)."""
from __future__ import annotations

import os
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from attn2d.attention import get_attention, layout
from attn2d.costmodel.measure import measure_model_overhead, sync_device, timeit
from attn2d.distributed import ProcessGrid, comm
from attn2d.dtypes import as_dtype

KINDS = ("p2p", "all_gather", "reduce_scatter", "all_to_all", "all_reduce")


def _comm_sizes(device, quick: bool) -> list[int]:
    if device.type == "cuda":
        return [1 << 16, 1 << 20, 1 << 24, 1 << 27]
    return [1 << 12, 1 << 16, 1 << 19, 1 << 21] if quick else [1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22]


def _barrier_time(fn, device, iters: int, repeats: int = 5) -> float:
    """Time per call of a collective fn: the mean over `iters` calls, max over ranks (everyone waits for the
    slowest), minimum over `repeats` (other tenants of a shared machine only ever add time)."""
    fn()
    sync_device(device)
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync_device(device)
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
        t = _barrier_time(partial(comm.send_recv, [(buf, nxt)], [(rbuf, prv)], op="cal"), device, iters)
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
            t = _barrier_time(partial(comm.all_gather, blk, group, op="cal"), device, iters)
            kinds.setdefault("all_gather", []).append((g - 1, bytes_sent, t))
            kinds.setdefault(f"all_gather_{gname}", []).append((g - 1, bytes_sent, t))
            blocks = [blk.clone() for _ in range(g)]
            t = _barrier_time(partial(comm.reduce_scatter, blocks, group, op="cal"), device, iters)
            kinds.setdefault("reduce_scatter", []).append((g - 1, bytes_sent, t))
            t = _barrier_time(partial(comm.all_to_all, blocks, group, op="cal"), device, iters)
            kinds.setdefault("all_to_all", []).append((g - 1, bytes_sent, t))
            flat = torch.randn(max(g, n), device=device)
            t = _barrier_time(partial(comm.all_reduce, flat, group, op="cal"), device, iters)
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
        res["overhead"] = measure_model_overhead(device, as_dtype(dtype_name), rates, quick, share=share,
                                                 shapes=[(1, 64, 4, 64), (2, 64, 4, 64), (4, 64, 4, 64)])
        dist.barrier()
    return res



def algorithm_worker(rank: int, world: int, cases, seq_len: int, heads: int, head_dim: int, reps: int,
                     threads: int) -> dict:
    """Each algorithm's attention alone, forward + backward on tiny shards: the minimum over `reps` of the slowest
    rank's time (everything but the glue around the transfers is priced by the other measurements)."""
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

