"""A cell's lifecycle on this machine: its job file, its lock, its process tree and its Slurm job.

- `<run dir>/job.json` (JOB_FILE) is written by the attn2d launcher as soon as a cell's job is submitted: scheduler,
  job id and name, submitit folder, the job's log paths, the launcher and its resolved parameters, the command-line
  arguments of the submitting run. workflow/scripts/run_cell.py reads it to cancel the job on an interrupt or a time
  limit, and on a re-run to re-attach to a job that is still pending or running instead of submitting another.
- `<run dir>/.lock` (LOCK_FILE) is flock'ed by run_cell.py for its whole life: a second run of the same cell fails
  fast instead of racing the first one over the record.
- `ProcessTree` is what this process started and everything below it; with `become_subreaper()` (Linux) no
  descendant escapes it by double-forking or `setsid`. `kill` stops all of them: SIGTERM, then SIGKILL after a
  grace time (submitit's tasks bypass SIGTERM).
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

JOB_FILE = "job.json"
LOCK_FILE = ".lock"
# Slurm states of a job that has not ended (sacct/squeue names); anything else is final
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING",
                           "CONFIGURING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED"})


# ---------------------------------------------------------------------------------------------- job file
def write_job_file(run_dir: str | os.PathLike, job: dict[str, Any]) -> Path:
    """Write `job` to <run_dir>/job.json atomically; returns the path."""
    path = Path(run_dir) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(job, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_job_file(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """<run_dir>/job.json, or None where there is none (or it is unreadable)."""
    try:
        return json.loads((Path(run_dir) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- lock
class CellLocked(RuntimeError):
    """Another process holds the cell's lock."""


class CellLock:
    """An exclusive, non-blocking flock on <run_dir>/.lock, held until release() or process exit (the kernel drops
    it when the holder dies, so a killed run never leaves a stale lock)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "unknown"
            os.close(self._fd)
            raise CellLocked(
                f"another run of this cell is in progress: {self.path} is locked by {holder}; wait for it to end "
                "(or stop that process) and run again. Not starting a second run of the same cell.") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ---------------------------------------------------------------------------------------------- process tree
def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of init (Linux prctl); False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _process_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, state letter)} of every process, from /proc/<pid>/stat."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
            table[int(entry.name)] = (int(rest[1]), rest[0])
        except (OSError, IndexError, ValueError):
            pass
    return table


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes (not this one) whose command line contains `text`."""
    out = []
    for pid, (_, state) in _process_table().items():
        if pid == os.getpid() or state in "ZX":
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text in f.read().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(pid)
        except OSError:
            pass
    return out


def kill_pids(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM `pids`, SIGKILL those still alive after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


class ProcessTree:
    """The processes this process starts from now on, their descendants, and (as a subreaper) the orphans those
    leave behind; children that existed before are not part of it."""

    def __init__(self) -> None:
        self._before = self._children(_process_table())

    @staticmethod
    def _children(table: dict[int, tuple[int, str]]) -> set[int]:
        me = os.getpid()
        return {pid for pid, (ppid, _) in table.items() if ppid == me}

    def _members(self) -> tuple[list[int], list[int]]:
        """(live members, zombie children of this process among them)."""
        table = _process_table()
        kids: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            kids.setdefault(ppid, []).append(pid)
        todo = [p for p in self._children(table) if p not in self._before]
        zombies = [p for p in todo if table[p][1] == "Z"]
        live = []
        while todo:
            pid = todo.pop()
            if table[pid][1] not in "ZX":
                live.append(pid)
            todo.extend(kids.get(pid, []))
        return live, zombies

    def pids(self) -> list[int]:
        """Live (non-zombie) members, from /proc."""
        return self._members()[0]

    def reap(self) -> None:
        """Collect exited members that are this process's children (orphans adopted as subreaper)."""
        for pid in self._members()[1]:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def kill(self, grace_s: float = 5.0) -> tuple[int, int]:
        """SIGTERM every member, SIGKILL those left after `grace_s` (until none is left, at most ~10 s more);
        returns (members signalled, members that needed SIGKILL)."""
        first = self.pids()
        needed_kill = 0
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            pids = self.pids()
            if not pids:
                break
            if sig == signal.SIGKILL:
                needed_kill = len(pids)
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.1)
            self.reap()
        return len(first), needed_kill


# ---------------------------------------------------------------------------------------------- Slurm
def slurm_state(job_id: str) -> str | None:
    """The job's state ("RUNNING", "CANCELLED", ...; first word), from squeue while it is queued or running, else
    sacct; None where Slurm does not know it (or is not there)."""
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%T"],
                ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State"]):
        try:
            out = [ln.split() for ln in subprocess.run(cmd, capture_output=True, text=True,
                                                        timeout=30).stdout.splitlines() if ln.strip()]
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out:
            return out[-1][0].upper()  # "CANCELLED by 0" -> CANCELLED
    return None


def slurm_accounting(job_id: str) -> tuple[str | None, int | None]:
    """(node list, times requeued) of a job as sacct knows it; None where it does not."""
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "NodeList,State"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    rows = [ln.split("|") for ln in out if "|" in ln]
    if not rows:
        return None, None
    nodes = rows[-1][0]
    return (None if nodes in ("", "None assigned") else nodes), sum(r[1].startswith("REQUEUED") for r in rows)


def scancel(job_id: str) -> str:
    """Cancel a Slurm job; returns what happened, for the log."""
    try:
        res = subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scancel {job_id} failed: {e}"
    return f"scancel {job_id}" + (f": {res.stderr.strip()}" if res.returncode else ": done")
