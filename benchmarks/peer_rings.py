"""Other people's Ring Attention, behind one interface, for benchmarks/bench_attention.py (guarded: each is skipped
with one line saying why when the running environment lacks it).

- "torch_ring" / "torch_ring_a2a": PyTorch's own ring (torch.distributed.tensor.experimental._attention,
  `_templated_ring_attention` and `_templated_ring_attention_backward`; private API, present in torch 2.6-2.13),
  called the way its SDPA handler calls them: q, k, v as (B, H, n, D) with seq_dim 2, the local kernel the CPU
  flash op (`aten._scaled_dot_product_flash_attention_for_cpu` and its backward), the head-tail load balance under
  causal masking (the same shards as our zigzag layout: rank k holds chunks k and 2P-1-k), K/V rotated by
  all-gather ("torch_ring", torch's default) or by all-to-all ("torch_ring_a2a"); dK/dV always go by all-to-all.
  torch's public `context_parallel` cannot run on CPU (no sharding strategy for the CPU flash op), hence the
  templates. Its collectives are functional ones that attn2d.distributed.comm does not see; the benchmark counts
  them with a dispatch-mode counter (attn2d.testing.OpCounter).
- "ringflash_zigzag": ring-flash-attention's zigzag_ring_flash_attn_func (CUDA, flash-attn), only when installed
  and a GPU is present.

Every entry takes our shards (B, n, H, D) in its layout and returns out (B, n, H, D), differentiable.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class PeerRing:
    name: str
    layout: str  # our layout name of the shards it takes
    fn: Callable  # fn(q, k, v, *, group, causal) -> out (B, n, H, D)
    what: str  # one line for the table's notes


# ---------------------------------------------------------------------------------------------- torch's ring
def _torch_cp():
    """torch's context-parallel module (the templates live there), or the reason it cannot be used."""
    for name in ("torch.distributed.tensor.experimental._context_parallel._attention",
                 "torch.distributed.tensor.experimental._attention"):
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # ImportError, or a torch build without distributed
            why = f"{type(e).__name__}: {e}"
            continue
        if all(hasattr(mod, a) for a in ("_templated_ring_attention", "_templated_ring_attention_backward",
                                          "_cp_options", "_RotateMethod")):
            return mod, None
        why = f"{name} has no _templated_ring_attention(_backward) / _cp_options / _RotateMethod"
    return None, f"torch {torch.__version__}: {why}"


class _TorchRingFunction(torch.autograd.Function):
    """torch's ring forward template, then its backward template (what the SDPA handler does for each op)."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, rotate: str):  # q, k, v (B, H, n, D)
        cp, _ = _torch_cp()
        opts = cp._cp_options
        opts.enable_load_balance, opts.rotate_method = causal, getattr(cp._RotateMethod, rotate)
        out, lse = cp._templated_ring_attention(group, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                                                q, k, v, is_causal=causal, dropout_p=0.0, scale=None)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.rotate = group, causal, rotate
        return out

    @staticmethod
    def backward(ctx, dout):
        cp, _ = _torch_cp()
        q, k, v, out, lse = ctx.saved_tensors
        opts = cp._cp_options
        opts.enable_load_balance, opts.rotate_method = ctx.causal, getattr(cp._RotateMethod, ctx.rotate)
        dq, dk, dv = cp._templated_ring_attention_backward(
            ctx.group, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, grad_out=dout,
            grad_out_name="grad_out", query=q, key=k, value=v, out=out, logsumexp=lse, is_causal=ctx.causal,
            dropout_p=0.0, scale=None)[:3]
        return dq, dk, dv, None, None, None


def _torch_ring(rotate: str):
    def fn(q, k, v, *, group=None, causal=True):
        group = group if group is not None else dist.group.WORLD
        bh = [x.transpose(1, 2) for x in (q, k, v)]  # (B, H, n, D) views, as a model hands them to SDPA
        return _TorchRingFunction.apply(*bh, group, bool(causal), rotate).transpose(1, 2)  # (B, n, H, D)
    return fn


# ---------------------------------------------------------------------------------------------- ring-flash-attention
def _ringflash():
    try:
        from ring_flash_attn import zigzag_ring_flash_attn_func  # needs flash-attn and CUDA
    except Exception as e:
        return None, f"ring-flash-attention not usable: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return None, "ring-flash-attention needs CUDA"
    return zigzag_ring_flash_attn_func, None


def _ringflash_fn(q, k, v, *, group=None, causal=True):
    func, _ = _ringflash()
    return func(q, k, v, causal=causal, group=group)  # (B, n, H, D) in, (B, n, H, D) out


# ---------------------------------------------------------------------------------------------- availability
def available(device: torch.device) -> tuple[list[PeerRing], list[str]]:
    """The peer rings that can run here on `device`, and one line for each that cannot."""
    rings, notes = [], []
    _, why = _torch_cp()
    if why is None and device.type == "cpu":
        rings.append(PeerRing("torch_ring", "zigzag", _torch_ring("ALL_GATHER"),
                              "torch's _templated_ring_attention, CPU flash op, head-tail balance, K/V all-gather"))
        rings.append(PeerRing("torch_ring_a2a", "zigzag", _torch_ring("ALL_TO_ALL"),
                              "the same with K/V rotated by all-to-all"))
    elif why is None:
        notes.append(f"skip torch_ring: wired to the CPU flash op, device is {device}")
    else:
        notes.append(f"skip torch_ring: {why}")
    func, why = _ringflash()
    if func is not None:
        rings.append(PeerRing("ringflash_zigzag", "zigzag", _ringflash_fn, "ring-flash-attention zigzag (flash-attn)"))
    else:
        notes.append(f"skip ringflash_zigzag: {why}")
    return rings, notes
