"""An emulated cluster on one Linux machine: K nodes (network namespaces) of M ranks each, joined by a switch
(a bridge in its own namespace) over links shaped to a given rate (the network itself: attn2d.distributed.netns).

This module runs one `attn2d.train` cell on such a cluster sized for its grid and writes the emulation into the
record's header (run_cell: what the `emulated` Hydra launcher and benchmarks/bench_emulated.py call), and is the CLI:

    python -m attn2d.distributed.emulate {check,up,clean,run} ...  (see --help)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from attn2d import records
from attn2d.distributed.grid import parse_grid
from attn2d.distributed.netns import NIC_MODES, Cluster, EmulationUnavailable, clean_stale, unavailable_reason
from attn2d.distributed.placement import Placement, rank_nodes


def node_count(rows: int, cols: int, ranks_per_node: int, placement: Placement = "row") -> int:
    return max(rank_nodes(rows, cols, ranks_per_node, placement)) + 1


def annotate_record(run_dir: str | os.PathLike, emulation: dict) -> dict:
    """Add `emulation` (with the per-NIC wire bytes per timed step, mean of the steps' `wire_bytes`) to the header
    of run_dir/metrics.jsonl, atomically. Returns the block written."""
    path = Path(run_dir) / records.METRICS
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    steps = [ln for ln in lines if ln.get("kind") == "step"]
    per_nic: dict[str, dict[str, float]] = {}
    for s in steps:
        for nic, d in (s.get("wire_bytes") or {}).items():
            acc = per_nic.setdefault(nic, {"tx": 0.0, "rx": 0.0})
            for k in ("tx", "rx"):
                acc[k] += d[k] / len(steps)
    block = {**emulation, "wire_bytes_per_step": per_nic,
             "busiest_nic_bytes_per_step": max((max(d.values()) for d in per_nic.values()), default=0.0)}
    for ln in lines:
        if ln.get("kind") == "header":
            ln["emulation"] = block
    records._atomic_write_text(path, "".join(json.dumps(records._json_safe(ln)) + "\n" for ln in lines))
    return block


def run_cell(overrides: Sequence[str], run_dir: str | os.PathLike, rows: int, cols: int, ranks_per_node: int = 1,
             nic: str = "shared", rate: str = "100mbit", placement: Placement = "row", timeout_s: float = 600,
             python: str = sys.executable) -> dict:
    """One `attn2d.train` run (Hydra overrides) on an emulated cluster sized for the grid; the record's header
    gets the emulation block. Returns {"status", "codes", "run_dir", "emulation"}."""
    K = node_count(rows, cols, ranks_per_node, placement)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    pl = placement if isinstance(placement, str) else list(placement)
    argv = [python, "-m", "attn2d.train", *overrides, f"grid.rows={rows}", f"grid.cols={cols}",
            f"grid.placement={json.dumps(pl) if not isinstance(pl, str) else pl}",
            f"run_dir='{run_dir}'", f"hydra.run.dir='{run_dir}'"]  # quoted: cell dirs hold = and ,
    with Cluster(K, ranks_per_node, nic, rate) as c:
        load = os.getloadavg()[0]
        codes = c.run_ranks(argv, rows, cols, placement, timeout_s=timeout_s, log_dir=run_dir / "ranks")
        emulation = {**c.describe(), "placement": pl, "load_avg_1min_before": load}  # a shared host: say how busy
    status = "ok" if all(x == 0 for x in codes) else "failed"
    if (run_dir / records.METRICS).exists():
        emulation = annotate_record(run_dir, emulation)
    return {"status": status, "codes": codes, "run_dir": str(run_dir), "emulation": emulation}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attn2d.distributed.emulate", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="say whether namespaces can be made here (exit 0) or what is missing (exit 2)")
    cl = sub.add_parser("clean", help="remove namespaces left by killed runs (--all: every a2d- namespace)")
    cl.add_argument("--all", action="store_true")
    helps = {"up": "build a cluster and hold it until Ctrl-C / SIGTERM",
             "run": "run attn2d.train on an emulated cluster: run ROWSxCOLS [overrides]"}
    for name, help_ in helps.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--ranks-per-node", type=int, default=1)
        p.add_argument("--nic", choices=NIC_MODES, default="shared")
        p.add_argument("--rate", default="100mbit")
        if name == "up":
            p.add_argument("--nodes", type=int, required=True)
        else:
            p.add_argument("--placement", default="row")
            p.add_argument("--run-dir", required=True)
            p.add_argument("--timeout-s", type=float, default=600)
            p.add_argument("grid", help="ROWSxCOLS, e.g. 3x3")
            p.add_argument("overrides", nargs="*", help="Hydra overrides for attn2d.train")
    a, extra = ap.parse_known_args(argv)  # `run`: Hydra overrides may follow the options
    if extra and (a.cmd != "run" or any(x.startswith("-") for x in extra)):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if a.cmd == "check":
        reason = unavailable_reason()
        print(f"emulation unavailable: {reason}" if reason else "emulation available")
        return 2 if reason else 0
    if a.cmd == "clean":
        print("\n".join(clean_stale(all_=a.all)) or "nothing to clean")
        return 0
    try:
        if a.cmd == "up":
            with Cluster(a.nodes, a.ranks_per_node, a.nic, a.rate) as c:
                print(json.dumps({**c.describe(), "namespaces": c.created}), flush=True)
                signal.pause()
            return 0
        rows, cols = parse_grid(a.grid)
        placement = json.loads(a.placement) if a.placement.startswith("[") else a.placement
        res = run_cell([*a.overrides, *extra], a.run_dir, rows, cols, a.ranks_per_node, a.nic, a.rate, placement,
                       a.timeout_s)
        print(json.dumps(res))
        return 0 if res["status"] == "ok" else 1
    except EmulationUnavailable as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
