"""What a benchmark cell fixes besides grid and hardware: the training step's `Workload`, and the model shape
(attn2d.model.GPTConfig) read from conf/model."""
from __future__ import annotations

import os
from dataclasses import dataclass

from omegaconf import OmegaConf

from attn2d.costmodel.hardware import conf_path
from attn2d.dtypes import itemsize
from attn2d.model import GPTConfig


@dataclass(frozen=True)
class Workload:
    """One training-step configuration (what a benchmark cell fixes besides model, grid and hardware)."""

    seq_len: int
    batch_size: int = 1
    dtype: str = "bf16"
    causal: bool = True
    fsdp: bool = False  # ZeRO-3: params all-gathered fwd and bwd, grads reduce-scattered
    activation_checkpointing: bool = False
    grad_bytes: int = 4  # gradients communicated in fp32
    grad_sync_overlap: bool | None = None  # gradient sync beside the backward compute; None: with FSDP only
    # (attn2d.train all-reduces after backward; FSDP2 prefetches gathers and reduce-scatters during backward)

    @property
    def overlaps_grad_sync(self) -> bool:
        return self.fsdp if self.grad_sync_overlap is None else self.grad_sync_overlap

    @property
    def dtype_bytes(self) -> int:
        return itemsize(self.dtype)


def load_model(name_or_path: str | os.PathLike) -> GPTConfig:
    """conf/model/NAME.yaml (or a path) -> its GPTConfig, named by its `name:` field or the file stem."""
    p = conf_path("model", name_or_path, "model config")
    d = OmegaConf.to_container(OmegaConf.load(p), resolve=True) or {}
    return GPTConfig.from_mapping(d, name=str(d.get("name") or p.stem))
