"""Run one cell (`python -m attn2d.train -m ...`, which submits through Hydra's submitit launcher and waits) and make
sure it leaves a complete record, no second run beside it and no process or job behind it.

- The run writes its own record (runs/<exp>/<cell>/metrics.jsonl, atomically; status ok or failed with a reason).
- If it leaves none (a crash before the writer started, a job killed by Slurm at its time limit, a node failure,
  a launcher error, a scancel), this script writes a record with status "failed" and the reason: every line of
  the command's last exception, and the Slurm job's state.
- Every failed record is also copied to <run dir>/failed/attempt-<k>.jsonl. The workflow passes the number of
  those copies to the cell rule as a parameter, so a failed cell is run again by the next `snakemake` (Snakemake's
  "params changed" rerun trigger), see workflow/rules/run.smk.
- One run per cell: <run dir>/.lock is held (flock) while this runs; a second run of the cell fails at once.
  Processes left by an earlier local run whose run_cell.py was SIGKILLed are stopped before this run starts.
- The launcher writes <run dir>/job.json when it submits the cell's job (attn2d.lifecycle). On SIGINT, SIGTERM or
  SIGHUP this script stops every process it started (SIGTERM, SIGKILL after a grace time; it is their subreaper,
  so none escapes), cancels the cell's Slurm job (scancel) and writes a failed record "interrupted by SIGINT".
  With --detach (or ATTN2D_DETACH=1) it leaves the Slurm job running and writes no record; the next run of the
  cell finds the job in job.json still pending or running and RE-ATTACHES to it (waits for it) instead of
  submitting another.
- --timeout-min T: the same stop (the Slurm job is always cancelled) after T minutes, recorded as "timed out".

Exit status 0 whenever a record exists at the end (one failed cell does not stop the tables and figures); 128+N
after signal N; 75 when another run holds the cell's lock.

    python workflow/scripts/run_cell.py --run-dir D --info '{"model": ...}' --nodes N --gpus-per-node G
        --launcher L [--launcher-args '...'] [--timeout-min T] [--detach] -- python -m attn2d.train -m ...
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from attn2d import lifecycle, records

# the last line of a Python traceback ("ValueError: ...", "submitit.core.utils.UncompletedJobError: ...")
_EXC = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)|Killed|Terminated|TIMEOUT)\b.*")
# lines that say nothing about the failure (Hydra's hints, our own echo of the command)
_NOISE = re.compile(r"^(Set the environment variable HYDRA_FULL_ERROR|See https://hydra\.cc|\+ |Traceback|\s*$)")
GRACE_S = 5.0  # SIGTERM -> SIGKILL
REASON_CHARS = 4000
DETACH_ENV = "ATTN2D_DETACH"


class Stop(Exception):
    """Raised in the main thread by a signal (SIGINT/SIGTERM/SIGHUP) or the time limit (SIGALRM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def timed_out(self) -> bool:
        return self.signum == signal.SIGALRM


def last_exception(lines: list[str]) -> str | None:
    """Every line of the last exception in `lines`: from the first unindented line after the last `Traceback`
    to the end, noise dropped; without a traceback, the last exception-like line."""
    tb = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if tb:
        body = lines[tb[-1] + 1:]
        start = next((i for i, ln in enumerate(body) if ln and not ln[0].isspace()), None)
        if start is not None:
            kept = [ln.rstrip() for ln in body[start:] if not _NOISE.match(ln)]
            if kept:
                return "\n".join(kept)
    exc = [ln.strip() for ln in lines if _EXC.match(ln.strip())]
    return exc[-1] if exc else None


def reason_from_output(lines: list[str], rc: int | None, timed_out_min: float | None = None) -> str:
    """Why a run left no record: its last exception (all lines), the exit status, a timeout."""
    if timed_out_min is not None:
        return f"timed out after {timed_out_min:g} min (workflow cell_timeout_min): still running; killed"
    said = [ln.strip() for ln in lines if not _NOISE.match(ln)]
    detail = last_exception(lines) or (" | ".join(said[-3:]) if said else "no output")
    if rc is not None and rc < 0:
        return f"killed by signal {-rc} ({signal.Signals(-rc).name}); last output: {detail}"[:REASON_CHARS]
    return f"attn2d.train exited with status {rc} without a record: {detail}"[:REASON_CHARS]


def job_of(job: dict | None, launcher: str) -> dict:
    """The header's `job` key for a record written here: job.json (what the launcher knew at submission), and
    for a Slurm job the nodes and requeues accounting knows of."""
    job = job or {}
    params = job.get("launcher_params")
    nodes, requeues = lifecycle.slurm_accounting(str(job["job_id"])) if _slurm_job(job) else (None, None)
    return {"launcher": job.get("launcher", launcher), "scheduler": job.get("scheduler"),
            "job_id": job.get("job_id"), "job_name": job.get("job_name"), "partition": job.get("partition"),
            "account": job.get("account"), "nodelist": nodes, "requeue_count": requeues,
            "launcher_params": params if isinstance(params, dict) else None}


def fallback_header(info: dict, launcher: str, command: list[str], job: dict | None = None) -> dict:
    """A header for a run that wrote none: the cell as the workflow planned it, no measurement context."""
    return {
        "cell": info,
        "config": {"command": shlex.join(command)},
        "versions": {},
        "hosts": [],
        "devices": [],
        "git_rev": None,
        "started_at": records.now_iso(),
        "launcher": launcher,
        "job": job_of(job, launcher),
    }


def keep_failed(run_dir: Path) -> Path | None:
    """Copy a failed record to failed/attempt-<k>.jsonl (k = 1, 2, ...); return the copy, or None if it is ok."""
    rec = records.read_record(run_dir / records.METRICS)
    if rec.ok:
        return None
    hist = run_dir / "failed"
    hist.mkdir(exist_ok=True)
    dst = hist / f"attempt-{len(list(hist.glob('attempt-*.jsonl'))) + 1}.jsonl"
    shutil.copyfile(run_dir / records.METRICS, dst)
    return dst


def say(msg: str) -> None:
    print(f"run_cell: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- stopping
def _on_signal(signum, _frame) -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):  # one stop at a time
        signal.signal(s, signal.SIG_IGN)
    raise Stop(signum)


def _arm(timeout_min: float | None) -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(s, _on_signal)
    if timeout_min:
        signal.setitimer(signal.ITIMER_REAL, timeout_min * 60)


def _disarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(s, signal.SIG_IGN)


def _slurm_job(job: dict | None) -> str | None:
    return str(job["job_id"]) if job and job.get("scheduler") == "slurm" and job.get("job_id") else None


# ---------------------------------------------------------------------------------------------- waiting
def run_command(command: list[str], tail: collections.deque) -> int:
    """Run `command` in its own session, echo its output into the log and `tail`; its exit status."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:  # type: ignore[union-attr]
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip("\n"))
    return proc.wait()


def wait_job(run_dir: Path, job_id: str) -> str:
    """Wait for a Slurm job this script did not submit (re-attached) to end; its final state. The job's own rank 0
    writes the record."""
    state, delay = None, 1.0
    while True:
        now = lifecycle.slurm_state(job_id)
        if now != state:
            say(f"Slurm job {job_id}: {now}")
            state = now
        if now is not None and now not in lifecycle.ACTIVE_STATES:
            return now
        if now is None and (run_dir / records.METRICS).exists():
            return "UNKNOWN"
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def _final_state(job_id: str, seconds: float = 10.0) -> str | None:
    """The job's state once it has settled (accounting can lag the job's end by a few seconds)."""
    deadline = time.monotonic() + seconds
    state = lifecycle.slurm_state(job_id)
    while state in ("RUNNING", "COMPLETING", None) and time.monotonic() < deadline:
        time.sleep(0.5)
        state = lifecycle.slurm_state(job_id)
    return state


def _job_log_tail(job: dict, n: int = 60) -> list[str]:
    try:
        return Path(job["stderr"]).read_text(errors="replace").splitlines()[-n:]
    except (KeyError, OSError, TypeError):
        return []


def _await_record(run_dir: Path, seconds: float = 30.0) -> bool:
    """The record written on a compute node can take a moment to show here (shared filesystem)."""
    deadline = time.monotonic() + seconds
    while not (run_dir / records.METRICS).exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    return (run_dir / records.METRICS).exists()


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None, subreaper: bool = False) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--info", required=True, help="the cell's header fields as JSON (see attn2d.plan)")
    ap.add_argument("--nodes", type=int, required=True, help="nodes of the job (for the header of a failed run)")
    ap.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node of the job (idem)")
    ap.add_argument("--launcher", required=True, help="hydra/launcher option")
    ap.add_argument("--launcher-args", default="", help="hydra.launcher.* overrides, shell-quoted")
    ap.add_argument("--timeout-min", type=float, default=0, help="stop the cell after this long (0: never)")
    ap.add_argument("--detach", action="store_true", default=os.environ.get(DETACH_ENV, "") not in ("", "0"),
                    help=f"on SIGINT/SIGTERM/SIGHUP leave the cell's Slurm job running (default: ${DETACH_ENV})")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    a = ap.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        ap.error("no command after --")
    command = [*command, f"hydra/launcher={a.launcher}", *shlex.split(a.launcher_args)]
    info = {**json.loads(a.info), "nodes": a.nodes, "gpus_per_node": a.gpus_per_node}
    run_dir: Path = a.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = lifecycle.CellLock(run_dir)
    except lifecycle.CellLocked as e:
        print(f"run_cell: {run_dir}: {e}", file=sys.stderr, flush=True)
        return 75
    if subreaper:
        lifecycle.become_subreaper()
    tree = lifecycle.ProcessTree()
    try:
        return _run(a, command, info, run_dir, tree)
    finally:
        lock.release()


def _previous_job(run_dir: Path, command: list[str]) -> tuple[dict | None, str | None]:
    """job.json's Slurm job if it is still pending or running, and whether it runs this same command."""
    job = lifecycle.read_job_file(run_dir)
    job_id = _slurm_job(job)
    if job_id is None:
        return None, None
    state = lifecycle.slurm_state(job_id)
    if state not in lifecycle.ACTIVE_STATES:
        return None, None
    args = command[command.index("attn2d.train") + 1:] if "attn2d.train" in command else None
    return job, ("same" if args is not None and job.get("args") == args else "other")


def _stop_leftovers(run_dir: Path) -> None:
    """Processes of an earlier LOCAL run of this cell whose run_cell.py was killed outright (SIGKILL: nothing could
    stop them then): stop them now, before they race this run over the record. Never a Slurm job's: those are
    re-attached or cancelled."""
    job = lifecycle.read_job_file(run_dir)
    if not job or job.get("scheduler") != "local" or not job.get("folder"):
        return
    pids = lifecycle.processes_mentioning(str(Path(job["folder"]).resolve()))
    launcher = job.get("pid")
    if isinstance(launcher, int) and launcher in lifecycle.processes_mentioning("attn2d.train"):
        pids.append(launcher)
    if pids:
        say(f"stopping {len(pids)} leftover process(es) of an earlier run of this cell (pids {pids})")
        lifecycle.kill_pids(pids, GRACE_S)


def _run(a, command: list[str], info: dict, run_dir: Path, tree: lifecycle.ProcessTree) -> int:
    tail: collections.deque[str] = collections.deque(maxlen=400)
    _stop_leftovers(run_dir)
    job, match = _previous_job(run_dir, command)
    attached = match == "same"
    if match == "other":  # the cell changed since: that job would write into this run dir
        state = lifecycle.slurm_state(job["job_id"])
        say(f"Slurm job {job['job_id']} of an earlier version of this cell is still {state}; "
            + lifecycle.scancel(job["job_id"]))
        deadline = time.monotonic() + 120
        while lifecycle.slurm_state(job["job_id"]) in lifecycle.ACTIVE_STATES and time.monotonic() < deadline:
            time.sleep(1)
        job = None
    if not attached:
        for stale in (records.METRICS, records.PARTIAL, lifecycle.JOB_FILE):  # never report an older run as this
            (run_dir / stale).unlink(missing_ok=True)
        print("+ " + shlex.join(command), flush=True)
    else:  # Snakemake removed the cell's old record; the job's rank 0 writes the new one
        say(f"re-attached to Slurm job {job['job_id']} ({job.get('job_name')}), submitted {job.get('submitted_at')} "
            f"for this cell and still {lifecycle.slurm_state(job['job_id'])}: waiting for it instead of submitting "
            f"another; logs of rank 0: {job.get('stdout')} and {job.get('stderr')}")

    rc, state, stop = None, None, None
    _arm(a.timeout_min or None)
    try:
        if attached:
            state = wait_job(run_dir, job["job_id"])
        else:
            rc = run_command(command, tail)
    except Stop as e:
        stop = e
    finally:
        _disarm()

    if not attached:
        job = lifecycle.read_job_file(run_dir)  # written by the launcher of THIS run (stale ones were removed)
    job_id = _slurm_job(job)
    if stop is not None:
        return _stopped(a, command, info, run_dir, tree, job, job_id, stop, attached)

    left = tree.pids()
    if left:  # e.g. a local controller that outlived its launcher: no process of the cell stays behind
        n, hard = tree.kill(GRACE_S)
        say(f"stopped {n} leftover process(es) of the cell ({hard} needed SIGKILL)")
    if not _await_record(run_dir, 30.0 if job_id and lifecycle.slurm_state(job_id) == "COMPLETED" else 2.0):
        if job_id is not None:
            state = state or _final_state(job_id)
            if state in lifecycle.ACTIVE_STATES:  # the launcher died, its job lives on: do not leave it behind
                say(f"the launcher ended but Slurm job {job_id} is still {state}; " + lifecycle.scancel(job_id))
        if attached:
            detail = last_exception(_job_log_tail(job)) or "no exception in its log"
            reason = f"Slurm job {job_id} ended {state} without a record; its log {job.get('stderr')}: {detail}"
        else:
            reason = reason_from_output(list(tail), rc)
            if job_id is not None:  # the job's state first: the exception may be long
                reason = f"Slurm job {job_id} ({job.get('job_name')}) ended {state or 'in an unknown state'}; {reason}"
        if (run_dir / records.PARTIAL).exists():
            reason = "the run died half-way (only a .partial record was left); " + reason
        reason = reason[:REASON_CHARS]
        records.write(run_dir, fallback_header(info, a.launcher, command, job), [], status="failed", reason=reason)
        say(f"no record from the run; wrote a failed one: {reason}")
    copy = keep_failed(run_dir)
    if copy is not None:
        say(f"the cell failed; record kept as {copy} (the next snakemake run retries it)")
    return 0


def _stopped(a, command, info, run_dir: Path, tree, job, job_id, stop: Stop, attached: bool) -> int:
    """After an interrupt or the time limit: stop the processes, cancel (or detach from) the job, record why."""
    n, hard = tree.kill(GRACE_S)
    if not attached:
        job = lifecycle.read_job_file(run_dir) or job  # the launcher may have submitted during the grace time
        job_id = _slurm_job(job)
    what = f"stopped {n} process(es) ({hard} needed SIGKILL)"
    if job_id is not None and a.detach and not stop.timed_out:
        say(f"{stop} received: {what}; DETACHED from Slurm job {job_id} ({job.get('job_name')}), which keeps "
            f"running (state {lifecycle.slurm_state(job_id)}); the next run of this cell re-attaches to it. "
            f"Logs: {job.get('stdout')}, {job.get('stderr')}")
        return 128 + stop.signum
    if job_id is not None:
        what += f"; Slurm job {job_id} cancelled ({lifecycle.scancel(job_id)})"
    minutes = a.timeout_min
    why = (f"timed out after {minutes:g} min (workflow cell_timeout_min): {what}" if stop.timed_out
           else f"interrupted by {stop}: {what}")
    say(why)
    if not (run_dir / records.METRICS).exists():  # a record that made it before the stop stands
        (run_dir / records.PARTIAL).unlink(missing_ok=True)
        records.write(run_dir, fallback_header(info, a.launcher, command, job), [], status="failed", reason=why)
    keep_failed(run_dir)
    return 0 if stop.timed_out else 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main(subreaper=True))
