"""An algorithm is one file: tests/toy_attention.py registers an all-gather attention, and with no other edit the
distributed run, config validation, the cost model, the advisor and the figures' labels take it."""
from __future__ import annotations

import pytest
import torch

from attn2d.attention import get_attention, layout
from attn2d.attention.registry import distributed_names
from attn2d.config import ConfigError, compose, validate
from attn2d.distributed import ProcessGrid, count_comm
from attn2d.model import GPTConfig
from attn2d.testing import assert_matches_reference, random_case, run_distributed, synthetic_hardware
from toy_attention import NAME, toy_attention

B, N, H, D = 1, 24, 2, 8


def _toy_worker(rank, world, case):
    grid = ProcessGrid(world, 1)
    q, k, v, dout = (layout.shard(case[x], grid, "contiguous").to(torch.float32).requires_grad_()
                     for x in ("q", "k", "v", "dout"))
    with count_comm() as stats:
        out = get_attention(NAME).fn(q, k, v, grid=grid, causal=case["causal"])
        out.backward(dout.detach())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "by_op": {op: sent for op, (sent, _, _) in stats.by_op.items()}}


def test_toy_is_registered_with_everything_the_house_asks_of_an_algorithm():
    impl = get_attention(NAME)
    assert impl.fn is toy_attention and impl.label == "Toy all-gather" and NAME in distributed_names()
    assert impl.cost_grid(2, 3) == (6, 1)
    with pytest.raises(ValueError, match=r"seq_len 25 cannot be split .* multiple of 4"):
        impl.check_layout(25, 4)


@pytest.mark.parametrize("causal", [True, False])
def test_toy_runs_exactly_and_sends_what_its_comm_ops_say(causal):
    case = random_case(0, (B, N, H, D), dtype="float32", causal=causal)
    results = run_distributed(3, _toy_worker, case)
    assert_matches_reference(case, results, "contiguous", 3, 1, 1e-5, f"toy causal={causal}")
    want = {op.name: op.bytes_sent for op in get_attention(NAME).comm_ops(B, N, H, D, 3, 1, torch.float32)}
    assert all(r["by_op"] == want for r in results), (results[0]["by_op"], want)


def test_config_validation_takes_the_toy_and_its_layout_rule():
    base = ["model=tiny", "grid=2x1", f"attention.name={NAME}", "benchmark.steps=1"]
    validate(compose([*base, "benchmark.seq_len=64"]), world_size=2)
    with pytest.raises(ConfigError, match=rf"seq_len 63 cannot be split over the 2 ranks of grid 2x1 in attention "
                                          rf"'{NAME}''s contiguous layout"):
        validate(compose([*base, "benchmark.seq_len=63"]), world_size=2)


def test_cost_model_and_advisor_price_the_toy():
    from attn2d import costmodel as cm
    from attn2d.costmodel.advise import advise

    hw, shape = synthetic_hardware(), GPTConfig(n_layer=2, d_model=64, n_head=4, vocab_size=128, name="toy_model")
    wl = cm.Workload(seq_len=4096)
    st = cm.step_time(NAME, shape, wl, 2, 2, hw)
    assert st.step_time_s > 0 and st.world == 4
    ops = cm.comm_ops_for(NAME, shape, wl, 2, 2)
    assert [op.name for op in ops] == ["toy_kv_all_gather", "toy_dkv_reduce_scatter"]
    options = advise(4, shape, wl, hw, algorithms=("ring", NAME))
    toy = [o for o in options if o.algorithm == NAME]
    assert [(o.rows, o.cols) for o in toy] == [(4, 1)] and toy[0].step_time_s > 0


def test_figures_label_the_toy_from_the_registry():
    from attn2d.report.plotting import algorithm_label

    assert algorithm_label(NAME) == "Toy all-gather"
