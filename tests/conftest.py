"""Test-wide settings: one torch thread per process (tests spawn several gloo ranks on 2 cores; torch's default
thread pool per process oversubscribes the cores badly)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
