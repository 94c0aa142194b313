"""Ring Attention on real gloo processes: output and gradients against the float64 reference (both layouts, causal
and not, fp32 and bf16), every rank's counted communication against comm_ops op by op, and the classic ring
volume 2 (P-1) (N/P) H D B e per rank (independent closed form); clear errors on bad inputs."""

import pytest
import torch
import torch.distributed as dist

from attn2d.attention import get_attention, kernels, layout
from attn2d.attention.kernels import block_pieces
from attn2d.attention.ring import BWD_OPS, FWD_OPS, comm_ops, ring_attention, step_spans
from attn2d.distributed import GridError, ProcessGrid, count_comm
from attn2d.distributed.comm import total_comm
from attn2d.testing import (
    assert_errors_match,
    assert_matches_reference,
    call_errors,
    counting_backend_calls,
    random_case,
    run_distributed,
)

B, H, D = 2, 3, 80  # head_dim of GPT-3 2.7B
N = 24  # a multiple of 2P for every P used: 1, 2, 3, 4
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
LAYOUTS = {1: ("zigzag", "contiguous"), 2: ("zigzag", "contiguous"), 3: ("contiguous", "zigzag"),
           4: ("zigzag", "contiguous")}


def _make_cases(world):
    cases = [random_case(1000 * world + 10 * i + 2 * causal + (dtype == "bfloat16"), (B, N, H, D),
                         layout=lay, causal=causal, dtype=dtype)
             for i, lay in enumerate(LAYOUTS[world]) for causal in (True, False) for dtype in ("float32", "bfloat16")]
    if world in (2, 4):  # grouped-query attention: one k/v head for q's three
        cases.append(random_case(7 * world, (B, N, H, D), kv_heads=1, layout="zigzag", causal=True, dtype="float32"))
    return cases


def _cases_worker(rank, world, cases):
    results = []
    grid = ProcessGrid(1, world)  # the registry entry: any grid shape, only its size matters
    for n, case in enumerate(cases):
        dt = getattr(torch, case["dtype"])
        q, k, v = (layout.shard(case[x].to(dt), None, case["layout"]).requires_grad_() for x in "qkv")  # (B, N/P, H, D)
        dout = layout.shard(case["dout"].to(dt), None, case["layout"])
        with count_comm() as fwd:
            if n % 2:  # every other case through the registry, as the model calls it
                name = "ring" if case["layout"] == "zigzag" else "ring_contiguous"
                out = get_attention(name).fn(q, k, v, grid=grid, causal=case["causal"])
            else:
                out = ring_attention(q, k, v, causal=case["causal"], layout=case["layout"])
        with count_comm() as bwd:
            out.backward(dout)
        results.append(dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad, fwd=fwd.as_dict(), bwd=bwd.as_dict()))
    if world == 1:
        results.append(_bad_inputs())
    if world == 4:
        results.append(_subgroup_case(rank, cases[0]))
        results.append(_kernel_calls(cases[0]))
    return results


def _kernel_calls(case):
    """Backend calls of one zigzag causal fp32 forward and backward on this rank, counted by wrapping the backend's
    entry points (the kernel layer looks them up at every call)."""
    name = kernels.resolve_backend(device="cpu", dtype=torch.float32, head_dim=D)
    with counting_backend_calls(name) as calls:
        q, k, v = (layout.shard(case[x].float(), None, "zigzag").requires_grad_() for x in "qkv")
        out = ring_attention(q, k, v, causal=True, layout="zigzag")
        n_fwd = len(calls)
        out.backward(layout.shard(case["dout"].float(), None, "zigzag"))
    return dict(fwd=calls[:n_fwd], bwd=calls[n_fwd:])


def _subgroup_case(rank, case):
    """Two independent rings of 2 over the strided subgroups {0, 2} and {1, 3} (neighbours are global ranks)."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # collective: every rank creates both
    group = groups[rank % 2]
    q, k, v = (layout.shard(case[x].float(), group, "zigzag").requires_grad_() for x in "qkv")  # (B, N/2, H, D)
    with count_comm() as stats:
        out = ring_attention(q, k, v, group=group, causal=True, layout="zigzag")
        out.backward(layout.shard(case["dout"].float(), group, "zigzag"))
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad, comm=stats.as_dict())


def _bad_inputs():
    """Each bad call's error message (world 1)."""
    x = torch.randn(1, 8, 2, 4)
    calls = {
        "shape": lambda: ring_attention(x, torch.randn(1, 6, 2, 4), x),
        "dtype": lambda: ring_attention(x, x.double(), x),
        "device": lambda: ring_attention(x, x, x.to("meta")),
        "heads": lambda: ring_attention(x, torch.randn(1, 8, 3, 4), torch.randn(1, 8, 3, 4)),
        "dims": lambda: ring_attention(x[0], x[0], x[0]),
        "int": lambda: ring_attention(x.long(), x.long(), x.long()),
        "zigzag": lambda: ring_attention(x[:, :5], x[:, :5], x[:, :5], layout="zigzag"),
        "layout": lambda: ring_attention(x, x, x, layout="cyclic"),
        "empty": lambda: ring_attention(x[:, :0], x[:, :0], x[:, :0], layout="contiguous"),
    }
    return call_errors(calls)


def _check_world(world):
    cases = _make_cases(world)
    per_rank = run_distributed(world, _cases_worker, cases, timeout_s=240)
    for i, case in enumerate(cases):
        lay, causal, dtype = case["layout"], case["causal"], case["dtype"]
        h_kv = case["k"].shape[2]  # only K/V (and dK/dV) circulate: every volume below has h_kv heads
        label = f"P={world} {lay} causal={causal} {dtype}" + (f" kv_heads={h_kv}" if h_kv != H else "")
        results = [per_rank[rk][i] for rk in range(world)]
        assert_matches_reference(case, results, lay, world, 1, TOL[dtype], label)
        dt = getattr(torch, dtype)
        for rk, res in enumerate(results):
            ops = comm_ops(B, N, H, D, world, 1, dt, causal, rank=rk, layout=lay, kv_heads=h_kv)
            for phase in ("fwd", "bwd"):
                want = total_comm(ops, phase)
                assert res[phase] == want, f"{label} rank {rk} {phase}: counted {res[phase]} != predicted {want}"
            # the classic ring volume, written independently: 2 (P-1) (N/P) H D B e, P-1 messages
            classic = 2 * (world - 1) * (N // world) * h_kv * D * B * dt.itemsize
            assert res["fwd"]["bytes_sent"] == res["fwd"]["bytes_received"] == classic, label
            assert res["fwd"]["messages"] == world - 1, label
            # backward: K/V once more (P-1 times, input dtype) and fp32 dK/dV P times, P+1 messages
            bwd = ((world - 1) * 2 * (N // world) * h_kv * D * B * dt.itemsize
                   + world * 2 * (N // world) * h_kv * D * B * 4)
            assert res["bwd"]["bytes_sent"] == (bwd if world > 1 else 0), label
            assert res["bwd"]["messages"] == (world + 1 if world > 1 else 0), label
    if world == 1:
        _check_errors(per_rank[0][-1])
    if world == 4:
        _check_subgroups(cases[0], [per_rank[rk][-2] for rk in range(world)])
        _check_kernel_calls(cases[0], world, [per_rank[rk][-1] for rk in range(world)])


def _check_kernel_calls(case, world, results):
    """Zigzag, causal: ONE kernel call per ring step and rank, each way (P = 4: 4 forward + 4 backward), with the
    shapes of the zigzag plan: step 0 all n rows x n keys (causal); a lower source rank n x n/2 (first chunk
    received); a higher one n/2 x n (second local chunk)."""
    assert case["layout"] == "zigzag" and case["causal"]
    n = N // world
    for rank, res in enumerate(results):
        want = [(n, n)] + [(n, n // 2) if (rank - s) % world < rank else (n // 2, n) for s in range(1, world)]
        assert res["fwd"] == [("fwd", *w) for w in want], (rank, res["fwd"])
        assert res["bwd"] == [("bwd", *w) for w in want], (rank, res["bwd"])


def _check_subgroups(case, results):
    assert case["layout"] == "zigzag" and case["causal"] and case["dtype"] == "float32"
    for members in ([0, 2], [1, 3]):
        sub = [results[rk] for rk in members]
        assert_matches_reference(case, sub, "zigzag", 2, 1, TOL["float32"], f"subgroup {members}")
        for res in sub:
            assert res["comm"] == total_comm(comm_ops(B, N, H, D, 2, 1, torch.float32, True)), members


def _check_errors(errors):
    expected = {
        "shape": r"q \(1, 8, 2, 4\), k \(1, 6, 2, 4\).*one shape",
        "dtype": r"dtypes differ: torch.float32, torch.float64",
        "device": r"devices differ: cpu, cpu, meta",
        "heads": r"heads differ: q has 2, k 3, v 3; .*grouped-query",
        "dims": r"q has shape \(8, 2, 4\); expected 4 dims",
        "int": r"q has dtype torch.int64; expected a floating dtype",
        "zigzag": r"holds 5 positions, so seq_len = 1 x 5 = 5 is not a multiple of 2P = 2.*nearest: 4 or 6",
        "layout": r"unknown layout 'cyclic'; use one of zigzag, contiguous",
        "empty": r"holds 0 positions",
    }
    assert_errors_match(errors, expected)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_matches_reference_and_comm_model(world):
    _check_world(world)


def _work(lay, P, seq_len, rank, step):
    """Visible (query, key) pairs the kernel computes for one ring step (from its piece plan)."""
    q_pos, k_pos = step_spans(lay, seq_len, rank, P, step)
    n = seq_len // P
    total = 0
    for p in block_pieces(q_pos, k_pos, n, n, causal=True):
        rows, keys = p.n_q, p.n_k
        total += rows * keys if p.kind == "full" else rows * (keys - rows) + rows * (rows + 1) // 2
    return total


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    P, seq_len = 4, 64
    causal_pairs = seq_len * (seq_len + 1) // 2
    for lay in ("zigzag", "contiguous"):
        work = [[_work(lay, P, seq_len, i, s) for s in range(P)] for i in range(P)]  # work[rank][step]
        assert sum(map(sum, work)) == causal_pairs, lay  # every visible pair exactly once
        if lay == "zigzag":  # the same work on every rank at every step after the diagonal one
            assert len({sum(w) for w in work}) == 1, work
            assert len({work[i][s] for i in range(P) for s in range(1, P)}) == 1, work
        else:  # rank i only has work at steps s <= i: its diagonal triangle and i full n x n blocks
            n = seq_len // P
            assert all(work[i][s] == 0 for i in range(P) for s in range(i + 1, P)), work
            assert [sum(w) for w in work] == [n * (n + 1) // 2 + i * n * n for i in range(P)], work


def test_comm_ops_names_volume_and_errors():
    ops = comm_ops(B, 64, H, D, 4, 1, "bf16", True)
    assert ops == comm_ops(B, 64, H, D, 2, 2, torch.bfloat16, False, rank=3, layout="contiguous")  # shape-free
    assert tuple(o.name for o in ops if o.phase == "fwd") == FWD_OPS == ("kv_ring",)
    assert tuple(o.name for o in ops if o.phase == "bwd") == BWD_OPS == ("kv_dkv_ring", "dkv_to_owner")
    assert [o.overlapped for o in ops] == [True, True, False]
    assert comm_ops(B, 24, H, D, 1, 1, "float32", True) == []
    # the forward volume per rank does not fall with P: 2 (P-1)/P N H D B e -> 2 N H D B e
    fwd = [total_comm(comm_ops(1, 1 << 12, 1, 1, P, 1, "bf16", True), "fwd")["bytes_sent"] for P in (2, 4, 8, 16)]
    assert fwd == [2 * (P - 1) * (1 << 12) // P * 2 for P in (2, 4, 8, 16)] and fwd == sorted(fwd)
    with pytest.raises(GridError, match=r"seq_len 36 .* 4 ranks x 2 chunks.*multiple of 8"):
        comm_ops(B, 36, H, D, 4, 1, "float32", True)
    assert comm_ops(B, 36, H, D, 4, 1, "float32", True, layout="contiguous")  # fine without zigzag's chunks
    with pytest.raises(ValueError, match=r"rank 4 is not in the ring of 4 ranks"):
        comm_ops(B, 48, H, D, 4, 1, "float32", True, rank=4)
    with pytest.raises(ValueError, match=r"unknown ring layout 'cyclic'"):
        comm_ops(B, 48, H, D, 4, 1, "float32", True, layout="cyclic")


def test_registered_in_the_registry():
    zig, cont = get_attention("ring"), get_attention("ring_contiguous")
    assert (zig.layout, cont.layout) == ("zigzag", "contiguous")
    assert zig.comm_ops is comm_ops
    assert cont.comm_ops(B, 36, H, D, 4, 1, "bf16", True) == comm_ops(B, 36, H, D, 4, 1, "bf16", True,
                                                                         layout="contiguous")


def test_bench_attention_runs_torch_ring_beside_ours(tmp_path, monkeypatch):
    """The CPU benchmark (tiny, P = 2): torch's own ring runs beside ours where this torch has it (else one skip
    line), both match SDPA, send the same bytes (ours counted by comm, torch's from its functional collectives),
    make P kernel calls per pass; each record names its command and machine and the fastest ring."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_attention", bench)  # the spawned ranks import its worker by this name
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.jsonl"
    argv = ["--world", "2", "--seq", "64", "--heads", "2", "--head-dim", "16", "--repeats", "2", "--warmup", "0",
            "--algorithms", "ring", "--timeout", "120", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = {r["algorithm"]: r for r in map(json.loads, out.read_text().splitlines())}
    has_torch_ring = bench.peer_rings._torch_cp()[1] is None
    assert set(rows) == ({"ring", "torch_ring", "torch_ring_a2a"} if has_torch_ring else {"ring"})
    for r in rows.values():
        assert r["check_ok"] and r["kernel_calls_fwd"] == r["kernel_calls_bwd"] == 2, r
        assert r["bytes_fwd_bwd"] == rows["ring"]["bytes_fwd_bwd"] > 0
        assert r["command"].endswith(" ".join(argv)) and "torch" in r["machine"]
        assert r["vs_fastest_ring"] in rows and min(x["time_fwd_bwd_s"] for x in rows.values()) == \
            rows[r["vs_fastest_ring"]]["time_fwd_bwd_s"]
        med, lo, hi = r["speedup_fwd_bwd_vs_fastest_ring_paired"]  # per-round ratios, one per --repeats round
        base_t = rows[r["vs_fastest_ring"]]["times_fwd_bwd_s"]
        assert lo <= med <= hi and {lo, hi} <= {b / t for b, t in zip(base_t, r["times_fwd_bwd_s"])}
    assert rows[rows["ring"]["vs_fastest_ring"]]["speedup_fwd_bwd_vs_fastest_ring_paired"] == [1.0, 1.0, 1.0]
