"""Tests of the cost model (attn2d.costmodel), its profiles, the advisor and the calibration fits.

Limits of the model: P = 1 equals local; the priced volumes are the algorithms' own comm_ops, which equal the bytes
counted on real gloo runs; ring's volume per device does not fall with P while Attention2D's falls as 1/sqrt(P);
placement on nodes, causal halving and load balance follow from the documented formulas.
"""
import importlib.util
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from attn2d import costmodel as cm
from attn2d.attention import get_attention, layout
from attn2d.costmodel import advise, fit
from attn2d.distributed import ProcessGrid, count_comm
from attn2d.distributed.comm import CommOp
from attn2d.model import GPT, GPTConfig
from attn2d.testing import run_distributed, synthetic_hardware

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTED = ["ring", "ring_contiguous", "attn2d", "attn2d_overlap"]
GPT_2P7B = GPTConfig(n_layer=32, d_model=2560, n_head=32, vocab_size=50257, name="gpt3_2p7b")


def _hw(**kw) -> cm.Hardware:
    """attn2d.testing.synthetic_hardware (round numbers), named 'test', with `kw` replaced."""
    return synthetic_hardware(**{"name": 'test', **kw})


# ---------------------------------------------------------------------------------------------- model limits
@pytest.mark.parametrize("profile", ["a100_4gpn", "h100_1gpn"])
@pytest.mark.parametrize("algorithm", DISTRIBUTED)
def test_one_rank_equals_local(profile, algorithm):
    hw = cm.load_hardware(profile)
    wl = cm.Workload(seq_len=8192, fsdp=True, activation_checkpointing=True)
    local = cm.step_time("local", GPT_2P7B, wl, 1, 1, hw)
    one = cm.step_time(algorithm, GPT_2P7B, wl, 1, 1, hw)
    assert cm.comm_ops_for(algorithm, GPT_2P7B, wl, 1, 1) == [] or all(
        op.bytes_sent == 0 for op in cm.comm_ops_for(algorithm, GPT_2P7B, wl, 1, 1))
    assert one.step_time_s == pytest.approx(local.step_time_s, rel=1e-12)
    assert one.grad_sync_s == 0.0 and one.attn_fwd_comm_s == 0.0
    # and the step is pure compute: attention + rest + optimizer
    assert local.step_time_s == pytest.approx(local.attn_fwd_s + local.attn_bwd_s + local.rest_compute_s
                                              + local.optimizer_s + local.overhead_s, rel=1e-12)


def _volume(alg, P, seq_len=1 << 16):
    rows, cols = (P, 1) if alg == "ring" else (math.isqrt(P), math.isqrt(P))
    wl = cm.Workload(seq_len=seq_len)
    return sum(op.bytes_sent for op in cm.comm_ops_for(alg, GPT_2P7B, wl, rows, cols))


def test_ring_volume_does_not_fall_with_P():
    vols = [_volume("ring", P) for P in (4, 16, 64, 256)]
    assert all(b >= a for a, b in zip(vols, vols[1:])), vols


@pytest.mark.parametrize("alg", ["attn2d", "attn2d_overlap"])
def test_2d_volume_falls_as_inverse_sqrt_P(alg):
    vols = {P: _volume(alg, P) for P in (16, 64, 256, 1024)}
    for P in (16, 64, 256):
        ratio = vols[4 * P] / vols[P]  # -> 1/sqrt(4) = 0.5 as P grows (the sqrt(P) - 1 terms), above it before
        assert 0.5 <= ratio <= 0.6, (P, ratio)
    # and the predicted attention communication TIME falls with P on an all-inter-node machine, ring's does not
    hw = cm.load_hardware("h100_1gpn")
    wl = cm.Workload(seq_len=1 << 17)
    t2d = [cm.step_time(alg, GPT_2P7B, wl, s, s, hw) for s in (4, 8, 16)]
    comm = [t.attn_fwd_comm_s + t.attn_bwd_comm_s for t in t2d]
    assert comm[0] > comm[1] > comm[2]


# ---------------------------------------------------------------------------------------------- counted bytes
def _counted_worker(rank, world, cases):
    grids, out = {}, []
    for alg, rows, cols, causal in cases:
        if (rows, cols) not in grids:
            grids[(rows, cols)] = ProcessGrid(rows, cols)
        grid = grids[(rows, cols)]
        impl = get_attention(alg)
        g = torch.Generator().manual_seed(7)
        q, k, v, dout = (torch.randn(1, 48, 2, 8, generator=g).to(torch.bfloat16) for _ in range(4))
        q, k, v = (layout.shard(x, grid, impl.layout).requires_grad_() for x in (q, k, v))  # (B, N/P, H, D)
        dout = layout.shard(dout, grid, impl.layout)
        with count_comm() as st:
            o = impl.fn(q, k, v, grid=grid, causal=causal)
            o.backward(dout)
        out.append({name: list(v) for name, v in st.by_op.items()})
    return out


def test_volume_formulas_equal_counted_bytes():
    """Run every registered algorithm on 4 gloo ranks (forward + backward), count its bytes per op, and compare
    with the comm_ops the cost model prices (per rank, op by op)."""
    cases = []
    for alg in DISTRIBUTED:
        grids = [(4, 1)] if alg.startswith("ring") else [(2, 2), (1, 4), (4, 1)]
        cases += [(alg, r, c, causal) for r, c in grids for causal in (True, False)]
    results = run_distributed(4, _counted_worker, cases, timeout_s=240)
    for i, (alg, rows, cols, causal) in enumerate(cases):
        for rank in range(4):
            ops = get_attention(alg).comm_ops(1, 48, 2, 8, rows, cols, torch.bfloat16, causal, rank=rank)
            want = {}
            for op in ops:
                w = want.setdefault(op.name, [0, 0, 0])
                w[0] += op.bytes_sent
                w[1] += op.bytes_received
                w[2] += op.messages
            got = {k: v for k, v in results[rank][i].items() if any(v)}
            want = {k: v for k, v in want.items() if any(v)}
            assert got == want, f"{alg} {rows}x{cols} causal={causal} rank {rank}: counted {got} vs comm_ops {want}"
    # the cost model prices exactly these ops
    wl = cm.Workload(seq_len=48, batch_size=1, dtype="bf16")
    shape = GPTConfig(n_layer=1, d_model=16, n_head=2, vocab_size=8)
    for alg in DISTRIBUTED:
        r, c = (4, 1) if alg.startswith("ring") else (2, 2)
        names = [o.name for o in cm.step_time(alg, shape, wl, r, c, _hw()).ops if o.phase in ("fwd", "bwd")]
        assert names == [o.name for o in get_attention(alg).comm_ops(1, 48, 2, 8, r, c, torch.bfloat16, True)]


# ---------------------------------------------------------------------------------------------- network model
def test_row_group_intra_node_column_group_across_nodes():
    hw = _hw()
    b = 1_000_000
    # 4 x 4 grid, 4 GPUs per node: a row (4 contiguous ranks) is one node; a column strides over 4 nodes
    row = CommOp("fwd", "x", "all_gather", "row", 4, 3 * b, 3 * b, 3, 3)
    col = CommOp("fwd", "y", "all_gather", "col", 4, 3 * b, 3 * b, 3, 3)
    t_row = cm.price_op(row, 4, 4, hw)
    t_col = cm.price_op(col, 4, 4, hw)
    assert not t_row.inter_node and t_col.inter_node and t_col.nodes_in_group == 4
    # by hand: row = base + 3 intra alphas + 3b / intra bw
    assert t_row.time_s == pytest.approx(1e-5 + 3e-6 + 3 * b / 1e11)
    # column: each node hosts 4 columns' ring edges leaving it at once (4 x 3b over the node's 1e10 B/s);
    # a column has one member per node, so its edge also meets the 5e9 B/s per-GPU NIC; NCCL's latency: 3 inter steps
    assert t_col.time_s == pytest.approx(1e-5 + 3 * 1e-5 + max(4 * 3 * b / 1e10, 3 * b / 5e9))
    # wide rows (8 columns) span two nodes and pay the network
    wide = CommOp("fwd", "x", "all_gather", "row", 8, 7 * b, 7 * b, 7, 7)
    assert cm.price_op(wide, 2, 8, hw).inter_node
    # groups of one move nothing
    assert cm.price_op(CommOp("fwd", "z", "all_gather", "col", 1, 0, 0, 0, 0), 1, 4, hw).time_s == 0.0


def test_point_to_point_ring_prices_the_slowest_edge():
    hw = _hw()
    b = 4_000_000
    ring = CommOp("fwd", "kv", "p2p", "world", 16, 15 * b, 15 * b, 15, 15)
    t = cm.price_op(ring, 16, 1, hw)
    # one rank per node sends off-node each step: its own NIC (5e9) limits; every step pays an inter-node alpha
    assert t.time_s == pytest.approx(15 * 1e-5 + 15 * b / 5e9)
    one_node = cm.price_op(CommOp("fwd", "kv", "p2p", "world", 4, 3 * b, 3 * b, 3, 3), 4, 1, hw)
    assert one_node.time_s == pytest.approx(3e-6 + 3 * b / 1e11)


def test_transpose_pair_crosses_nodes_only_off_the_node():
    hw = _hw(gpus_per_node=2)
    op = CommOp("fwd", "kv_to_row_major", "p2p", "pair", 2, 1000, 1000, 1, 1)
    # 2 x 2 grid on 2-GPU nodes: p(0,1) = rank 1 <-> p(1,0) = rank 2 sit on different nodes
    assert cm.price_op(op, 2, 2, hw).inter_node
    assert not cm.price_op(op, 2, 2, _hw(gpus_per_node=4)).inter_node


# ---------------------------------------------------------------------------------------------- compute model
def test_causal_halves_attention_work_and_cyclic_layout_balances_it():
    hw = _hw()
    shape = GPTConfig(n_layer=1, d_model=1024, n_head=8, vocab_size=8)
    causal = sum(cm.attention_step_times("attn2d", shape, cm.Workload(seq_len=1 << 14), 4, 4, hw, "fwd"))
    full = sum(cm.attention_step_times("attn2d", shape, cm.Workload(seq_len=1 << 14, causal=False), 4, 4, hw, "fwd"))
    assert causal / full == pytest.approx(0.5, abs=0.01)
    # the slowest rank of attn2d does ~ 1/P of the useful work (load balance of the cyclic layout)
    useful = cm.attention_flops(shape, cm.Workload(seq_len=1 << 14)) / 16 / hw.attn_fwd_flops_per_s
    assert causal == pytest.approx(useful, rel=0.02)


def test_ring_contiguous_is_imbalanced_zigzag_is_not():
    hw = _hw()
    shape = GPTConfig(n_layer=1, d_model=512, n_head=8, vocab_size=8)
    wl = cm.Workload(seq_len=1 << 13)
    zig = sum(cm.attention_step_times("ring", shape, wl, 8, 1, hw, "fwd"))
    cont = sum(cm.attention_step_times("ring_contiguous", shape, wl, 8, 1, hw, "fwd"))
    useful = cm.attention_flops(shape, wl) / 8 / hw.attn_fwd_flops_per_s
    assert zig == pytest.approx(useful, rel=0.08)
    assert cont / zig == pytest.approx(2.0, rel=0.1)  # each step waits for a rank with a fully visible block


def test_non_square_grid_pieces_are_restrided_not_masked():
    # q stride 2 vs k stride 3: re-strided by the kernel layer (no explicit mask), so a 2x3 grid's block costs its
    # causal half like a square grid's; steps 7 vs 11 (77 sub-span pairs) keep the explicit mask
    for rows, cols in ((2, 3), (3, 2), (3, 3)):
        work = cm.schedule_work("attn2d", 48, rows, cols, True)
        assert all(w[3] == 0 for step in work for w in step), (rows, cols)
        computed = sum(w[1] - w[2] for step in work for w in step)  # dense pairs minus the skipped triangles
        assert computed == 48 * 49 // 2, (rows, cols)  # every visible (query, key) pair once, over all ranks
    calls, dense, masked, mask = cm.schedule_work("attn2d", 154, 7, 11, True)[0][0]
    assert mask > 0


def test_pipeline_overlap():
    assert cm._pipeline([1.0, 1.0, 1.0], 0.0, 2, 1.0) == 3.0
    assert cm._pipeline([1.0, 1.0, 1.0], 4.0, 2, 1.0) == pytest.approx(2.0 + 2.0 + 1.0)  # comm-bound gaps
    assert cm._pipeline([1.0, 1.0, 1.0], 1.0, 2, 1.0) == pytest.approx(3.0)  # fully hidden
    assert cm._pipeline([1.0, 1.0, 1.0], 1.0, 2, 0.0) == pytest.approx(4.0)  # no hiding at efficiency 0


def test_model_params_match_the_real_model():
    for kw in (dict(n_layer=2, d_model=64, n_head=4, vocab_size=256),
               dict(n_layer=3, d_model=40, n_head=2, vocab_size=100, head_dim=16),
               dict(n_layer=1, d_model=32, n_head=4, vocab_size=50, positions="learned", max_seq_len=96)):
        gpt = GPT(GPTConfig(**kw), lambda q, k, v: q)
        assert GPTConfig(**kw).n_params() == gpt.num_params(non_embedding=False), kw


def test_fsdp_and_grad_all_reduce_volumes():
    wl = cm.Workload(seq_len=1024)
    n = GPT_2P7B.n_params()
    (ar,) = cm.grad_sync_ops(GPT_2P7B, wl, 8)
    assert ar.kind == "all_reduce" and ar.bytes_sent == 2 * 7 * 4 * n // 8
    ag, rs = cm.grad_sync_ops(GPT_2P7B, cm.Workload(seq_len=1024, fsdp=True), 8)
    assert rs.bytes_sent == 7 * 4 * n // 8 and ag.bytes_sent < 2 * 7 * 2 * n // 8
    assert cm.grad_sync_ops(GPT_2P7B, wl, 1) == []


# ---------------------------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("name", ["a100_4gpn", "h100_1gpn"])
def test_every_number_in_the_public_profiles_says_where_it_comes_from(name):
    text = (ROOT / "conf" / "hardware" / f"{name}.yaml").read_text()
    numeric = re.compile(r"^\s*[\w]+:\s*(\{.*\}|[-+0-9.eE]+)\s*(#.*)?$")
    for line in text.splitlines():
        if numeric.match(line):
            assert "#" in line, f"{name}.yaml: no source comment on {line.strip()!r}"
    hw = cm.load_hardware(name)
    assert hw.gpus_per_node == {"a100_4gpn": 4, "h100_1gpn": 1}[name]


def test_local_profile_is_measured_here():
    path = ROOT / "conf" / "hardware" / "local_cpu.yaml"
    text = path.read_text()
    assert "measured by python -m attn2d.costmodel.calibrate" in text
    hw = cm.load_hardware("local_cpu")
    assert hw.matmul_flops_per_s > 0 and hw.intra.bw_bytes_per_s > 0


# ---------------------------------------------------------------------------------------------- advisor
def test_advisor_lists_every_grid_and_picks_the_fastest(capsys):
    rc = advise.main(["gpus=16", "gpus_per_node=4", "model=gpt3_2p7b", "seq_len=32768", "hardware=a100_4gpn",
                      "algorithms=attn2d,attn2d_overlap"])
    assert rc == 0
    out = capsys.readouterr().out
    for r, c in advise.grids(16):
        assert re.search(rf"attn2d\s+{r}x{c}\s", out), f"grid {r}x{c} missing"
    times = [float(m) for m in re.findall(r"^\S+\s+\d+x\d+\s+([0-9.]+)", out, re.M)]
    best = float(re.search(r"predicted ([0-9.]+) s", out).group(1))
    assert best == pytest.approx(min(times), abs=1e-4)
    with pytest.raises(SystemExit, match="missing"):
        advise.main(["gpus=16"])
    opts = advise.advise(16, GPT_2P7B, cm.Workload(seq_len=16 * 3 + 8), _hw(), ("attn2d",))
    assert all(o.step_time_s is None and "multiple of 16" in o.reason for o in opts)


# ---------------------------------------------------------------------------------------------- calibration fits
def test_alpha_beta_fit_recovers_known_link():
    alpha, bw = 2e-4, 3e8
    pts = [(s, b, s * alpha + b / bw) for s in (1, 3) for b in (1e3, 1e5, 1e6, 4e6)]
    f = fit.fit_kind(pts)
    assert f["alpha_s"] == pytest.approx(alpha, rel=1e-6) and f["bw_bytes_per_s"] == pytest.approx(bw, rel=1e-6)


def test_attention_fit_recovers_rate_overhead_skip_and_mask_rate():
    rate, over, skip, mrate = 5e10, 1e-4, 0.8, 1e10
    pts = []
    for calls, dense, masked, mask in [(1, 1e6, 0, 0), (2, 4e6, 1e6, 0), (1, 0, 0, 3e6), (3, 9e6, 4e6, 1e6),
                                      (1, 2e7, 0, 0)]:
        t = calls * over + (dense - skip * masked) * 4 / rate + mask * 4 / mrate
        pts.append((calls, dense, masked, mask, t))
    f = fit.fit_attention(pts, 4.0)
    assert f["rate"] == pytest.approx(rate, rel=1e-6) and f["overhead_s"] == pytest.approx(over, rel=1e-6)
    assert f["causal_skip"] == pytest.approx(skip, rel=1e-6) and f["mask_rate"] == pytest.approx(mrate, rel=1e-6)


# ---------------------------------------------------------------------------------------------- projection table
def test_projection_rows_and_speedups():
    spec = importlib.util.spec_from_file_location("proj", ROOT / "workflow" / "scripts" / "costmodel_projection.py")
    proj = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proj)
    cell = dict(model="gpt3_760m", world_size=16, nodes=4, gpus_per_node=4, grid="4x4", rows=4, cols=4,
                seq_len=16384, batch_size=1, dtype="bfloat16", hardware="a100_4gpn", experiment="x", fsdp=True,
                activation_checkpointing=True, causal=True)
    df = proj.project([{**cell, "attention": a} for a in ("ring", "attn2d")])
    assert list(df.columns[:9]) == proj.COLUMNS and set(df.source) == {"modelled"}
    t = df.set_index("algorithm").step_time_s
    s = df.set_index("algorithm").speedup_vs_ring
    assert s["ring"] == pytest.approx(1.0) and s["attn2d"] == pytest.approx(t["ring"] / t["attn2d"])
    hw, shape = cm.load_hardware("a100_4gpn"), cm.load_model("gpt3_760m")
    wl = cm.Workload(seq_len=16384, fsdp=True, activation_checkpointing=True)
    assert t["attn2d"] == pytest.approx(cm.step_time("attn2d", shape, wl, 4, 4, hw).step_time_s)
    # the speedup against each Ring variant, and the per-term breakdown that sums to the step
    a2d = df.set_index("algorithm").loc["attn2d"]
    t_cont = cm.step_time("ring_contiguous", shape, wl, 16, 1, hw, overlap=False).step_time_s
    assert a2d.speedup_vs_ring_contiguous_nooverlap == pytest.approx(t_cont / t["attn2d"])
    assert a2d.speedup_vs_ring_nooverlap > a2d.speedup_vs_ring
    terms = [c for c in df.columns if c.startswith("term_")]
    assert "term_comm_fwd_kv_col_all_gather_s" in terms and "term_comm_fwd_kv_ring_s" in terms
    assert (df[terms].sum(axis=1) - df.step_time_s).abs().max() < 1e-9


def test_grouped_query_attention_scales_only_the_kv_traffic():
    """With n_kv_head = 1 of 8 heads Ring's volume (K/V only) falls 8x; Attention2D's Q and output traffic stays,
    so on a square grid it no longer beats Ring's bytes, while a tall (R x 1) grid, which moves only K/V, does."""
    mha = GPTConfig(n_layer=1, d_model=512, n_head=8, vocab_size=8)
    gqa = replace(mha, n_kv_head=1)
    wl = cm.Workload(seq_len=4096)

    def vol(alg, shape, rows, cols):
        return cm.comm_volume_per_rank(cm.comm_ops_for(alg, shape, wl, rows, cols))

    assert vol("ring", mha, 16, 1) == 8 * vol("ring", gqa, 16, 1)
    assert vol("attn2d", mha, 4, 4) < vol("ring", mha, 16, 1)
    assert vol("attn2d", gqa, 4, 4) > vol("ring", gqa, 16, 1) > vol("attn2d", gqa, 16, 1)
    with pytest.raises(ValueError, match=r"n_kv_head 3 does not divide n_head 32"):
        advise.main(["gpus=16", "model=gpt3_2p7b", "seq_len=8192", "n_kv_head=3"])
