"""One entry to torch.distributed that works under torchrun, under submitit (Slurm or local) and as plain python.

Backend: NCCL when CUDA is available, gloo otherwise. Every collective gets a timeout (`timeout_s`), so a dead rank
ends the job with an error instead of a hang.
"""
from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    launcher: str  # "torchrun" | "submitit" | "plain"
    device: torch.device


def _submitit_env() -> bool:
    """If running as a submitit task with several tasks, export RANK/WORLD_SIZE/MASTER_* and return True."""
    try:
        import submitit

        env = submitit.JobEnvironment()
    except (ImportError, RuntimeError):
        return False
    if env.num_tasks <= 1:
        return False
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return True


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, device: str = "auto") -> DistInfo:
    """Initialise (once) the default process group and pick this rank's device.

    device: "auto" (cuda:local_rank if CUDA is available, else cpu), "cpu" or "cuda"."""
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "plain"
    if "RANK" not in os.environ and _submitit_env():
        launcher = "submitit"
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but torch.cuda.is_available() is False on this host")
    backend = backend or ("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)  # before the first collective (NCCL picks the device from it)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # plain python, one process: a private file store, so no port is needed
            path = tempfile.mktemp(prefix="attn2d-pg-")
            dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, launcher, dev)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
