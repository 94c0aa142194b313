"""Test-wide settings: one torch thread per process (tests spawn several gloo ranks on 2 cores; torch's default
thread pool per process oversubscribes the cores badly), and fixtures shared by several test files."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  after OMP_NUM_THREADS, which torch reads when it loads

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def slurm_profile(tmp_path_factory) -> Path:
    """A stand-in for cluster_profiles/slurm: Snakemake runs locally, cells submit through the Slurm launchers."""
    d = tmp_path_factory.mktemp("profile") / "slurm"
    d.mkdir()
    (d / "workflow.yaml").write_text("launcher: slurm\n")
    (d / "config.yaml").write_text(f"executor: local\ncores: 64\nconfigfile: {d / 'workflow.yaml'}\n")
    return d
