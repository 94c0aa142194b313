"""Attention2D-O (Algorithms 4-6) on real gloo processes: outputs and gradients against the float64 oracle, counted
communication against comm_ops, and the overlap schedule (post, compute, wait) against the ops marked overlapped."""
import itertools
import re

import pytest
import torch

from attn2d.attention import get_attention, kernels
from attn2d.attention.attention2d import comm_ops as no_comm_ops
from attn2d.attention.attention2d_overlap import attention2d_overlap, comm_ops
from attn2d.attention.layout import shard, unshard
from attn2d.attention.reference import reference_attention
from attn2d.distributed import ProcessGrid, comm, count_comm
from attn2d.distributed.comm import total_comm
from attn2d.testing import rel_error, run_distributed

B, N, H, D = 2, 36, 3, 80  # N divisible by P = 1, 4, 6, 9
ODD = (1, 18, 1, 5)  # extra case on the 2x3 grid: odd shard sizes (packed bf16/fp32 messages must stay aligned)
GRIDS = {1: [(1, 1)], 4: [(2, 2), (1, 4), (4, 1)], 6: [(2, 3)], 9: [(3, 3)]}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _nonzero(by_op):
    return {k: v for k, v in by_op.items() if v["bytes_sent"] or v["bytes_received"] or v["messages"]}


class _Trace:
    """Records ('post', op), ('wait', op) and ('compute',) events of this rank (monkeypatches comm and kernels)."""

    def __init__(self):
        self.events, self.on = [], False
        send_recv, fwd, bwd = comm.send_recv, kernels.attn_forward, kernels.attn_backward
        trace = self

        class Handle:
            def __init__(self, h, op):
                self.h, self.op = h, op

            def wait(self):
                if trace.on:
                    trace.events.append(("wait", self.op))
                return self.h.wait()

        def traced_send_recv(*args, op="send_recv", async_op=False, **kw):
            if self.on:
                self.events.append(("post", op))
            out = send_recv(*args, op=op, async_op=async_op, **kw)
            if not async_op:
                if self.on:
                    self.events.append(("wait", op))
                return out
            return Handle(out, op)

        def traced(f):
            def g(*a, **kw):
                if self.on:
                    self.events.append(("compute",))
                return f(*a, **kw)
            return g

        comm.send_recv, kernels.attn_forward, kernels.attn_backward = traced_send_recv, traced(fwd), traced(bwd)


def _overlap_flags(events):
    """For each post, whether a compute happened before its wait (posts and waits of one op pair up in order)."""
    flags, pending = {}, {}
    for i, ev in enumerate(events):
        if ev[0] == "post":
            pending.setdefault(ev[1], []).append(i)
        elif ev[0] == "wait":
            start = pending[ev[1]].pop(0)
            hidden = any(e[0] == "compute" for e in events[start + 1 : i])
            flags.setdefault(ev[1], set()).add(hidden)
    return flags


def _worker(rank, world):
    trace = _Trace()
    results = []
    for rows, cols in GRIDS[world]:
        grid = ProcessGrid(rows, cols)
        impl = get_attention("attn2d_overlap")
        cases = [((B, N, H, D), causal, dtype, H) for causal in (True, False) for dtype in TOL]
        if (rows, cols) == (2, 3):
            cases += [(ODD, True, dtype, ODD[2]) for dtype in TOL]
        if (rows, cols) in ((2, 2), (2, 3)):  # grouped-query attention: one k/v head for q's three
            cases += [((B, N, H, D), True, torch.float32, 1)]
        for size, causal, dtype, h_kv in cases:
            torch.manual_seed(1234)
            kv_size = (*size[:2], h_kv, size[3])
            q, k, v, dout = (torch.randn(*s).to(dtype) for s in (size, kv_size, kv_size, size))
            q_p, k_p, v_p = (shard(t, grid, "cyclic").requires_grad_() for t in (q, k, v))
            trace.events, trace.on = [], True
            with count_comm() as fwd:
                out_p = impl.fn(q_p, k_p, v_p, grid=grid, causal=causal)
            fwd_events, trace.events = trace.events, []
            with count_comm() as bwd:
                out_p.backward(shard(dout, grid, "cyclic"))
            bwd_events, trace.on = trace.events, False
            got = [unshard(t, grid, "cyclic") for t in (out_p.detach(), q_p.grad, k_p.grad, v_p.grad)]
            q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
            ref, _ = reference_attention(q64, k64, v64, causal=causal)
            ref.backward(dout.double())
            want = [ref.detach(), q64.grad, k64.grad, v64.grad]
            results.append(dict(
                size=size, kv_heads=h_kv, grid=(rows, cols), rc=(grid.row, grid.col), rank=grid.rank, causal=causal,
                dtype=dtype,
                out_dtype=out_p.dtype, grad_dtypes=[t.grad.dtype for t in (q_p, k_p, v_p)],
                errors=[rel_error(g, w) for g, w in zip(got, want)],
                fwd=fwd.as_dict(), bwd=bwd.as_dict(),
                fwd_flags=_overlap_flags(fwd_events), bwd_flags=_overlap_flags(bwd_events),
                fwd_computes=sum(e[0] == "compute" for e in fwd_events)))
        if world == 4 and (rows, cols) == (2, 2):  # validation: errors name the numbers
            msgs = []
            qf, kf, vf = (t.detach().float() for t in (q_p, k_p, v_p))
            for bad in ((qf, kf[:, :-1], vf), (qf, kf.double(), vf)):
                try:
                    attention2d_overlap(*bad, grid=grid)
                except ValueError as e:
                    msgs.append(str(e))
            results.append(dict(validation=msgs))
    return results


@pytest.fixture(scope="module")
def runs():
    return {world: run_distributed(world, _worker, timeout_s=150) for world in GRIDS}


def _cases(runs):
    for per_rank in runs.values():
        for rank_results in per_rank:
            for res in rank_results:
                if "validation" not in res:
                    yield res


def test_every_grid_and_dtype_was_run(runs):
    seen = {(r["size"], r["grid"], r["causal"], r["dtype"], r["kv_heads"]) for r in _cases(runs)}
    grids = [g for gs in GRIDS.values() for g in gs]
    want = {((B, N, H, D), g, c, d, H) for g in grids for c in (True, False) for d in TOL}
    gqa = {((B, N, H, D), g, True, torch.float32, 1) for g in ((2, 2), (2, 3))}
    assert seen == want | {(ODD, (2, 3), True, d, ODD[2]) for d in TOL} | gqa


def test_outputs_and_gradients_match_float64_reference(runs):
    for r in _cases(runs):
        assert r["out_dtype"] == r["dtype"] and r["grad_dtypes"] == [r["dtype"]] * 3
        for name, err in zip(("out", "dq", "dk", "dv"), r["errors"]):
            assert err < TOL[r["dtype"]], (f"grid {r['grid']} causal={r['causal']} {r['dtype']} rank {r['rank']}: "
                                           f"{name} relative error {err:.2e} >= {TOL[r['dtype']]:.0e}")


def test_counted_comm_equals_comm_ops_per_rank_and_phase(runs):
    for r in _cases(runs):
        rows, cols = r["grid"]
        ops = comm_ops(*r["size"], rows, cols, r["dtype"], r["causal"], rank=r["rank"], kv_heads=r["kv_heads"])
        for phase in ("fwd", "bwd"):
            assert _nonzero(r[phase]["by_op"]) == total_comm(ops, phase)["by_op"], (r["grid"], r["rank"], phase)


def test_messages_and_bytes_follow_the_algorithm(runs):
    """Independent of comm_ops: count the algorithm's sends per rank (paper Sec. 3.4, 4.2)."""
    for r in _cases(runs):
        rows, cols = r["grid"]
        row, col = r["rc"]
        B, N, H, D = r["size"]
        e = torch.empty(0, dtype=r["dtype"]).element_size()
        moves = (row + col * rows) != (col + row * cols)  # holds k_p already laid out as k_t otherwise
        shard_b = B * (N // (rows * cols)) * H * D
        kv_b = B * (N // (rows * cols)) * r["kv_heads"] * D  # K or V shard (grouped-query: fewer heads)
        lse_b = B * H * (N // (rows * cols)) * 4
        # fwd: K/V transpose (1), K/V column ring, Q row ring (C-1), (out, lse) row scatter (C-1)
        assert r["fwd"]["messages"] == int(moves) + (rows - 1) + 2 * (cols - 1)
        assert r["fwd"]["bytes_sent"] == (2 * int(moves) + 2 * (rows - 1)) * kv_b * e + (cols - 1) * shard_b * e \
            + (cols - 1) * (shard_b * e + lse_b)
        # bwd: bundle ring (C-1) of (q, dout, lse, delta), K/V ring, dq scatter (C-1), dK/dV scatter,
        # inverse transpose (1)
        assert r["bwd"]["messages"] == 2 * (cols - 1) + 2 * (rows - 1) + int(moves)
        assert r["bwd"]["bytes_sent"] == (cols - 1) * (2 * shard_b * e + 2 * lse_b) + 2 * (rows - 1) * kv_b * e \
            + (cols - 1) * shard_b * 4 + (rows - 1 + int(moves)) * 2 * kv_b * 4
        for phase in ("fwd", "bwd"):
            assert r[phase]["bytes_received"] == r[phase]["bytes_sent"]
        # one kernel call per K/V block of the column ring (Alg. 5) + one per other column's Q block (Alg. 6)
        assert r["fwd_computes"] == rows + (cols - 1)


def test_overlap_schedule_matches_overlapped_flags(runs):
    """Every op comm_ops marks overlapped has a compute between each post and its wait; every other op none."""
    for r in _cases(runs):
        rows, cols = r["grid"]
        ops = comm_ops(*r["size"], rows, cols, r["dtype"], r["causal"], rank=r["rank"], kv_heads=r["kv_heads"])
        for phase in ("fwd", "bwd"):
            want = {op.name: {op.overlapped} for op in ops if op.phase == phase}
            assert r[f"{phase}_flags"] == want, (r["grid"], r["rank"], phase)
        if rows > 1 and cols > 1:  # the point of Attention2D-O: the rings are hidden
            assert r["fwd_flags"]["kv_col_gather"] == {True} and r["fwd_flags"]["q_row_ring"] == {True}


def test_validation_errors_name_the_shapes(runs):
    msgs = [res["validation"] for res in runs[4][0] if "validation" in res][0]
    assert len(msgs) == 2
    assert re.search(r"k \(2, 8, [13], 80\)", msgs[0]) and "q (2, 9, 3, 80)" in msgs[0]  # the last case ran
    assert "dtypes differ: torch.float32, torch.float64, torch.float32" in msgs[1]


def test_comm_ops_volume_shrinks_like_one_over_sqrt_p():
    """Sec. 4.2: forward bytes per rank ~ 4NH/sqrt(P); ring-free 1x1 moves nothing; rank=None is off-diagonal."""
    assert comm_ops(1, 64, 1, 8, 1, 1, "fp32", True) == []
    fwd = {g: total_comm(comm_ops(1, 4096, 1, 64, g, g, "bf16", True), "fwd")["bytes_sent"] for g in (4, 8)}
    assert 1.7 < fwd[4] / fwd[8] < 2.3  # sqrt(P) doubles -> about half the bytes
    ops = {op.name: op for op in comm_ops(2, 64, 2, 8, 4, 4, torch.bfloat16, True)}
    assert ops["kv_transpose"].messages == 1 and not ops["kv_transpose"].overlapped
    assert ops["out_row_scatter"].overlapped and not ops["out_row_scatter_tail"].overlapped
    assert ops["dq_row_scatter"].bytes_sent == 2 * (2 * 4 * 2 * 8) * 4  # (C-2) steps of fp32 (B, n, H, D)
    diag = {op.name for op in comm_ops(2, 64, 2, 8, 4, 4, "bf16", True, rank=5)}
    assert "kv_transpose" not in diag and "dkv_transpose" not in diag


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 2), (1, 4), (4, 1), (2, 3), (3, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp64"])
def test_same_volume_as_attention2d_no(rows, cols, dtype):
    """Attention2D-O moves exactly the bytes and messages of Attention2D-NO, per rank and phase (Sec. 4.2)."""
    for rank, kv_heads in itertools.product(range(rows * cols), (None, 1)):
        o = comm_ops(2, 96 * rows * cols, 3, 16, rows, cols, dtype, True, rank=rank, kv_heads=kv_heads)
        no = no_comm_ops(2, 96 * rows * cols, 3, 16, rows, cols, dtype, True, rank=rank, kv_heads=kv_heads)
        for phase in ("fwd", "bwd"):
            a, b = total_comm(o, phase), total_comm(no, phase)
            assert (a["bytes_sent"], a["bytes_received"], a["messages"]) == \
                (b["bytes_sent"], b["bytes_received"], b["messages"]), (rows, cols, rank, phase)
