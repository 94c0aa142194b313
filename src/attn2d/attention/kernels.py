"""Local block attention returning (out, lse), and its backward given the GLOBAL out and lse.

Every distributed algorithm computes attention of a block of queries against a block of keys whose global
positions are given as Spans (see layout.py). The causal rule is positional: key j is visible to query i iff
k_pos[j] <= q_pos[i]. Position defaults are 0..L-1 for both (top-left alignment).

Conventions: q (B, Lq, H, D), k, v (B, Lk, H, D); out (B, Lq, H, D) in q's dtype; lse (B, H, Lq) float32
(float64 for float64 inputs), natural log, -inf for a row that sees no key (out = 0 there).
The backward takes the final (merged) out and lse of the whole row, and the incoming dout, and returns this
block's contribution dq, dk, dv in float32 (float64 for float64 inputs): the usual trick that lets blocks be
differentiated independently, since P_block = exp(S_block - lse_global) and delta = rowsum(dout * out_global).

How a causal block is computed (decided from the Spans alone, once per (spans, sizes, backend kind): cached).
First the row-profile plan (`_prefix_pieces`): when the keys' positions increase and the queries' do not decrease,
every row sees a prefix of the keys, and each run of rows whose visible-key count is constant (one unmasked call)
or grows by one per row (one causal call) is one backend call, on disjoint rows (no merging). A zigzag or
contiguous ring step and a square-grid Attention2D block are each exactly one call this way. Otherwise (or when
that needs more calls) the span-pair decomposition: every (q span, k span) pair is fully masked (skipped: no call),
fully visible (one unmasked call), or split by `_pair_pieces` into: rows before the first key (empty, never
computed), an offset-causal part and a fully visible tail. With equal steps the offset-causal part is exactly a
bottom-right causal call (Lk = Lq + d; the stripe trick "q[1:] vs k[:-1]" is the case d = 0 after dropping row 0);
backends whose causal flag is top-left get it as an unmasked call on the first d keys plus a square causal call.
Different steps (cyclic layouts of non-square grids, e.g. q step 2, k step 3) are re-strided to lcm(steps):
strided sub-spans of rows and keys with equal steps, each pair offset-causal (`_restrided_pieces`), so no mask and
half the rectangle's work; an explicit boolean mask is left only for pairs that would need more than
MAX_RESTRIDE_PAIRS sub-span pairs. Rows met by several pieces are merged in place in fp32 (merge.merge_into); the
backward runs the same pieces and sums dq over them. Non-causal blocks are one unmasked call. A plan that is one
piece over the whole block returns the backend's output as is (no buffer, no copy).

Entry points: attn_forward / attn_backward (a block's result), and for a caller that keeps running accumulators
(Ring Attention) attn_forward_into (merge into (out, lse) in place, only the rows the pieces touch) and
attn_backward_into (dq added in place, key gradients handed back per piece). 

Backends (backends.py): "math" (materialises scores; everywhere-correct, fp64), "cpu_flash", "cuda_flash",
"cuda_efficient", "cudnn", "flash_attn". backend="auto" (or env ATTN2D_KERNEL_BACKEND) picks the first backend of
backends.preference(device) that applies and passes a one-time self-check against "math" (forward and backward,
tiny inputs, per backend/device/dtype/head_dim), warning when it skips one. Explicit-mask pieces are checked
apart: under "auto" they go to the first backend whose mask check passes (cuDNN may run the dense pieces and hand
its masks to cuda_efficient); a named backend keeps them if it supports masks, else they go the "auto" way.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch

from attn2d.attention.backends import BACKENDS, preference
from attn2d.dtypes import acc_dtype
from attn2d.attention.layout import Span, Spans, spans_tensor
from attn2d.attention.merge import merge_into

ENV_VAR = "ATTN2D_KERNEL_BACKEND"
_acc_dtype = acc_dtype  # the foundation's name, kept for existing callers


def _norm_spans(pos: Spans | Span | None, n: int) -> Spans:
    if pos is None:
        return (Span(0, 1, n),)
    spans = (pos,) if isinstance(pos, Span) else tuple(pos)
    if sum(s.n for s in spans) != n:
        raise ValueError(f"positions describe {sum(s.n for s in spans)} tokens but the block has {n}")
    return spans


def visible_mask(q_pos: Spans | Span | None, k_pos: Spans | Span | None, n_q: int, n_k: int, device=None) -> torch.Tensor:
    """Boolean (Lq, Lk) causal visibility: k_pos[j] <= q_pos[i]."""
    qp = spans_tensor(_norm_spans(q_pos, n_q), device)
    kp = spans_tensor(_norm_spans(k_pos, n_k), device)
    return kp.unsqueeze(0) <= qp.unsqueeze(1)


# ---------------------------------------------------------------- span-pair decomposition (no tensors)
@dataclass(frozen=True)
class Piece:
    """One backend call: block query rows q0, q0 + q_stride, ... (< q1) against block keys k0, k0 + k_stride, ...
    (< k1); strides are 1 except for re-strided pairs (`_restrided_pieces`).
    kind "full": every key visible; "causal": key j visible to row i iff j <= i + n_k - n_q (bottom-right,
    n_k >= n_q, counted in the piece's own rows and keys); "mask": visible iff position of key <= position of
    query, from q_span / k_span."""

    q0: int
    q1: int
    k0: int
    k1: int
    kind: str
    q_span: Span | None = None
    k_span: Span | None = None
    q_stride: int = 1
    k_stride: int = 1

    @property
    def rows(self) -> slice:
        return slice(self.q0, self.q1, self.q_stride)

    @property
    def keys(self) -> slice:
        return slice(self.k0, self.k1, self.k_stride)

    @property
    def n_q(self) -> int:
        return len(range(self.q0, self.q1, self.q_stride))

    @property
    def n_k(self) -> int:
        return len(range(self.k0, self.k1, self.k_stride))

    def mask(self, device=None) -> torch.Tensor:
        return visible_mask(self.q_span, self.k_span, self.n_q, self.n_k, device)


def _cdiv(a: int, b: int) -> int:
    return -((-a) // b)


def _pair_pieces(Q: Span, K: Span, qo: int, ko: int, bottom_right: bool) -> list[Piece]:
    """Pieces of one (q span, k span) pair whose rows start at block row qo and keys at block key ko."""
    if Q.n == 0 or K.n == 0:
        return []
    q_lo, q_hi = min(Q.start, Q.last), max(Q.start, Q.last)
    k_lo, k_hi = min(K.start, K.last), max(K.start, K.last)
    if k_lo > q_hi:  # every key after every query: contributes nothing, rows stay -inf
        return []
    if k_hi <= q_lo:  # every key before every query
        return [Piece(qo, qo + Q.n, ko, ko + K.n, "full")]
    q_step = Q.step if Q.n > 1 else K.step  # a single position takes the other span's step
    k_step = K.step if K.n > 1 else Q.step
    if q_step <= 0 or k_step <= 0:  # not increasing: explicit mask over the whole pair
        return [Piece(qo, qo + Q.n, ko, ko + K.n, "mask", Q, K)]
    a = max(0, _cdiv(K.start - Q.start, q_step))  # rows [0, a) precede the first key: empty
    if q_step == k_step:
        s = q_step
        d = (Q.start + s * a - K.start) // s  # row a + i sees keys j <= i + d  (d >= 0)
        m = min(Q.n - a, K.n - d)  # rows whose causal window ends inside this span
        r0, r1 = qo + a, qo + a + m
        if bottom_right or d == 0:
            out = [Piece(r0, r1, ko, ko + d + m, "causal")]
        else:  # top-left backends: the first d keys are visible to all these rows, the next m form a square
            out = [Piece(r0, r1, ko, ko + d, "full"), Piece(r0, r1, ko + d, ko + d + m, "causal")]
        if a + m < Q.n:  # the remaining rows see every key
            out.append(Piece(r1, qo + Q.n, ko, ko + K.n, "full"))
        return out
    restrided = _restrided_pieces(Q, K, qo, ko, bottom_right)  # different steps: re-stride the staircase
    if restrided is not None:
        return restrided
    b = min(Q.n, max(a, _cdiv(K.last - Q.start, q_step)))  # too many sub-spans: mask it; rows [b, n) see every key
    out = []
    if b > a:
        k_max = min(K.n, (Q.start + q_step * (b - 1) - K.start) // k_step + 1)  # keys seen by row b-1
        out.append(Piece(qo + a, qo + b, ko, ko + k_max, "mask",
                         Span(Q.start + q_step * a, q_step, b - a), Span(K.start, k_step, k_max)))
    if b < Q.n:
        out.append(Piece(qo + b, qo + Q.n, ko, ko + K.n, "full"))
    return out


MAX_RESTRIDE_PAIRS = 64  # above this many sub-span pairs, an explicit mask is cheaper than the many small calls


def _restrided_pieces(Q: Span, K: Span, qo: int, ko: int, bottom_right: bool) -> list[Piece] | None:
    """Causal pieces of a pair with different positive steps (the cyclic layouts of a non-square grid, e.g. q step
    2 against k step 3), or None (more than MAX_RESTRIDE_PAIRS sub-span pairs) to leave `_pair_pieces` to mask
    the staircase. Called by `_pair_pieces` only: both spans then hold >= 2 positions (a single position takes
    the other span's step) and the pair is neither fully visible nor fully masked.

    With L = lcm(q step, k step), every (L / q step)-th row of Q is a span of step L, and so is every (L / k step)-th
    key of K: each pair of such sub-spans has equal steps, so it is offset-causal (no mask), and the pieces cover
    only the causal triangle instead of the whole rectangle (about half the work). The sub-spans are strided rows
    and keys of the block (Piece.q_stride, k_stride): no copy."""
    L = math.lcm(Q.step, K.step)
    sq, sk = L // Q.step, L // K.step
    if sq * sk > MAX_RESTRIDE_PAIRS:
        return None
    out = []
    for i in range(min(sq, Q.n)):
        Qi = Span(Q.start + i * Q.step, L, len(range(i, Q.n, sq)))  # rows i, i + sq, ... of Q
        for j in range(min(sk, K.n)):
            Kj = Span(K.start + j * K.step, L, len(range(j, K.n, sk)))  # keys j, j + sk, ... of K
            for p in _pair_pieces(Qi, Kj, 0, 0, bottom_right):
                out.append(Piece(qo + i + sq * p.q0, qo + i + sq * p.q1, ko + j + sk * p.k0, ko + j + sk * p.k1,
                                 p.kind, q_stride=sq, k_stride=sk))
    return out


MAX_PREFIX_PIECES = 4  # a row-profile plan with more pieces than this is left to the span-pair decomposition


def _increasing(spans: Spans, strict: bool) -> bool:
    """True if the positions of `spans`, in block order, never decrease (strict: always increase)."""
    last = None
    for s in spans:
        if s.n == 0:
            continue
        if s.n > 1 and s.step <= 0:
            return False
        if last is not None and (s.start < last or (strict and s.start == last)):
            return False
        last = s.last
    return True


def _prefix_pieces(Q: Spans, K: Spans, n_q: int, n_k: int, bottom_right: bool) -> list[Piece] | None:
    """Pieces on disjoint row ranges from the row profile f(i) = number of keys row i sees, when the keys increase
    (so every row sees a prefix [0, f(i)) of the block's keys) and the queries do not decrease (f does not
    decrease, rows with f = 0 come first). A run of rows with constant f is one unmasked call on keys [0, f); a run
    where f grows by 1 per row is one causal call (bottom-right: keys [0, f_last); top-left backends: square from
    key f_first - 1, plus an unmasked call on the keys before it when f_first > 1). None when the keys do not
    increase, the queries decrease, or more than MAX_PREFIX_PIECES pieces would be needed. This is what makes a
    zigzag ring step, a contiguous one or a square-grid Attention2D block exactly one call."""
    if not (_increasing(K, strict=True) and _increasing(Q, strict=False)):
        return None
    f = torch.searchsorted(spans_tensor(K), spans_tensor(Q), right=True)  # (n_q,) keys visible per row
    a = int((f == 0).sum())  # rows [0, a) see no key
    if a == n_q:
        return []
    g = f[a:]
    d = g[1:] - g[:-1]  # (n_q - a - 1,) >= 0
    vals, counts = torch.unique_consecutive(d, return_counts=True)
    if len(vals) > 2 * MAX_PREFIX_PIECES + 1:
        return None
    runs, fl = list(zip(vals.tolist(), counts.tolist())), g.tolist()
    segments, s, kind, p = [], 0, None, 0  # rows [s, p] of g form the open segment; its diffs are all `kind`
    for v, c in runs:
        while c > 0:
            if v in (0, 1) and kind in (None, v):  # the whole run extends the open segment
                kind, p, c = v, p + c, 0
            else:  # the diff between rows p and p + 1 breaks the segment
                segments.append((s, p, kind))
                s, p, kind, c = p + 1, p + 1, None, c - 1
            if len(segments) > MAX_PREFIX_PIECES:
                return None
    segments.append((s, p, kind))
    out = []
    for s, e, kind in segments:
        r0, r1, f0 = a + s, a + e + 1, fl[s]
        if kind == 1 and e > s:
            if bottom_right or f0 == 1:
                out.append(Piece(r0, r1, 0, f0 + e - s, "causal"))
            else:  # top-left backends: the first f0 - 1 keys are visible to every row, then a square
                out += [Piece(r0, r1, 0, f0 - 1, "full"), Piece(r0, r1, f0 - 1, f0 + e - s, "causal")]
        else:
            out.append(Piece(r0, r1, 0, f0, "full"))
    return out if len(out) <= MAX_PREFIX_PIECES else None


def _pair_plan(Q: Spans, K: Spans, bottom_right: bool) -> list[Piece]:
    pieces, qo = [], 0
    for q_span in Q:
        ko = 0
        for k_span in K:
            pieces += _pair_pieces(q_span, k_span, qo, ko, bottom_right)
            ko += k_span.n
        qo += q_span.n
    return pieces


def block_pieces(q_pos, k_pos, n_q: int, n_k: int, *, causal: bool, bottom_right: bool = True) -> list[Piece]:
    """The backend calls for one block (see the module docstring). Pure: reads only the Spans. Causal blocks take
    the row-profile plan (`_prefix_pieces`: one call per run of rows, no merging) where it applies and needs no
    more calls than the span-pair decomposition, else the span-pair decomposition."""
    return list(_block_pieces(_norm_key(q_pos), _norm_key(k_pos), n_q, n_k, causal, bottom_right))


def _norm_key(pos):
    """Spans in a hashable form (a list becomes a tuple) for the plan cache."""
    return tuple(pos) if isinstance(pos, list) else pos


@functools.lru_cache(maxsize=4096)
def _block_pieces(q_pos, k_pos, n_q: int, n_k: int, causal: bool, bottom_right: bool) -> tuple[Piece, ...]:
    if not causal:
        return (Piece(0, n_q, 0, n_k, "full"),) if n_q and n_k else ()
    Q, K = _norm_spans(q_pos, n_q), _norm_spans(k_pos, n_k)
    pairs = _pair_plan(Q, K, bottom_right)
    prefix = _prefix_pieces(Q, K, n_q, n_k, bottom_right) if n_q and n_k else None
    return tuple(prefix if prefix is not None and len(prefix) <= len(pairs) else pairs)


# ---------------------------------------------------------------- running the pieces
@dataclass(frozen=True)
class _Schedule:
    """What running a tuple of pieces needs beyond the pieces, derived once per plan (cached): whether each piece's
    rows (keys) were met by an earlier piece (merge / add) or not (write / copy), and whether the buffers may start
    uninitialised (every row (key) written by some piece, and no piece meeting earlier pieces only in part)."""

    q_seen: tuple[bool, ...]
    k_seen: tuple[bool, ...]
    rows_written: bool  # the out / lse / dq buffers need no initial fill
    keys_written: bool  # the dk / dv buffers need no initial fill
    whole: bool  # one piece over every row and key: the backend's own output is the result


def _first_writes(slices, n: int) -> tuple[tuple[bool, ...], bool]:
    seen_by, flags, clean = [False] * n, [], True
    for sl, m in slices:
        hit = seen_by[sl]
        flags.append(any(hit))
        clean = clean and (all(hit) or not any(hit))
        seen_by[sl] = [True] * m
    return tuple(flags), clean and all(seen_by)


@functools.lru_cache(maxsize=4096)
def _schedule(pieces: tuple[Piece, ...], n_q: int, n_k: int) -> _Schedule:
    q_seen, rows_written = _first_writes([(p.rows, p.n_q) for p in pieces], n_q)
    k_seen, keys_written = _first_writes([(p.keys, p.n_k) for p in pieces], n_k)
    whole = len(pieces) == 1 and pieces[0].n_q == n_q and pieces[0].n_k == n_k
    return _Schedule(q_seen, k_seen, rows_written, keys_written, whole)


def _call_forward(impl, mask_impl, p: Piece, q, k, v, scale):
    b = mask_impl if p.kind == "mask" else impl
    return b.forward(q, k, v, scale=scale, causal=p.kind == "causal",
                     mask=p.mask(q.device) if p.kind == "mask" else None)


def _call_backward(impl, mask_impl, p: Piece, dout, q, k, v, out, lse, scale):
    b = mask_impl if p.kind == "mask" else impl
    return b.backward(dout, q, k, v, out, lse, scale=scale, causal=p.kind == "causal",
                      mask=p.mask(q.device) if p.kind == "mask" else None)


def _forward_pieces(q, k, v, pieces, scale, impl, mask_impl):
    acc = acc_dtype(q.dtype)
    b, n_q, h, d = q.shape
    pieces = tuple(pieces)
    sch = _schedule(pieces, n_q, k.shape[1])
    if sch.whole:
        p = pieces[0]
        o, l = _call_forward(impl, mask_impl, p, q, k[:, p.keys], v[:, p.keys], scale)
        return o.to(q.dtype), l.to(acc)
    merges = any(sch.q_seen)
    alloc = torch.empty if sch.rows_written else torch.zeros
    out = alloc(b, n_q, h, d, dtype=acc if merges else q.dtype, device=q.device)  # (B, Lq, H, D)
    lse = torch.empty(b, h, n_q, dtype=acc, device=q.device)  # (B, H, Lq)
    if not sch.rows_written:
        lse.fill_(-math.inf)  # rows no piece touches see no key
    for p, seen in zip(pieces, sch.q_seen):
        o, l = _call_forward(impl, mask_impl, p, q[:, p.rows], k[:, p.keys], v[:, p.keys], scale)
        if seen:
            merge_into(out[:, p.rows], lse[:, :, p.rows], o, l, empty_rows=p.kind == "mask")
        else:
            out[:, p.rows] = o
            lse[:, :, p.rows] = l
    return out.to(q.dtype), lse


def _backward_pieces(dout, q, k, v, out, lse, pieces, scale, impl, mask_impl):
    acc = acc_dtype(q.dtype)
    lse = lse_for_backward(lse)
    pieces = tuple(pieces)
    sch = _schedule(pieces, q.shape[1], k.shape[1])
    if sch.whole:
        p = pieces[0]
        return tuple(g.to(acc) for g in _call_backward(impl, mask_impl, p, dout, q, k[:, p.keys], v[:, p.keys], out,
                                                       lse, scale))
    alloc_q = torch.empty if sch.rows_written else torch.zeros
    alloc_k = torch.empty if sch.keys_written else torch.zeros
    dq = alloc_q(q.shape, dtype=acc, device=q.device)  # (B, Lq, H, D)
    dk = alloc_k(k.shape, dtype=acc, device=q.device)  # (B, Lk, H, D)
    dv = alloc_k(v.shape, dtype=acc, device=q.device)
    for p, q_seen, k_seen in zip(pieces, sch.q_seen, sch.k_seen):
        rows, keys = p.rows, p.keys
        g = _call_backward(impl, mask_impl, p, dout[:, rows], q[:, rows], k[:, keys], v[:, keys], out[:, rows],
                           lse[:, :, rows], scale)
        if q_seen:
            dq[:, rows].add_(g[0])
        else:
            dq[:, rows] = g[0]
        if k_seen:
            dk[:, keys].add_(g[1])
            dv[:, keys].add_(g[2])
        else:
            dk[:, keys] = g[1]
            dv[:, keys] = g[2]
    return dq, dk, dv


def lse_for_backward(lse: torch.Tensor) -> torch.Tensor:
    """The lse the backends' backward takes: accumulation dtype, +inf (not -inf) on rows that see no key, so that
    P = exp(S - lse) is 0 there instead of NaN. Returns lse itself when there is nothing to change."""
    lse = lse.to(acc_dtype(lse.dtype))
    return lse.masked_fill(lse == -math.inf, math.inf)


# ---------------------------------------------------------------- choosing a backend
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
        got_p = block_pieces(q_pos, k_pos, n_q, n_k, causal=causal, bottom_right=impl.causal_bottom_right)
        ref_p = block_pieces(q_pos, k_pos, n_q, n_k, causal=causal, bottom_right=True)
        o, l = _forward_pieces(*x[:3], got_p, scale, impl, impl)
        o64, l64 = _forward_pieces(*x64[:3], ref_p, scale, ref, ref)
        g = _backward_pieces(x[3], *x[:3], o, l, got_p, scale, impl, impl)
        g64 = _backward_pieces(x64[3], *x64[:3], o64, l64, ref_p, scale, ref, ref)
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


def _plan(q, k, causal, q_pos, k_pos, backend):
    dev, dt, hd = q.device, q.dtype, q.shape[-1]
    impl = BACKENDS[resolve_backend(backend, device=dev, dtype=dt, head_dim=hd)]
    pieces = _block_pieces(_norm_key(q_pos), _norm_key(k_pos), q.shape[1], k.shape[1], bool(causal),
                           impl.causal_bottom_right)  # cached: planned once per (spans, sizes, backend kind)
    mask_impl = impl
    if any(p.kind == "mask" for p in pieces) and not (impl.supports_mask and _named(backend)):
        mask_impl = BACKENDS[_auto(dev, dt, hd, need_mask=True)]  # auto: the first backend whose masks check out
    return pieces, impl, mask_impl


def _check(q, k, v):
    if (q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]
            or q.shape[2] % k.shape[2]):
        raise ValueError(f"attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "expected q (B, Lq, H, D) and k, v (B, Lk, H_kv, D) with H a multiple of H_kv")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device: {q.dtype}/{k.dtype}/{v.dtype}, {q.device}/{k.device}/{v.device}")


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Grouped-query attention: k, v (B, Lk, H_kv, D) -> (B, Lk, H, D), query head h using k/v head h // g
    (g = H / H_kv, as Llama's repeat_kv). A copy; the kernels see plain multi-head attention."""
    g = q.shape[2] // k.shape[2]
    if g == 1:
        return k, v, 1
    return k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2), g


def _sum_groups(dx: torch.Tensor, g: int) -> torch.Tensor:
    """(B, Lk, H, D) gradients of the expanded k or v -> (B, Lk, H_kv, D): the sum over each head's group."""
    if g == 1:
        return dx
    b, n, h, d = dx.shape
    return dx.view(b, n, h // g, g, d).sum(3)


def attn_forward(q, k, v, *, causal: bool, q_pos=None, k_pos=None, scale: float | None = None, backend: str = "auto"):
    """Block attention -> (out (B, Lq, H, D), lse (B, H, Lq)). k, v may have fewer heads (grouped-query)."""
    _check(q, k, v)
    k, v, _ = _expand_kv(q, k, v)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    pieces, impl, mask_impl = _plan(q, k, causal, q_pos, k_pos, backend)
    return _forward_pieces(q, k, v, pieces, scale, impl, mask_impl)


def row_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dout * out) (B, H, Lq) in the accumulation dtype, from dout, out (B, Lq, H, D): what a caller
    sends instead of out (attn_backward(..., out=None, delta=...))."""
    acc = acc_dtype(out.dtype)
    return (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()


def out_for_delta(dout: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A stand-in for `out` (B, Lq, H, D) with rowsum(dout * out) = delta (B, H, Lq), in dout's dtype.

    The block backward uses out only through delta = rowsum(dO * O) (dS = P * (dP - delta)), and every kernel API
    takes out and forms delta itself. A caller that holds delta but not out (Attention2D's backward gathers the
    scalar delta instead of the D-wide out) passes out' = dO_hat * delta / (m |dO_hat|^2) with dO_hat = dO / m,
    m = max |dO| of the row (scaled so |dO_hat|^2 >= 1 cannot underflow). Every term dO_i out'_i has the sign of
    delta, so rounding out' to a half dtype perturbs delta by at most that dtype's relative precision (no
    cancellation). |out'| <= |O| (Cauchy-Schwarz), so out' cannot overflow where O does not. A row with dO = 0 has
    delta = 0 and gets out' = 0."""
    d = dout.to(acc_dtype(dout.dtype))  # (B, Lq, H, D)
    m = d.abs().amax(-1)  # (B, Lq, H)
    u = d / torch.where(m > 0, m, 1.0).unsqueeze(-1)  # (B, Lq, H, D), max |u| = 1 per nonzero row
    coef = torch.where(m > 0, delta.to(d.dtype).transpose(1, 2) / (m * u.square().sum(-1)).clamp_min(1e-300), 0.0)
    return (u * coef.unsqueeze(-1)).to(dout.dtype)  # (B, Lq, H, D), in dout's dtype as the kernels take it


def attn_backward(dout, q, k, v, out, lse, *, causal: bool, q_pos=None, k_pos=None, scale: float | None = None,
                  backend: str = "auto", delta=None):
    """This block's (dq, dk, dv) given the global out/lse of its query rows (accumulation dtype).

    Instead of out, a caller may pass out=None and delta = rowsum(dout * out) (B, H, Lq) of the global out."""
    _check(q, k, v)
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # (B, H, Lq)
    if out is None:
        if delta is None or delta.shape != lse_shape:
            raise ValueError(f"out=None needs delta of shape (B, H, Lq) = {lse_shape}, got "
                             f"{None if delta is None else tuple(delta.shape)}")
        out = out_for_delta(dout, delta)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != lse_shape:
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must be q's shape {tuple(q.shape)}, "
                         f"lse {tuple(lse.shape)} must be (B, H, Lq) = {lse_shape}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k, v, g = _expand_kv(q, k, v)
    pieces, impl, mask_impl = _plan(q, k, causal, q_pos, k_pos, backend)
    dq, dk, dv = _backward_pieces(dout, q, k, v, out, lse, pieces, scale, impl, mask_impl)
    return dq, _sum_groups(dk, g), _sum_groups(dv, g)


def _rows(x: torch.Tensor, sl: slice, dim: int = 1) -> torch.Tensor:
    """x restricted to the rows `sl` of dimension `dim`; x itself when `sl` is all of them (no view op)."""
    if sl.start == 0 and sl.step == 1 and sl.stop >= x.shape[dim]:
        return x
    return x[(slice(None),) * dim + (sl,)]


def attn_forward_into(out, lse, q, k, v, *, causal: bool, q_pos=None, k_pos=None, scale: float | None = None,
                      backend: str = "auto") -> None:
    """Merge this block's attention into the running (out, lse) of its query rows, in place: out (B, Lq, H, D) and
    lse (B, H, Lq) in the accumulation dtype (-inf rows: nothing seen yet). One backend call per piece of the
    (cached) plan and an in-place fp32 merge of only the rows that piece covers (merge.merge_into)."""
    _check(q, k, v)
    k, v, _ = _expand_kv(q, k, v)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    pieces, impl, mask_impl = _plan(q, k, causal, q_pos, k_pos, backend)
    for p in pieces:
        o, l = _call_forward(impl, mask_impl, p, _rows(q, p.rows), _rows(k, p.keys), _rows(v, p.keys), scale)
        merge_into(_rows(out, p.rows), _rows(lse, p.rows, 2), o, l, empty_rows=p.kind == "mask")


def attn_backward_into(dq, dout, q, k, v, out, lse, *, causal: bool, q_pos=None, k_pos=None,
                       scale: float | None = None, backend: str = "auto") -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """This block's backward with the global out and lse of its rows: dq (B, Lq, H, D, accumulation dtype) is added
    to in place; the key gradients come back per piece as [(keys, dk, dv)] (keys: a slice of the block's keys; dk,
    dv (B, |keys|, H_kv, D) in the accumulation dtype) for the caller to add where its dK/dV accumulator lives (the
    ring adds them to an accumulator that arrives while the kernel runs). lse: as lse_for_backward returns it
    (converted once per pass by the caller, not per block)."""
    _check(q, k, v)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k, v, g = _expand_kv(q, k, v)
    pieces, impl, mask_impl = _plan(q, k, causal, q_pos, k_pos, backend)
    parts = []
    for p in pieces:
        rows = p.rows
        gq, gk, gv = _call_backward(impl, mask_impl, p, _rows(dout, rows), _rows(q, rows), _rows(k, p.keys),
                                    _rows(v, p.keys), _rows(out, rows), _rows(lse, rows, 2), scale)
        _rows(dq, rows).add_(gq)
        parts.append((p.keys, _sum_groups(gk, g), _sum_groups(gv, g)))
    return parts
