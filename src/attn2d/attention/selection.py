"""Choosing a backend for a block: backend="auto" (or env ATTN2D_KERNEL_BACKEND) picks the first backend of
backends.preference(device) that applies and passes a one-time self-check against "math" (forward and backward,
tiny inputs, per backend / device / dtype / head_dim; cached), warning when it skips one. Explicit-mask pieces are
checked apart: under "auto" they go to the first backend whose mask check passes (cuDNN may run the dense pieces
and hand its masks to cuda_efficient); a named backend keeps them if it supports masks, else they go the "auto" way.
"""
from __future__ import annotations

import os
import warnings

import torch

from attn2d.attention.backends import BACKENDS, Backend, preference
from attn2d.attention.execute import backward_pieces, forward_pieces
from attn2d.attention.layout import Span
from attn2d.attention.planner import Piece, block_pieces, plan_pieces

ENV_VAR = "ATTN2D_KERNEL_BACKEND"
_CHECKED: dict[tuple, str | None] = {}
_RESOLVED: dict[tuple, str] = {}


def available_backends(device, dtype: torch.dtype, head_dim: int | None = None) -> list[str]:
    """Backends that apply to this device/dtype/head_dim (importable, supported), in "auto" order; no self-check."""
    device = torch.device(device)
    return [n for n in preference(device) if BACKENDS[n].applies(device, dtype, head_dim) is None]


def _tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 6e-2)


def _self_check_cases(mask: bool):
    if mask:  # steps 7 and 11 (too many sub-span pairs to re-stride): explicit-mask staircase (+ unmasked tail)
        return [(True, Span(1, 7, 5), Span(0, 11, 4), 5, 4), (True, Span(0, 11, 6), Span(1, 7, 7), 6, 7)]
    return [(False, None, None, 7, 5),  # non-square, unmasked
            (True, None, None, 6, 6),  # square causal
            (True, (Span(0, 1, 4), Span(12, 1, 3)), (Span(2, 1, 5), Span(9, 1, 4)), 7, 9),  # empty rows, offsets
            (True, Span(1, 2, 7), Span(0, 3, 5), 7, 5)]  # steps 2, 3: re-strided, pieces on strided rows and keys


def _compare_with_math(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, mask: bool):
    impl, ref = BACKENDS[name], BACKENDS["math"]
    gen = torch.Generator().manual_seed(0)
    for causal, q_pos, k_pos, n_q, n_k in _self_check_cases(mask):
        q, dout = (torch.randn(1, n_q, 2, head_dim, generator=gen) for _ in range(2))
        k, v = (torch.randn(1, n_k, 2, head_dim, generator=gen) for _ in range(2))
        x = [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]
        x64 = [t.double() for t in x]
        scale = head_dim ** -0.5
        got_p = block_pieces(q_pos, k_pos, n_q, n_k, causal=causal, bottom_right=impl.causal_bottom_right,
                             causal_tile=impl.causal_tile and 2)  # tile 2: the 6 x 6 square as 3 strips
        ref_p = block_pieces(q_pos, k_pos, n_q, n_k, causal=causal, bottom_right=True)
        o, l = forward_pieces(*x[:3], got_p, scale, impl, impl)
        o64, l64 = forward_pieces(*x64[:3], ref_p, scale, ref, ref)
        g = backward_pieces(x[3], *x[:3], o, l, got_p, scale, impl, impl)
        g64 = backward_pieces(x64[3], *x64[:3], o64, l64, ref_p, scale, ref, ref)
        if not torch.equal(torch.isinf(l).cpu(), torch.isinf(l64).cpu()):
            return f"rows with no visible key differ from math (causal={causal}, q {q_pos}, k {k_pos})"
        l, l64 = l.masked_fill(torch.isinf(l), 0), l64.masked_fill(torch.isinf(l64), 0)
        for what, a, r in (("out", o, o64), ("lse", l, l64), ("dq", g[0], g64[0]), ("dk", g[1], g64[1]),
                           ("dv", g[2], g64[2])):
            err = (a.double() - r).abs().max().item() / max(1.0, r.abs().max().item())
            if not err <= _tol(dtype):  # also catches NaN
                return (f"{what} differs from math by {err:.2e} > {_tol(dtype):.0e} "
                        f"(causal={causal}, q {q_pos}, k {k_pos})")
    return None


def self_check(name: str, device, dtype: torch.dtype, head_dim: int = 64, *, mask: bool = False) -> str | None:
    """None if backend `name` agrees with "math" (float64) on tiny cases, forward and backward; else the reason.
    mask=False checks unmasked and causal pieces, mask=True explicit-mask pieces. Cached per argument tuple."""
    key = (name, torch.device(device), dtype, head_dim, mask)
    if key not in _CHECKED:
        try:
            with torch.no_grad():
                _CHECKED[key] = _compare_with_math(name, torch.device(device), dtype, head_dim, mask)
        except Exception as e:  # an op missing in this build, an unsupported shape, ...
            _CHECKED[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return _CHECKED[key]


def _auto(device: torch.device, dtype, head_dim, need_mask: bool) -> str:
    key = (device, dtype, head_dim, need_mask)
    if key not in _RESOLVED:
        skipped = []
        for name in available_backends(device, dtype, head_dim):
            if need_mask and not BACKENDS[name].supports_mask:
                continue
            why = None if name == "math" else self_check(name, device, dtype, head_dim or 64, mask=need_mask)
            if why is None:
                _RESOLVED[key] = name
                break
            skipped.append(f"{name} ({why})")
        if skipped:
            warnings.warn(f"attn2d kernels: for {dtype} on {device} (head_dim {head_dim}) skipped "
                          f"{'; '.join(skipped)}; using {_RESOLVED[key]!r}", RuntimeWarning, stacklevel=3)
    return _RESOLVED[key]


def resolve_backend(backend: str = "auto", *, device, dtype: torch.dtype, head_dim: int | None = None) -> str:
    """The backend a call will use. backend="auto" defers to env ATTN2D_KERNEL_BACKEND if set, else picks the
    first self-checked backend of the auto order; a named backend is used as is (error if it cannot apply)."""
    device = torch.device(device)
    name = (os.environ.get(ENV_VAR, "").strip() or "auto") if backend == "auto" else backend
    if name == "auto":
        return _auto(device, dtype, head_dim, need_mask=False)
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (from {'argument' if backend != 'auto' else ENV_VAR}); "
                         f"known: {', '.join(BACKENDS)}, or 'auto'")
    why = BACKENDS[name].applies(device, dtype, head_dim)
    if why:
        raise ValueError(f"attention backend {name!r} cannot run {dtype} on {device} with head_dim {head_dim}: "
                         f"{why}; usable here: {', '.join(available_backends(device, dtype, head_dim))}")
    return name


def _named(backend: str) -> bool:
    """True if the caller (argument or env var) named the backend, rather than leaving it to "auto"."""
    return backend != "auto" or os.environ.get(ENV_VAR, "").strip() not in ("", "auto")


def plan(q, k, causal, q_pos, k_pos, backend) -> tuple[tuple[Piece, ...], Backend, Backend]:
    """The pieces of this block for its backend, the backend of the dense pieces and that of the mask pieces."""
    dev, dt, hd = q.device, q.dtype, q.shape[-1]
    impl = BACKENDS[resolve_backend(backend, device=dev, dtype=dt, head_dim=hd)]
    pieces = plan_pieces(q_pos, k_pos, q.shape[1], k.shape[1], causal, impl.causal_bottom_right,
                         impl.causal_tile)  # cached
    mask_impl = impl
    if any(p.kind == "mask" for p in pieces) and not (impl.supports_mask and _named(backend)):
        mask_impl = BACKENDS[_auto(dev, dt, hd, need_mask=True)]  # auto: the first backend whose masks check out
    return pieces, impl, mask_impl


