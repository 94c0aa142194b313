"""The Slurm path for real, on a one-node Slurm cluster (../shared/slurm-local/start.sh, as root): a cell pushed
through `snakemake --profile slurm`, and a pre-empted job that submitit requeues and that then finishes.

Skipped ONLY where start.sh is absent (set SLURM_LOCAL_START to point elsewhere); CI has it and runs these tests.
The cluster is started here (SLURM_LOCAL_CPUS=8 unless set) and stopped afterwards unless it was already up.
"""
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from attn2d.config import compose
from attn2d.records import read_record
from attn2d.slurm import launcher_params, sbatch_script

REPO = Path(__file__).resolve().parents[1]
START = Path(os.environ.get("SLURM_LOCAL_START", REPO.parent / "shared" / "slurm-local" / "start.sh"))
pytestmark = pytest.mark.skipif(
    not START.is_file(), reason=f"no one-node Slurm cluster to start: {START} is absent (CI has it)")


def _sh(*cmd: str, timeout: float = 60) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def _cluster_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.fail(f"{START} is here but needs root to start a Slurm cluster (uid {os.geteuid()})")
    was_up = _cluster_up()
    env = {**os.environ, "SLURM_LOCAL_CPUS": os.environ.get("SLURM_LOCAL_CPUS", "8")}
    res = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{START} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    yield
    if not was_up:
        subprocess.run(["bash", str(START.parent / "stop.sh")], capture_output=True, timeout=180)


def _sacct_states(job_id: str) -> list[str]:
    """Every state the job went through (-D: requeued runs too), allocation lines only."""
    out = _sh("sacct", "-n", "-P", "-D", "-X", "-j", job_id, "-o", "State,Partition")
    return [line for line in out.splitlines() if line]


def _settled_states(job_id: str, timeout: float = 60) -> list[str]:
    """_sacct_states once the last one is no longer PENDING/RUNNING/COMPLETING (accounting lags the job's end)."""
    deadline = time.time() + timeout
    states = _sacct_states(job_id)
    while time.time() < deadline and (not states or states[-1].split("|")[0] in ("PENDING", "RUNNING", "COMPLETING")):
        time.sleep(0.5)
        states = _sacct_states(job_id)
    return states


def test_cell_through_snakemake_profile_slurm(slurm_cluster, tmp_path):
    """`snakemake --profile slurm --config launcher=slurm_cpu ...` in a copy of the workflow: the cell's job runs
    on the cluster's cpu partition and leaves an ok record; the script submitit gave sbatch is the one
    attn2d.slurm.sbatch_script renders for the same config."""
    work = tmp_path / "wf"
    work.mkdir()
    for d in ("conf", "workflow", "cluster_profiles"):
        shutil.copytree(REPO / d, work / d)
    shutil.copy(REPO / "Snakefile", work / "Snakefile")
    os.symlink("cluster_profiles/slurm", work / "slurm")
    sweep = "model=tiny benchmark.seq_len=144 grid=1x2 attention=attn2d"
    cell = "attention=attn2d,benchmark.seq_len=144,grid=1x2,model=tiny"
    record = f"runs/local_speedup/{cell}/metrics.jsonl"
    cmd = [sys.executable, "-m", "snakemake", "--profile", "slurm", "--config", "launcher=slurm_cpu",
           "experiments=[local_speedup]", f"sweep={sweep}", "overrides=benchmark.steps=2 benchmark.progress=false",
           "modelled=False", "--", record]
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=420)
    log = (work / f"results/logs/cells/local_speedup/{cell}.log")
    detail = res.stdout[-3000:] + res.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    assert res.returncode == 0, detail

    rec = read_record(work / record)
    assert rec.ok, detail
    assert rec.cell["world_size"] == 2 and rec.header["launcher"] == "submitit", rec.header
    submitted = list((work / f"runs/local_speedup/{cell}/.submitit").glob("*/*_submission.sh"))
    assert len(submitted) == 1, submitted
    job_id = submitted[0].name.split("_")[0]
    assert _settled_states(job_id)[-1] == "COMPLETED|cpu", _sacct_states(job_id)

    cfg = compose(["experiment=local_speedup", *sweep.split(), "benchmark.steps=2", "benchmark.progress=false",
                   "hydra/launcher=slurm_cpu", f"hydra.sweep.dir='{work}/runs/local_speedup/{cell}'", "hydra.sweep.subdir=."],
                  return_hydra_config=True)
    params = launcher_params(cfg)
    assert submitted[0].read_text() == sbatch_script(params)


def test_preempted_job_is_requeued_and_completes(slurm_cluster, tmp_path):
    """Pre-emption as submitit's own SlurmJob._interrupt() simulates it (SIGTERM, then the USR2 Slurm sends ahead
    of the end of an allocation): rank 0 checkpoints the launcher, `scontrol requeue`s the job, the cell runs
    again from the start and the one `-m` call ends with an ok record."""
    name = f"attn2d-preempt-{uuid.uuid4().hex[:8]}"
    sweep_dir = tmp_path / "sweep"
    run_dir = sweep_dir / "cell"
    steps = 150  # about 10 s on 2 cores: time to interrupt the first attempt
    cmd = [sys.executable, "-m", "attn2d.train", "-m", "experiment=smoke_cpu", "attention=attn2d", "grid=1x2",
           f"benchmark.steps={steps}", "benchmark.progress=false", "hydra/launcher=slurm_cpu",
           f"hydra.launcher.name={name}", f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=cell"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job_id, deadline = None, time.time() + 180
        while time.time() < deadline and proc.poll() is None:  # running, and rank 0 has started its record
            out = _sh("squeue", "-h", "-n", name, "-o", "%i %T").split()
            if out and out[1] == "RUNNING" and (run_dir / "metrics.jsonl.partial").exists():
                job_id = out[0]
                break
            time.sleep(0.3)
        assert job_id is not None, f"job {name} never ran: {proc.communicate(timeout=60)[0][-3000:]}"
        _sh("scancel", "--signal=TERM", job_id)  # submitit's _interrupt(timeout=False): SIGTERM, then USR2
        _sh("scancel", "--signal=USR2", job_id)

        deadline = time.time() + 120
        while time.time() < deadline and not any(s.startswith("REQUEUED") for s in _sacct_states(job_id)):
            time.sleep(0.5)
        assert any(s.startswith("REQUEUED") for s in _sacct_states(job_id)), _sacct_states(job_id)
        # Slurm holds a requeued job for about 2 minutes (EligibleTime); release it now to keep the test short
        # Slurm holds a requeued job for about 2 minutes (EligibleTime); release it to keep the test short
        deadline = time.time() + 60
        while time.time() < deadline:
            state = _sh("squeue", "-h", "-j", job_id, "-o", "%T %r").split()
            if state[:2] == ["PENDING", "BeginTime"]:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True,
                               timeout=30)
            elif not state or state[0] in ("RUNNING", "COMPLETED"):
                break
            time.sleep(0.5)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "-n", name], capture_output=True, timeout=30)
    assert proc.returncode == 0, out[-3000:]
    rec = read_record(run_dir / "metrics.jsonl")
    assert rec.ok and len(rec.steps) == steps, (rec.status, len(rec.steps))
    log = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
    assert "this job is preempted" in log, log[-3000:]
    states = [s.split("|")[0] for s in _settled_states(job_id)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
