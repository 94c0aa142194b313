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


def run_ranks(world, scenario, bound_s, stop_rank=None, timeout_s=TIMEOUT_S, sig=signal.SIGSTOP):
    """Start `world` ranks running SCENARIOS[scenario]; with stop_rank, send `sig` to that rank once every rank has
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
                os.kill(procs[stop_rank].pid, sig)
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
    out = run_ranks(4, "stall", bound_s=90, stop_rank=3)
    for rank, (status, t, text) in out.items():
        assert status == "error", f"rank {rank}: {status}"
        assert t < 2 * TIMEOUT_S + 3, f"rank {rank} took {t:.1f} s"
        assert "CollectiveError" in text and "group" in text and "rank 3 stopped answering" in text, text[:800]
        print(f"stopped rank 3: rank {rank} failed after {t:.1f} s: {text.splitlines()[0][:160]}")


def test_a_killed_rank_is_named_by_the_others_fast():
    """SIGKILL: gloo says "Connection reset by peer" (or times out); the error names the dead rank."""
    out = run_ranks(4, "stall", bound_s=90, stop_rank=1, sig=signal.SIGKILL)
    for rank, (status, t, text) in out.items():
        assert status == "error", f"rank {rank}: {status}"
        assert t < 2 * TIMEOUT_S + 3, f"rank {rank} took {t:.1f} s"
        assert "CollectiveError" in text and "rank 1 stopped answering" in text, text[:800]
        print(f"killed rank 1: rank {rank} failed after {t:.1f} s: {text.splitlines()[0][:160]}")


def test_ranks_that_disagree_on_the_grid_get_an_error_naming_the_rank():
    out = run_ranks(4, "grid_disagree", bound_s=90)  # the bound only ends a hang; the check is t
    for rank, (status, t, text) in out.items():
        assert status == "error", f"rank {rank}: {status}"
        assert t < 3, f"rank {rank} took {t:.1f} s"
        assert "rank 2 has grid 4x1, ranks 0,1,3 have grid 2x2" in text, text[:600]
        print(f"grid 4x1 on rank 2: rank {rank} failed after {t:.2f} s")


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
    out = run_ranks(4, "inputs_disagree", bound_s=90)
    for rank, (status, t, text) in out.items():
        assert status == "error", f"rank {rank}: {status}"
        assert t < 3, f"rank {rank} took {t:.1f} s"
        assert ("attention2d: the ranks disagree on the inputs: rank 1 has positions per rank (N/P) 12, dtype float64; "
                "rank 3 has positions per rank (N/P) 6, dtype float32; ranks 0,2 have positions per rank (N/P) 6, "
                "dtype float64") in text, text[:800]
        print(f"N/P and dtype differ: rank {rank} failed after {t:.2f} s")
    ring = run_ranks(4, "ring_dtype_disagree", bound_s=90)
    for rank, (status, t, text) in ring.items():
        assert status == "error" and t < 3, (rank, status, t)
        assert ("ring_attention: the ranks disagree on the inputs: rank 2 has dtype float32; ranks 0,1,3 have dtype "
                "float64") in text, text[:800]


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
            "bhnd_with_heads": (r"q has shape \(1, 2, 12, 8\) but heads=2: .* \(B, H, N/P, D\): "
                                r"pass q.transpose\(1, 2\)"),
            "bhnd_ring_with_heads": r"ring_attention: q has shape \(1, 2, 12, 8\) but heads=2",
            "sharded_along_dim2": r"q was sharded along dim 2, but the sequence must be dim 1",
            "other_grid": r"q was sharded for rank \d of grid 2x1, but this call runs on rank \d of grid 1x2",
            "unshard_wrong_layout": r"unshard: the tensor is a 'contiguous' shard .* pass layout='contiguous'",
        })


# ---------------------------------------------------------------------------------------------- item 6
PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
CLI = ["model=tiny", "benchmark=cpu_small", "benchmark.seq_len=64", "benchmark.steps=1", "benchmark.progress=false"]


def _cli(args, cwd, launcher=(PY, "-m", "attn2d.train"), timeout=120):
    import subprocess

    return subprocess.run([*launcher, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_grid_mismatch_is_reported_once_in_one_run_dir(tmp_path):
    t0 = time.time()
    p = _cli([*CLI, "attention=attn2d", "grid=1x2"], cwd=tmp_path, launcher=(
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m", "attn2d.train"))
    took = time.time() - t0
    assert p.returncode != 0
    ours = [line for line in p.stderr.splitlines() if "ConfigError" in line]
    assert ours == ["ConfigError: invalid config: grid 1x2 needs 2 ranks, but the world has 4; "
                    "grids that fit 4 ranks: 1x4, 2x2, 4x1"], p.stderr[-3000:]
    assert "Error executing job" not in p.stderr
    assert p.stderr.count("Traceback") <= 1  # torchrun's own summary of the failed ranks, none of ours
    (run_dir,) = (tmp_path / "runs" / "adhoc").iterdir()  # every rank resolved one run dir
    assert (run_dir / "metrics.jsonl").exists()
    print(f"torchrun grid mismatch: {took:.1f} s, {len(p.stderr.splitlines())} lines of stderr in all")


def test_launch_time_is_one_value_for_every_rank_of_a_torchrun_launch():
    """Ranks started a second apart (as torchrun's agent starts them, one process each) resolve one run dir."""
    import subprocess

    code = "import attn2d.config as c, omegaconf as o; print(o.OmegaConf.create({'d': '${attn2d.now:%H-%M-%S.%f}'}).d)"
    def stamp(env):
        return subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env}, check=True).stdout.strip()
    first = stamp({"TORCHELASTIC_RUN_ID": "x"})
    time.sleep(1.1)
    second, plain = stamp({"TORCHELASTIC_RUN_ID": "x"}), stamp({})
    assert first == second  # children of one launcher (here: this process): one time
    assert plain > second  # plain python: the run's own time (later than its parent's start)


def test_plain_python_with_a_multi_rank_grid_says_how_to_launch_it(tmp_path):
    p = _cli([*CLI, "attention=attn2d", "grid=2x2", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert p.returncode == 1
    assert ("this grid needs 4 ranks: run it with `torchrun --nproc-per-node 4 -m attn2d.train ...` or a launcher"
            in p.stderr) and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("value", ["-1", "0", "abc", "inf", "nan"])
def test_timeout_s_is_validated_at_config_time(value):
    from attn2d.config import ConfigError, compose, timeout_s_of, validate

    cfg = compose([f"benchmark.timeout_s={value}"])
    with pytest.raises(ConfigError, match=rf"benchmark.timeout_s '?{value}'? is not a number of seconds > 0"):
        timeout_s_of(cfg)  # what train.py checks before any process group exists
    if value != "abc":  # a string fails OmegaConf's type check first (naming the key too)
        with pytest.raises(ConfigError, match=rf"benchmark.timeout_s {value}(.0)? is not a number of seconds > 0"):
            validate(cfg, world_size=1)
    assert timeout_s_of(compose(["benchmark.timeout_s=7"])) == 7.0


def test_timeout_s_rejected_by_the_cli_without_a_traceback(tmp_path):
    p = _cli([*CLI, "attention=local", "benchmark.timeout_s=-1", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "ConfigError: invalid config: benchmark.timeout_s -1 is not a number of seconds > 0 (e.g. 300)"], p.stderr


def _grid_timeout_worker(rank, world):
    from attn2d.distributed import health

    grid = ProcessGrid(2, 1)
    short = ProcessGrid(2, 1, timeout_s=3)
    return [health.group_timeout(g).total_seconds() for g in (None, grid.row_group, grid.col_group, short.col_group)]


def test_row_and_column_groups_get_the_world_timeout():
    from attn2d.testing import run_distributed

    for timeouts in run_distributed(2, _grid_timeout_worker, timeout_s=17):
        assert timeouts == [17.0, 17.0, 17.0, 3.0]


def test_one_report_per_failed_run_and_own_errors_of_other_ranks_are_not_lost(capsys):
    from attn2d.config import ConfigError
    from attn2d.distributed.health import CollectiveError
    from attn2d.train import report_failure

    def err(silent):
        e = CollectiveError(f"rank 1: q_row_all_gather on the row group 0 ... silent {silent}")
        e.silent = silent
        return e

    said = {(rank, name): report_failure(e, rank) for rank, name, e in [
        (0, "config", ConfigError("invalid config: grid 1x2 needs 2 ranks")), (1, "config", ConfigError("same")),
        (1, "peer_3_silent", err([3])), (1, "rank_0_silent", err([0])), (1, "store_gone", err(None)),
        (2, "own_bug", RuntimeError("boom on rank 2 only"))]}
    assert said == {(0, "config"): True, (1, "config"): False, (1, "peer_3_silent"): False,
                    (1, "rank_0_silent"): True, (1, "store_gone"): True, (2, "own_bug"): True}
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "ConfigError: invalid config: grid 1x2 needs 2 ranks" and "rank 2:" in lines
    assert lines[-1] == "RuntimeError: boom on rank 2 only" and "Traceback" not in "\n".join(lines[:3])
