"""The emulated-cluster cells of the local reproduction (workflow/rules/emulated.smk), then their tables and figure.

    python workflow/scripts/emulated_local.py --runs runs/emulated_speedup --out results/tables/emulated_speedup \
        --figure results/figures/emulated_speedup/speedup

Where network namespaces cannot be made (not root, no CAP_NET_ADMIN, no iproute2) it prints ONE line saying why
and writes the outputs saying "skipped: <why>". Otherwise it runs a small subset of
conf/experiment/emulated_speedup.yaml (P = 4, the tiny model at N = 1152, 3 timed steps: 12 cells, 4-6 minutes on 2
shared cores), through `python -m attn2d.train -m` with the `emulated` launcher, one call per node layout:
  4 nodes x 1 rank at 50 and 200 Mbit/s; 2 nodes x 2 ranks, one shared NIC or rails, at 50 Mbit/s.
The P = 9 and 16 cells (and 4-rank nodes) are benchmarks/bench_emulated.py's.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

from attn2d.distributed.netns import unavailable_reason
from attn2d.report import emulated

LOCAL_LAYOUTS = [  # (overrides of one multirun call): grid x attention x layout x rate
    ["emulation.ranks_per_node=1", "emulation.nic=shared", "emulation.rate=50mbit,200mbit"],
    ["emulation.ranks_per_node=2", "emulation.nic=shared,rails", "emulation.rate=50mbit"],
]
COMMON = ["experiment=emulated_speedup", "grid=2x2", "attention=ring,attn2d,attn2d_overlap", "benchmark.seq_len=1152",
          "benchmark.steps=3"]  # median of 3: one slow step from other jobs on a shared host does not decide it


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--figure", required=True)
    a = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"emulated_speedup skipped: network namespaces cannot be made here ({reason})")
        emulated.write(a.runs, a.out, a.figure, note=f"network namespaces cannot be made here ({reason})")
        return 0
    for layout in LOCAL_LAYOUTS:
        cmd = [sys.executable, "-m", "attn2d.train", "-m", *COMMON, *layout, f"hydra.sweep.dir={a.runs}"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd)  # a failed cell is listed in the table, not fatal here
    print(emulated.write(a.runs, a.out, a.figure))
    return 0


if __name__ == "__main__":
    sys.exit(main())
