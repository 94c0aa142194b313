"""A cell's lifecycle without Slurm (tests/test_slurm.py has the Slurm side): workflow/scripts/run_cell.py stops
every process of a cell at its time limit and on Ctrl-C, one run per cell (the lock), the whole reason of a
failure, job names, the record header's `job` key and the dry run of attn2d.slurm."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from attn2d import records
from attn2d.slurm import job_name
from attn2d.slurm import main as slurm_main

REPO = Path(__file__).resolve().parents[1]
RUN_CELL = REPO / "workflow" / "scripts" / "run_cell.py"
INFO = {"experiment": "smoke_cpu", "model": "tiny", "attention": "attn2d", "rows": 1, "cols": 2, "world_size": 2,
        "seq_len": 48, "batch_size": 1, "dtype": "float32", "device": "cpu"}


def _run_cell_cmd(run_dir: Path, *extra: str, train: list[str] | None = None) -> list[str]:
    """run_cell.py of a 1x2 local_cpu cell that would run for hours (or of `train`, if given)."""
    train = train or [sys.executable, "-m", "attn2d.train", "-m", "experiment=smoke_cpu", "attention=attn2d",
                      "grid=1x2", "benchmark.seq_len=48", "benchmark.steps=1000000", "benchmark.progress=false",
                      f"hydra.sweep.dir={run_dir}", "hydra.sweep.subdir=."]
    return [sys.executable, str(RUN_CELL), "--run-dir", str(run_dir), "--info", json.dumps(INFO), "--nodes", "1",
            "--gpus-per-node", "0", "--launcher", "local_cpu", *extra, "--", *train]


def _cell_processes(run_dir: Path) -> list[str]:
    """Command lines of live processes that belong to the cell (launcher, submitit controller, ranks)."""
    out = subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if str(RUN_CELL) not in ln and "pgrep" not in ln]


def _wait_ranks_running(run_dir: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / records.PARTIAL).exists():  # rank 0 has written its header: every rank is up
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the cell never started: {proc.communicate(timeout=30)[0][-3000:]}")


def test_time_limit_stops_every_rank_and_records_timed_out(tmp_path):
    """--timeout-min on a local cell: the launcher, submitit's controller and both ranks (which bypass SIGTERM)
    are gone soon after the limit, and the record says "timed out after 0.25 min"."""
    run_dir = tmp_path / "cell"
    t0 = time.time()
    res = subprocess.run(_run_cell_cmd(run_dir, "--timeout-min", "0.25"), cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    took = time.time() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not _cell_processes(run_dir), _cell_processes(run_dir)
    rec = records.read_record(run_dir)
    assert rec.status == "failed" and rec.end["reason"].startswith("timed out after 0.25 min"), rec.end
    assert 15 <= took < 15 + 30, took  # the limit, then at most the SIGTERM grace and the SIGKILL
    job = rec.header["job"]  # from the job file the local launcher wrote at submission
    assert (job["launcher"], job["scheduler"], job["job_name"]) == ("local_cpu", "local",
                                                                    "a2d:smoke_cpu:attn2d:1x2:48:tiny"), job


def test_ctrl_c_stops_every_rank_and_records_the_interrupt(tmp_path):
    """SIGINT to run_cell.py (and to its process group, as Ctrl-C does): no process of the cell is left and the
    record says "interrupted by SIGINT"; a re-run right after does not race a leftover."""
    run_dir = tmp_path / "cell"
    proc = subprocess.Popen(_run_cell_cmd(run_dir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_ranks_running(run_dir, proc)
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    assert not _cell_processes(run_dir), _cell_processes(run_dir)
    rec = records.read_record(run_dir)
    assert rec.status == "failed" and rec.end["reason"].startswith("interrupted by SIGINT"), rec.end
    assert not (run_dir / records.PARTIAL).exists()


def test_rerun_after_run_cell_was_killed_outright_does_not_race_its_leftovers(tmp_path):
    """SIGKILL of run_cell.py alone (nothing can be stopped then) leaves the local launcher, controller and ranks
    running; the next run of the cell stops them before it starts, so no leftover renames the new run's record,
    and it ends with its own ok record and nothing left behind."""
    run_dir = tmp_path / "cell"
    first = subprocess.Popen(_run_cell_cmd(run_dir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        _wait_ranks_running(run_dir, first)
        first.kill()
        first.communicate(timeout=30)
        assert _cell_processes(run_dir)  # the leftovers
        short = [sys.executable, "-m", "attn2d.train", "-m", "experiment=smoke_cpu", "attention=attn2d", "grid=1x2",
                 "benchmark.seq_len=48", "benchmark.steps=2", "benchmark.progress=false",
                 f"hydra.sweep.dir={run_dir}", "hydra.sweep.subdir=."]
        res = subprocess.run(_run_cell_cmd(run_dir, train=short), cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    finally:
        for pid in _cell_pids(run_dir):
            os.kill(pid, signal.SIGKILL)
    assert "leftover process(es) of an earlier run of this cell" in res.stdout, res.stdout[-3000:]
    rec = records.read_record(run_dir)
    assert rec.ok and len(rec.steps) == 2, rec.end
    assert not _cell_processes(run_dir), _cell_processes(run_dir)


def _cell_pids(run_dir: Path) -> list[int]:
    return [int(ln.split()[0]) for ln in _cell_processes(run_dir)]


def test_second_run_of_a_cell_fails_fast_on_the_lock(tmp_path):
    """While one run_cell.py runs a cell, a second one on the same run dir exits at once (75) naming the lock and
    its holder, and leaves the first run's files alone."""
    run_dir = tmp_path / "cell"
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    first = subprocess.Popen(_run_cell_cmd(run_dir, train=slow), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and "pid" not in ((run_dir / ".lock").read_text()
                                                       if (run_dir / ".lock").exists() else ""):
            time.sleep(0.1)
        t0 = time.time()
        second = subprocess.run(_run_cell_cmd(run_dir, train=slow), cwd=REPO, capture_output=True, text=True,
                                timeout=30)
        took = time.time() - t0
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=30)
    assert second.returncode == 75 and took < 10, (second.returncode, took)
    assert "another run of this cell is in progress" in second.stderr and f"pid {first.pid}" in second.stderr, (
        second.stderr)
    assert "+ " not in second.stdout  # it started nothing
    assert records.read_record(run_dir).end["reason"].startswith("interrupted by SIGTERM")  # the first run's


def _run_cell_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_cell", RUN_CELL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_failure_reason_keeps_every_line_of_the_last_exception():
    """A scancelled job's UncompletedJobError is two lines and the job's stderr; all of it stays (the state is on
    the second line), Hydra's hint goes."""
    out = ["Error executing job with overrides: ['grid=1x2']", "Traceback (most recent call last):",
           '  File "x.py", line 1, in <module>', "    raise job_exception",
           "submitit.core.utils.UncompletedJobError: Job 4 (task: 0) with path /r/4_0_result.pkl",
           "has not produced any output (state: CANCELLED by 0)", "Error stream produced:", "-" * 40,
           "slurmstepd: error: *** JOB 4 ON vm CANCELLED AT 2026-12-01T20:00:00 ***", "",
           "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."]
    reason = _run_cell_module().reason_from_output(out, 1)
    assert reason.startswith("attn2d.train exited with status 1 without a record: submitit.core.utils."
                             "UncompletedJobError: Job 4 (task: 0) with path /r/4_0_result.pkl\n"
                             "has not produced any output (state: CANCELLED by 0)\n"), reason
    assert "JOB 4 ON vm CANCELLED" in reason and "HYDRA_FULL_ERROR" not in reason


def test_job_names_name_the_cell_and_are_safe_for_slurm():
    assert job_name("a100_speedup", "ring", 8, 8, 131072, "gpt3_13b") == "a2d:a100_speedup:ring:8x8:131072:gpt3_13b"
    assert job_name("e", "x'$(touch y)", 1, 2, 3, "m m") == "a2d:e:x___touch_y_:1x2:3:m_m"
    assert len(job_name("e" * 300, "a", 1, 1, 1, "m")) == 128


def test_dead_slurm_jobs_are_noticed_within_30_s(monkeypatch):
    """submitit's Slurm watcher polls sacct at most every 600 s late in a job; the launcher's polls at least every
    30 s however long the job has run."""
    import submitit

    from hydra_plugins.attn2d_launcher import launcher

    monkeypatch.setattr(submitit.SlurmJob, "watcher", submitit.SlurmJob.watcher)  # restored afterwards
    w = submitit.SlurmJob.watcher
    calls = []
    monkeypatch.setattr(type(w), "update", lambda self: calls.append(1) or setattr(self, "_last_status_check",
                                                                                  time.time()))
    w._start_time = time.time() - 3600  # a job that has run for an hour, last polled 100 s ago
    w._last_status_check = time.time() - 100
    w.update_if_long_enough("standard")
    assert not calls  # submitit: not yet (next poll 600 s after the last)
    launcher.fast_slurm_watcher()
    w = submitit.SlurmJob.watcher
    w._start_time, w._last_status_check = time.time() - 3600, time.time() - 31
    w.update_if_long_enough("standard")
    assert calls == [1]


def test_header_job_key_is_optional_and_checked():
    header = {"kind": "header", "cell": {k: None for k in ("experiment", "model", "attention", "rows", "cols",
              "world_size", "nodes", "gpus_per_node", "seq_len", "batch_size", "dtype", "device")},
              "config": {}, "versions": {}, "hosts": [], "devices": [], "git_rev": None,
              "started_at": "2026-12-01T20:00:00+00:00"}
    assert records.validate_line(header) is None  # older records have no job key
    job = {"launcher": "slurm_cpu", "scheduler": "slurm", "job_id": "7", "job_name": "a2d:e:ring:2x2:144:tiny",
           "partition": "cpu", "account": None, "nodelist": "vm", "requeue_count": 0, "launcher_params": {}}
    assert records.validate_line({**header, "job": job}) is None
    assert records.validate_line({**header, "job": None}) is None
    assert "partition" in records.validate_line({**header, "job": {k: v for k, v in job.items() if k != "partition"}})
    assert "requeue_count" in records.validate_line({**header, "job": {**job, "requeue_count": -1}})


def test_slurm_dry_run_honours_grid_and_says_what_cannot_be_placed(capsys):
    """`python -m attn2d.slurm local_speedup hydra/launcher=slurm_a100`: grid= overrides the sweep's grids, a grid
    that does not fill 4-GPU nodes is one clear line and exit status 1, no account is "none (cluster default)",
    and the jobs are summed up by shape."""
    assert slurm_main(["local_speedup", "hydra/launcher=slurm_a100", "grid=2x2"]) == 0
    out = capsys.readouterr().out
    assert "grid=3x3" not in out and "local_speedup grid=2x2 (slurm_a100, 9 jobs)" in out, out
    assert "account: none (cluster default)" in out and "account=default" not in out
    assert "jobs by shape (9 jobs, 9 cells):\n  1 nodes x 4 tasks x 4 GPUs, partition a100: 9" in out, out
    assert slurm_main(["local_speedup", "hydra/launcher=slurm_a100"]) == 1
    out = capsys.readouterr().out
    assert ("local_speedup grid=3x3: cannot be placed: grid 3x3 has 9 ranks, which do not fill whole nodes of 4 GPUs"
            in out), out
    assert "Traceback" not in out and "grids that cannot be placed: 3x3" in out
    assert slurm_main(["a100_speedup", "hydra.launcher.account=proj1", "attention=ring"]) == 0
    out = capsys.readouterr().out
    assert "--account=proj1" in out and "jobs by shape (30 jobs, 30 cells)" in out, out
