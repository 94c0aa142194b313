"""Dtypes: the one table of names, torch dtypes, bytes and accumulation dtypes every module uses.

Configs, records and the cost model's hardware files say the short names ("bf16", "fp32"); torch's own names
("bfloat16", "torch.float32") and the usual aliases ("half", "double") are accepted everywhere a name is read.
"""
from __future__ import annotations

import torch

# short name -> torch dtype (the canonical vocabulary of configs, records and hardware files)
SHORT: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                                 "fp64": torch.float64}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
            "float64": "fp64", "double": "fp64"}
# the dtypes a training run may use (benchmark.dtype): fp32, bf16 autocast over fp32 parameters, fp64 for checks
TRAIN_DTYPES = ("float32", "bfloat16", "float64")


def short_name(dtype) -> str:
    """A torch.dtype or any accepted name -> its short name ("bf16", "fp16", "fp32", "fp64")."""
    if isinstance(dtype, torch.dtype):
        for name, dt in SHORT.items():
            if dt == dtype:
                return name
        raise ValueError(f"dtype {dtype} has no short name; known: {', '.join(map(str, SHORT.values()))}")
    key = str(dtype).removeprefix("torch.").lower()
    key = _ALIASES.get(key, key)
    if key not in SHORT:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join([*SHORT, *_ALIASES])} or a torch.dtype")
    return key


def as_dtype(dtype) -> torch.dtype:
    """A torch.dtype, or a name of one ("bf16", "torch.float32", "double", ...) -> the torch.dtype."""
    return dtype if isinstance(dtype, torch.dtype) else SHORT[short_name(dtype)]


def itemsize(dtype) -> int:
    """Bytes per element of a dtype or dtype name."""
    return as_dtype(dtype).itemsize


def acc_dtype(dtype) -> torch.dtype:
    """The accumulation dtype of a computation in `dtype`: lse, softmax sums, gradients (fp64 for fp64, else fp32)."""
    return torch.float64 if as_dtype(dtype) == torch.float64 else torch.float32


def wire_bytes(dtype) -> tuple[int, int]:
    """(e, a): bytes per element of the input dtype and of its accumulation dtype, the sizes every algorithm's
    comm_ops price its messages with."""
    return itemsize(dtype), acc_dtype(dtype).itemsize


__all__ = ["SHORT", "TRAIN_DTYPES", "short_name", "as_dtype", "itemsize", "acc_dtype", "wire_bytes"]
