"""The calibration's fits: non-negative least squares (scipy.optimize.nnls) of the measured times on the cost
model's terms (attn2d.costmodel.calibrate measures, this module fits)."""
from __future__ import annotations

import numpy as np
from scipy.optimize import nnls

from attn2d import costmodel as cm
from attn2d.attention import get_attention
from attn2d.costmodel.advise import DEFAULT_ALGORITHMS
from attn2d.costmodel.hardware import Hardware
from attn2d.model import GPTConfig

# the algorithms whose host time around transfers and steps is measured: the advisor's candidates on 4 ranks
GLUE_CASES = tuple((a, *get_attention(a).cost_grid(2, 2)) for a in DEFAULT_ALGORITHMS)
GLUE_SEQ_LEN = 48  # far below the local sweep's 144..576: a micro-benchmark, not a validation cell


def nnls_scaled(A, b) -> np.ndarray:
    """scipy.optimize.nnls of b ~ A c on unit-norm columns (the terms differ by many orders of magnitude: calls,
    bytes, FLOPs), mapped back; all-zero columns get 0."""
    A, b = np.asarray(A, float), np.asarray(b, float)
    norms = np.linalg.norm(A, axis=0)
    norms[norms == 0] = 1.0
    c, _ = nnls(A / norms, b)
    return c / norms


def nnls_rel(X, t) -> np.ndarray:
    """Non-negative least squares of t ~ X c in RELATIVE error (rows weighted by 1/t)."""
    X, t = np.asarray(X, float), np.asarray(t, float)
    return nnls_scaled(X / t[:, None], np.ones_like(t))


def fit_line(x, y) -> tuple[float, float]:
    """Least squares y = a + b x with a, b >= 0 (a refit through the origin if a < 0): -> (a, b)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    A = np.stack([np.ones_like(x), x], 1)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    if a < 0:
        a, b = 0.0, float((x @ y) / (x @ x))
    if b <= 0:
        a, b = float(np.mean(y)), 1e-30
    return float(a), float(b)


def fit_attention(samples: list[tuple[int, int, int, int, float]], flop_per_pair: float) -> dict:
    """samples: (calls, dense pairs, masked pairs inside causal pieces, explicit-mask pairs, time), as
    costmodel.call_work counts them. Non-negative least squares (relative error) of
        t = calls * overhead + (dense - skip * masked) * flop_per_pair / rate + mask * flop_per_pair / mask_rate
    -> {rate, overhead_s, causal_skip, mask_rate}."""
    X = np.array([[c, d * flop_per_pair, -m * flop_per_pair, k * flop_per_pair] for c, d, m, k, _ in samples], float)
    t = np.array([x[-1] for x in samples], float)
    over, inv_rate, skip_inv, inv_mask = nnls_rel(X, t)
    inv_rate = max(inv_rate, 1e-30)
    return {"rate": 1.0 / inv_rate, "overhead_s": float(over), "causal_skip": float(min(1.0, skip_inv / inv_rate)),
            "mask_rate": 1.0 / inv_mask if inv_mask > 0 else 1.0 / inv_rate}



def fit_kind(points: list[tuple[int, int, float]]) -> dict:
    """points (steps, bytes_sent per rank, time): t = call + steps*alpha + bytes/bw, non-negative, in relative
    error (the small messages of a CPU-scale run matter as much as the large ones)."""
    X = np.array([[1.0, s, b] for s, b, _ in points], float)
    t = np.array([p[2] for p in points], float)
    call, alpha, inv_bw = nnls_rel(X, t)
    pred = X @ np.array([call, alpha, inv_bw])
    err = float(np.median(np.abs(pred - t) / t))
    return {"call_s": float(call), "alpha_s": float(alpha),
            "bw_bytes_per_s": float(1.0 / inv_bw) if inv_bw > 0 else 1e15, "median_rel_err": err}



def fit_glue(measured: dict, hw: Hardware, heads: int, head_dim: int) -> dict:
    """Host time the algorithms spend outside kernels and the communication library: per communication call
    (packing, reordering) and per synchronous attention step (merging partials, slicing blocks). Non-negative
    least squares of (measured - modelled attention time without them) = (calls x glue + steps x step) / share."""
    shape = GPTConfig(n_layer=1, d_model=heads * head_dim, n_head=heads, vocab_size=8)
    wl = cm.Workload(seq_len=GLUE_SEQ_LEN, dtype="fp32")
    share = hw.compute_share(4)
    rows = []
    for alg, r, c in GLUE_CASES:
        ops = cm.comm_ops_for(alg, shape, wl, r, c)
        ph = cm.attention_phases(alg, shape, wl, r, c, hw, ops)
        steps = 2 * len(cm.attention_schedule(alg, GLUE_SEQ_LEN, r, c))  # forward and backward
        rows.append((alg, measured[alg], ph["fwd"][2] + ph["bwd"][2], cm.comm_calls(ops), steps))
    X = np.array([[n / share, k / share] for *_, n, k in rows], float)
    y = np.array([m - p for _, m, p, *_ in rows], float)
    coef = nnls_scaled(X, y)
    return {"comm_call_overhead_s": float(coef[0]), "attn_step_overhead_s": float(coef[1]), "cases": rows}
