"""Backend adapters for local block attention: one forward and one backward per backend, one contract.

planner.py splits a block into pieces (`block_pieces`) and execute.py hands each piece to an adapter here:
- q (B, Lq, H, D), k, v (B, Lk, H, D), any strides (rows may be a slice of a bigger block);
- `causal`: key j is visible to query i iff j <= i + (Lk - Lq) (bottom-right). The planner gives Lk != Lq only
  to backends with causal_bottom_right=True; for the others a causal piece is always square;
- `mask`: boolean (Lq, Lk) visibility (True = visible) or None. Only for supports_mask=True backends.
forward -> out (B, Lq, H, D) in q.dtype or the accumulation dtype, lse (B, H, Lq) in the accumulation dtype
(float32; float64 for float64), natural log, -inf and out = 0 on a row that sees no key (every kernel gets this
wrong in its own way: CPU flash and CUDA efficient give lse 0, flash kernels +inf; `_fix_empty` normalises).
backward(dout, q, k, v, out, lse) -> dq, dk, dv in the accumulation dtype, where out and lse are the GLOBAL values
of these query rows; kernels.py passes lse = +inf (never -inf) for a row with no visible key anywhere, so that
P = exp(S - lse) is 0 there instead of NaN (checked on the CPU op: -inf gives NaN gradients, +inf gives 0).

The CUDA adapters (cuda_flash, cuda_efficient, cudnn, flash_attn) are written from the op schemas of torch 2.13
(`torch.ops.aten.<op>.default._schema`), torch's own context-parallel code, and flash-attn 2.7+'s
flash_attn_interface.py; their argument binding is tested on "meta" tensors, and selection.resolve_backend("auto")
self-checks each one against "math" before first use.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attn2d.dtypes import SHORT, acc_dtype

INF = float("inf")
HALF = (torch.float16, torch.bfloat16)
FLOATS = tuple(SHORT.values())


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable  # forward(q, k, v, *, scale, causal, mask) -> (out, lse)
    backward: Callable  # backward(dout, q, k, v, out, lse, *, scale, causal, mask) -> (dq, dk, dv)
    applies: Callable  # applies(device, dtype, head_dim | None) -> None if usable, else the reason why not
    causal_bottom_right: bool  # takes a causal piece with Lk > Lq in one call
    supports_mask: bool
    causal_tile: int = 0  # > 0: the planner cuts causal squares into strips of this many rows (planner._strips)


def _bhld(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (B, L, H, D) <-> (B, H, L, D)


def _fix_empty(out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None, n_k: int | None = None,
               causal_bottom_right: bool = False):
    """Rows with no visible key (per mask, or lse +inf / NaN from the kernel) -> lse -inf, out 0.

    Given n_k (keys of the call), it returns (out, lse) untouched where no row can lack a key: no mask, n_k >= 1, and
    not a bottom-right causal call with more queries than keys (the planner's calls; 4 full-size ops saved)."""
    if mask is None and n_k is not None and n_k >= 1 and not (causal_bottom_right and n_k < out.shape[1]):
        return out, lse
    bad = ~torch.isfinite(lse)  # (B, H, Lq)
    if mask is not None:
        bad = bad | ~mask.any(-1)  # (B, H, Lq) | (Lq,)
    lse = lse.masked_fill(bad, -INF)
    out = out.masked_fill(bad.transpose(1, 2).unsqueeze(-1), 0.0)  # bad as (B, Lq, H, 1)
    return out, lse


def _additive(mask: torch.Tensor, dtype: torch.dtype, align: int = 1) -> torch.Tensor:
    """Boolean visibility (Lq, Lk) -> additive bias (Lq, Lk) in `dtype`, rows padded to `align` elements in
    memory (the CUDA efficient kernel wants 16-element aligned row strides, like torch's preprocess_mask)."""
    n_q, n_k = mask.shape
    bias = torch.zeros(n_q, n_k + (-n_k) % align, dtype=dtype, device=mask.device)[:, :n_k]  # (Lq, Lk), padded
    return bias.masked_fill_(~mask, -INF)


def _visibility(n_q: int, n_k: int, causal: bool, mask, device):
    if mask is not None:
        return mask
    if not causal:
        return None
    i = torch.arange(n_q, device=device).unsqueeze(1)  # (Lq, 1)
    return torch.arange(n_k, device=device).unsqueeze(0) <= i + (n_k - n_q)  # (Lq, Lk), bottom-right


def _lse_of(t: torch.Tensor) -> torch.Tensor:
    return t.to(acc_dtype(t.dtype))


# ---------------------------------------------------------------- math: materialised scores, any device/dtype
def _math_scores(q, k, scale, causal, mask):
    acc = acc_dtype(q.dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale  # (B, H, Lq, Lk)
    vis = _visibility(q.shape[1], k.shape[1], causal, mask, q.device)
    return s if vis is None else s.masked_fill(~vis, -INF)


def math_forward(q, k, v, *, scale, causal, mask):
    s = _math_scores(q, k, scale, causal, mask)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Lq)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))  # (B, H, Lq, Lk)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.to(p.dtype)), lse  # (B, Lq, H, D)


def math_backward(dout, q, k, v, out, lse, *, scale, causal, mask):
    acc = acc_dtype(q.dtype)
    p = torch.exp(_math_scores(q, k, scale, causal, mask) - lse.to(acc).unsqueeze(-1))  # (B, H, Lq, Lk), global P
    do = dout.to(acc)
    delta = (do * out.to(acc)).sum(-1).transpose(1, 2)  # (B, H, Lq)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)  # (B, Lk, H, D)
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, v.to(acc)) - delta.unsqueeze(-1)) * scale  # (B, H, Lq, Lk)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.to(acc))  # (B, Lq, H, D)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.to(acc))  # (B, Lk, H, D)
    return dq, dk, dv


def _math_applies(device, dtype, head_dim):
    return None if dtype in FLOATS else f"dtype {dtype} is not a floating type"


# ---------------------------------------------------------------- cpu_flash: aten's CPU flash kernel (top-left causal)
def cpu_flash_forward(q, k, v, *, scale, causal, mask):
    bias = None if mask is None else _additive(mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhld(q), _bhld(k), _bhld(v), 0.0, causal, attn_mask=bias, scale=scale)  # (B, H, Lq, D), (B, H, Lq)
    return _fix_empty(_bhld(out), _lse_of(lse), mask, k.shape[1])


def cpu_flash_backward(dout, q, k, v, out, lse, *, scale, causal, mask):
    bias = None if mask is None else _additive(mask, q.dtype)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _bhld(dout.to(q.dtype)), _bhld(q), _bhld(k), _bhld(v), _bhld(out.to(q.dtype)), _lse_of(lse).contiguous(),
        0.0, causal, attn_mask=bias, scale=scale)  # each (B, H, L, D)
    return tuple(_bhld(g).to(acc_dtype(q.dtype)) for g in grads)  # (B, L, H, D)


def _cpu_flash_applies(device, dtype, head_dim):
    if device.type != "cpu":
        return f"cpu_flash runs on CPU tensors only, not {device}"
    if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return f"torch {torch.__version__} has no aten._scaled_dot_product_flash_attention_for_cpu"
    return None if dtype in FLOATS else f"dtype {dtype} is not supported"


# ---------------------------------------------------------------- CUDA adapters
def _cuda_applies(dtypes, what):
    def applies(device, dtype, head_dim):
        if device.type != "cuda":
            return f"{what} needs CUDA tensors, not {device}"
        if dtype not in dtypes:
            return f"{what} supports {', '.join(map(str, dtypes))}, not {dtype}"
        if head_dim is not None and (head_dim % 8 or head_dim > 256):
            return f"{what} needs head_dim a multiple of 8 and <= 256, not {head_dim}"
        return None
    return applies


def _uint64(shape, device):  # philox placeholders; read by the kernels only when dropout_p > 0
    return torch.empty(shape, dtype=torch.uint64, device=device)


def _int64(device):
    return torch.empty((), dtype=torch.int64, device=device)


def cuda_flash_forward(q, k, v, *, scale, causal, mask):
    """torch's FlashAttention-2 op; causal is bottom-right for Lq != Lk."""
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        _bhld(q), _bhld(k), _bhld(v), 0.0, causal, False, scale=scale)  # 9 outputs: out, lse (B, H, Lq) fp32, ...
    return _fix_empty(_bhld(res[0]), res[1].float(), None, k.shape[1], causal)


def cuda_flash_backward(dout, q, k, v, out, lse, *, scale, causal, mask):
    """cum_seq_q/k None = the dense (not varlen) path, as the forward returns them."""
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        _bhld(dout.to(q.dtype)), _bhld(q), _bhld(k), _bhld(v), _bhld(out.to(q.dtype)), lse.float().contiguous(),
        None, None, q.shape[1], k.shape[1], 0.0, causal, _uint64((2,), q.device), _uint64((), q.device),
        scale=scale)  # each (B, H, L, D)
    return tuple(_bhld(g).float() for g in (dq, dk, dv))


def _bias(mask, q, k):
    if mask is None:
        return None
    b, n_q, h, _ = q.shape
    return _additive(mask, q.dtype, align=16).expand(b, h, n_q, k.shape[1])  # (B, H, Lq, Lk), stride 0 on B, H


def cuda_efficient_forward(q, k, v, *, scale, causal, mask):
    """Memory-efficient (cutlass) op; causal is top-left; lse comes padded along L."""
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhld(q), _bhld(k), _bhld(v), _bias(mask, q, k), True, 0.0, causal, scale=scale)[:2]
    lse = lse[..., : q.shape[1]]  # (B, H, ceil32(Lq)) -> (B, H, Lq)
    return _fix_empty(_bhld(out), lse.float(), mask, k.shape[1])


def cuda_efficient_backward(dout, q, k, v, out, lse, *, scale, causal, mask):
    """lse is handed over padded to 32 rows, the shape the forward produces."""
    b, n_q, h, _ = q.shape
    lse_pad = torch.full((b, h, -(-n_q // 32) * 32), INF, dtype=torch.float32, device=q.device)  # (B, H, ceil32)
    lse_pad[..., :n_q] = lse
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        _bhld(dout.to(q.dtype)), _bhld(q), _bhld(k), _bhld(v), _bias(mask, q, k), _bhld(out.to(q.dtype)), lse_pad,
        _int64(q.device), _int64(q.device), 0.0, [True, True, True, False], causal, scale=scale)
    return tuple(_bhld(g).float() for g in (dq, dk, dv))


_CUDNN_LSE_DIM: list[int] = []  # rank of the lse the cuDNN forward returns in this torch ((B,H,L,1) in 2.11-2.13)


def cudnn_forward(q, k, v, *, scale, causal, mask):
    """cuDNN fused attention; causal used for square pieces only."""
    q, k, v = (x.contiguous() for x in (q, k, v))  # one (B, L, H, D) layout for q, k, v, out, dout
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _bhld(q), _bhld(k), _bhld(v), _bias(mask, q, k), True, 0.0, causal, False, scale=scale)
    _CUDNN_LSE_DIM[:] = [res[1].dim()]
    b, n_q, h, _ = q.shape
    lse = res[1].reshape(b, h, n_q)  # (B, H, Lq[, 1]) -> (B, H, Lq)
    return _fix_empty(_bhld(res[0]), lse.float(), mask, k.shape[1])


def cudnn_backward(dout, q, k, v, out, lse, *, scale, causal, mask):
    """lse goes back in the rank the forward of this torch version returns."""
    if not _CUDNN_LSE_DIM:
        cudnn_forward(q[:, :1], k[:, :1], v[:, :1], scale=scale, causal=False, mask=None)  # learn the lse rank
    q, k, v = (x.contiguous() for x in (q, k, v))
    lse = lse.float().contiguous()
    lse = lse.unsqueeze(-1) if _CUDNN_LSE_DIM[0] == 4 else lse  # (B, H, Lq, 1) or (B, H, Lq)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _bhld(dout.to(q.dtype).contiguous()), _bhld(q), _bhld(k), _bhld(v), _bhld(out.to(q.dtype).contiguous()),
        lse, _int64(q.device), _int64(q.device), _bias(mask, q, k), None, None, q.shape[1], k.shape[1], 0.0, causal,
        scale=scale)
    return tuple(_bhld(g).float() for g in (dq, dk, dv))


# ---------------------------------------------------------------- flash_attn: the flash-attn package (2.7+)
_FA_BWD_ARGS = ["dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p", "softmax_scale",
                "causal", "window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic"]
_FA: list = []  # [module or None, reason]


def _flash_attn():
    if not _FA:
        try:
            import flash_attn.flash_attn_interface as fai  # the stub install raises ModuleNotFoundError here

            fn = fai._flash_attn_backward  # 2.7+: a torch.library.custom_op; its Python function is ._init_fn
            names = list(inspect.signature(getattr(fn, "_init_fn", fn)).parameters)
            if names[: len(_FA_BWD_ARGS)] != _FA_BWD_ARGS:
                raise ImportError(f"unknown _flash_attn_backward signature {names} (flash-attn 2.7+ expected)")
            _FA[:] = [fai, None]
        except Exception as e:  # ImportError, OSError from CUDA libraries, ...
            _FA[:] = [None, f"flash-attn not usable: {type(e).__name__}: {e}"]
    return _FA[0], _FA[1]


def flash_attn_forward(q, k, v, *, scale, causal, mask):
    """flash_attn_func(return_attn_probs=True) -> (out, lse, S); causal bottom-right."""
    fai, _ = _flash_attn()
    out, lse, _ = fai.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal,
                                      return_attn_probs=True)  # out (B, Lq, H, D), lse (B, H, Lq); +inf = empty
    return _fix_empty(out, lse.float(), None, k.shape[1], causal)


def flash_attn_backward(dout, q, k, v, out, lse, *, scale, causal, mask):
    """flash_attn_interface._flash_attn_backward writes into dq, dk, dv."""
    fai, _ = _flash_attn()
    q, k, v = (x.contiguous() for x in (q, k, v))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fai._flash_attn_backward(dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(),
                             lse.float().contiguous(), dq, dk, dv, 0.0, scale, causal, -1, -1, 0.0, None, False, None)
    return dq.float(), dk.float(), dv.float()


def _flash_attn_applies(device, dtype, head_dim):
    why = _cuda_applies(HALF, "flash_attn")(device, dtype, head_dim)
    return why or _flash_attn()[1]


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("math", math_forward, math_backward, _math_applies, True, True),
    Backend("cpu_flash", cpu_flash_forward, cpu_flash_backward, _cpu_flash_applies, False, True, causal_tile=128),
    Backend("flash_attn", flash_attn_forward, flash_attn_backward, _flash_attn_applies, True, False),
    Backend("cudnn", cudnn_forward, cudnn_backward, _cuda_applies(HALF, "cudnn"), False, True),
    Backend("cuda_flash", cuda_flash_forward, cuda_flash_backward, _cuda_applies(HALF, "cuda_flash"), True, False),
    Backend("cuda_efficient", cuda_efficient_forward, cuda_efficient_backward,
            _cuda_applies((torch.float32, *HALF), "cuda_efficient"), False, True),
)}


def preference(device: torch.device) -> list[str]:
    """Backend order for "auto". On Hopper and newer cuDNN leads (1.5-1.8x torch's FA2 on an H100, see
    tooling-notes.md Sec. 7); elsewhere the flash-attn package, then torch's flash, efficient and cuDNN ops."""
    if device.type == "cpu":
        return ["cpu_flash", "math"]
    if device.type == "cuda":
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9
        fast = ["cudnn", "flash_attn", "cuda_flash"] if hopper else ["flash_attn", "cuda_flash", "cudnn"]
        return [*fast, "cuda_efficient", "math"]
    return ["math"]
