"""The piece planner: how one block-attention call (queries and keys at positions given as Spans) is split into
backend calls. Pure: it reads only the Spans and sizes (no tensors but the optional mask), so the cost model prices
exactly the calls the kernels make. The rules and why they hold: docs/algorithms.md#piece-planner.

The causal rule is positional: key j is visible to query i iff k_pos[j] <= q_pos[i]; positions default to
0..L-1 (top-left alignment).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from attn2d.attention.layout import Span, Spans, spans_tensor


def _norm_spans(pos: Spans | Span | None, n: int) -> Spans:
    if pos is None:
        return (Span(0, 1, n),)
    spans = (pos,) if isinstance(pos, Span) else tuple(pos)
    if sum(s.n for s in spans) != n:
        raise ValueError(f"positions describe {sum(s.n for s in spans)} tokens but the block has {n}")
    return spans


def visible_mask(q_pos: Spans | Span | None, k_pos: Spans | Span | None, n_q: int, n_k: int,
                 device=None) -> torch.Tensor:
    """Boolean (Lq, Lk) causal visibility: k_pos[j] <= q_pos[i]."""
    qp = spans_tensor(_norm_spans(q_pos, n_q), device)
    kp = spans_tensor(_norm_spans(k_pos, n_k), device)
    return kp.unsqueeze(0) <= qp.unsqueeze(1)




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


def block_pieces(q_pos, k_pos, n_q: int, n_k: int, *, causal: bool, bottom_right: bool = True,
                 causal_tile: int = 0) -> list[Piece]:
    """The backend calls for one block (see the module docstring). Pure: reads only the Spans. Causal blocks take
    the row-profile plan (`_prefix_pieces`: one call per run of rows, no merging) where it applies and needs no
    more calls than the span-pair decomposition, else the span-pair decomposition; with causal_tile (a property
    of the backend, backends.Backend.causal_tile) big causal squares are then cut into strips (`_strips`)."""
    return list(_block_pieces(_norm_key(q_pos), _norm_key(k_pos), n_q, n_k, causal, bottom_right, causal_tile))


def plan_pieces(q_pos, k_pos, n_q: int, n_k: int, causal: bool, bottom_right: bool,
                causal_tile: int = 0) -> tuple[Piece, ...]:
    """block_pieces as the cached tuple (planned once per (spans, sizes, causal, backend kind)): what the kernels
    run; lists of Spans are accepted (made hashable for the cache)."""
    return _block_pieces(_norm_key(q_pos), _norm_key(k_pos), n_q, n_k, bool(causal), bottom_right, causal_tile)


STRIPS_MIN = 3  # cut a causal square only into >= 3 strips (2 were slower than one call; docs/algorithms.md)


def _strips(pieces: tuple[Piece, ...], tile: int) -> tuple[Piece, ...]:
    """Each causal square piece of n >= STRIPS_MIN * tile rows as S = n // tile strips of about `tile` rows: strip s
    is a causal square on its own keys, then an unmasked call on the keys before them (merged into its rows). For
    kernels whose causal flag skips masked work only in coarse tiles (aten's CPU flash kernel): why, and what it
    saves, in docs/algorithms.md#piece-planner."""
    out = []
    for p in pieces:
        n = p.n_q
        if p.kind != "causal" or p.n_k != n or n < STRIPS_MIN * tile:
            out.append(p)
            continue
        S = n // tile
        b = [round(i * n / S) for i in range(S + 1)]  # strip bounds, in the piece's own rows (and keys)
        for s in range(S):
            r0, r1 = p.q0 + b[s] * p.q_stride, p.q0 + b[s + 1] * p.q_stride
            k0, k1 = p.k0 + b[s] * p.k_stride, p.k0 + b[s + 1] * p.k_stride
            out.append(Piece(r0, r1, k0, k1, "causal", q_stride=p.q_stride, k_stride=p.k_stride))
            if s:
                out.append(Piece(r0, r1, p.k0, k0, "full", q_stride=p.q_stride, k_stride=p.k_stride))
    return tuple(out)


def _norm_key(pos):
    """Spans in a hashable form (a list becomes a tuple) for the plan cache."""
    return tuple(pos) if isinstance(pos, list) else pos


@functools.lru_cache(maxsize=4096)
def _block_pieces(q_pos, k_pos, n_q: int, n_k: int, causal: bool, bottom_right: bool,
                  causal_tile: int = 0) -> tuple[Piece, ...]:
    if not causal:
        return (Piece(0, n_q, 0, n_k, "full"),) if n_q and n_k else ()
    Q, K = _norm_spans(q_pos, n_q), _norm_spans(k_pos, n_k)
    pairs = _pair_plan(Q, K, bottom_right)
    prefix = _prefix_pieces(Q, K, n_q, n_k, bottom_right) if n_q and n_k else None
    pieces = tuple(prefix if prefix is not None and len(prefix) <= len(pairs) else pairs)
    return _strips(pieces, causal_tile) if causal_tile else pieces


# ---------------------------------------------------------------- how a plan writes its buffers
@dataclass(frozen=True)
class WritePlan:
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
def write_plan(pieces: tuple[Piece, ...], n_q: int, n_k: int) -> WritePlan:
    q_seen, rows_written = _first_writes([(p.rows, p.n_q) for p in pieces], n_q)
    k_seen, keys_written = _first_writes([(p.keys, p.n_k) for p in pieces], n_k)
    whole = len(pieces) == 1 and pieces[0].n_q == n_q and pieces[0].n_k == n_k
    return WritePlan(q_seen, k_seen, rows_written, keys_written, whole)

