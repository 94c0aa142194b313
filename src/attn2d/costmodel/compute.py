"""Attention compute: each algorithm's own schedule (attn2d.attention.get_attention(name).schedule) split into
backend pieces as attn2d.attention.kernels.block_pieces splits them, and priced per synchronous step at the time
of its slowest rank."""
from __future__ import annotations

from functools import lru_cache

from attn2d.attention import get_attention
from attn2d.attention.kernels import block_pieces
from attn2d.attention.registry import Call, Schedule
from attn2d.costmodel.hardware import Hardware
from attn2d.costmodel.workload import Workload
from attn2d.model import GPTConfig

ATTN_BWD_FLOP_RATIO = 2.5  # FlashAttention convention: backward = 5 matmuls vs 2 forward


def attention_schedule(algorithm: str, seq_len: int, rows: int, cols: int) -> Schedule:
    """schedule[step][rank]: the algorithm's own schedule (attn2d.attention.get_attention(name).schedule)."""
    impl = get_attention(algorithm)
    if impl.schedule is None:
        raise ValueError(f"attention {algorithm!r} registers no schedule, so the cost model cannot price its compute")
    return impl.schedule(seq_len, rows, cols)


def call_work(call: Call, causal: bool, bottom_right: bool = True, causal_tile: int = 0) -> tuple[int, int, int, int]:
    """(backend calls, dense pairs of unmasked/causal pieces, masked pairs inside causal pieces, pairs of
    explicit-mask pieces) of one block call, split exactly as attn2d.attention.kernels.block_pieces splits it."""
    qs, ks = call
    nq, nk = sum(s.n for s in qs), sum(s.n for s in ks)
    pieces = block_pieces(qs, ks, nq, nk, causal=causal, bottom_right=bottom_right, causal_tile=causal_tile)
    dense = masked = mask = 0
    for p in pieces:
        lq, lk = p.n_q, p.n_k
        if p.kind == "full":
            dense += lq * lk
        elif p.kind == "causal":  # bottom-right: row i sees lk - lq + i + 1 keys
            dense += lq * lk
            masked += lq * (lq - 1) // 2
        else:
            mask += lq * lk
    return len(pieces), dense, masked, mask


@lru_cache(maxsize=4096)
def schedule_work(algorithm: str, seq_len: int, rows: int, cols: int, causal: bool, bottom_right: bool = True,
                  causal_tile: int = 0) -> tuple:
    """schedule_work[step][rank] = call_work summed over the rank's calls of that step (cached)."""
    out = []
    for step in attention_schedule(algorithm, seq_len, rows, cols):
        row = []
        for calls in step:
            w = [call_work(c, causal, bottom_right, causal_tile) for c in calls]
            row.append(tuple(sum(x[i] for x in w) for i in range(4)))
        out.append(tuple(row))
    return tuple(out)


def attention_step_times(algorithm: str, shape: GPTConfig, wl: Workload, rows: int, cols: int, hw: Hardware,
                         phase: str) -> list[float]:
    """Per synchronous step, the time of its slowest rank (one layer, one phase)."""
    single = get_attention(algorithm).ranks == "one"  # the single-device kernel (its own rates, if measured)
    P = rows * cols
    share = hw.compute_share(min(P, hw.gpus_per_node))
    rate = hw.attn_rate(shape.d_head, phase, local=single) * share
    mask_rate = hw.attn_rate(shape.d_head, phase, mask=True) * share
    skip = hw.causal_skip(single)
    flop_per_pair = 4.0 * wl.batch_size * shape.n_head * shape.d_head * (1.0 if phase == "fwd" else ATTN_BWD_FLOP_RATIO)
    return list(_step_times(algorithm, wl.seq_len, rows, cols, wl.causal, hw.causal_bottom_right, hw.causal_tile,
                            (hw.attn_call_overhead_s, hw.attn_step_overhead_s, share, skip),
                            flop_per_pair / rate, flop_per_pair / mask_rate))


@lru_cache(maxsize=65536)
def _step_times(algorithm, seq_len, rows, cols, causal, bottom_right, causal_tile, over, s_per_pair,
                s_per_mask_pair) -> tuple:
    """attention_step_times for scalar arguments (cached: the network sweeps re-price the same compute)."""
    call_s, step_s, share, skip = over
    times = []
    for step in schedule_work(algorithm, seq_len, rows, cols, causal, bottom_right, causal_tile):
        worst = 0.0
        for calls, dense, masked, mask in step:
            t = ((calls * call_s + step_s) / share
                 + (dense - skip * masked) * s_per_pair + mask * s_per_mask_pair)
            worst = max(worst, t)
        times.append(worst)
    return tuple(times)


def attention_flops(shape: GPTConfig, wl: Workload) -> float:
    """Useful (visible-pair) attention FLOPs of one layer forward, whole sequence: 4 B H D x pairs."""
    n = wl.seq_len
    pairs = n * (n + 1) // 2 if wl.causal else n * n
    return 4.0 * wl.batch_size * shape.n_head * shape.d_head * pairs
