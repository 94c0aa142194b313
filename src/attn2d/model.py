"""A GPT-3-like decoder (nanoGPT-sized) that takes its attention as a callable.

Architecture (GPT-3, Brown et al. 2020, Sec. 2.1, without its sparse layers): pre-LayerNorm blocks, a GELU MLP of
width 4 d_model, tied input/output embeddings, no dropout (a benchmark). Positions: **rotary** (RoPE, the rotate-half
form of GPT-NeoX) by default, applied to q and k before the attention callable; **learned** absolute embeddings as in
GPT-3 are available with `positions="learned"` (they add max_seq_len x d_model parameters, 200M for d 1536 at 128K).
Either way the model takes the *global* sequence positions of the tokens it holds, so one rank's shard of a
sequence (any layout) sees exactly the embeddings the full sequence would. Attention is multi-head as in GPT-3;
`n_kv_head` < n_head gives grouped-query attention (k and v reach the attention callable with n_kv_head heads).

The model is single-device code: it never imports torch.distributed. Sequence parallelism is applied from
outside (attn2d.train): the caller passes `attention(q, k, v) -> out` on (B, L, H, D) shards, already bound to its
process grid and causality, and sums this rank's loss over ranks.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (B, L, H, D) x3 -> (B, L, H, D)


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    head_dim: int | None = None  # None: d_model // n_head. GPT-3 13B has d 5140, 40 heads of 128 (5120 != 5140)
    n_kv_head: int | None = None  # k/v heads, dividing n_head (grouped-query attention); None: n_head (GPT-3)
    mlp_ratio: int = 4
    positions: str = "rotary"  # "rotary" | "learned"
    max_seq_len: int | None = None  # learned positions only: size of the position table
    rope_base: float = 10000.0
    init_std: float = 0.02
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    name: str = ""  # the conf/model option it came from ("gpt3_760m"); labels only

    @classmethod
    def from_mapping(cls, m, **overrides) -> GPTConfig:
        """A conf/model group (DictConfig, dataclass or mapping; unknown keys ignored, null = default) -> GPTConfig.
        `overrides` win over the mapping (e.g. max_seq_len=seq_len, activation_checkpointing=True)."""
        if dataclasses.is_dataclass(m):
            m = dataclasses.asdict(m)
        names = {f.name: f for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in dict(m).items() if k in names and v is not None}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        for k, v in kw.items():  # YAML/OmegaConf values -> the field's type (ints stay ints, "10000" -> float)
            t = names[k].type
            if t in ("int", "int | None") and not isinstance(v, bool):
                kw[k] = int(v)
            elif t == "float":
                kw[k] = float(v)
            elif t in ("str",):
                kw[k] = str(v)
        return cls(**kw)

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def d_attn(self) -> int:
        """Width of the attention projections, n_head * d_head (= d_model except for GPT-3 13B)."""
        return self.n_head * self.d_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    def block_params(self) -> int:
        """Parameters of one Block, by construction of its modules."""
        d, a, f = self.d_model, self.d_attn, self.mlp_ratio * self.d_model
        qkv = a + 2 * self.kv_heads * self.d_head  # output width of the fused q, k, v projection
        return (d * qkv + qkv) + (a * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d  # qkv, proj, mlp, 2 LN

    def n_params(self) -> int:
        """Parameters of GPT(self) (tied embeddings counted once), by construction of its modules."""
        d = self.d_model
        return self.n_layer * self.block_params() + self.vocab_size * d + self._position_params() + 2 * d  # + ln_f

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (all but the position table; lm_head counts)."""
        return self.n_params() - self._position_params()

    def _position_params(self) -> int:
        return (self.max_seq_len or 0) * self.d_model if self.positions == "learned" else 0

    def check(self) -> None:
        """Raise ValueError when heads and dims do not fit (names every number)."""
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by n_head {self.n_head}; set head_dim explicitly "
                f"(e.g. {self.d_model // self.n_head}) or pick n_head dividing {self.d_model}"
            )
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            divisors = [h for h in range(1, self.n_head + 1) if self.n_head % h == 0]
            raise ValueError(f"n_kv_head {self.n_kv_head} does not divide n_head {self.n_head}; use one of "
                             f"{divisors} (or null for n_head)")
        if self.positions not in ("rotary", "learned"):
            raise ValueError(f"positions {self.positions!r} is not 'rotary' or 'learned'")
        if self.positions == "rotary" and self.d_head % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.d_head}")
        if self.positions == "learned" and not self.max_seq_len:
            raise ValueError("learned positions need max_seq_len (the size of the position table)")


# ---------------------------------------------------------------------------------------------- rotary positions
def rotary_tables(pos: torch.Tensor, d_head: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, 1, D/2) in fp32 for the global positions `pos` (L,) of this shard's tokens."""
    inv_freq = base ** (-torch.arange(0, d_head, 2, device=pos.device, dtype=torch.float32) / d_head)  # (D/2,)
    angles = pos.to(torch.float32)[:, None] * inv_freq[None, :]  # (L, D/2)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]  # (L, 1, D/2) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x (B, L, H, D), computed in fp32 (fp64 stays fp64), returned in x.dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)  # (B, L, H, D/2) each
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, L, H, D)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- blocks
class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv, self.d_head = cfg.n_head, cfg.kv_heads, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.d_head)
        self.proj = nn.Linear(cfg.d_attn, cfg.d_model)

    def forward(self, x: torch.Tensor, attention: AttentionFn, rope: tuple | None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, self.n_head + 2 * self.n_kv, self.d_head).split(
            [self.n_head, self.n_kv, self.n_kv], dim=2)  # q (B, L, H, D), k and v (B, L, H_kv, D)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = attention(q.contiguous(), k.contiguous(), v.contiguous())  # (B, L, H, D)
        return self.proj(y.reshape(B, L, self.n_head * self.d_head))  # (B, L, d_model)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.d_model), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)
        self.checkpointing = cfg.activation_checkpointing

    def _forward(self, x: torch.Tensor, attention: AttentionFn, rope: tuple | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attention, rope)
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor, attention: AttentionFn, rope: tuple | None) -> torch.Tensor:
        # Checkpoint inside the module (not around it), so FSDP's hooks on this module run once per pass.
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, attention, rope, use_reentrant=False)
        return self._forward(x, attention, rope)


class GPT(nn.Module):
    """Token ids (B, L) at global positions pos (L,) -> logits (B, L, vocab)."""

    def __init__(self, cfg: GPTConfig, attention: AttentionFn):
        super().__init__()
        cfg.check()
        self.cfg, self.attention = cfg, attention
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        self.reset_parameters()

    def init_spec(self, name: str, p: torch.Tensor) -> tuple[str, float]:
        """GPT-2/3 init of parameter `name`: ("zeros" | "ones" | "normal", std). N(0, 0.02) weights, zero biases,
        unit LayerNorm weights, residual projections N(0, 0.02 / sqrt(2 n_layer))."""
        if name.endswith("bias"):
            return "zeros", 0.0
        if p.dim() == 1:  # LayerNorm weights
            return "ones", 0.0
        if name.endswith("proj.weight"):
            return "normal", self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        return "normal", self.cfg.init_std

    @torch.no_grad()
    def init_parameters(self, names: Iterable[str] | None = None, seed: int | None = None) -> None:
        """Initialise the named parameters (default: all). With `seed`, each one is drawn from its own generator
        seeded by (seed, name): the values do not depend on the order of initialisation, so a model materialised
        and sharded block by block gets exactly the values of one built whole (on the same device type)."""
        wanted = None if names is None else set(names)
        for name, p in self.named_parameters():
            if wanted is not None and name not in wanted:
                continue
            kind, std = self.init_spec(name, p)
            if kind == "zeros":
                p.zero_()
            elif kind == "ones":
                p.fill_(1.0)
            else:
                g = None
                if seed is not None and p.device.type != "meta":
                    g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.normal_(0.0, std, generator=g)

    def reset_parameters(self) -> None:
        self.init_parameters()

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding drops the token (= tied output) and position tables."""
        n = sum(p.numel() for p in self.parameters())  # tied weight counted once
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def forward(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if pos.shape != idx.shape[1:]:
            raise ValueError(f"positions {tuple(pos.shape)} do not match the {idx.shape[1]} tokens of the shard")
        x = self.wte(idx)  # (B, L, d_model)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)  # (B, L, d_model)
        else:
            rope = rotary_tables(pos, cfg.d_head, cfg.rope_base)
        for block in self.blocks:
            x = block(x, self.attention, rope)
        return self.lm_head(self.ln_f(x))  # (B, L, vocab)


def shard_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies of this shard, in fp32 (the caller divides by the GLOBAL token count)."""
    V = logits.shape[-1]
    logits = logits.reshape(-1, V).to(torch.promote_types(logits.dtype, torch.float32))  # (B*L, V)
    return F.cross_entropy(logits, targets.reshape(-1), reduction="sum")  # scalar
