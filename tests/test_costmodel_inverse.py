"""Tests of the swept unknowns of the cost model: placement, the Ring baselines, the breakdown, and the inverse
search (attn2d.costmodel.inverse) on a synthetic profile whose answer is known."""
from dataclasses import replace

import pytest

from attn2d import costmodel as cm
from attn2d.costmodel import advise
from attn2d.costmodel import inverse as inv
from attn2d.distributed.placement import describe, node_of, rank_nodes
from attn2d.model import GPTConfig
from attn2d.testing import synthetic_hardware

SMALL = GPTConfig(n_layer=2, d_model=256, n_head=4, vocab_size=64, name="small")


def _hw(**kw) -> cm.Hardware:
    """attn2d.testing.synthetic_hardware (round numbers), named 'synthetic', with `kw` replaced."""
    return synthetic_hardware(**{"name": 'synthetic', **kw})


# ---------------------------------------------------------------------------------------------- placement
def test_placement_rule_and_its_errors():
    # 4x4 grid, 4 ranks per node: "row" = rank // 4 (a grid row per node), "col" = a grid column per node
    assert rank_nodes(4, 4, 4, "row") == [k // 4 for k in range(16)]
    assert [node_of(r * 4 + 2, 4, 4, 4, "col") for r in range(4)] == [2, 2, 2, 2]
    assert "a grid row spans 1 node(s), a grid column spans 4" in describe(4, 4, 4, "row")
    assert "a grid row spans 4 node(s), a grid column spans 1" in describe(4, 4, 4, "col")
    assert rank_nodes(2, 2, 2, [0, 1, 0, 1]) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"unknown placement 'diag'; known: row, col"):
        node_of(0, 2, 2, 2, "diag")
    with pytest.raises(ValueError, match=r"explicit placement has 3 entries, but the 2x2 grid has 4 ranks"):
        rank_nodes(2, 2, 2, [0, 0, 1])
    with pytest.raises(ValueError, match=r"more than ranks_per_node=2 ranks on node"):
        rank_nodes(2, 2, 2, [0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"rank 4 is outside the 2x2 grid"):
        node_of(4, 2, 2, 2)
    with pytest.raises(ValueError, match=r"placement 'diag' unknown"):
        _hw(placement="diag")


def test_placement_col_vs_row_changes_which_op_crosses_nodes():
    wl = cm.Workload(seq_len=4096)
    ops = {op.name: op for op in cm.comm_ops_for("attn2d", SMALL, wl, 4, 4)}
    row_op, col_op = ops["q_row_all_gather"], ops["kv_col_all_gather"]
    for placement, on_node, across in (("row", row_op, col_op), ("col", col_op, row_op)):
        hw = _hw(placement=placement)
        assert not cm.price_op(on_node, 4, 4, hw).inter_node, placement
        assert cm.price_op(across, 4, 4, hw).inter_node, placement
    # and the ring's 1-D group is placed the same under either
    ring = cm.comm_ops_for("ring", SMALL, wl, 16, 1)
    assert [cm.price_op(o, 16, 1, _hw()).time_s for o in ring] == [
        cm.price_op(o, 16, 1, _hw(placement="col")).time_s for o in ring]


def test_tree_collectives_pay_log_depth_inter_node_latency():
    op = cm.comm_ops_for("attn2d", SMALL, cm.Workload(seq_len=4096), 8, 8)
    col = next(o for o in op if o.name == "kv_col_all_gather")  # 8 ranks on 8 nodes (row placement, 4 per node)
    hw = _hw(inter=cm.Link(1e-3, 1e12), inter_rank_bw_bytes_per_s=1e12)  # latency-dominated
    ring, tree = cm.price_op(col, 8, 8, hw), cm.price_op(col, 8, 8, replace(hw, collective_algorithm="tree"))
    # 7 ring steps cross nodes, log2(8) = 3 tree steps do; the other 4 become on-node steps (alpha 1e-6)
    assert ring.latency_s - tree.latency_s == pytest.approx((7 - 3) * (1e-3 - 1e-6), rel=1e-9)


# ---------------------------------------------------------------------------------------------- baselines
def test_contiguous_ring_critical_path_is_its_most_loaded_ranks_blocks():
    """A ring's step waits for its slowest rank; with the contiguous layout the last rank computes a block at
    every step (all earlier ranks' keys), so the critical path is exactly that rank's sum of blocks."""
    P, n = 8, 1024
    hw = _hw(attn_call_overhead_s=0.0)
    wl = cm.Workload(seq_len=n)
    steps = cm.attention_step_times("ring_contiguous", SMALL, wl, P, 1, hw, "fwd")
    s_per_pair = 4.0 * SMALL.n_head * SMALL.d_head / hw.attn_fwd_flops_per_s
    work = cm.schedule_work("ring_contiguous", n, P, 1, True, True)
    per_rank = [sum((w[s][k][1] - w[s][k][2]) for s in range(P) for w in [work]) * s_per_pair for k in range(P)]
    assert sum(steps) == pytest.approx(max(per_rank), rel=1e-12)
    assert max(per_rank) == pytest.approx(per_rank[-1], rel=1e-12)
    # and (2P - 1)/P times the balanced (zigzag) ring (P - 1/2 blocks vs P/2 blocks per rank)
    zig = sum(cm.attention_step_times("ring", SMALL, wl, P, 1, hw, "fwd"))
    assert sum(steps) / zig == pytest.approx((2 * P - 1) / P, rel=0.01)


def test_ring_without_overlap_is_compute_plus_communication():
    hw = _hw()
    wl = cm.Workload(seq_len=8192)
    serial = cm.step_time("ring", SMALL, wl, 16, 1, hw, overlap=False)
    assert serial.attn_fwd_s == pytest.approx(serial.attn_fwd_compute_s + serial.attn_fwd_comm_s, rel=1e-12)
    assert serial.attn_bwd_s == pytest.approx(serial.attn_bwd_compute_s + serial.attn_bwd_comm_s, rel=1e-12)
    hidden = cm.step_time("ring", SMALL, wl, 16, 1, hw)
    assert hidden.step_time_s < serial.step_time_s
    # Attention2D-NO has nothing to overlap: the switch does not change it
    assert cm.step_time("attn2d", SMALL, wl, 4, 4, hw, overlap=False).step_time_s == pytest.approx(
        cm.step_time("attn2d", SMALL, wl, 4, 4, hw).step_time_s, rel=1e-12)


@pytest.mark.parametrize("algorithm,rows,cols", [("ring", 16, 1), ("attn2d", 4, 4), ("attn2d_overlap", 4, 4)])
@pytest.mark.parametrize("ckpt", [False, True])
def test_breakdown_terms_sum_to_the_step(algorithm, rows, cols, ckpt):
    wl = cm.Workload(seq_len=8192, fsdp=True, activation_checkpointing=ckpt)
    st = cm.step_time(algorithm, SMALL, wl, rows, cols, _hw())
    b = st.breakdown()
    assert sum(b.values()) == pytest.approx(st.step_time_s, rel=1e-9)
    assert all(v >= -1e-15 for v in b.values()), b
    names = {op.name for op in cm.comm_ops_for(algorithm, SMALL, wl, rows, cols)}
    assert {k.split(".")[-1] for k in b if k.startswith("comm.")} <= names


# ---------------------------------------------------------------------------------------------- inverse search
def test_inverse_search_finds_a_known_answer_on_a_synthetic_profile():
    base = _hw()
    cells = [inv.Cell(SMALL, 8192, 4, 4, ("attn2d",)), inv.Cell(SMALL, 16384, 4, 4, ("attn2d",))]
    sc = inv.Scenario(baseline="ring_nooverlap", fsdp=False, activation_checkpointing=False)
    b0 = 3.0  # GB/s per NIC: the "true" network
    s0 = inv.max_speedup(base, sc, b0, cells)
    target = inv.Target("synthetic", "x", 16, s0, s0 * 0.99, s0 * 1.01)
    row = inv.invert(base, target, cells, [sc], n_scan=17)[0]
    assert row["reproduces"] and row["nic_GBps_min"] <= b0 <= row["nic_GBps_max"], row
    for a, b in inv._intervals(row["nic_GBps_intervals"]):  # every reported end reproduces the target
        for x in (a, b):
            assert target.lo - 1e-3 <= inv.max_speedup(base, sc, x, cells) <= target.hi + 1e-3
    # a number no network gives: none, and the limits say why
    far = inv.Target("synthetic", "x", 16, 100.0, 99.5, 100.5)
    none = inv.invert(base, far, cells, [sc], n_scan=9)[0]
    assert not none["reproduces"] and none["nic_GBps_intervals"] == "none"
    assert none["max_speedup_peak"] < 99.5


def test_stated_number_sets_its_rounding_interval_and_bad_scenarios_are_named():
    t = inv.Target.stated("h", "e", 64, "9.4")
    assert (t.lo, t.hi) == pytest.approx((9.35, 9.45))
    assert (inv.Target.stated("h", "e", 64, "5").lo, inv.Target.stated("h", "e", 64, "5").hi) == (4.5, 5.5)
    with pytest.raises(ValueError, match=r"baseline 'striped' unknown; known: ring, ring_nooverlap"):
        inv.Scenario(baseline="striped")
    assert len(inv.scenarios(1)) * 4 == len(inv.scenarios(4))  # placement x NIC layout only with > 1 GPU/node


def test_both_keeps_only_settings_reproducing_both_clusters():
    mk = lambda hw, b, iv: {"hardware": hw, "baseline": b, "collective_algorithm": "ring", "fsdp": True,  # noqa: E731
                            "activation_checkpointing": True, "p2p_efficiency": 1.0, "kernel_x": 1.0,
                            "overlap_efficiency": None, "placement": "row", "nics": "per_gpu",
                            "reproduces": bool(iv), "intervals": iv, "nic_GBps_intervals": str(iv),
                            "nic_GBps_min": iv[0][0] if iv else None, "nic_GBps_max": iv[-1][1] if iv else None,
                            "node_GBps_min": None, "node_GBps_max": None}
    rows = [mk("a_x", "ring", [(10.0, 20.0)]), mk("h_y", "ring", [(100.0, 200.0)]),
            mk("a_x", "ring_contiguous", [(10.0, 20.0)]), mk("h_y", "ring_contiguous", [])]
    out = inv.both(rows, {"a_x": (15.0, 25.0), "h_y": (30.0, 50.0)})
    assert [e["baseline"] for e in out] == ["ring"]
    assert out[0]["a_in_spec"] and not out[0]["h_in_spec"]
    assert out[0]["spec_distance"] == pytest.approx(__import__("math").log(100.0 / 50.0))


# ---------------------------------------------------------------------------------------------- advisor
def test_advisor_chooses_placement_and_says_how_confident(capsys):
    rc = advise.main(["gpus=16", "gpus_per_node=4", "model=gpt3_760m", "seq_len=16384", "hardware=a100_4gpn",
                      "algorithms=ring,attn2d"])
    assert rc == 0
    out = capsys.readouterr().out
    assert " row" in out and " col" in out
    assert "why: placement" in out
    assert "confidence: the same choice is the fastest in" in out and "of 4 variants" in out


# ---------------------------------------------------------------------------------------------- time-shared ranks
def test_sync_penalty_scales_with_the_ranks_queued_behind_each_core():
    hw = _hw(shared_cores=2, gpus_per_node=1024, sync_penalty_by_world={4: 1e-3, 9: 1.2e-3})
    assert hw.sync_penalty(9) == pytest.approx(1.2e-3)  # "measured": the calibration's own value
    over = replace(hw, sync_penalty_scaling="oversubscription")
    assert over.sync_penalty(4) == pytest.approx(1e-3)
    assert over.sync_penalty(9) == pytest.approx(1e-3 * (9 / 2 - 1) / (4 / 2 - 1))
    assert over.sync_penalty(2) == 0.0  # one rank per core: nothing queued
    local = cm.load_hardware("local_cpu")
    assert local.sync_penalty_scaling == "oversubscription"


def test_explicit_placement_list_prices_like_the_rule_it_spells_out():
    wl = cm.Workload(seq_len=4096)
    col = rank_nodes(4, 4, 4, "col")
    for op in cm.comm_ops_for("attn2d", SMALL, wl, 4, 4):
        explicit, named = _hw(placement=list(col)), _hw(placement="col")
        assert cm.price_op(op, 4, 4, explicit).time_s == cm.price_op(op, 4, 4, named).time_s
    with pytest.raises(ValueError, match="explicit placement has 15 entries, but the 4x4 grid has 16 ranks"):
        cm.price_op(cm.comm_ops_for("attn2d", SMALL, wl, 4, 4)[0], 4, 4, _hw(placement=col[:15]))
