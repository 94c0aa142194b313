"""The Slurm path for real, on a one-node Slurm cluster (../shared/slurm-local/start.sh, as root): a cell pushed
through `snakemake --profile slurm` (its job named after it, the record saying which job it was), a pre-empted job
that submitit requeues and that then finishes, Ctrl-C of the workflow (the job cancelled, or detached and then
re-attached by the next run: one job per cell), and a scancelled job whose record keeps the whole reason.

Skipped ONLY where start.sh is absent (set SLURM_LOCAL_START to point elsewhere); CI has it and runs these tests.
The cluster is started here (SLURM_LOCAL_CPUS=8 unless set) and stopped afterwards unless it was already up.
"""
import json
import os
import shutil
import signal
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


def _workflow_copy(tmp_path: Path) -> Path:
    """A copy of the workflow (its records do not mix with the repository's), with the ./slurm profile link."""
    work = tmp_path / "wf"
    work.mkdir()
    for d in ("conf", "workflow", "cluster_profiles"):
        shutil.copytree(REPO / d, work / d)
    shutil.copy(REPO / "Snakefile", work / "Snakefile")
    os.symlink("cluster_profiles/slurm", work / "slurm")
    return work


def _jobs_in(work: Path) -> list[str]:
    """JobID|JobName|State of every job (allocation lines) submitted from `work` (sacct's WorkDir)."""
    out = _sh("sacct", "-n", "-P", "-X", "-S", "now-1hours", "-o", "JobID,JobName,State,WorkDir%400")
    return [line.rsplit("|", 1)[0] for line in out.splitlines() if line.rstrip().endswith(f"|{work}")]


def test_cell_through_snakemake_profile_slurm(slurm_cluster, tmp_path):
    """`snakemake --profile slurm --config launcher=slurm_cpu ...` in a copy of the workflow: the cell's job runs
    on the cluster's cpu partition and leaves an ok record; the script submitit gave sbatch is the one
    attn2d.slurm.sbatch_script renders for the same config; the job is named after the cell, and the record's
    header and the cell log say which job it was."""
    work = _workflow_copy(tmp_path)
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
    name = "a2d:local_speedup:attn2d:1x2:144:tiny"
    assert _jobs_in(work) == [f"{job_id}|{name}|COMPLETED"], _jobs_in(work)
    job = rec.header["job"]
    assert (job["launcher"], job["scheduler"], job["job_id"], job["job_name"], job["partition"]) == (
        "slurm_cpu", "slurm", job_id, name, "cpu"), job
    assert job["nodelist"] and job["requeue_count"] == 0 and job["launcher_params"]["partition"] == "cpu", job
    assert f"Slurm job {job_id} ({name}) submitted" in log.read_text() and f"{job_id}_0_log.err" in log.read_text()

    cfg = compose(["experiment=local_speedup", *sweep.split(), "benchmark.steps=2", "benchmark.progress=false",
                   "hydra/launcher=slurm_cpu", f"hydra.sweep.dir='{work}/runs/local_speedup/{cell}'",
                   "hydra.sweep.subdir=."],
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
    assert rec.header["job"]["job_id"] == job_id and rec.header["job"]["requeue_count"] == 1, rec.header["job"]
    log = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
    assert "this job is preempted" in log, log[-3000:]
    states = [s.split("|")[0] for s in _settled_states(job_id)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states


def _interruptible_cell(work: Path, env: dict) -> tuple[subprocess.Popen, Path, Path]:
    """`snakemake --profile slurm` of one cell long enough to interrupt, in its own session (as a terminal runs a
    foreground job, so that Ctrl-C = SIGINT to the whole process group); (process, run dir, cell log)."""
    cell = "attention=attn2d,benchmark.seq_len=144,grid=2x2,model=tiny"
    cmd = [sys.executable, "-m", "snakemake", "--profile", "slurm", "--config", "launcher=slurm_cpu",
           "experiments=[local_speedup]", "sweep=model=tiny benchmark.seq_len=144 grid=2x2 attention=attn2d",
           "overrides=benchmark.steps=3000 benchmark.progress=false", "modelled=False", "--",
           f"runs/local_speedup/{cell}/metrics.jsonl"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, work / "runs/local_speedup" / cell, work / f"results/logs/cells/local_speedup/{cell}.log"


def _wait_for(what, predicate, proc: subprocess.Popen, log: Path, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"{what} did not happen: {proc.communicate(timeout=30)[0][-3000:]}\n"
                         f"{log.read_text()[-3000:] if log.exists() else '(no cell log)'}")


def _running_job(run_dir: Path):
    """The cell's Slurm job id once it runs and rank 0 has started its record, else None."""
    try:
        job_id = json.loads((run_dir / "job.json").read_text())["job_id"]
    except (OSError, ValueError, KeyError):
        return None
    running = _sh("squeue", "-h", "-j", job_id, "-o", "%T").strip() == "RUNNING"
    if (run_dir / "metrics.jsonl.partial").exists() and running:
        return job_id
    return None


def _ctrl_c(proc: subprocess.Popen, run_dir: Path) -> str:
    """SIGINT to the workflow's process group; its output once it and the cell's run_cell.py have ended."""
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=90)[0]
    deadline = time.time() + 60
    while time.time() < deadline and subprocess.run(["pgrep", "-f", f"--run-dir {run_dir}"],
                                                     capture_output=True).returncode == 0:
        time.sleep(0.3)
    return out


def _in_squeue(job_id: str, timeout: float = 30) -> bool:
    """Whether the job is still queued or running after it had `timeout` s to go away (COMPLETING lingers)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _sh("squeue", "-h", "-j", job_id, "-o", "%T").strip():
            return False
        time.sleep(0.5)
    return True


def test_ctrl_c_detaches_then_the_next_run_reattaches_and_ctrl_c_cancels(slurm_cluster, tmp_path):
    """Ctrl-C of `snakemake --profile slurm` with ATTN2D_DETACH=1 leaves the cell's job running; the next
    `snakemake` re-attaches to it instead of submitting another; Ctrl-C of that one (no detach) cancels the job
    and records the cell as failed "interrupted by SIGINT". sacct: one job for the cell in all."""
    work = _workflow_copy(tmp_path)
    proc, run_dir, log = _interruptible_cell(work, {**os.environ, "ATTN2D_DETACH": "1"})
    job_id = _wait_for("the cell's job running", lambda: _running_job(run_dir), proc, log)
    _ctrl_c(proc, run_dir)
    assert f"DETACHED from Slurm job {job_id}" in log.read_text(), log.read_text()[-3000:]
    assert _sh("squeue", "-h", "-j", job_id, "-o", "%T").strip() == "RUNNING"

    env = {k: v for k, v in os.environ.items() if k != "ATTN2D_DETACH"}
    proc, run_dir, log = _interruptible_cell(work, env)
    _wait_for("re-attaching", lambda: log.exists() and f"re-attached to Slurm job {job_id}" in log.read_text(),
              proc, log)
    _ctrl_c(proc, run_dir)
    assert not _in_squeue(job_id), _sh("squeue", "-h", "-j", job_id)
    assert [j.split("|")[0] for j in _jobs_in(work)] == [job_id], _jobs_in(work)
    attempts = sorted((run_dir / "failed").glob("attempt-*.jsonl"))
    assert attempts, log.read_text()[-3000:]
    rec = read_record(attempts[-1])
    assert rec.end["reason"].startswith("interrupted by SIGINT") and f"Slurm job {job_id} cancelled" in rec.end[
        "reason"], rec.end
    assert rec.header["job"]["job_id"] == job_id


def test_scancelled_job_keeps_its_whole_reason(slurm_cluster, tmp_path):
    """A cell whose job is scancelled: the failed record has every line of the launcher's exception, including
    the job's state, and it is written within about 30 s of the scancel (not submitit's 10-minute poll)."""
    run_dir = tmp_path / "cell"
    info = {"experiment": "smoke_cpu", "model": "tiny", "attention": "attn2d", "rows": 1, "cols": 2,
            "world_size": 2, "seq_len": 48, "batch_size": 1, "dtype": "float32", "device": "cpu"}
    cmd = [sys.executable, str(REPO / "workflow/scripts/run_cell.py"), "--run-dir", str(run_dir), "--info",
           json.dumps(info), "--nodes", "1", "--gpus-per-node", "0", "--launcher", "slurm_cpu", "--",
           sys.executable, "-m", "attn2d.train", "-m", "experiment=smoke_cpu", "attention=attn2d", "grid=1x2",
           "benchmark.seq_len=48", "benchmark.steps=100000", "benchmark.progress=false",
           f"hydra.sweep.dir={run_dir}", "hydra.sweep.subdir=."]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        job_id = _wait_for("the job running", lambda: _running_job(run_dir), proc, run_dir / "none")
        _sh("scancel", job_id)
        t0 = time.time()
        out = proc.communicate(timeout=120)[0]
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    rec = read_record(run_dir)
    reason = rec.end["reason"]
    job = rec.header["job"]  # written here from the job file and sacct: the job is named, placed, counted
    assert (job["job_id"], job["partition"], job["requeue_count"]) == (job_id, "cpu", 0) and job["nodelist"], job
    assert "UncompletedJobError: Job " in reason and "has not produced any output (state: CANCELLED" in reason, reason
    assert f"Slurm job {job_id} (a2d:smoke_cpu:attn2d:1x2:48:tiny) ended CANCELLED;" in reason.splitlines()[0], reason
    assert took < 60, (took, out[-3000:])
