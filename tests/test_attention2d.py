"""Attention2D-NO on real gloo processes: output and gradients against the float64 reference, and every rank's
counted communication against comm_ops (forward and backward) and the paper's volume formula."""
import unittest.mock

import pytest
import torch

import attn2d
import attn2d.attention
from attn2d.attention import get_attention, layout, ring
from attn2d.attention.attention2d import BWD_OPS, FWD_OPS, attention2d, comm_ops, kv_recv_peer, kv_send_peer
from attn2d.distributed import GridError, ProcessGrid, count_comm
from attn2d.distributed.comm import total_comm
from attn2d.testing import assert_errors_match, assert_matches_reference, call_errors, random_case, run_distributed

B, H, D = 2, 3, 80  # head_dim of GPT-3 2.7B
N = 36  # divisible by every P used: 1, 4, 6, 9
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
GRIDS = {1: [(1, 1)], 4: [(2, 2), (1, 4), (4, 1)], 6: [(2, 3), (3, 2)], 9: [(3, 3)]}
GQA_WORLDS = (4, 6)


def _make_cases(world):
    cases = [random_case(1000 * world + 10 * i + 2 * causal + (dtype == "bfloat16"), (B, N, H, D),
                         rows=rows, cols=cols, causal=causal, dtype=dtype)
             for i, (rows, cols) in enumerate(GRIDS[world]) for causal in (True, False)
             for dtype in ("float32", "bfloat16")]
    if world in GQA_WORLDS:  # grouped-query attention: one k/v head for q's three, on the first grid of this P
        rows, cols = GRIDS[world][0]
        cases.append(random_case(7 * world, (B, N, H, D), kv_heads=1, rows=rows, cols=cols, causal=True,
                                 dtype="float32"))
    return cases


def _cases_worker(rank, world, cases):
    grids, results = {}, []
    for case in cases:
        shape = (case["rows"], case["cols"])
        if shape not in grids:
            grids[shape] = ProcessGrid(*shape)
        grid = grids[shape]
        dt = getattr(torch, case["dtype"])
        q, k, v = (layout.shard(case[x].to(dt), grid, "cyclic").requires_grad_() for x in "qkv")  # (B, N/P, H, D)
        dout = layout.shard(case["dout"].to(dt), grid, "cyclic")
        with count_comm() as fwd:
            out = attention2d(q, k, v, grid, causal=case["causal"])
        with count_comm() as bwd:
            out.backward(dout)
        results.append(dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad, fwd=fwd.as_dict(), bwd=bwd.as_dict()))
    return results


def _bad_inputs_worker(rank, world):
    """Each bad call's error message (world 1, grid 1x1)."""
    grid = ProcessGrid(1, 1)
    x = torch.randn(1, 8, 2, 4)
    calls = {
        "shape": lambda: attention2d(x, torch.randn(1, 6, 2, 4), x, grid),
        "dtype": lambda: attention2d(x, x.double(), x, grid),
        "device": lambda: attention2d(x, x, x.to("meta"), grid),
        "heads": lambda: attention2d(x, torch.randn(1, 8, 3, 4), torch.randn(1, 8, 3, 4), grid),
        "dims": lambda: attention2d(x[0], x[0], x[0], grid),
        "grid": lambda: attention2d(x, x, x, None),
        "empty": lambda: attention2d(x[:, :0], x[:, :0], x[:, :0], grid),
        "world": lambda: ProcessGrid(2, 2),
    }
    return call_errors(calls)


def _paper_forward_bytes(rows, cols, rk, dtype):
    """Independent closed form for square grids: B H (N/P) [(4(s-1) + 2 delta) D e + (s-1) l], delta = off-diagonal."""
    s, (r, c) = rows, divmod(rk, cols)
    e, lse = torch.empty((), dtype=getattr(torch, dtype)).element_size(), 4
    return B * H * (N // (s * s)) * ((4 * (s - 1) + 2 * (r != c)) * D * e + (s - 1) * lse)


def _check_world(world):
    cases = _make_cases(world)
    per_rank = run_distributed(world, _cases_worker, cases, timeout_s=240)
    for i, case in enumerate(cases):
        rows, cols, causal, dtype = case["rows"], case["cols"], case["causal"], case["dtype"]
        h_kv = case["k"].shape[2]
        label = f"{rows}x{cols} causal={causal} {dtype}" + (f" kv_heads={h_kv}" if h_kv != H else "")
        results = [per_rank[rk][i] for rk in range(world)]
        assert_matches_reference(case, results, "cyclic", rows, cols, TOL[dtype], label)
        dt = getattr(torch, dtype)
        # communication: counted == predicted, op by op, on every rank
        for rk, res in enumerate(results):
            ops = comm_ops(B, N, H, D, rows, cols, dt, causal, rank=rk, kv_heads=h_kv)
            for phase in ("fwd", "bwd"):
                want = total_comm(ops, phase)
                assert res[phase] == want, f"{label} rank {rk} {phase}: counted {res[phase]} != predicted {want}"
            # backward, written independently: row gather of (q, dout) in the input dtype and (lse, delta) in fp32,
            # K/V column gather, fp32 dq / dk, dv reduce-scatters, inverse K/V permutation
            r, c = divmod(rk, cols)
            moves = (r + c * rows) != (c + r * cols)
            e, n = dt.itemsize, B * (N // world)  # K/V and dK/dV travel with h_kv heads, the rest with H
            bwd = n * (H * (cols - 1) * (2 * D * e + 2 * 4) + h_kv * 2 * (rows - 1) * D * e + H * (cols - 1) * D * 4
                       + h_kv * (2 * (rows - 1) * D * 4 + 2 * D * 4 * moves))
            assert res["bwd"]["bytes_sent"] == res["bwd"]["bytes_received"] == bwd, f"{label} rank {rk} backward"
            if h_kv != H:  # forward, independently: K/V terms with h_kv heads, q and (out, lse) with H
                fwd = n * (h_kv * (2 * D * e * moves + 2 * (rows - 1) * D * e) + H * (cols - 1) * (2 * D * e + 4))
                assert res["fwd"]["bytes_sent"] == fwd, f"{label} rank {rk} forward"
            elif rows == cols:
                assert res["fwd"]["bytes_sent"] == _paper_forward_bytes(rows, cols, rk, dtype), label
                assert res["fwd"]["bytes_received"] == res["fwd"]["bytes_sent"], label
                if r != c:  # the paper's [4(sqrt(P)-1)+2] N H / P elements per head (H = head_dim): within 1 %
                    paper = (4 * (rows - 1) + 2) * N * D // world * B * H * dt.itemsize
                    assert abs(res["fwd"]["bytes_sent"] / paper - 1) < 0.01, f"{label} rank {rk}"
                    ring = 2 * (world - 1) * N * D // world * B * H * dt.itemsize  # Ring Attention forward
                    assert (res["fwd"]["bytes_sent"] < ring) == (world > 4), f"{label}: attn2d vs ring volume"


@pytest.mark.parametrize("world", [1, 4, 6, 9])
def test_attention2d_matches_reference_and_comm_model(world):
    _check_world(world)


def test_kv_permutation_is_a_bijection_to_row_major():
    for rows, cols in [(1, 1), (2, 2), (1, 4), (4, 1), (2, 3), (3, 2), (3, 3), (2, 4), (4, 2)]:
        world = rows * cols
        dests = [kv_send_peer(r, c, rows, cols) for r in range(rows) for c in range(cols)]
        assert sorted(dests) == [(r, c) for r in range(rows) for c in range(cols)], (rows, cols)
        for r in range(rows):
            for c in range(cols):
                # the sender of my row-major class c + r*cols holds it column-major: r' + c'*rows == c + r*cols
                rs, cs = kv_recv_peer(r, c, rows, cols)
                assert rs + cs * rows == c + r * cols
                assert kv_send_peer(rs, cs, rows, cols) == (r, c)
                if rows == cols:
                    assert (rs, cs) == (c, r)  # the paper's transpose peer
        if rows == 1 or cols == 1:  # 1-D grids: column-major == row-major, nothing moves
            assert dests == [divmod(k, cols) for k in range(world)]


def test_comm_ops_names_typical_rank_and_errors():
    ops = comm_ops(B, 64, H, D, 2, 2, "bf16", True)
    assert ops == comm_ops(B, 64, H, D, 2, 2, torch.bfloat16, True, rank=1)  # rank 1 = p(0,1), off-diagonal
    assert tuple(o.name for o in ops if o.phase == "fwd") == FWD_OPS == ("kv_to_row_major", "q_row_all_gather",
                                                                         "kv_col_all_gather", "out_row_reduce_scatter")
    assert tuple(o.name for o in ops if o.phase == "bwd") == BWD_OPS
    assert "kv_to_row_major" not in [o.name for o in comm_ops(B, 64, H, D, 2, 2, "bf16", True, rank=3)]  # diagonal
    assert comm_ops(B, 36, H, D, 1, 1, "float32", True) == []
    # backward gradients travel in fp32 whatever the input dtype
    dq = [o for o in ops if o.name == "dq_row_reduce_scatter"][0]
    assert dq.bytes_sent == B * H * (64 // 4) * D * 4
    with pytest.raises(GridError, match=r"seq_len 37 .* 4 ranks.*multiple of 4"):
        comm_ops(B, 37, H, D, 2, 2, "float32", True)
    with pytest.raises(ValueError, match=r"rank 4 is not in the 2x2 grid"):
        comm_ops(B, 36, H, D, 2, 2, "float32", True, rank=4)


def test_registered_in_the_registry():
    impl = get_attention("attn2d")
    assert impl.fn is attention2d and impl.layout == "cyclic" and impl.comm_ops is comm_ops


def test_bad_inputs_raise_clear_errors():
    errors = run_distributed(1, _bad_inputs_worker)[0]
    expected = {
        "shape": r"q \(1, 8, 2, 4\), k \(1, 6, 2, 4\).*one shape",
        "dtype": r"dtypes differ: torch.float32, torch.float64",
        "device": r"devices differ: cpu, cpu, meta",
        "heads": r"heads differ: q has 2, k 3, v 3; .*divides q's \(grouped-query attention\)",
        "dims": r"q has shape \(8, 2, 4\); expected 4 dims",
        "grid": r"needs an attn2d.distributed.ProcessGrid, got NoneType",
        "empty": r"holds 0 positions.*multiple of P = 1x1 = 1",
        "world": r"grid 2x2 needs 4 ranks, but the world has 1",
    }
    assert_errors_match(errors, expected)



PUBLIC_CASES = [  # (public function, layout, how the group is given, registry entry it must be or call)
    ("attention2d", "cyclic", "grid", "attn2d"),
    ("attention2d_overlap", "cyclic", "grid", "attn2d_overlap"),
    ("ring_attention", "zigzag", "grid", "ring"),
    ("ring_attention", "contiguous", "world", "ring_contiguous"),
]


def _public_worker(rank, world, case):
    grid = ProcessGrid(2, 2)
    results = []
    for fn_name, lay, how, _ in PUBLIC_CASES:
        fn = getattr(attn2d, fn_name)
        assert fn is getattr(attn2d.attention, fn_name)
        q, k, v = (layout.shard(case[x].float(), grid, lay).requires_grad_() for x in "qkv")  # (B, N/P, H, D)
        if fn_name == "ring_attention":
            out = fn(q, k, v, grid if how == "grid" else None, causal=True, layout=lay)
        else:
            out = fn(q, k, v, grid, causal=True)
        out.backward(layout.shard(case["dout"].float(), grid, lay))
        results.append(dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad))
    return results


def test_public_functions_are_the_registered_ones_and_match_reference():
    """attn2d.attention2d, attention2d_overlap and ring_attention: the registry's functions (the ring entries call
    ring_attention with their layout), importable from attn2d and attn2d.attention, exact on a 2x2 gloo run."""
    assert get_attention("attn2d").fn is attn2d.attention2d is attn2d.attention.attention2d is attention2d
    assert get_attention("attn2d_overlap").fn is attn2d.attention2d_overlap is attn2d.attention.attention2d_overlap
    assert attn2d.ring_attention is attn2d.attention.ring_attention
    with unittest.mock.patch.object(ring, "ring_attention", wraps=ring.ring_attention) as spy:
        x = torch.randn(1, 8, 2, 4)
        for name, lay in (("ring", "zigzag"), ("ring_contiguous", "contiguous")):
            get_attention(name).fn(x, x, x, grid=None, causal=True)
            assert spy.call_args.kwargs["layout"] == lay
    case = random_case(5, (B, 32, H, D), causal=True, dtype="float32")  # zigzag over 4 ranks: a multiple of 8
    per_rank = run_distributed(4, _public_worker, case, timeout_s=240)
    for i, (fn_name, lay, how, entry) in enumerate(PUBLIC_CASES):
        assert_matches_reference(case, [r[i] for r in per_rank], lay, 2, 2, TOL["float32"],
                                 f"attn2d.{fn_name} ({lay}, {how}; registry {entry!r})")
