"""Hostile input and stalled ranks: every fault ends in a clear error naming the group or rank, fast, never a hang.

Multi-process cases run real gloo ranks (spawned) under a wall-clock bound; the collective timeout is short (5 s)."""
from __future__ import annotations

import datetime
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attn2d.attention import get_attention, shard
from attn2d.distributed import ProcessGrid

TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------------------------- a bounded harness
def _rank_main(rank, world, init_file, out_dir, scenario, timeout_s):
    torch.set_num_threads(1)
    result = Path(out_dir) / f"rank{rank}.txt"
    begin = time.time()
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        dist.barrier()
        begin = time.time()
        SCENARIOS[scenario](rank, world, Path(out_dir))
        result.write_text(f"ok {begin} {time.time()}\n")
    except BaseException as e:  # noqa: BLE001 - the parent reads every rank's outcome
        result.write_text(f"error {begin} {time.time()}\n{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        os._exit(0)  # no teardown: a peer may be stopped, and destroy_process_group would wait on it


def run_ranks(world, scenario, bound_s, stop_rank=None, timeout_s=TIMEOUT_S):
    """Start `world` ranks running SCENARIOS[scenario]; with stop_rank, SIGSTOP that rank once every rank has
    written its 'ready' file. Returns {rank: (status, seconds, text)} for the other ranks: seconds from the SIGSTOP
    (with stop_rank) or from the scenario's start on that rank (after the process group is up) to its outcome;
    ranks still running after `bound_s` seconds are killed and reported as 'hung'."""
    with tempfile.TemporaryDirectory(prefix="attn2d-faults-") as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "rdzv"), tmp, scenario, timeout_s))
                 for r in range(world)]
        for p in procs:
            p.start()
        t0 = time.time()
        try:
            if stop_rank is not None:
                while not all((Path(tmp) / f"ready{r}").exists() for r in range(world)):
                    if time.time() - t0 > bound_s:
                        raise AssertionError("the ranks never got ready")
                    time.sleep(0.05)
                os.kill(procs[stop_rank].pid, signal.SIGSTOP)
                t0 = time.time()
            waiting = [p for r, p in enumerate(procs) if r != stop_rank]
            deadline = t0 + bound_s
            for p in waiting:
                p.join(max(0.1, deadline - time.time()))
            out = {}
            for r in range(world):
                f = Path(tmp) / f"rank{r}.txt"
                if r == stop_rank:
                    continue
                if not f.exists():
                    out[r] = ("hung", None, "")
                    continue
                head, text = f.read_text().split("\n", 1)
                status, begin, t = head.split()
                out[r] = (status, float(t) - (t0 if stop_rank is not None else float(begin)), text)
            return out
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)


# ---------------------------------------------------------------------------------------------- scenarios
def _qkv(seed, n=24, heads=2, dim=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, heads, dim, generator=g, dtype=dtype) for _ in range(3)]


def _stall(rank, world, out):
    """Attention2D on a 2x2 grid, forever; the parent stops one rank after the first step."""
    grid = ProcessGrid(2, 2)
    fn = get_attention("attn2d").fn
    q, k, v = (shard(x, grid, "cyclic") for x in _qkv(0))
    fn(q, k, v, grid=grid)
    (out / f"ready{rank}").touch()
    while True:
        fn(q, k, v, grid=grid)


def _grid_disagree(rank, world, out):
    ProcessGrid(4, 1) if rank == 2 else ProcessGrid(2, 2)


SCENARIOS = {"stall": _stall, "grid_disagree": _grid_disagree}


# ---------------------------------------------------------------------------------------------- item 2
def test_a_stopped_rank_ends_the_others_within_twice_the_timeout_naming_group_and_rank():
    out = run_ranks(4, "stall", bound_s=6 * TIMEOUT_S, stop_rank=3)
    for rank, (status, t, text) in out.items():
        print(rank, status, t, text.splitlines()[:1])
    for rank, (status, t, text) in out.items():
        assert status == "error", f"rank {rank}: {status}"
        assert t < 2 * TIMEOUT_S + 3, f"rank {rank} took {t:.1f} s"
        assert "CollectiveError" in text and "group" in text and "rank 3 stopped answering" in text, text[:800]


def test_ranks_that_disagree_on_the_grid_get_an_error_naming_the_rank():
    out = run_ranks(4, "grid_disagree", bound_s=4 * TIMEOUT_S)
    for rank, (status, t, text) in out.items():
        assert status == "error", f"rank {rank}: {status}"
        assert t < 3, f"rank {rank} took {t:.1f} s"
        assert "rank 2 has grid 4x1, ranks 0,1,3 have grid 2x2" in text, text[:600]


def _inputs_disagree(rank, world, out):
    """Rank 1 passes shards of a longer sequence, rank 3 float32 shards; the others agree."""
    grid = ProcessGrid(2, 2)
    q, k, v = _qkv(0, n=48 if rank == 1 else 24, dtype=torch.float32 if rank == 3 else torch.float64)
    get_attention("attn2d").fn(*(shard(x, grid, "cyclic") for x in (q, k, v)), grid=grid)


def _ring_dtype_disagree(rank, world, out):
    q, k, v = _qkv(0, dtype=torch.float32 if rank == 2 else torch.float64)
    get_attention("ring").fn(*(shard(x, None, "zigzag") for x in (q, k, v)), grid=ProcessGrid(4, 1))


SCENARIOS.update(inputs_disagree=_inputs_disagree, ring_dtype_disagree=_ring_dtype_disagree)


def test_ranks_passing_different_shapes_or_dtypes_get_an_error_naming_the_rank():
    out = run_ranks(4, "inputs_disagree", bound_s=4 * TIMEOUT_S)
    for rank, (status, t, text) in out.items():
        assert status == "error", f"rank {rank}: {status}"
        assert t < 3, f"rank {rank} took {t:.1f} s"
        assert ("attention2d: the ranks disagree on the inputs: rank 1 has positions per rank (N/P) 12, dtype float64; "
                "rank 3 has positions per rank (N/P) 6, dtype float32; ranks 0,2 have positions per rank (N/P) 6, "
                "dtype float64") in text, text[:800]
    ring = run_ranks(4, "ring_dtype_disagree", bound_s=4 * TIMEOUT_S)
    for rank, (status, t, text) in ring.items():
        assert status == "error" and t < 3, (rank, status, t)
        assert "ring_attention: the ranks disagree on the inputs: rank 2 has dtype float32; ranks 0,1,3 have dtype float64" in text, text[:800]


# ---------------------------------------------------------------------------------------------- item 5
def _api_misuse_worker(rank, world):
    from attn2d.attention import layout as lay
    from attn2d.attention.attention2d import attention2d
    from attn2d.attention.attention2d_overlap import attention2d_overlap
    from attn2d.attention.ring import ring_attention
    from attn2d.testing import call_errors

    grid = ProcessGrid(1, 2)
    q, k, v = _qkv(1)  # (B, N, H, D) = (1, 24, 2, 8)
    cyc = [shard(x, grid, "cyclic") for x in (q, k, v)]
    cont = [shard(x, grid, "contiguous") for x in (q, k, v)]
    bhnd = [x.transpose(1, 2).contiguous() for x in cyc]  # (B, H, N/P, D): the wrong axis order
    along2 = [shard(x.transpose(1, 2), grid, "cyclic", dim=2) for x in (q, k, v)]
    other_grid = [shard(x, ProcessGrid(2, 1), "cyclic") for x in (q, k, v)]
    ok = attention2d(*[x.requires_grad_() for x in cyc], grid, heads=2)  # the tag survives requires_grad_()
    return call_errors({
        "contiguous_to_attn2d": lambda: attention2d(*cont, grid),
        "contiguous_to_overlap": lambda: attention2d_overlap(*cont, grid),
        "cyclic_to_ring": lambda: ring_attention(*cyc, grid.group, layout="zigzag"),
        "bhnd_with_heads": lambda: attention2d(*bhnd, grid, heads=2),
        "bhnd_ring_with_heads": lambda: ring_attention(*bhnd, layout="contiguous", heads=2),
        "sharded_along_dim2": lambda: attention2d(*along2, grid),
        "other_grid": lambda: attention2d(*other_grid, grid),
        "unshard_wrong_layout": lambda: lay.unshard(cont[0], grid, "cyclic"),
    }) | {"ok_shape": tuple(ok.shape)}


def test_wrong_layout_axis_order_or_grid_of_a_shard_is_an_error_not_a_wrong_answer():
    from attn2d.testing import assert_errors_match, run_distributed

    for errors in run_distributed(2, _api_misuse_worker, timeout_s=60):
        assert errors.pop("ok_shape") == (1, 12, 2, 8)
        assert_errors_match(errors, {
            "contiguous_to_attn2d": r"attention2d: q is a 'contiguous' shard .* needs the 'cyclic' layout",
            "contiguous_to_overlap": r"attention2d_overlap: q is a 'contiguous' shard .* needs the 'cyclic' layout",
            "cyclic_to_ring": r"ring_attention: q is a 'cyclic' shard .* needs the 'zigzag' layout",
            "bhnd_with_heads": r"q has shape \(1, 2, 12, 8\) but heads=2: .* \(B, H, N/P, D\): pass q.transpose\(1, 2\)",
            "bhnd_ring_with_heads": r"ring_attention: q has shape \(1, 2, 12, 8\) but heads=2",
            "sharded_along_dim2": r"q was sharded along dim 2, but the sequence must be dim 1",
            "other_grid": r"q was sharded for rank \d of grid 2x1, but this call runs on rank \d of grid 1x2",
            "unshard_wrong_layout": r"unshard: the tensor is a 'contiguous' shard .* pass layout='contiguous'",
        })
