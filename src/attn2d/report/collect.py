"""Run records -> one table per experiment: results/tables/<experiment>.csv and .md.

One row per cell (a record): the cell (model, attention, grid, P, nodes, sequence length, ...), its status and
reason, the median step time over the timed steps (and min/max), tokens/s, TFLOP/s per GPU, MFU, peak memory, the
communication per step (max over ranks; `attn_*` counts the attention's own traffic only), where it ran, and the
speedup over Ring Attention of the same (model, seq_len, P, batch, dtype): ring's median step time / this one's.

Failed cells stay in the table (status "failed", the reason, no times); a speedup needs both runs ok. Every record is
read with attn2d.records.read_record, which rejects a malformed or unfinished record with an error naming the file.

    python -m attn2d.report.collect --experiment local_speedup --csv results/tables/local_speedup.csv \
        --md results/tables/local_speedup.md runs/local_speedup/*/metrics.jsonl
"""
from __future__ import annotations

import argparse
import math
import statistics
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from attn2d.records import Record, RecordError, read_record

BASELINE = "ring"  # the algorithm every speedup is measured against
CELL_KEYS = ["model", "seq_len", "gpus", "batch_size", "dtype"]  # a speedup compares rows equal in these

COLUMNS = [
    "experiment", "model", "attention", "grid", "rows", "cols", "gpus", "nodes", "gpus_per_node", "seq_len",
    "batch_size", "dtype", "device", "status", "reason", "steps", "step_time_s", "step_time_min_s", "step_time_max_s",
    "speedup_vs_ring", "tokens_per_s", "tflops_per_gpu", "mfu", "max_mem_gib", "comm_bytes_sent",
    "comm_bytes_received", "comm_messages", "attn_comm_bytes_sent", "attn_comm_messages", "activation_checkpointing",
    "causal", "hardware", "device_name", "launcher", "job_launcher", "partition", "job_id",
    "git_rev", "started_at", "finished_at", "cell", "record",
]


def _median(steps: list[dict], key: str) -> float | None:
    vals = [s[key] for s in steps if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def hardware_of(rec: Record) -> str:
    """Where a run ran, from its header: "16 x NVIDIA A100-SXM4-80GB on 4 nodes" (one name per device kind)."""
    devices = rec.header.get("devices") or []
    hosts = rec.header.get("hosts") or []
    if not devices:
        return "unknown (no measurement)"
    kinds = ", ".join(f"{n} x {d}" for d, n in Counter(devices).items())
    n_hosts = len(set(hosts))
    return f"{kinds} on {n_hosts} node{'s' if n_hosts != 1 else ''}" if n_hosts else kinds


def hardware_summary(df: pd.DataFrame) -> str:
    """Where the ok runs of a table ran: device names and node counts, e.g. "NVIDIA A100-SXM4-80GB; 4 and 16 nodes"."""
    ok = df[df.status == "ok"]
    if ok.empty:
        return "no successful run"
    devices = sorted(set(ok.device_name.dropna()))
    nodes = sorted({int(n) for n in ok.nodes.dropna()})
    where = " and ".join(map(str, nodes)) + (" nodes" if nodes != [1] else " node")
    return f"{', '.join(devices)}; {where}"


def _config(rec: Record, *path: str):
    """A key of the run's composed config (None where the record has no config, e.g. a run that never started)."""
    node = rec.header.get("config") or {}
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
    return node


def _ranks(cell: dict) -> int | None:
    rows, cols = cell.get("rows"), cell.get("cols")
    return rows * cols if isinstance(rows, int) and isinstance(cols, int) else None


def _job_columns(rec: Record) -> dict:
    """Where the cell's job ran, from the header's `job` (absent in older records): launcher option, partition,
    job id."""
    job = rec.header.get("job")
    job = job if isinstance(job, dict) else {}
    return {"job_launcher": job.get("launcher"), "partition": job.get("partition"), "job_id": job.get("job_id")}


def row(rec: Record, experiment: str) -> dict:
    """One table row of a record (see the module docstring)."""
    c, steps = rec.cell, rec.steps
    times = [s["step_time_s"] for s in steps]
    ok = rec.ok
    r = {
        "experiment": experiment,
        "model": c.get("model"),
        "attention": c.get("attention"),
        "grid": f"{c.get('rows')}x{c.get('cols')}",
        "rows": c.get("rows"),
        "cols": c.get("cols"),
        "gpus": c.get("world_size") or _ranks(c),  # a run that failed before it started may not know its world
        "nodes": c.get("nodes"),
        "gpus_per_node": c.get("gpus_per_node"),
        "seq_len": c.get("seq_len"),
        "batch_size": c.get("batch_size"),
        "dtype": c.get("dtype"),
        "device": c.get("device"),
        "status": rec.status,
        "reason": rec.end.get("reason"),
        "steps": len(steps),
        "step_time_s": statistics.median(times) if ok else None,
        "step_time_min_s": min(times) if ok else None,
        "step_time_max_s": max(times) if ok else None,
        "speedup_vs_ring": None,
        "activation_checkpointing": _config(rec, "benchmark", "activation_checkpointing"),
        "causal": _config(rec, "attention", "causal"),
        "hardware": hardware_of(rec),
        "device_name": Counter(rec.header.get("devices") or ["unknown"]).most_common(1)[0][0],
        "launcher": rec.header.get("launcher"),
        **_job_columns(rec),
        "git_rev": rec.header.get("git_rev"),
        "started_at": rec.header.get("started_at"),
        "finished_at": rec.end.get("finished_at"),
        "cell": rec.path.parent.name,
        "record": str(rec.path),
    }
    for key in ("tokens_per_s", "tflops_per_gpu", "mfu", "comm_bytes_sent", "comm_bytes_received", "comm_messages",
                "attn_comm_bytes_sent", "attn_comm_messages"):
        r[key] = _median(steps, key) if ok else None
    mem = [s["max_mem_gib"] for s in steps if s.get("max_mem_gib") is not None]
    r["max_mem_gib"] = max(mem) if ok and mem else None
    return r


def add_speedup(df: pd.DataFrame) -> pd.DataFrame:
    """speedup_vs_ring = ring's step time / the row's, for rows equal in CELL_KEYS; NaN where either failed."""
    df = df.copy()
    ring = df[(df.attention == BASELINE) & (df.status == "ok")]
    dup = ring.duplicated(CELL_KEYS, keep=False)
    if dup.any():
        cells = ring.loc[dup, ["cell", "record"]].to_string(index=False)
        raise ValueError(f"{dup.sum()} ring runs share model, seq_len, gpus, batch_size and dtype, so the speedup "
                         f"baseline is ambiguous; one ring run per such cell is needed:\n{cells}")
    base = ring.set_index(CELL_KEYS)["step_time_s"]
    keys = pd.MultiIndex.from_frame(df[CELL_KEYS])
    ring_time = pd.Series(base.reindex(keys).to_numpy(), index=df.index, dtype="float64")
    df["speedup_vs_ring"] = ring_time / pd.to_numeric(df["step_time_s"], errors="coerce")
    return df


def collect(paths: Iterable[str | Path], experiment: str) -> pd.DataFrame:
    """Read every record (a malformed one raises RecordError naming its file) -> the experiment's table."""
    rows = [row(read_record(p), experiment) for p in paths]
    if not rows:
        raise RecordError(f"experiment {experiment}: no records given")
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = add_speedup(df)
    return df.sort_values(["model", "gpus", "seq_len", "attention"], kind="stable").reset_index(drop=True)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1e4:
        return f"{int(v):,}"
    if isinstance(v, int) and abs(v) >= 1e4:
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


MD_COLUMNS = ["model", "gpus", "grid", "nodes", "seq_len", "attention", "status", "step_time_s", "speedup_vs_ring",
              "tflops_per_gpu", "max_mem_gib", "attn_comm_bytes_sent", "attn_comm_messages", "reason"]


def to_markdown(df: pd.DataFrame, title: str) -> str:
    """A readable table (the CSV has every column): a title, where it was measured, failures counted."""
    failed = int((df.status != "ok").sum())
    lines = [f"# {title}", "",
             f"Measured on: {hardware_summary(df)}.",
             f"{len(df)} cells, {len(df) - failed} ok, {failed} failed. Step time: median over the timed steps (s); "
             f"speedup: Ring Attention's step time / the row's (same model, sequence length and P); communication: "
             f"bytes and messages per step of the attention, max over ranks.", ""]
    lines.append("| " + " | ".join(MD_COLUMNS) + " |")
    lines.append("|" + "---|" * len(MD_COLUMNS))
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in MD_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_tables(df: pd.DataFrame, csv: str | Path, md: str | Path, title: str) -> None:
    Path(csv).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(csv, index=False)
    Path(md).write_text(to_markdown(df, title))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--title", default=None, help="heading of the .md table (default: the experiment)")
    ap.add_argument("--csv", required=True, type=Path)
    ap.add_argument("--md", required=True, type=Path)
    ap.add_argument("records", nargs="+", type=Path)
    a = ap.parse_args(argv)
    try:
        df = collect(a.records, a.experiment)
    except RecordError as e:  # names the file; no traceback needed
        raise SystemExit(f"collect: rejected a record: {e}\nRun snakemake again: it moves a corrupt record to "
                         "<run dir>/corrupt/ (kept) and runs its cell again.") from None
    write_tables(df, a.csv, a.md, a.title or a.experiment)
    print(f"{a.csv}: {len(df)} cells, {int((df.status != 'ok').sum())} failed")


if __name__ == "__main__":
    main()
