"""Tables and figure of the emulated-cluster runs (records with an `emulation` header block).

    python -m attn2d.report.emulated --runs runs/emulated_speedup --out results/tables/emulated_speedup \
        --figure results/figures/emulated_speedup/speedup

Writes <out>.csv|md (per cell: measured step time, speedup over Ring in the same layout and rate, busiest NIC's
wire bytes and Ring's / this algorithm's wire-byte ratio) and <out>_validation.csv|md (the cost model on each
cell: predicted vs measured step time, bytes predicted vs counted, wire bytes predicted vs the NIC counters).
Every output says "measured on an emulated network (tbf, R per node, no latency emulation)".
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from attn2d import records
from attn2d.attention import get_attention
from attn2d.distributed.emulate_model import validate_record
from attn2d.report.collect import BASELINE
from attn2d.report.figures import save_figure

LABEL = "measured on an emulated network (tbf, R per node, no latency emulation)"
KEY = ["P", "grid", "nodes", "ranks_per_node", "nic", "rate", "placement", "seq_len"]
TARGETS = {"time": 0.15, "wire": 0.10}  # median |step-time error|, max |wire-byte error|


def load(runs: str | Path) -> tuple[list, list[str]]:
    """Complete ok records with an emulation block under `runs`; and one line per skipped/failed cell."""
    recs, notes = [], []
    for p in records.find_records(runs):
        try:
            rec = records.read_record(p)
        except records.RecordError as e:
            notes.append(f"unreadable: {e}")
            continue
        if not rec.ok or "emulation" not in rec.header:
            notes.append(f"{p.parent.name}: {rec.status}")
            continue
        recs.append(rec)
    return recs, notes


def tables(recs) -> tuple[pd.DataFrame, pd.DataFrame]:
    val = pd.DataFrame([validate_record(r) for r in recs])
    if val.empty:
        return val, val
    sp = val[KEY + ["algorithm", "measured_s", "wire_busiest_node_tx"]].copy()
    ring = sp[sp.algorithm == BASELINE].set_index(KEY)
    sp["speedup_vs_ring"] = [ring.measured_s.get(tuple(r[k] for k in KEY), float("nan")) / r.measured_s
                             for _, r in sp.iterrows()]
    sp["ring_wire_ratio"] = [ring.wire_busiest_node_tx.get(tuple(r[k] for k in KEY), float("nan"))
                             / r.wire_busiest_node_tx for _, r in sp.iterrows()]
    sp["algorithm"] = sp.algorithm.map(lambda a: get_attention(a).label)
    return sp.sort_values(KEY + ["algorithm"]).reset_index(drop=True), val


def summary(val: pd.DataFrame) -> dict:
    if val.empty:
        return {}
    return {"cells": len(val), "median_abs_time_error": float(val.rel_error.abs().median()),
            "max_abs_time_error": float(val.rel_error.abs().max()),
            "bytes_equal": bool((val.counted_bytes == val.predicted_bytes).all()),
            "max_abs_wire_error": float(val.wire_rel_error.abs().max())}


def write(runs, out: str | Path, figure: str | Path | None = None, note: str | None = None) -> dict:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recs, notes = load(runs) if note is None else ([], [])
    sp, val = tables(recs) if recs else (pd.DataFrame(), pd.DataFrame())
    s = summary(val)
    head = f"# Emulated cluster: speedup over {get_attention(BASELINE).label}\n\n{LABEL}.\n\n"
    if note:
        head += f"Skipped: {note}\n"
    sp.to_csv(out.with_suffix(".csv"), index=False)
    md = head + (sp.to_markdown(index=False, floatfmt=".3g") if not sp.empty else "(no emulated cells)") + "\n"
    if notes:
        md += "\nNot used:\n" + "".join(f"- {n}\n" for n in notes)
    out.with_suffix(".md").write_text(md)
    vout = out.with_name(out.name + "_validation")
    val.to_csv(vout.with_suffix(".csv"), index=False)
    vmd = f"# Cost model on the emulated cells\n\n{LABEL}; profile built from the configured rates " \
          f"(attn2d.distributed.emulate_model), nothing fitted to these timings.\n\n"
    if s:
        vmd += (f"Median |step-time error| {s['median_abs_time_error']:.1%} (target <= {TARGETS['time']:.0%}), "
                f"max {s['max_abs_time_error']:.1%}; bytes predicted == counted: {s['bytes_equal']}; max |wire-byte "
                f"error| {s['max_abs_wire_error']:.1%} (target <= {TARGETS['wire']:.0%}), {s['cells']} cells.\n\n")
        cols = ["algorithm", "grid", "nodes", "ranks_per_node", "nic", "rate", "measured_s", "predicted_s",
                "rel_error", "counted_bytes", "predicted_bytes", "wire_total_tx", "pred_total_tx", "wire_rel_error"]
        vmd += val[cols].to_markdown(index=False, floatfmt=".3g") + "\n"
    elif note:
        vmd += f"Skipped: {note}\n"
    vout.with_suffix(".md").write_text(vmd)
    if figure:
        speedup_figure(sp, figure, note)
    return s


def speedup_figure(sp: pd.DataFrame, out: str | Path, note: str | None = None) -> None:
    baseline = get_attention(BASELINE).label
    fig, ax = plt.subplots(figsize=(8, 3.8))
    if sp.empty:
        ax.text(0.5, 0.5, f"no emulated cells\n{note or ''}", ha="center", va="center", wrap=True)
        ax.axis("off")
    else:
        d = sp[sp.algorithm != baseline].copy()
        d["layout"] = [f"P={r.P}\n{r.nodes}x{r.ranks_per_node}" + (f" {r.nic}" if r.ranks_per_node > 1 else "")
                       + f"\n{r.rate}" for _, r in d.iterrows()]
        layouts = list(dict.fromkeys(d.sort_values(["P", "ranks_per_node", "nic", "rate"]).layout))
        algs = sorted(set(d.algorithm))
        w = 0.8 / max(1, len(algs))
        for i, a in enumerate(algs):
            sub = d[d.algorithm == a].set_index("layout")
            xs = [j + (i - (len(algs) - 1) / 2) * w for j in range(len(layouts))]
            ax.bar(xs, [sub.speedup_vs_ring.get(lay, float("nan")) for lay in layouts], w, label=a)
            ax.scatter(xs, [sub.ring_wire_ratio.get(lay, float("nan")) for lay in layouts], marker="_", s=200,
                       color="k", zorder=3, label="Ring / its busiest-NIC bytes" if i == 0 else None)
        ax.axhline(1.0, ls="--", color="gray", lw=1)
        ax.set_xticks(range(len(layouts)), layouts, fontsize=7)
        ax.set_ylabel(f"speedup over {baseline}")
        ax.legend(fontsize=7)
    fig.suptitle(f"Speedup over {baseline}, {LABEL}", fontsize=9)
    save_figure(fig, out)  # closes fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", required=True, help="table path without extension")
    ap.add_argument("--figure", default=None, help="figure path without extension (png and pdf)")
    ap.add_argument("--skipped", default=None, help="write the outputs saying this reason instead of reading runs")
    a = ap.parse_args(argv)
    print(write(a.runs, a.out, a.figure, a.skipped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
