"""Local block-attention layer (kernels.py, planner.py, execute.py, selection.py, backends.py) against float64
references, on every CPU backend.

References are computed here, independently of the code under test: `_ref_block` (float64 scores with an explicit
positional mask) and reference.reference_attention (+ autograd for gradients). The CUDA adapters' argument binding
to the torch op schemas is checked on "meta" tensors.
"""
import contextlib
import dataclasses
import importlib.util
import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from attn2d.attention import backends, execute, kernels, selection
from attn2d.attention.kernels import attn_backward, attn_forward
from attn2d.attention.layout import Span, layout_spans, spans_tensor
from attn2d.attention.merge import merge_into, merge_partials
from attn2d.attention.planner import Piece, block_pieces
from attn2d.attention.reference import reference_attention
from attn2d.testing import counting_backend_calls

CPU_BACKENDS = ["math", "cpu_flash"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
B, H, N = 2, 3, 24
NEG_INF = float("-inf")


def _qkv(dtype, head_dim, n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, H, head_dim, generator=gen).to(dtype) for _ in range(4)]  # q, k, v, dout


def _leaf(t):
    return t.detach().to(torch.float64, copy=True).requires_grad_()


def _pos(spans):
    return spans_tensor((spans,) if isinstance(spans, Span) else tuple(spans))


def _ref_block(q, k, v, q_pos, k_pos, causal=True):
    """float64 attention of q rows at positions q_pos against keys at k_pos (explicit mask k_pos <= q_pos)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5  # (B, H, Lq, Lk)
    if causal:
        s = s.masked_fill(~(k_pos[None, :] <= q_pos[:, None]), NEG_INF)
    lse = torch.logsumexp(s, -1)  # (B, H, Lq)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0).unsqueeze(-1))
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double()), lse  # (B, Lq, H, D)


def _close(got, want, dtype, what):
    """fp64: abs 1e-10; fp32: 1e-5 and bf16: 2e-2 of the reference scale. -inf must match exactly."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{what}: -inf pattern differs"
    got, want = got.masked_fill(torch.isinf(got), 0), want.masked_fill(torch.isinf(want), 0)
    scale = want.abs().max().item()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5 * scale}.get(dtype, 2e-2 * scale)
    err = (got - want).abs().max().item()
    assert err <= tol, f"{what} ({dtype}): max error {err:.3e} > {tol:.3e}"


# ---------------------------------------------------------------- (a) whole sequence
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [80, 64])
def test_whole_sequence_matches_reference(backend, dtype, head_dim):
    q, k, v, dout = _qkv(dtype, head_dim)
    for causal in (True, False):
        q64, k64, v64 = (_leaf(t) for t in (q, k, v))
        ref, ref_lse = reference_attention(q64, k64, v64, causal=causal)
        ref.backward(dout.double())
        out, lse = attn_forward(q, k, v, causal=causal, backend=backend)
        assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        _close(out, ref, dtype, f"out causal={causal}")
        _close(lse, ref_lse, dtype, f"lse causal={causal}")
        grads = attn_backward(dout, q, k, v, out, lse, causal=causal, backend=backend)
        for name, g, want in zip("qkv", grads, (q64.grad, k64.grad, v64.grad)):
            _close(g, want, dtype, f"d{name} causal={causal}")


# ---------------------------------------------------------------- (b) Attention2D blocks, forward and backward
GRIDS = [(2, 2), (3, 3), (2, 3), (4, 1), (1, 4)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", GRIDS)
def test_attention2d_blocks(backend, dtype, rows, cols):
    """q Span(r, R, N/R) vs k Span(c, C, N/C): every block vs the masked reference; merging a row's C blocks gives
    the reference rows; per-block backward with the global out/lse, summed, gives autograd's gradients."""
    for head_dim in (80, 64):
        q, k, v, dout = _qkv(dtype, head_dim, seed=rows * 10 + cols)
        q64, k64, v64 = (_leaf(t) for t in (q, k, v))
        ref, ref_lse = reference_attention(q64, k64, v64, causal=True)
        ref.backward(dout.double())
        dk_sum = torch.zeros(B, N, H, head_dim, dtype=torch.float64)
        dv_sum = torch.zeros_like(dk_sum)
        for r in range(rows):
            qs = Span(r, rows, N // rows)
            qi = _pos(qs)
            k_spans = [Span(c, cols, N // cols) for c in range(cols)]
            out, lse = _forward_over_blocks(q, k, v, qs, k_spans, ref, ref_lse, backend, dtype,
                                            f"row {r} of {rows}x{cols}")
            dq = 0
            for c in range(cols):
                ks = Span(c, cols, N // cols)
                ki = _pos(ks)
                g = attn_backward(dout[:, qi], q[:, qi], k[:, ki], v[:, ki], out, lse, causal=True, q_pos=qs, k_pos=ks,
                                  backend=backend)
                dq = dq + g[0].double()
                dk_sum[:, ki] += g[1].double()
                dv_sum[:, ki] += g[2].double()
            _close(dq, q64.grad[:, qi], dtype, f"dq row {r}")
        _close(dk_sum, k64.grad, dtype, "dk")
        _close(dv_sum, v64.grad, dtype, "dv")


def _forward_over_blocks(q, k, v, qs, k_spans, ref, ref_lse, backend, dtype, label):
    """attn_forward of the queries at qs against each key block (each checked against its float64 block), merged
    and checked against the full reference rows; returns the merged (out, lse)."""
    qi = _pos(qs)
    parts = []
    for j, ks in enumerate(k_spans):
        ki = _pos(ks)
        o, l = attn_forward(q[:, qi], k[:, ki], v[:, ki], causal=True, q_pos=qs, k_pos=ks, backend=backend)
        want_o, want_l = _ref_block(q[:, qi], k[:, ki], v[:, ki], qi, ki)
        _close(o, want_o, dtype, f"{label}: out of key block {j}")
        _close(l, want_l, dtype, f"{label}: lse of key block {j}")
        parts.append((o, l))
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    _close(out, ref[:, qi], dtype, f"{label}: merged out")
    _close(lse, ref_lse[:, :, qi], dtype, f"{label}: merged lse")
    return out, lse


# ---------------------------------------------------------------- (c) zigzag vs contiguous spans
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zigzag_and_contiguous_blocks(backend, dtype):
    for head_dim, world in ((80, 2), (64, 3)):
        q, k, v, _ = _qkv(dtype, head_dim, seed=world)
        ref, ref_lse = reference_attention(q, k, v, causal=True)
        for i in range(world):
            for q_layout, k_layout in (("zigzag", "zigzag"), ("zigzag", "contiguous"), ("contiguous", "zigzag")):
                qs = layout_spans(q_layout, N, i, world)
                k_spans = [layout_spans(k_layout, N, j, world) for j in range(world)]
                _forward_over_blocks(q, k, v, qs, k_spans, ref, ref_lse, backend, dtype,
                                     f"{q_layout} {i} vs {k_layout} keys")


# ---------------------------------------------------------------- (d) backward over arbitrary key blocks
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [80, 64])
def test_backward_over_key_blocks_uses_global_out_lse(backend, dtype, head_dim):
    q, k, v, dout = _qkv(dtype, head_dim, seed=head_dim)
    q64, k64, v64 = (_leaf(t) for t in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, causal=True)
    ref.backward(dout.double())
    q_spans = (Span(12, 1, 12), Span(0, 1, 12))  # all queries, in a rotated order
    qi = _pos(q_spans)
    for k_blocks in ([(Span(0, 1, 6), Span(18, 1, 6)), Span(6, 2, 6), Span(7, 2, 6)],  # 3 blocks
                     [Span(1, 2, 12), (Span(0, 4, 6), Span(2, 4, 6))]):  # 2 blocks, steps 2 and 4
        parts = [attn_forward(q[:, qi], k[:, _pos(ks)], v[:, _pos(ks)], causal=True, q_pos=q_spans, k_pos=ks,
                              backend=backend) for ks in k_blocks]
        out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
        _close(out, ref[:, qi].detach(), dtype, "merged out")
        _close(lse, ref_lse[:, :, qi], dtype, "merged lse")
        dq = torch.zeros(B, N, H, head_dim, dtype=torch.float64)
        dk, dv = torch.zeros_like(dq), torch.zeros_like(dq)
        for ks in k_blocks:
            ki = _pos(ks)
            g = attn_backward(dout[:, qi], q[:, qi], k[:, ki], v[:, ki], out, lse, causal=True, q_pos=q_spans, k_pos=ks,
                              backend=backend)
            assert all(t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) for t in g)
            dq[:, qi] += g[0].double()
            dk[:, ki] += g[1].double()
            dv[:, ki] += g[2].double()
        _close(dq, q64.grad, dtype, "dq")
        _close(dk, k64.grad, dtype, "dk")
        _close(dv, v64.grad, dtype, "dv")


# ---------------------------------------------------------------- traps: empty rows, alignment by position
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_visible_key_give_minus_inf_and_zero(backend, dtype):
    q, k, v, dout = _qkv(dtype, 64, n=6)
    impl = backends.BACKENDS[backend]
    mask = torch.ones(6, 6, dtype=torch.bool).tril(-1)  # row 0 sees nothing (strictly causal block)
    mask[3] = False  # and row 3
    o, l = impl.forward(q, k, v, scale=0.125, causal=False, mask=mask)  # adapter level: the kernel's own output
    assert torch.isneginf(l[:, :, [0, 3]]).all() and (o[:, [0, 3]] == 0).all()
    assert torch.isfinite(l[:, :, [1, 2, 4, 5]]).all()
    # through attn_forward: block of queries at 0..5 vs keys at 1..6 (the strictly causal Attention2D block)
    o, l = attn_forward(q, k, v, causal=True, q_pos=Span(0, 1, 6), k_pos=Span(1, 1, 6), backend=backend)
    assert torch.isneginf(l[:, :, 0]).all() and (o[:, 0] == 0).all() and torch.isfinite(l[:, :, 1:]).all()
    # a block whose keys all come after its queries: lse -inf everywhere, out 0, zero gradients
    o, l = attn_forward(q, k, v, causal=True, q_pos=Span(0, 1, 6), k_pos=Span(6, 1, 6), backend=backend)
    assert torch.isneginf(l).all() and (o == 0).all()
    g = attn_backward(dout, q, k, v, o, l, causal=True, q_pos=Span(0, 1, 6), k_pos=Span(6, 1, 6), backend=backend)
    assert all((t == 0).all() for t in g)
    # backward with a GLOBAL lse of -inf on a row (no key anywhere) stays finite
    o, l = attn_forward(q, k, v, causal=True, q_pos=Span(0, 1, 6), k_pos=Span(1, 1, 6), backend=backend)
    g = attn_backward(dout, q, k, v, o, l, causal=True, q_pos=Span(0, 1, 6), k_pos=Span(1, 1, 6), backend=backend)
    assert all(torch.isfinite(t).all() for t in g) and (g[0][:, 0] == 0).all()
    # descending positions take the generic explicit-mask path: the empty row (position 0, last) reaches the kernel
    qs = Span(5, -1, 6)
    o, l = attn_forward(q, k, v, causal=True, q_pos=qs, k_pos=Span(1, 1, 6), backend=backend)
    want_o, want_l = _ref_block(q, k, v, _pos(qs), _pos(Span(1, 1, 6)))
    _close(o, want_o, dtype, "out, descending q positions")
    _close(l, want_l, dtype, "lse, descending q positions")
    g = attn_backward(dout, q, k, v, o, l, causal=True, q_pos=qs, k_pos=Span(1, 1, 6), backend=backend)
    assert all(torch.isfinite(t).all() for t in g) and (g[0][:, 5] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_square_offset_causal_is_aligned_by_position(backend, dtype):
    """Non-square same-step pairs (neither top-left nor bottom-right in general) vs the positional mask."""
    q, k, v, _ = _qkv(dtype, 64, n=16)
    cases = [(Span(5, 1, 3), Span(0, 1, 8)),  # bottom-right-like (3 x 8)
             (Span(0, 1, 8), Span(0, 1, 3)),  # top-left-like (8 x 3)
             (Span(2, 1, 6), Span(0, 1, 12)),  # offset 2, keys run past the last query
             (Span(7, 1, 5), Span(3, 1, 4)),  # rows 7.. all see keys 3..6, except none: fully visible
             (Span(4, 3, 5), Span(1, 3, 7)),  # step 3, offset 1
             (Span(1, 2, 6), Span(4, 2, 6))]  # step 2, keys start later: empty rows then causal
    for qs, ks in cases:
        qi, ki = _pos(qs), _pos(ks)
        o, l = attn_forward(q[:, :qs.n], k[:, :ks.n], v[:, :ks.n], causal=True, q_pos=qs, k_pos=ks, backend=backend)
        want_o, want_l = _ref_block(q[:, :qs.n], k[:, :ks.n], v[:, :ks.n], qi, ki)
        _close(o, want_o, dtype, f"out {qs} vs {ks}")
        _close(l, want_l, dtype, f"lse {qs} vs {ks}")
        # a top-left backend only ever gets square causal pieces
        bottom_right = backends.BACKENDS[backend].causal_bottom_right
        for p in block_pieces(qs, ks, qs.n, ks.n, causal=True, bottom_right=bottom_right):
            assert p.kind != "causal" or bottom_right or p.n_q == p.n_k


# ---------------------------------------------------------------- (e) the decomposition itself
def test_block_pieces_classify_pairs_without_tensors():
    n = 6
    assert block_pieces(Span(0, 1, n), Span(n, 1, n), n, n, causal=True) == []  # fully masked: no call
    assert block_pieces(Span(n, 1, n), Span(0, 1, n), n, n, causal=True) == [Piece(0, n, 0, n, "full")]
    assert block_pieces(None, None, n, n, causal=True) == [Piece(0, n, 0, n, "causal")]
    assert block_pieces(None, None, n, 4, causal=False) == [Piece(0, n, 0, 4, "full")]
    # Attention2D on a square grid: r >= c is one square causal call; r < c drops row 0 and key n-1 (stripe trick)
    assert block_pieces(Span(1, 2, n), Span(0, 2, n), n, n, causal=True) == [Piece(0, n, 0, n, "causal")]
    assert block_pieces(Span(0, 2, n), Span(1, 2, n), n, n, causal=True) == [Piece(1, n, 0, n - 1, "causal")]
    # offset d = 2: one bottom-right call, or unmasked first 2 keys + square causal for top-left backends
    assert block_pieces(Span(2, 1, 4), Span(0, 1, 8), 4, 8, causal=True) == [Piece(0, 4, 0, 6, "causal")]
    assert block_pieces(Span(2, 1, 4), Span(0, 1, 8), 4, 8, causal=True, bottom_right=False) == [
        Piece(0, 4, 0, 2, "full"), Piece(0, 4, 2, 6, "causal")]
    # queries past the keys: a causal part and a fully visible tail
    assert block_pieces(Span(0, 1, 8), Span(0, 1, 3), 8, 3, causal=True) == [
        Piece(0, 3, 0, 3, "causal"), Piece(3, 8, 0, 3, "full")]
    # different steps (2x3 grid): re-strided to step 6, strided causal/full pieces, no mask (no masked-out rectangle)
    qs, ks = Span(1, 2, 12), Span(0, 3, 8)
    ps = block_pieces(qs, ks, 12, 8, causal=True)
    assert {p.kind for p in ps} <= {"causal", "full"} and {(p.q_stride, p.k_stride) for p in ps} == {(3, 2)}
    assert _visible_pairs(ps) == _true_pairs(qs, ks)
    for bottom_right in (True, False):  # top-left backends get square causal pieces only
        ps = block_pieces(Span(0, 3, 10), Span(1, 2, 15), 10, 15, causal=True, bottom_right=bottom_right)
        assert _visible_pairs(ps) == _true_pairs(Span(0, 3, 10), Span(1, 2, 15))
        assert all(p.kind != "causal" or bottom_right or p.n_q == p.n_k for p in ps)
    # steps 7 and 11 would need 77 sub-span pairs (> MAX_RESTRIDE_PAIRS): explicit mask on the staircase instead
    qs, ks = Span(1, 7, 30), Span(0, 11, 20)
    ps = block_pieces(qs, ks, 30, 20, causal=True)
    assert ps[0].kind == "mask" and ps[0].q_span == Span(1, 7, ps[0].q1)
    assert torch.equal(ps[0].mask(), visible_of(qs, ks)[ps[0].q0:ps[0].q1, :ps[0].k1])
    assert _visible_pairs(ps) == _true_pairs(qs, ks)
    # zigzag pair: 4 span pairs, two fully masked, two fully visible on the same rows: ONE unmasked call
    ps = block_pieces((Span(0, 1, 4), Span(12, 1, 4)), (Span(4, 1, 4), Span(8, 1, 4)), 8, 8, causal=True)
    assert ps == [Piece(4, 8, 0, 8, "full")]


def visible_of(qs, ks):
    return _pos(ks)[None, :] <= _pos(qs)[:, None]


def _true_pairs(qs, ks):
    """(row, key) index pairs of the block that causality makes visible."""
    return {tuple(x) for x in visible_of(qs, ks).nonzero().tolist()}


def _visible_pairs(pieces):
    """(row, key) index pairs the pieces treat as visible; asserts no pair is computed twice."""
    seen = []
    for p in pieces:
        rows, keys = range(p.q0, p.q1, p.q_stride), range(p.k0, p.k1, p.k_stride)
        vis = (p.mask() if p.kind == "mask" else torch.ones(p.n_q, p.n_k, dtype=torch.bool).tril(p.n_k - p.n_q)
               if p.kind == "causal" else torch.ones(p.n_q, p.n_k, dtype=torch.bool))
        seen += [(rows[i], keys[j]) for i, j in vis.nonzero().tolist()]
    assert len(seen) == len(set(seen)), "a (row, key) pair is computed by two pieces"
    return set(seen)


def test_fully_masked_pair_makes_no_backend_call(monkeypatch):
    calls = []
    math = backends.BACKENDS["math"]

    def counting_forward(q, k, v, **kw):
        calls.append(("fwd", q.shape[1], k.shape[1], kw["causal"], kw["mask"] is not None))
        return math.forward(q, k, v, **kw)

    def counting_backward(*args, **kw):
        calls.append(("bwd",))
        return math.backward(*args, **kw)

    monkeypatch.setitem(backends.BACKENDS, "math", backends.Backend(
        "math", counting_forward, counting_backward, math.applies, True, True))
    q, k, v, dout = _qkv(torch.float64, 16, n=8)
    out, lse = attn_forward(q, k, v, causal=True, q_pos=Span(0, 1, 8), k_pos=Span(8, 1, 8), backend="math")
    assert calls == [] and torch.isneginf(lse).all() and (out == 0).all()
    dq, dk, dv = attn_backward(dout, q, k, v, out, lse, causal=True, q_pos=Span(0, 1, 8), k_pos=Span(8, 1, 8),
                               backend="math")
    assert calls == [] and (dq == 0).all() and (dk == 0).all()
    # two q spans: the first sees none of the keys (no call), the second sees all (one unmasked call)
    q_pos = (Span(0, 1, 4), Span(20, 1, 4))
    out, lse = attn_forward(q, k, v, causal=True, q_pos=q_pos, k_pos=Span(10, 1, 8), backend="math")
    assert calls == [("fwd", 4, 8, False, False)]
    assert torch.isneginf(lse[:, :, :4]).all() and torch.isfinite(lse[:, :, 4:]).all()
    attn_backward(dout, q, k, v, out, lse, causal=True, q_pos=q_pos, k_pos=Span(10, 1, 8), backend="math")
    assert calls[1:] == [("bwd",)]


# ---------------------------------------------------------------- choosing a backend
def test_backend_resolution_and_overrides(monkeypatch):
    monkeypatch.delenv(selection.ENV_VAR, raising=False)
    assert selection.available_backends("cpu", torch.float32) == ["cpu_flash", "math"]
    for dtype in DTYPES:  # cpu_flash passes its self-check for fp64, fp32 and bf16 with torch 2.13
        assert kernels.resolve_backend(device="cpu", dtype=dtype, head_dim=80) == "cpu_flash"
    monkeypatch.setenv(selection.ENV_VAR, "math")
    assert kernels.resolve_backend(device="cpu", dtype=torch.float32, head_dim=64) == "math"
    assert kernels.resolve_backend("cpu_flash", device="cpu", dtype=torch.float32) == "cpu_flash"  # argument wins
    monkeypatch.setenv(selection.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="nonsense.*ATTN2D_KERNEL_BACKEND"):
        kernels.resolve_backend(device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="cuda_flash.*usable here: cpu_flash, math"):
        kernels.resolve_backend("cuda_flash", device="cpu", dtype=torch.float32, head_dim=64)
    # on a CUDA device (no GPU needed to ask): flash-attn is reported missing, fp64 leaves only math
    if importlib.util.find_spec("flash_attn") is None:
        why = backends.BACKENDS["flash_attn"].applies(torch.device("cuda"), torch.bfloat16, 64)
        assert "flash-attn not usable" in why
    assert selection.available_backends("cuda", torch.float64) == ["math"]
    assert selection.available_backends("cuda", torch.float32) == ["cuda_efficient", "math"]
    assert set(selection.available_backends("cuda", torch.bfloat16, 80)) - {"flash_attn"} == {
        "cuda_flash", "cudnn", "cuda_efficient", "math"}
    assert "cuda_flash" not in selection.available_backends("cuda", torch.bfloat16, 36)  # head_dim not a multiple of 8


def test_auto_falls_back_when_a_backend_disagrees_with_math(monkeypatch):
    monkeypatch.delenv(selection.ENV_VAR, raising=False)
    monkeypatch.setattr(selection, "_CHECKED", {})
    monkeypatch.setattr(selection, "_RESOLVED", {})
    good = backends.BACKENDS["cpu_flash"]

    def off_by_a_bit(q, k, v, **kw):
        out, lse = good.forward(q, k, v, **kw)
        return out, lse + 0.01

    monkeypatch.setitem(backends.BACKENDS, "cpu_flash", backends.Backend(
        "cpu_flash", off_by_a_bit, good.backward, good.applies, False, True))
    with pytest.warns(RuntimeWarning, match="skipped cpu_flash \\(lse differs from math"):
        assert kernels.resolve_backend(device="cpu", dtype=torch.float32, head_dim=64) == "math"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resolved once: no second warning
        assert kernels.resolve_backend(device="cpu", dtype=torch.float32, head_dim=64) == "math"


def test_default_backend_matches_reference():
    q, k, v, dout = _qkv(torch.float32, 64)
    out, lse = attn_forward(q, k, v, causal=True)  # backend="auto"
    ref, ref_lse = reference_attention(q, k, v, causal=True)
    _close(out, ref, torch.float32, "out")
    _close(lse, ref_lse, torch.float32, "lse")


# ---------------------------------------------------------------- CUDA adapters: schema binding on meta tensors
@pytest.mark.parametrize("name", ["cuda_flash", "cuda_efficient", "cudnn"])
def test_cuda_adapters_bind_to_torch_op_schemas(name):
    """Not a numerical test: runs every piece kind through the adapter on meta tensors, which
    dispatches to torch's meta kernels and so checks argument count, order, types and output shapes."""
    impl = backends.BACKENDS[name]
    mask_impl = impl if impl.supports_mask else backends.BACKENDS["cuda_efficient"]
    for q_pos, k_pos, n_q, n_k in (((Span(0, 1, 4), Span(12, 1, 4)), (Span(2, 1, 5), Span(9, 1, 4)), 8, 9),
                                   (Span(1, 2, 6), Span(0, 3, 4), 6, 4),  # re-strided: strided row/key views
                                   (Span(1, 7, 5), Span(0, 11, 4), 5, 4),  # explicit mask
                                   (Span(2, 1, 4), Span(0, 1, 8), 4, 8)):
        q = torch.empty(B, n_q, H, 80, device="meta", dtype=torch.bfloat16)
        k = torch.empty(B, n_k, H, 80, device="meta", dtype=torch.bfloat16)
        pieces = block_pieces(q_pos, k_pos, n_q, n_k, causal=True, bottom_right=impl.causal_bottom_right)
        out, lse = execute.forward_pieces(q, k, k, pieces, 0.1, impl, mask_impl)
        assert out.shape == q.shape and out.dtype == torch.bfloat16 and lse.shape == (B, H, n_q)
        assert lse.dtype == torch.float32
        dq, dk, dv = execute.backward_pieces(q, q, k, k, out, lse, pieces, 0.1, impl, mask_impl)
        assert dq.shape == q.shape and dk.shape == dv.shape == k.shape and dq.dtype == torch.float32


def test_auto_routes_masked_pieces_apart_from_dense_ones(monkeypatch):
    """A backend whose explicit masks are wrong (dense pieces fine) keeps the dense pieces under "auto"; its masked
    pieces go to the next backend whose mask check passes ("math" on CPU)."""
    monkeypatch.delenv(selection.ENV_VAR, raising=False)
    monkeypatch.setattr(selection, "_CHECKED", {})
    monkeypatch.setattr(selection, "_RESOLVED", {})
    good = backends.BACKENDS["cpu_flash"]
    used = []

    def bad_masks(q, k, v, **kw):
        used.append("mask" if kw["mask"] is not None else "dense")
        out, lse = good.forward(q, k, v, **kw)
        return (out, lse + 0.5) if kw["mask"] is not None else (out, lse)

    monkeypatch.setitem(backends.BACKENDS, "cpu_flash", backends.Backend(
        "cpu_flash", bad_masks, good.backward, good.applies, False, True))
    q, k, v, _ = _qkv(torch.float32, 64)
    qs, ks = Span(1, 7, 12), Span(0, 11, 8)  # steps 7, 11 (not re-strided): an explicit-mask piece, an unmasked tail
    with pytest.warns(RuntimeWarning, match="skipped cpu_flash \\(lse differs"):
        out, lse = attn_forward(q[:, :12], k[:, :8], v[:, :8], causal=True, q_pos=qs, k_pos=ks)
    want_o, want_l = _ref_block(q[:, :12], k[:, :8], v[:, :8], _pos(qs), _pos(ks))
    _close(out, want_o, torch.float32, "out")
    _close(lse, want_l, torch.float32, "lse")
    used.clear()
    attn_forward(q[:, :12], k[:, :8], v[:, :8], causal=True, q_pos=qs, k_pos=ks)
    assert used == ["dense"]  # the tail on cpu_flash, the staircase on math
    assert kernels.resolve_backend(device="cpu", dtype=torch.float32, head_dim=64) == "cpu_flash"


# ---------------------------------------------------------------- flash_attn adapter vs a stand-in of its interface
@torch.library.custom_op("attn2d_test::flash_attn_backward", mutates_args=("dq", "dk", "dv"))
def _fake_flash_attn_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                              softmax_lse: torch.Tensor, dq: torch.Tensor | None, dk: torch.Tensor | None,
                              dv: torch.Tensor | None, dropout_p: float, softmax_scale: float, causal: bool,
                              window_size_left: int, window_size_right: int, softcap: float,
                              alibi_slopes: torch.Tensor | None, deterministic: bool,
                              rng_state: torch.Tensor | None = None) -> torch.Tensor:
    """flash-attn 2.7+'s _flash_attn_backward signature (a custom op writing dq, dk, dv), computed by "math"."""
    assert dropout_p == 0.0 and (window_size_left, window_size_right) == (-1, -1) and alibi_slopes is None
    g = backends.math_backward(dout, q, k, v, out, softmax_lse, scale=softmax_scale, causal=causal, mask=None)
    for buf, t in zip((dq, dk, dv), g):
        buf.copy_(t)
    return torch.empty(0)


def _fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                          alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_func: bottom-right causal; lse +inf on a row with no key (flash-attn's convention)."""
    out, lse = backends.math_forward(q, k, v, scale=softmax_scale, causal=causal, mask=None)
    out, lse = out.to(q.dtype), lse.float().masked_fill(torch.isneginf(lse), float("inf"))
    return (out, lse, None) if return_attn_probs else out


def test_flash_attn_adapter_follows_its_documented_interface(monkeypatch):
    """Not the real package: a stand-in with flash-attn 2.7+'s signatures checks that the adapter
    finds the version, passes arguments in the documented order and reads lse / fills dq, dk, dv as documented."""
    fai = types.ModuleType("flash_attn.flash_attn_interface")
    fai.flash_attn_func, fai._flash_attn_backward = _fake_flash_attn_func, _fake_flash_attn_backward
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", fai)
    monkeypatch.setattr(backends, "_FA", [])
    assert backends.BACKENDS["flash_attn"].applies(torch.device("cuda"), torch.bfloat16, 64) is None
    impl = backends.BACKENDS["flash_attn"]
    q, k, v, dout = _qkv(torch.float32, 64, n=12)  # flash-attn keeps lse and grads in fp32
    q_pos, k_pos = (Span(0, 1, 6), Span(18, 1, 6)), (Span(3, 1, 6), Span(12, 1, 6))  # offsets, empty rows
    pieces = block_pieces(q_pos, k_pos, 12, 12, causal=True, bottom_right=impl.causal_bottom_right)
    out, lse = execute.forward_pieces(q, k, v, pieces, 0.125, impl, impl)
    qi, ki = _pos(q_pos), _pos(k_pos)
    want_o, want_l = _ref_block(q, k, v, qi, ki)
    _close(out, want_o, torch.float32, "out")
    _close(lse, want_l, torch.float32, "lse")
    q64, k64, v64 = (_leaf(t) for t in (q, k, v))
    o64, _ = _ref_block(q64, k64, v64, qi, ki)
    o64.backward(dout.double())
    grads = execute.backward_pieces(dout, q, k, v, out, lse, pieces, 0.125, impl, impl)
    for name, g, want in zip("qkv", grads, (q64.grad, k64.grad, v64.grad)):
        _close(g, want, torch.float32, f"d{name}")
    # adapter level: causal with Lq > Lk leaves rows 0, 1 without a key; flash-attn says +inf, the adapter -inf
    o, l = impl.forward(q[:, :5], k[:, :3], v[:, :3], scale=0.125, causal=True, mask=None)
    assert torch.isneginf(l[:, :, :2]).all() and (o[:, :2] == 0).all() and torch.isfinite(l[:, :, 2:]).all()


# ---------------------------------------------------------------- the benchmark script runs (tiny, CPU)
def test_bench_kernels_script_runs_and_checks(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.jsonl"
    rows = bench.main(["--device", "cpu", "--dtype", "float32", "--seq", "48", "--heads", "2", "--head-dim", "16",
                       "--block", "2,3,0,1", "--warmup", "1", "--iters", "2", "--out", str(out)])
    assert [r["backend"] for r in rows] == ["cpu_flash", "math", "torch_sdpa"]
    assert all(r["check"] in ("ok", "n/a") and r["fwd_ms"] > 0 and r["fwd_bwd_tflops"] > 0 for r in rows)
    assert all(r["max_rel_err"] < 1e-5 for r in rows[:2])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 and lines[0]["block"] == "2,3,0,1" and lines[0]["kind"] == "bench_kernels"


# ---------------------------------------------------------------- backward from delta instead of out
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_from_delta_equals_backward_from_out(backend, dtype):
    """Attention2D gathers delta = rowsum(dO * O) instead of O: the stand-in out' must give the same gradients,
    also for a zero dout row (delta 0) and a row of tiny dout (1e-30: its norm would underflow unscaled)."""
    q, k, v, dout = _qkv(dtype, 80, seed=7)
    dout[0, 3] = 0
    dout[1, 5, 1] = dout[1, 5, 1] * 1e-30 if dtype != torch.bfloat16 else dout[1, 5, 1] * 1e-20
    q64, k64, v64 = (_leaf(t) for t in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, causal=True)
    ref.backward(dout.double())
    out, lse = attn_forward(q, k, v, causal=True, backend=backend)
    delta = (dout.to(lse.dtype) * out.to(dout.dtype).to(lse.dtype)).sum(-1).transpose(1, 2)  # (B, H, N)
    stand_in = kernels.out_for_delta(dout, delta)
    rtol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5  # bf16 out' moves delta by < 2^-8 (no cancellation)
    got_delta = (dout.to(lse.dtype) * stand_in.to(lse.dtype)).sum(-1).transpose(1, 2)
    assert stand_in.dtype == dtype and torch.allclose(got_delta, delta, rtol=rtol, atol=0)
    assert stand_in[0, 3].abs().max() == 0
    assert stand_in.to(lse.dtype).norm(dim=-1).le(out.to(lse.dtype).norm(dim=-1) * (1 + rtol)).all()  # |out'| <= |O|
    got = attn_backward(dout, q, k, v, None, lse, causal=True, backend=backend, delta=delta)
    for g, want, name in zip(got, (q64.grad, k64.grad, v64.grad), ("dq", "dk", "dv")):
        _close(g, want, dtype, f"{name} from delta")
        tiny = want[1, 5, 1].abs().max().item()  # the tiny row's dq keeps its magnitude (not flushed to 0)
        if name == "dq" and dtype != torch.bfloat16:
            assert abs(g[1, 5, 1].double() - want[1, 5, 1]).max().item() <= 1e-3 * tiny, name
    with pytest.raises(ValueError, match=r"out=None needs delta of shape \(B, H, Lq\) = \(2, 3, 24\), got None"):
        attn_backward(dout, q, k, v, None, lse, causal=True, backend=backend)


# ---------------------------------------------------------------- grouped-query attention
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grouped_query_blocks_match_reference(backend):
    """k, v with 1 head for q's 3 (query head h uses k/v head h // 3): forward and backward of a re-strided
    staircase block and of a plain causal block, dk and dv summed over each group."""
    gen = torch.Generator().manual_seed(11)
    for qs, ks in ((Span(1, 2, 12), Span(0, 3, 8)), (None, None)):
        n_q, n_k = (12, 8) if qs is not None else (10, 10)
        q, dout = (torch.randn(B, n_q, H, 16, generator=gen) for _ in range(2))
        k, v = (torch.randn(B, n_k, 1, 16, generator=gen) for _ in range(2))
        qp, kp = (_pos(qs), _pos(ks)) if qs is not None else (torch.arange(n_q), torch.arange(n_k))
        q64, k64, v64 = (_leaf(t) for t in (q, k, v))
        s = torch.einsum("bqhd,bkhd->bhqk", q64, k64.expand(-1, -1, H, -1)) / 4.0  # (B, H, Lq, Lk)
        p = torch.softmax(s.masked_fill(~(kp[None, :] <= qp[:, None]), NEG_INF), -1)
        ref = torch.einsum("bhqk,bkhd->bqhd", p, v64.expand(-1, -1, H, -1))
        ref.backward(dout.double())
        out, lse = attn_forward(q, k, v, causal=True, q_pos=qs, k_pos=ks, backend=backend)
        got = attn_backward(dout, q, k, v, out, lse, causal=True, q_pos=qs, k_pos=ks, backend=backend)
        _close(out, ref.detach(), torch.float32, f"GQA out {qs}")
        for g, want, name in zip(got, (q64.grad, k64.grad, v64.grad), ("dq", "dk", "dv")):
            assert g.shape == want.shape, name
            _close(g, want, torch.float32, f"GQA {name} {qs}")


# ---------------------------------------------------------------- one backend call per ring step / square-grid block
@pytest.fixture
def counting():
    """counting(backend) -> the list of that backend's calls for the rest of the test (attn2d.testing)."""
    with contextlib.ExitStack() as stack:
        yield lambda name: stack.enter_context(counting_backend_calls(name))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ring_zigzag_steps_make_one_kernel_call_each(counting, backend):
    """P = 4, zigzag, causal: every (rank, step) block is ONE backend call forward and one backward (step 0: the
    causal square on both local chunks; lower source: all queries x first received chunk; higher source: second
    local chunk x both received chunks), and it equals the float64 block; 4 calls per rank per pass."""
    from attn2d.attention.ring import ring_plan

    P, n_seq = 4, 64
    n = n_seq // P
    q, k, v, dout = _qkv(torch.float32, 16, n=n_seq, seed=3)
    calls = counting(backend)
    for rank in range(P):
        qi = _pos(layout_spans("zigzag", n_seq, rank, P))
        before = len(calls)
        for s, (q_pos, k_pos) in enumerate(ring_plan("zigzag", n_seq, rank, P)):
            ki = _pos(k_pos)
            got = len(calls)
            o, l = attn_forward(q[:, qi], k[:, ki], v[:, ki], causal=True, q_pos=q_pos, k_pos=k_pos, backend=backend)
            src = (rank - s) % P
            rows, keys = (n, n) if s == 0 else (n, n // 2) if src < rank else (n // 2, n)
            assert calls[got:] == [("fwd", rows, keys)], (rank, s, calls[got:])
            want_o, want_l = _ref_block(q[:, qi], k[:, ki], v[:, ki], qi, ki)
            _close(o, want_o, torch.float32, f"rank {rank} step {s} out")
            _close(l, want_l, torch.float32, f"rank {rank} step {s} lse")
            got = len(calls)
            attn_backward(dout[:, qi], q[:, qi], k[:, ki], v[:, ki], o, l, causal=True, q_pos=q_pos, k_pos=k_pos,
                          backend=backend)
            assert calls[got:] == [("bwd", rows, keys)], (rank, s, calls[got:])
        assert len(calls) - before == 2 * P  # 4 forward + 4 backward calls for this rank


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("side", [2, 3])
def test_square_grid_attention2d_block_is_one_kernel_call(counting, backend, side):
    """Attention2D's block on a square grid (queries r mod R, keys c mod R) is one backend call each way, for
    every (r, c): causal when c <= r, the stripe trick (rows 1.., keys ..-1) when c > r."""
    n_seq = 6 * side
    q, k, v, dout = _qkv(torch.float32, 16, n=n_seq, seed=side)
    calls = counting(backend)
    for r in range(side):
        for c in range(side):
            qs, ks = Span(r, side, n_seq // side), Span(c, side, n_seq // side)
            qi, ki = _pos(qs), _pos(ks)
            got = len(calls)
            o, l = attn_forward(q[:, qi], k[:, ki], v[:, ki], causal=True, q_pos=qs, k_pos=ks, backend=backend)
            attn_backward(dout[:, qi], q[:, qi], k[:, ki], v[:, ki], o, l, causal=True, q_pos=qs, k_pos=ks,
                          backend=backend)
            assert [x[0] for x in calls[got:]] == ["fwd", "bwd"], (r, c, calls[got:])
            want_o, want_l = _ref_block(q[:, qi], k[:, ki], v[:, ki], qi, ki)
            _close(o, want_o, torch.float32, f"block ({r}, {c}) out")
            _close(l, want_l, torch.float32, f"block ({r}, {c}) lse")


@pytest.mark.parametrize("side", [1, 3])
def test_big_causal_squares_run_as_strips_on_tiled_backends(monkeypatch, counting, side):
    """A backend with causal_tile t (cpu_flash: 128, as its causal flag skips only whole 512-key tiles) runs a
    causal square of n >= 3t rows as n // t strips, 2 (n // t) - 1 calls each way (a causal square per strip and an
    unmasked call on the keys before it), exact against float64; below 3t rows it stays one call. With t = 2 here,
    so that small blocks show it: the whole sequence (side 1) and Attention2D's diagonal 3x3-grid block."""
    tiled = dataclasses.replace(backends.BACKENDS["cpu_flash"], causal_tile=2)
    monkeypatch.setitem(backends.BACKENDS, "cpu_flash", tiled)
    calls = counting("cpu_flash")
    for n in (4, 5, 6, 7, 12):  # rows of the block
        n_seq = n * side
        q, k, v, dout = _qkv(torch.float32, 16, n=n_seq, seed=n)
        qs = ks = Span(side - 1, side, n)
        qi = _pos(qs)
        got = len(calls)
        o, l = attn_forward(q[:, qi], k[:, qi], v[:, qi], causal=True, q_pos=qs, k_pos=ks, backend="cpu_flash")
        g = attn_backward(dout[:, qi], q[:, qi], k[:, qi], v[:, qi], o, l, causal=True, q_pos=qs, k_pos=ks,
                          backend="cpu_flash")
        strips = n // 2 if n >= 6 else 1
        assert [x[0] for x in calls[got:]] == ["fwd"] * (2 * strips - 1) + ["bwd"] * (2 * strips - 1), (n, calls)
        q64, k64, v64 = (_leaf(t[:, qi]) for t in (q, k, v))
        ref = reference_attention(q64, k64, v64, causal=True)[0]
        ref.backward(dout[:, qi].double())
        _close(o, ref.detach(), torch.float32, f"n {n} out")
        for a, want, name in zip(g, (q64.grad, k64.grad, v64.grad), ("dq", "dk", "dv")):
            _close(a, want, torch.float32, f"n {n} {name}")


def test_row_profile_plans_cover_each_visible_pair_once():
    """The row-profile plan (one call per run of rows) on many increasing layouts, both causal conventions and with
    causal squares cut into strips: every visible (row, key) pair computed exactly once, no masked pair, top-left
    backends only square causal pieces."""
    cases = [(layout_spans(lay, 48, i, P), layout_spans(lay, 48, j, P), 48 // P)
             for lay in ("zigzag", "contiguous", "cyclic") for P in (1, 2, 3, 4) for i in range(P) for j in range(P)]
    cases += [(Span(2, 1, 4), Span(0, 1, 8), None), (Span(0, 1, 8), Span(0, 1, 3), None),
              (Span(1, 2, 7), Span(0, 3, 5), None), ((Span(0, 1, 3), Span(10, 1, 3)), Span(1, 2, 6), None)]
    for qs, ks, _ in cases:
        n_q, n_k = len(_pos(qs)), len(_pos(ks))
        for bottom_right, tile in ((True, 0), (False, 0), (False, 2), (False, 3)):
            ps = block_pieces(qs, ks, n_q, n_k, causal=True, bottom_right=bottom_right, causal_tile=tile)
            assert _visible_pairs(ps) == _true_pairs(qs, ks), (qs, ks, ps)
            assert all(p.kind != "causal" or bottom_right or p.n_q == p.n_k for p in ps), ps
            assert not tile or all(p.kind != "causal" or p.n_q < 3 * tile for p in ps), ps  # cut in strips


def test_merge_into_equals_merge_partials_in_place():
    """In-place merge of a partial into running (out, lse) views: the same as merge_partials, -inf rows included
    (a running row with nothing yet takes the partial; a row empty on both sides stays 0 / -inf)."""
    gen = torch.Generator().manual_seed(5)
    out_full = torch.randn(2, 10, 3, 8, generator=gen)
    lse_full = torch.randn(2, 3, 10, generator=gen)
    o, l = torch.randn(2, 6, 3, 8, generator=gen), torch.randn(2, 3, 6, generator=gen)
    out_full[:, 4] = 0
    lse_full[:, :, 4] = NEG_INF  # running row 4 (partial row 0) saw nothing yet
    o[:, 1], l[:, :, 1] = 0, NEG_INF  # partial row 1 saw nothing
    out_full[:, 5], lse_full[:, :, 5] = 0, NEG_INF  # row 5 (partial row 1): empty on both sides
    want_o, want_l = merge_partials([out_full[:, 4:], o], [lse_full[:, :, 4:], l])
    untouched = out_full[:, :4].clone(), lse_full[:, :, :4].clone()
    merge_into(out_full[:, 4:], lse_full[:, :, 4:], o, l)  # rows 4.. of the running buffers, in place
    _close(out_full[:, 4:], want_o, torch.float32, "merged out")
    _close(lse_full[:, :, 4:], want_l, torch.float32, "merged lse")
    assert torch.equal(out_full[:, 4], o[:, 0]) and (out_full[:, 5] == 0).all()
    assert torch.equal(out_full[:, :4], untouched[0]) and torch.equal(lse_full[:, :, :4], untouched[1])
