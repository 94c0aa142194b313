"""On the one-node Slurm cluster (as tests/test_slurm.py, skipped where its start script is absent): a cell whose
sbatch the cluster rejects fails the workflow. Before, the failed record was written and Snakemake said
"2 of 2 steps (100%) done" and exited 0."""
import shutil
import subprocess
import sys

from test_slurm import REPO, pytestmark, slurm_cluster  # noqa: F401  (the fixture starts the cluster)


def test_a_rejected_sbatch_fails_the_workflow_and_names_the_cell(slurm_cluster, tmp_path):  # noqa: F811
    work = tmp_path / "wf"
    work.mkdir()
    for d in ("conf", "workflow", "cluster_profiles"):
        shutil.copytree(REPO / d, work / d)
    shutil.copy(REPO / "Snakefile", work / "Snakefile")
    (work / "slurm").symlink_to("cluster_profiles/slurm")
    cell = "attention=attn2d,benchmark.seq_len=144,grid=1x2,model=tiny"
    cmd = [sys.executable, "-m", "snakemake", "--profile", "slurm", "--config", "launcher=slurm_cpu",
           "experiments=[local_speedup]", "sweep=benchmark.seq_len=144 grid=1x2 attention=attn2d",
           "overrides=benchmark.steps=1 benchmark.progress=false",
           "launcher_overrides=hydra.launcher.mem_gb=100000",  # more memory than the node has: sbatch refuses
           "modelled=False", "--", "results/tables/local_speedup.csv"]
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=420)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "1 of 1 planned cells FAILED" in res.stderr and f"runs/local_speedup/{cell}" in res.stderr
    assert "sbatch: error: Memory specification can not be satisfied" in res.stderr
    assert (work / "results/tables/local_speedup.csv").read_text().count("failed") >= 1
