"""Compute measurements of the calibration, one rank alone (or every rank at once, `share` < 1): GEMM rate, the
block attention kernels split into backend pieces as the algorithms call them, torch SDPA, AdamW, and a small
GPT's time not explained by its FLOPs."""
from __future__ import annotations

import time
from functools import partial

import torch

from attn2d.attention import kernels
from attn2d.attention.backends import BACKENDS
from attn2d.attention.layout import Span
from attn2d.attention.local import local_attention
from attn2d.costmodel.compute import ATTN_BWD_FLOP_RATIO, call_work
from attn2d.costmodel.fit import fit_attention, fit_line
from attn2d.model import GPT, GPTConfig


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, min_time_s: float = 0.05, repeats: int = 5) -> float:
    """Minimum over `repeats` of the mean time of fn() (after one warm-up call), each repeat >= min_time_s.
    The minimum: a shared machine's other tenants only ever add time."""
    fn()
    sync_device(device)
    t0 = time.perf_counter()
    fn()
    sync_device(device)
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(min_time_s / once))
    out = []
    for _ in range(repeats):
        sync_device(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync_device(device)
        out.append((time.perf_counter() - t0) / n)
    return min(out)



def measure_gemm(device, dtype, threads: int, quick: bool) -> dict:
    """Linear layer forward + backward (3 GEMMs, 6 flops per weight and token): rate and per-layer overhead."""
    torch.manual_seed(0)
    xs, ys = [], []
    sizes = ([(256, 64), (512, 128), (1024, 128), (1024, 256), (2048, 256)] if not quick
             else [(256, 64), (1024, 128), (1024, 256)])
    if device.type == "cuda":
        sizes = [(4096, 1024), (8192, 2048), (8192, 4096), (16384, 4096)]
    for tokens, d in sizes:
        lin = torch.nn.Linear(d, 4 * d, device=device, dtype=dtype)
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)

        def step(lin=lin, x=x):
            lin(x).sum().backward()

        t = timeit(step, device)
        xs.append(6.0 * tokens * d * 4 * d)
        ys.append(t)
    a, b = fit_line(xs, ys)
    return {"matmul_flops_per_s": 1.0 / b, "linear_overhead_s": a, "points": list(zip(xs, ys))}


def _attn_calls(device, quick: bool) -> list[tuple]:
    """Block calls (query Spans, key Spans) like the algorithms' ones: unmasked, causal squares, offset causal
    staircases (ring / attn2d square grids) and strided staircases that need an explicit mask (non-square grids,
    Alg. 6 of the overlapped variant)."""
    sizes = [32, 64, 128, 256] if quick else [32, 64, 128, 256, 512]
    if device.type == "cuda":
        sizes = [2048, 4096, 8192, 16384]
    calls = []
    for L in sizes:
        calls.append(((Span(0, 1, L),), (Span(0, 1, L),), False))  # unmasked
        calls.append(((Span(0, 1, L),), (Span(0, 1, L),), True))  # causal square
        calls.append(((Span(L, 1, L),), (Span(0, 1, 2 * L),), True))  # offset causal (bottom-right)
        calls.append(((Span(1, 4, L),), (Span(2, 3, (4 * L) // 3),), True))  # strided staircase -> explicit mask
    return calls


def measure_block_attention(device, dtype, quick: bool, heads: int = 4, head_dim: int = 16) -> dict:
    """attn2d.attention.kernels forward and backward (the kernels ring and attn2d call) on block calls split into
    backend pieces exactly as the algorithms' calls are (costmodel.call_work)."""
    name = kernels.resolve_backend("auto", device=device, dtype=dtype, head_dim=head_dim)
    bottom_right, tile = BACKENDS[name].causal_bottom_right, BACKENDS[name].causal_tile
    fwd, bwd = [], []
    for qs, ks, causal in _attn_calls(device, quick):
        nq, nk = sum(x.n for x in qs), sum(x.n for x in ks)
        q = torch.randn(1, nq, heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(1, nk, heads, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        kw = dict(causal=causal, q_pos=qs, k_pos=ks)
        out, lse = kernels.attn_forward(q, k, v, **kw)
        dout = torch.randn_like(out)
        tf = timeit(partial(kernels.attn_forward, q, k, v, **kw), device)
        tb = timeit(partial(kernels.attn_backward, dout, q, k, v, out, lse, **kw), device)
        calls, dense, masked, mask = call_work((qs, ks), causal, bottom_right, tile)
        u = heads * head_dim
        fwd.append((calls, dense * u, masked * u, mask * u, tf))
        bwd.append((calls, dense * u, masked * u, mask * u, tb))
    return {"backend": name, "bottom_right": bottom_right, "causal_tile": tile, "heads": heads, "head_dim": head_dim,
            "fwd": fit_attention(fwd, 4.0), "bwd": fit_attention(bwd, 4.0 * ATTN_BWD_FLOP_RATIO),
            "points_fwd": fwd, "points_bwd": bwd}


def measure_local_attention(device, dtype, quick: bool, heads: int = 4, head_dim: int = 16) -> dict:
    """torch SDPA (the `local` algorithm) forward, and forward + backward through autograd."""
    sizes = [64, 128, 256, 512] if quick else [64, 128, 256, 512, 1024]
    if device.type == "cuda":
        sizes = [4096, 8192, 16384]
    fwd, bwd = [], []
    for L in sizes:
        q, k, v = (torch.randn(1, L, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        for causal in (False, True):
            with torch.no_grad():
                tf = timeit(partial(local_attention, q, k, v, causal=causal), device)

            def fb(q=q, k=k, v=v, causal=causal):
                local_attention(q, k, v, causal=causal).sum().backward()

            tfb = timeit(fb, device)
            u = heads * head_dim
            masked = L * (L - 1) // 2 if causal else 0
            fwd.append((1, L * L * u, masked * u, 0, tf))
            bwd.append((1, L * L * u, masked * u, 0, max(tfb - tf, 1e-9)))
    return {"fwd": fit_attention(fwd, 4.0), "bwd": fit_attention(bwd, 4.0 * ATTN_BWD_FLOP_RATIO)}


def measure_optimizer(device, quick: bool) -> dict:
    """AdamW step on fp32 parameters: effective memory bandwidth at 28 bytes per parameter."""
    n = 1 << (20 if quick else 22)
    if device.type == "cuda":
        n = 1 << 26
    p = torch.nn.Parameter(torch.randn(n, device=device))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4)
    t = timeit(opt.step, device)
    return {"memory_bw_bytes_per_s": 28.0 * n / t, "seconds_per_param": t / n}


def measure_model_overhead(device, dtype, rates: dict, quick: bool, share: float = 1.0,
                           shapes=None) -> dict:
    """Per-layer and per-step time of a small GPT (attn2d.model, local attention, one rank) that the FLOP terms
    above do not explain: fit (measured - predicted) = step + n_layer x layer over a few shapes. With share < 1
    (called on every rank of a world at once: the ranks time-share the cores) the FLOP terms are predicted at
    share x the solo rates, and the fit is the overhead as it is under that contention."""
    rows = []
    if shapes is None:
        shapes = ([(1, 64, 4, 256), (2, 64, 4, 256), (4, 64, 4, 256), (2, 128, 4, 512)]
                  if not quick else [(1, 64, 4, 256), (3, 64, 4, 256)])
    for n_layer, d, h, n in shapes:
        cfg = GPTConfig(n_layer=n_layer, d_model=d, n_head=h, vocab_size=256)
        model = GPT(cfg, lambda q, k, v: local_attention(q, k, v, causal=True)).to(device=device, dtype=dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        idx = torch.randint(0, 256, (1, n), device=device)
        pos = torch.arange(n, device=device)

        def step(opt=opt, model=model, idx=idx, pos=pos):
            opt.zero_grad(set_to_none=True)
            logits = model(idx, pos)
            torch.nn.functional.cross_entropy(logits.reshape(-1, 256).float(), idx.reshape(-1)).backward()
            opt.step()

        t = timeit(step, device, min_time_s=0.2)
        d_h = cfg.d_head
        pairs = n * (n + 1) / 2
        skip = rates["local_fwd"]["causal_skip"]
        work = n * n - skip * (n * n - pairs)
        attn = n_layer * (4 * h * d_h * work / rates["local_fwd"]["rate"]
                          + 4 * ATTN_BWD_FLOP_RATIO * h * d_h * work / rates["local_bwd"]["rate"]) / share
        rest = 6.0 * cfg.matmul_params() * n / rates["matmul"] / share
        opt_t = cfg.n_params() * rates["optimizer_s_per_param"] / share
        rows.append((n_layer, t - attn - rest - opt_t, t))
    a, b = fit_line([r[0] for r in rows], [r[1] for r in rows])
    return {"step_overhead_s": a, "layer_overhead_s": b, "points": rows}

