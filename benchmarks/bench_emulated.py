"""Ring vs Attention2D-NO vs -O at P = 9 and 16 on an emulated cluster (attn2d.distributed.emulate), training the
tiny GPT (`attn2d.train`, the same entry and record as every run) at a sequence length where communication
dominates. Measured on an emulated network (tbf, R per node, no latency emulation).

Layouts: P = 9 on 9 one-rank nodes; P = 16 on 16 one-rank nodes, and on 4 nodes x 4 ranks with one shared NIC per
node and with one NIC per rank (rails); every rank's NIC (or a node's shared NIC) at --rate.

Per cell: median step time, the busiest node's transmitted wire bytes per step (/sys/class/net counters), the
speedup over Ring in the same layout beside Ring's / its busiest-node wire bytes, and the cost model's prediction
(attn2d.distributed.emulate_model). Prints a table, states where O beats NO and where not, and appends one JSON
line per cell (with the host's load average) to --out.

  python benchmarks/bench_emulated.py --rate 50mbit --seq 2304 --out results/benchmarks/emulated.jsonl

Needs root or CAP_NET_ADMIN and iproute2 (exits 2 with the reason otherwise). Timings on a shared CPU are rough.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from attn2d import records
from attn2d.attention import get_attention
from attn2d.distributed.emulate import run_cell
from attn2d.distributed.emulate_model import validate_record
from attn2d.distributed.netns import unavailable_reason

LAYOUTS = {  # name: (rows, cols, ranks_per_node, nic)
    "P9_9x1": (3, 3, 1, "shared"),
    "P16_16x1": (4, 4, 1, "shared"),
    "P16_4x4_shared": (4, 4, 4, "shared"),
    "P16_4x4_rails": (4, 4, 4, "rails"),
}
ALGS = ("ring", "attn2d", "attn2d_overlap")  # the first is the baseline of the speedups


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", default="50mbit")
    ap.add_argument("--seq", type=int, default=2304)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--out", default="results/benchmarks/emulated.jsonl")
    ap.add_argument("--timeout-s", type=float, default=300)
    a = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"bench_emulated: network namespaces cannot be made here ({reason})", file=sys.stderr)
        return 2
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="a2d-bench-") as tmp:
        for lay in a.layouts.split(","):
            r, c, G, nic = LAYOUTS[lay]
            for alg in ALGS:
                load = os.getloadavg()
                t0 = time.monotonic()
                run_dir = Path(tmp) / f"{lay}_{alg}"
                res = run_cell(["model=tiny", f"attention={alg}", f"benchmark.seq_len={a.seq}",
                                "benchmark.warmup_steps=1", f"benchmark.steps={a.steps}", "benchmark.progress=false",
                                "experiment_name=bench_emulated"], run_dir, r, c, G, nic, a.rate,
                               timeout_s=a.timeout_s)
                row = {"layout": lay, "algorithm": alg, "status": res["status"], "rate": a.rate, "seq_len": a.seq,
                       "load_avg_1_5_15": load, "wall_s": time.monotonic() - t0,
                       "when": datetime.now(UTC).isoformat(timespec="seconds")}
                if res["status"] == "ok":
                    v = validate_record(records.read_record(run_dir))
                    row.update({k: v[k] for k in ("measured_s", "predicted_s", "rel_error", "counted_bytes",
                                                  "predicted_bytes", "wire_busiest_node_tx", "pred_busiest_node_tx",
                                                  "wire_total_tx", "pred_total_tx", "wire_rel_error", "nodes",
                                                  "ranks_per_node", "nic")})
                print(json.dumps(row), flush=True)
                rows_out.append(row)
    ok = {(x["layout"], x["algorithm"]): x for x in rows_out if x["status"] == "ok"}
    for x in rows_out:
        ring = ok.get((x["layout"], ALGS[0]))
        if ring and x["status"] == "ok":
            x["speedup_vs_ring"] = ring["measured_s"] / x["measured_s"]
            x["ring_wire_ratio"] = ring["wire_busiest_node_tx"] / x["wire_busiest_node_tx"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for x in rows_out:
            f.write(json.dumps(x) + "\n")
    print(f"\nmeasured on an emulated network (tbf, {a.rate} per NIC, no latency emulation), tiny GPT N={a.seq}, "
          f"median of {a.steps} steps; load average at start {rows_out[0]['load_avg_1_5_15'][0]:.1f}")
    hdr = (f"{'layout':16} {'alg':14} {'step s':>7} {'model s':>7} {'err':>6} {'busiest MB':>10} {'model MB':>8} "
           f"{'speedup':>7} {'wire ratio':>10}")
    print(hdr)
    for x in rows_out:
        label = get_attention(x["algorithm"]).label
        if x["status"] != "ok":
            print(f"{x['layout']:16} {label:14} failed")
            continue
        print(f"{x['layout']:16} {label:14} {x['measured_s']:7.3f} {x['predicted_s']:7.3f} "
              f"{x['rel_error']:+6.0%} {x['wire_busiest_node_tx'] / 1e6:10.2f} {x['pred_busiest_node_tx'] / 1e6:8.2f} "
              f"{x.get('speedup_vs_ring', float('nan')):7.2f} {x.get('ring_wire_ratio', float('nan')):10.2f}")
    for lay in dict.fromkeys(x["layout"] for x in rows_out):
        no, o = ok.get((lay, "attn2d")), ok.get((lay, "attn2d_overlap"))
        if no and o:
            verdict = "beats" if o["measured_s"] < no["measured_s"] else "does not beat"
            print(f"{lay}: O {verdict} NO ({o['measured_s']:.3f} s vs {no['measured_s']:.3f} s)")
    return 0 if all(x["status"] == "ok" for x in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
