"""What the workflow says at its end: the failed cells (cell, job id, state, reason) read from their records, and,
for a dry run, the cell jobs counted by job shape. Used by the Snakefile's onsuccess/onerror handlers."""
from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from attn2d.records import RecordError, read_record

SHAPE_KEYS = ("launcher", "nodes", "tasks_per_node", "gpus_per_node", "partition")  # a job shape, as the dry run
_STATE = re.compile(r"state: ([A-Z_]+(?: by \d+)?)")  # submitit's "... (state: CANCELLED by 0)"


@dataclass(frozen=True)
class Failed:
    cell: str  # run dir
    job_id: str
    state: str
    reason: str


def _job(header: Mapping) -> Mapping:
    job = header.get("job")
    return job if isinstance(job, Mapping) else {}


def _sacct_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Slurm's state of each job id (sacct), {} where sacct is absent or does not answer."""
    ids = sorted({j for j in job_ids if j and j != "-"})
    if not ids or shutil.which("sacct") is None:
        return {}
    try:
        p = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(ids)],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in p.stdout.splitlines():
        jid, _, state = line.partition("|")
        out[jid.strip()] = state.strip()
    return out


def failed_cells(run_dirs: Iterable[str | Path], ask_scheduler: bool = True) -> list[Failed]:
    """The cells among `run_dirs` whose record says failed (cells without a record are not listed; a record that
    cannot be read is listed with the reader's error)."""
    out = []
    for d in run_dirs:
        path = Path(d) / "metrics.jsonl"
        if not path.exists():
            continue
        try:
            rec = read_record(path)
        except RecordError as e:
            out.append(Failed(str(d), "-", "UNREADABLE", str(e)))
            continue
        if rec.ok:
            continue
        job = _job(rec.header)
        reason = str(rec.end.get("reason") or "no reason recorded")
        m = _STATE.search(reason)
        state = str(job.get("state") or (m.group(1) if m else "FAILED"))
        out.append(Failed(str(d), str(job.get("job_id") or "-"), state, reason))
    if ask_scheduler:
        states = _sacct_states(f.job_id for f in out)
        out = [Failed(f.cell, f.job_id, states.get(f.job_id) or f.state, f.reason) for f in out]
    return out


def failed_table(failed: list[Failed], width: int = 160) -> str:
    """A plain-text table of failed cells; the reason's first line, cut to fit (the record has all of it)."""
    rows = [("cell", "job id", "state", "reason")]
    for f in failed:
        first = f.reason.strip().splitlines()[0] if f.reason.strip() else ""
        rows.append((f.cell, f.job_id, f.state, first[:width]))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}" for r in rows)


def shape_summary(shapes: Iterable[Mapping]) -> str:
    """Cell jobs counted by shape: "launcher=slurm_a100, nodes=4, tasks_per_node=4, gpus_per_node=4,
    partition=a100: 45 jobs" per line, most frequent first."""
    counts = Counter(tuple((k, s.get(k)) for k in SHAPE_KEYS) for s in shapes)
    lines = [", ".join(f"{k}={v}" for k, v in shape) + f": {n} job{'s' if n != 1 else ''}"
             for shape, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]
    total = sum(counts.values())
    return f"cell jobs by shape ({total} in all):\n" + "\n".join("  " + ln for ln in lines)


# ------------------------------------------------------------------------------------------ before the run
# the launcher settings whose change means the job would run elsewhere or otherwise (its name, folder: not)
LAUNCHER_KEYS = ("partition", "account", "qos", "constraint", "reservation", "nodes", "tasks_per_node",
                 "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")


def launcher_changes(header: Mapping, params: Mapping) -> list[str]:
    """How the plan's resolved launcher settings differ from those the record's job ran with (header
    job.launcher_params; nothing where the record has none): ["partition cpu -> a100", ...]."""
    before = _job(header).get("launcher_params")
    if not isinstance(before, Mapping):
        return []
    return [f"{k} {before.get(k)} -> {params.get(k)}" for k in LAUNCHER_KEYS
            if k in before and k in params and str(before.get(k)) != str(params.get(k))]


def set_aside(record: Path, folder: str = "corrupt") -> Path:
    """Move a record out of the way (never deleted): <run dir>/<folder>/metrics-<k>.jsonl, k = 1, 2, ..."""
    dest = record.parent / folder
    dest.mkdir(exist_ok=True)
    k = len(list(dest.glob("metrics-*.jsonl"))) + 1
    target = dest / f"metrics-{k}.jsonl"
    record.replace(target)
    return target
