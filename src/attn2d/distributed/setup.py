"""One entry to torch.distributed that works under torchrun, under submitit (Slurm or local) and as plain python.

Backend: NCCL when CUDA is available, gloo otherwise. Every collective gets a timeout (`timeout_s`), so a dead rank
ends the job with an error instead of a hang.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import submitit
import torch
import torch.distributed as dist

from attn2d.distributed.grid import check_timeout
from attn2d.distributed.health import stop_heartbeat

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    launcher: str  # "torchrun" | "submitit" | "plain"
    device: torch.device


def _submitit_env() -> str | None:
    """If running as a submitit task with several tasks: export RANK/WORLD_SIZE/MASTER_* and return the init
    method, else None. Slurm: env:// (TCP on the port submitit derives from the job id). submitit's local executor
    (one machine): a file:// rendezvous in the job's own submitit folder, so no port can be taken already
    (a random port once failed here with EADDRINUSE, and the other ranks then waited for the collective timeout).
    torch's FileStore deletes the file when every rank has closed it."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not a submitit job
        return None
    if env.num_tasks <= 1:
        return None
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if env.cluster == "local":
        folder = Path(env.paths.folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return f"file://{folder / f'{env.job_id}_rendezvous'}"
    return "env://"


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     device: str = "auto") -> DistInfo:
    """Initialise (once) the default process group and pick this rank's device.

    device: "auto" (cuda:local_rank if CUDA is available, else cpu), "cpu" or "cuda"."""
    timeout = check_timeout(timeout_s)
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "plain"
    init_method = _submitit_env() if "RANK" not in os.environ else None
    if init_method:
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
        if init_method and init_method.startswith("file://"):
            dist.init_process_group(backend, init_method=init_method, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        elif "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # plain python, one process: a private file store, so no port is needed
            path = tempfile.mktemp(prefix="attn2d-pg-")
            dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, launcher, dev)


def destroy_distributed() -> None:
    stop_heartbeat()
    if dist.is_initialized():
        dist.destroy_process_group()
