"""Run one cell (`python -m attn2d.train -m ...`, which submits through Hydra's submitit launcher and waits) and make
sure it leaves a complete record.

- The run writes its own record (runs/<exp>/<cell>/metrics.jsonl, atomically; status ok or failed with a reason).
- If it leaves none (a crash before the writer started, a job killed by Slurm at its time limit, a node failure,
  a launcher error), this script writes a record with status "failed" and the reason read off the command's
  output, so the cell shows in the tables as failed instead of vanishing.
- Every failed record is also copied to <run dir>/failed/attempt-<k>.jsonl. The workflow passes the number of
  those copies to the cell rule as a parameter, so a failed cell is run again by the next `snakemake` (Snakemake's
  "params changed" rerun trigger), see workflow/rules/run.smk.

Exit status 0 whenever a record exists at the end, so one failed cell does not stop the tables and figures.

    python workflow/scripts/run_cell.py --run-dir D --info '{"model": ...}' --nodes N --gpus-per-node G
        --launcher L [--launcher-args '...'] [--timeout-min T] -- python -m attn2d.train -m ...
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
from pathlib import Path

from attn2d import records

# the last line of a Python traceback ("ValueError: ...", "submitit.core.utils.UncompletedJobError: ...")
_EXC = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)|Killed|Terminated|TIMEOUT)\b.*")
# lines that say nothing about the failure (Hydra's hints, our own echo of the command)
_NOISE = re.compile(r"^(Set the environment variable HYDRA_FULL_ERROR|See https://hydra\.cc|\+ |Traceback|\s*$)")


def reason_from_output(lines: list[str], rc: int | None, timed_out_min: float | None) -> str:
    """Why a run left no record: the last exception line of its output, the exit status, a timeout."""
    if timed_out_min is not None:
        return f"timed out: still running after {timed_out_min:g} min (workflow cell_timeout_min); killed"
    exc = [ln.strip() for ln in lines if _EXC.match(ln.strip())]
    said = [ln.strip() for ln in lines if not _NOISE.match(ln)]
    detail = exc[-1] if exc else (" | ".join(said[-3:]) if said else "no output")
    if rc is not None and rc < 0:
        return f"killed by signal {-rc} ({signal.Signals(-rc).name}); last output: {detail}"[:2000]
    return f"attn2d.train exited with status {rc} without a record: {detail}"[:2000]


def fallback_header(info: dict, launcher: str, command: list[str]) -> dict:
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


def run(command: list[str], timeout_min: float | None) -> tuple[int | None, list[str], float | None]:
    """Run `command` in its own process group, echo its output, return (status, last lines, timed-out-after)."""
    import threading

    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    expired = threading.Event()

    def kill() -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def on_timeout() -> None:
        expired.set()
        kill()

    timer = threading.Timer(timeout_min * 60, on_timeout) if timeout_min else None
    if timer is not None:
        timer.start()

    def on_sigterm(*_) -> None:  # snakemake cancelling the job: stop the run too
        kill()
        sys.exit(143)

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, old)
        if timer is not None:
            timer.cancel()
    return rc, list(tail), (timeout_min if expired.is_set() else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--info", required=True, help="the cell's header fields as JSON (see attn2d.report.cells)")
    ap.add_argument("--nodes", type=int, required=True, help="nodes of the job (for the header of a failed run)")
    ap.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node of the job (idem)")
    ap.add_argument("--launcher", required=True, help="hydra/launcher option")
    ap.add_argument("--launcher-args", default="", help="hydra.launcher.* overrides, shell-quoted")
    ap.add_argument("--timeout-min", type=float, default=0, help="kill the command after this long (0: never)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    a = ap.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        ap.error("no command after --")
    command = [*command, f"hydra/launcher={a.launcher}", *shlex.split(a.launcher_args)]
    info = {**json.loads(a.info), "nodes": a.nodes, "gpus_per_node": a.gpus_per_node}
    run_dir: Path = a.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / records.METRICS).unlink(missing_ok=True)  # never report an older run as this one
    (run_dir / records.PARTIAL).unlink(missing_ok=True)
    print("+ " + shlex.join(command), flush=True)

    rc, tail, timed_out = run(command, a.timeout_min or None)

    if not (run_dir / records.METRICS).exists():
        reason = reason_from_output(tail, rc, timed_out)
        if (run_dir / records.PARTIAL).exists():
            reason = "the run died half-way (only a .partial record was left); " + reason
        records.write(run_dir, fallback_header(info, a.launcher, command), [], status="failed", reason=reason)
        print(f"run_cell: no record from the run; wrote a failed one: {reason}", flush=True)
    copy = keep_failed(run_dir)
    if copy is not None:
        print(f"run_cell: the cell failed; record kept as {copy} (the next snakemake run retries it)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
