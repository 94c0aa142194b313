"""Merging partial attention results computed over disjoint key sets (paper Algorithm 2, "AttnFix", Sec. 3.1).

The paper keeps (M, N, D): running row max, un-normalised numerator sum_j exp(s_ij - m_i) v_j, denominator
sum_j exp(s_ij - m_i). We keep the equivalent normalised pair (out, lse): out = N / D, lse = M + log D.
Both combinations are associative and commutative, which is what lets Attention2D split the KV dimension.

Naive:  out = (exp(lse1) out1 + exp(lse2) out2) / (exp(lse1) + exp(lse2))          (overflows)
Stable: lse = max + log(sum_i exp(lse_i - max));  out = sum_i exp(lse_i - lse) out_i  (fp32, below)
A row that sees no key has lse = -inf and out = 0; it carries weight 0 in every merge.
merge_partials merges k partials into new tensors; merge_into merges one partial into a running (out, lse) in
place (what Ring Attention and the kernel layer's multi-piece blocks use: no temporaries of the whole block).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def attn_fix(m1, num1, den1, m2, num2, den2):
    """Algorithm 2 (AttnFix) as printed: merge (M, N, D) triples. m, den: (..., L); num: (..., L, D)."""
    m = torch.maximum(m1, m2)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both empty: keep weights finite
    e1, e2 = torch.exp(m1 - m_safe), torch.exp(m2 - m_safe)
    num = e1.unsqueeze(-1) * num1 + e2.unsqueeze(-1) * num2
    den = e1 * den1 + e2 * den2
    return m, num, den


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge k partial results in one fp32 pass.

    outs[i]: (B, L, H, D) normalised partial outputs; lses[i]: (B, H, L) float32 natural-log sum-exp (-inf = empty);
    either may be one stacked (k, ...) tensor.
    Returns out (B, L, H, D) and lse (B, H, L) in float32 (float64 if any input is float64)."""
    acc = torch.float64 if any(t.dtype == torch.float64 for t in (*outs, *lses)) else torch.float32
    lse_all = torch.stack([l.to(acc) for l in lses])  # (k, B, H, L)
    lse = torch.logsumexp(lse_all, dim=0)  # (B, H, L); -inf where every partial is empty
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lse_all - lse_safe).transpose(2, 3).unsqueeze(-1)  # (k, B, L, H, 1); 0 for empty partials
    out = w[0] * outs[0].to(acc)  # (B, L, H, D)
    for wi, o in zip(w[1:], outs[1:]):
        out.addcmul_(wi, o.to(acc))
    return out, lse


def merge_into(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor, empty_rows: bool = True) -> None:
    """Merge the partial (o, l) into the running (out, lse) in place, in out's dtype (fp32; views of a bigger
    buffer are fine): lse <- log(e^lse + e^l), out <- out + sigmoid(l - lse_old) (o - out) (the form torch's and
    ring-flash-attention's rings use). A running row with lse = -inf takes (o, l) as is; a partial row with
    l = -inf leaves it as it was. empty_rows=False: the caller knows every row of the partial saw a key (l finite),
    which saves the NaN guard of rows empty on both sides. out (B, L, H, D), lse (B, H, L)."""
    w = torch.sigmoid(l - lse)  # (B, H, L): weight of the partial
    if empty_rows:
        w = w.nan_to_num_(0.0)  # -inf on both sides
    out.lerp_(o.to(out.dtype), w.transpose(1, 2).unsqueeze(-1))  # w as (B, L, H, 1)
    torch.logaddexp(lse, l, out=lse)
