"""Step timing and FLOP / MFU accounting of a training step.

FLOPs of one training step (forward + backward), for a batch of B sequences of N tokens, T = B N tokens:

    dense     = 6 * params_non_embedding * T            # every weight matmul: 2 FLOPs per MAC, x3 for fwd + bwd
    lm_head   = 6 * d_model * vocab * T                 # the tied output projection (a real matmul; nanoGPT's and
                                                        # Megatron's counts include it too)
    attention = n_layer * 3 * 4 * B * N^2 * d_attn * (1/2 if causal)
                                                        # QK^T and PV: 2 matmuls of 2 B N^2 d_attn in the forward,
                                                        # the backward twice that; d_attn = n_head * head_dim
    total     = dense + lm_head + attention

This is the model-FLOPs convention (MFU, not hardware FLOPs): recomputation under activation checkpointing and the
attention kernels' own recomputation in the backward are not counted. Per GPU: total / P (the P sequence-parallel
ranks share every sequence). MFU = achieved TFLOP/s per GPU / peak TFLOP/s per GPU (`benchmark.peak_tflops`; None
gives mfu None).

Timing: on CUDA, torch.cuda.Event pairs around the step after a barrier; on CPU,
barrier + perf_counter + barrier. A step's time is the maximum over ranks.
"""
from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist

from attn2d.model import GPTConfig


def flops_per_step(cfg: GPTConfig, params_non_embedding: int, batch_size: int, seq_len: int, causal: bool) -> dict:
    """FLOPs of one forward + backward over batch_size x seq_len tokens (formula in the module docstring)."""
    tokens = batch_size * seq_len
    dense = 6 * params_non_embedding * tokens
    lm_head = 6 * cfg.d_model * cfg.vocab_size * tokens
    attention = cfg.n_layer * 3 * 4 * batch_size * seq_len**2 * cfg.d_attn
    if causal:
        attention //= 2
    return {"dense": dense, "lm_head": lm_head, "attention": attention, "total": dense + lm_head + attention}


def tflops_per_gpu(flops: float, world_size: int, step_time_s: float) -> float:
    return flops / world_size / step_time_s / 1e12


def mfu(tflops: float, peak_tflops: float | None) -> float | None:
    return None if not peak_tflops else tflops / peak_tflops


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class StepTimer:
    """`with timer: step()` then `timer.elapsed_s`: this rank's wall time of the step (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.elapsed_s = float("nan")

    def __enter__(self) -> StepTimer:
        _barrier()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.elapsed_s = self._start.elapsed_time(self._end) / 1e3
        else:
            _barrier()
            self.elapsed_s = time.perf_counter() - self._t0


def max_mem_gib(device: torch.device) -> float:
    """CUDA: peak allocated memory of the last timed step. CPU: the process's peak resident set (since start)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


NOT_ATTENTION_OPS = ("grad_", "fsdp_")  # op-name prefixes of the training loop's own traffic


def max_over_ranks(per_rank: list[dict]) -> dict:
    """Fold CommStats.as_dict() of every rank into the step line's comm fields: the maximum over ranks of each
    total and of each op's counts, plus the attention-only totals (ops not named grad_* or fsdp_*)."""

    def attn_only(d: dict) -> tuple[int, int]:
        ops = [v for k, v in d["by_op"].items() if not k.startswith(NOT_ATTENTION_OPS)]
        return sum(v["bytes_sent"] for v in ops), sum(v["messages"] for v in ops)

    by_op: dict[str, dict] = {}
    for d in per_rank:
        for name, v in d["by_op"].items():
            row = by_op.setdefault(name, {"bytes_sent": 0, "bytes_received": 0, "messages": 0})
            for k in row:
                row[k] = max(row[k], v[k])
    return {
        "comm_bytes_sent": max(d["bytes_sent"] for d in per_rank),
        "comm_bytes_received": max(d["bytes_received"] for d in per_rank),
        "comm_messages": max(d["messages"] for d in per_rank),
        "attn_comm_bytes_sent": max(attn_only(d)[0] for d in per_rank),
        "attn_comm_messages": max(attn_only(d)[1] for d in per_rank),
        "comm_by_op": by_op,
        "comm_per_rank": [{k: d[k] for k in ("bytes_sent", "bytes_received", "messages")} for d in per_rank],
    }
