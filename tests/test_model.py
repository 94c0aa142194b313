"""The GPT model alone (one process): sizes of the configs, positions, tied embeddings, checkpointing, FLOP formula."""
import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attn2d import bench
from attn2d.config import compose
from attn2d.model import GPT, GPTConfig, apply_rotary, rotary_tables, shard_loss_sum

TINY = GPTConfig(n_layer=2, d_model=64, n_head=4, vocab_size=256)


def sdpa(causal=True):
    def attn(q, k, v):  # (B, L, H, D)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)
    return attn


def masked_attention(pos):
    """Attention over the whole (possibly permuted) sequence with the causal mask taken from global positions."""
    def attn(q, k, v):  # (B, L, H, D)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        s = s.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)  # (B, L, H, D)
    return attn


@pytest.mark.parametrize("name,nominal", [("gpt3_760m", 760e6), ("gpt3_1p3b", 1.3e9), ("gpt3_2p7b", 2.7e9),
                                          ("gpt3_6p7b", 6.7e9), ("gpt3_13b", 13e9)])
def test_gpt3_configs_have_their_sizes(name, nominal):
    cfg = compose([f"model={name}"])
    mcfg = GPTConfig.from_mapping(cfg.model)
    with torch.device("meta"):
        model = GPT(mcfg, sdpa())
    L, d, da, V = mcfg.n_layer, mcfg.d_model, mcfg.d_attn, mcfg.vocab_size
    # per block: qkv (d x 3da + 3da), proj (da x d + d), fc (d x 4d + 4d), proj (4d x d + d), 2 LayerNorms (4d)
    per_block = 3 * d * da + 3 * da + da * d + d + 8 * d * d + 4 * d + d + 4 * d
    assert model.num_params(non_embedding=True) == L * per_block + 2 * d
    assert model.num_params(non_embedding=False) == L * per_block + 2 * d + V * d  # tied: one table
    assert abs(model.num_params(non_embedding=False) / nominal - 1) < 0.04  # GPT-3 Table 2.1's rounded size


def test_gpt3_13b_uses_heads_of_128_not_dividing_d_model():
    mcfg = GPTConfig.from_mapping(compose(["model=gpt3_13b"]).model)
    assert (mcfg.d_model, mcfg.n_head, mcfg.d_head, mcfg.d_attn) == (5140, 40, 128, 5120)
    with pytest.raises(ValueError, match=r"d_model 5140 is not divisible by n_head 40.*head_dim"):
        GPTConfig(n_layer=1, d_model=5140, n_head=40, vocab_size=8).check()
    # a small model of the same kind runs
    model = GPT(GPTConfig(n_layer=1, d_model=60, n_head=4, head_dim=16, vocab_size=32), sdpa())
    assert model(torch.randint(32, (1, 8)), torch.arange(8)).shape == (1, 8, 32)


def test_model_never_imports_torch_distributed():
    src = Path(__import__("attn2d.model", fromlist=["x"]).__file__).read_text()
    names = [a.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)]
    assert names and not [m for m in names if m and m.startswith("torch.distributed")]


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)

    def score(pq, pk):
        rq = apply_rotary(q, *rotary_tables(torch.tensor([pq]), 16, 10000.0))
        rk = apply_rotary(k, *rotary_tables(torch.tensor([pk]), 16, 10000.0))
        return (rq * rk).sum(-1)

    torch.testing.assert_close(score(3, 1), score(103, 101))
    assert not torch.allclose(score(3, 1), score(3, 2))


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_tokens_at_global_positions_give_permuted_logits(positions):
    """The model uses the positions it is given, not the order of its input: feeding a permutation of the tokens
    with their global positions (what a cyclic or zigzag shard does) permutes the logits and nothing else."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, positions=positions, max_seq_len=24)
    idx, pos = torch.randint(64, (2, 24)), torch.arange(24)
    perm = torch.randperm(24)
    model = GPT(cfg, masked_attention(pos)).double()
    ref = model(idx, pos)
    model.attention = masked_attention(pos[perm])
    torch.testing.assert_close(model(idx[:, perm], pos[perm]), ref[:, perm])


def test_rotary_is_relative_and_learned_is_absolute():
    torch.manual_seed(0)
    model = GPT(TINY, masked_attention(torch.arange(8))).double()
    idx = torch.randint(256, (1, 8))
    a = model(idx, torch.arange(8))
    b = model(idx, torch.arange(8) + 5)  # same order, other global positions: only relative ones count for RoPE
    torch.testing.assert_close(a, b)
    learned = GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64, positions="learned", max_seq_len=16),
                  masked_attention(torch.arange(8))).double()
    idx = torch.randint(64, (1, 8))
    assert not torch.allclose(learned(idx, torch.arange(8)), learned(idx, torch.arange(8) + 5))


def test_tied_embeddings_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(TINY, sdpa())
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(256, (4, 64))
    loss = shard_loss_sum(model(idx, torch.arange(64)), idx.roll(-1, 1)) / idx.numel()
    assert abs(loss.item() - math.log(256)) < 0.05  # small init: nearly uniform predictions
    loss.backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    idx = torch.randint(256, (2, 32))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        cfg = GPTConfig(n_layer=2, d_model=64, n_head=4, vocab_size=256, activation_checkpointing=ckpt)
        model = GPT(cfg, sdpa())
        shard_loss_sum(model(idx, torch.arange(32)), idx).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_flop_formula_matches_torch_flop_counter():
    """bench.flops_per_step against torch's FlopCounterMode on a non-causal step whose attention is plain matmuls."""
    cfg = GPTConfig(n_layer=2, d_model=128, n_head=4, vocab_size=512)

    def matmul_attention(q, k, v):  # (B, L, H, D), no mask
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)  # (B, L, H, D)

    model = GPT(cfg, matmul_attention)
    B, N = 2, 48
    idx = torch.randint(512, (B, N))
    with FlopCounterMode(display=False) as fc:
        shard_loss_sum(model(idx, torch.arange(N)), idx).backward()
    f = bench.flops_per_step(cfg, model.num_params(), B, N, causal=False)
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("wte"))
    assert fc.get_total_flops() == 6 * weights * B * N + f["lm_head"] + f["attention"]
    # 6 * params (with biases and LayerNorms, the usual convention) is within 1% of the weight matmuls
    assert abs(f["dense"] / (6 * weights * B * N) - 1) < 0.01
    causal = bench.flops_per_step(cfg, model.num_params(), B, N, causal=True)
    assert causal["attention"] * 2 == f["attention"] and causal["dense"] == f["dense"]
    assert bench.mfu(50.0, None) is None and bench.mfu(50.0, 200.0) == 0.25


def test_seeded_init_does_not_depend_on_order_and_follows_gpt2():
    cfg = GPTConfig(n_layer=4, d_model=64, n_head=4, vocab_size=256)
    a, b = GPT(cfg, sdpa()), GPT(cfg, sdpa())
    names = [n for n, _ in a.named_parameters()]
    a.init_parameters(seed=5)
    for n in reversed(names):  # one parameter at a time, backwards: same values
        b.init_parameters([n], seed=5)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    params = dict(a.named_parameters())
    assert abs(params["blocks.0.attn.proj.weight"].std().item() / (0.02 / math.sqrt(8)) - 1) < 0.05
    assert abs(params["wte.weight"].std().item() / 0.02 - 1) < 0.05
    assert torch.equal(params["blocks.1.ln_1.weight"], torch.ones(64)) and not params["blocks.0.mlp.fc.bias"].any()
    a.init_parameters(seed=6)
    assert not torch.equal(params["wte.weight"], b.wte.weight)


def test_grouped_query_attention_config_counts_and_runs():
    """n_kv_head < n_head: the fused projection shrinks (n_params matches the modules), k and v reach the
    attention with n_kv_head heads, and a bad divisor is a clear error."""
    cfg = GPTConfig(n_layer=2, d_model=64, n_head=4, vocab_size=256, n_kv_head=2)
    model = GPT(cfg, sdpa_gqa := _recording_sdpa())
    assert model.num_params(non_embedding=False) == cfg.n_params() < TINY.n_params()
    idx = torch.randint(0, 256, (2, 16))
    logits = model(idx, torch.arange(16))
    assert logits.shape == (2, 16, 256) and sdpa_gqa.shapes[0] == [(2, 16, 4, 16), (2, 16, 2, 16), (2, 16, 2, 16)]
    with pytest.raises(ValueError, match=r"n_kv_head 3 does not divide n_head 4; use one of \[1, 2, 4\]"):
        GPTConfig(n_layer=1, d_model=64, n_head=4, vocab_size=8, n_kv_head=3).check()


def _recording_sdpa():
    def attn(q, k, v):
        attn.shapes.append([tuple(t.shape) for t in (q, k, v)])
        from attn2d.attention.local import local_attention

        return local_attention(q, k, v, causal=True)
    attn.shapes = []
    return attn
