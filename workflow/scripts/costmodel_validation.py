"""Validate the cost model on the local CPU sweep: predicted vs measured step time per cell, table and figure.

    python workflow/scripts/costmodel_validation.py --runs runs --experiments local_speedup local_time_per_step \
        --hardware local_cpu --table results/tables/costmodel_validation.csv \
        --figure results/figures/costmodel_validation

Every complete record (runs/<experiment>/<cell>/metrics.jsonl, read with attn2d.records.read_record) of the named
experiments with status ok is predicted with attn2d.costmodel.step_time from its own header (model config, grid,
attention, seq_len, batch, dtype, FSDP, checkpointing) on the given profile; measured = median step time of its
timed steps. Writes the table (CSV + Markdown with the error summary) and a predicted-vs-measured figure (PNG and
PDF). The summary states the median and max absolute relative error, and the comparison of the predicted
communication bytes (the algorithms' comm_ops + gradient sync) with the bytes the run counted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import pandas as pd

from attn2d.attention import get_attention
from attn2d.costmodel import Workload, comm_ops_for, grad_sync_ops, load_hardware, step_time
from attn2d.model import GPTConfig
from attn2d.records import RecordError, find_records, read_record

TARGET = 0.20  # the target: median absolute relative error under 20%


def predict_record(rec, hw) -> dict:
    """One table row: the record's cell, measured and predicted step time, bytes counted and predicted."""
    c, cfg = rec.cell, rec.header.get("config") or {}
    b = cfg.get("benchmark") or {}
    mcfg = dict(cfg.get("model") or {})
    shape = GPTConfig.from_mapping(mcfg, name=str(c.get("model")))
    if shape.positions == "learned" and not shape.max_seq_len:
        shape = GPTConfig.from_mapping(mcfg, name=shape.name, max_seq_len=int(c["seq_len"]))
    dtype = str(c.get("dtype") or b.get("dtype") or "float32")
    wl = Workload(seq_len=int(c["seq_len"]), batch_size=int(c["batch_size"]), dtype=dtype,
                  causal=bool((cfg.get("attention") or {}).get("causal", True)), fsdp=bool(b.get("fsdp", False)),
                  activation_checkpointing=bool(b.get("activation_checkpointing", False)),
                  grad_bytes=8 if dtype == "float64" else 4)
    alg, rows, cols = str(c["attention"]), int(c["rows"]), int(c["cols"])
    st = step_time(alg, shape, wl, rows, cols, hw)
    times = [s["step_time_s"] for s in rec.steps]
    measured = statistics.median(times)
    r, k = get_attention(alg).cost_grid(rows, cols)
    ops = comm_ops_for(alg, shape, wl, r, k)
    per = {ph: sum(o.bytes_sent for o in ops if o.phase == ph) for ph in ("fwd", "bwd")}
    attn_pred = shape.n_layer * (per["fwd"] * (2 if wl.activation_checkpointing else 1) + per["bwd"])
    grad_pred = sum(o.bytes_sent for o in grad_sync_ops(shape, wl, rows * cols))
    counted = statistics.median([s.get("comm_bytes_sent") or 0 for s in rec.steps])
    attn_counted = [s.get("attn_comm_bytes_sent") for s in rec.steps if s.get("attn_comm_bytes_sent") is not None]
    return {
        "experiment": c.get("experiment"), "cell": rec.path.parent.name, "model": c.get("model"), "algorithm": alg,
        "grid": f"{rows}x{cols}", "gpus": rows * cols, "seq_len": int(c["seq_len"]), "batch_size": wl.batch_size,
        "dtype": dtype, "steps": len(times), "measured_s": measured, "measured_min_s": min(times),
        "measured_max_s": max(times), "predicted_s": st.step_time_s,
        "rel_error": (st.step_time_s - measured) / measured,
        "pred_attn_compute_s": st.attn_fwd_compute_s + st.attn_bwd_compute_s,
        "pred_attn_comm_s": st.attn_fwd_comm_s + st.attn_bwd_comm_s,
        "pred_rest_s": st.rest_compute_s + st.optimizer_s + st.overhead_s, "pred_grad_sync_s": st.grad_sync_exposed_s,
        "attn_bytes_predicted": attn_pred,
        "attn_bytes_counted": statistics.median(attn_counted) if attn_counted else None,
        "bytes_predicted": attn_pred + grad_pred, "bytes_counted": counted,
        "record": str(rec.path),
    }


def collect(runs: Path, experiments, hw) -> tuple[pd.DataFrame, list[str]]:
    rows, skipped, seen = [], [], set()
    for exp in experiments:
        for path in find_records(runs / exp):
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            try:
                rec = read_record(path)
            except RecordError as e:
                skipped.append(f"{path}: {e}")
                continue
            if not rec.ok:
                skipped.append(f"{path}: status {rec.status} ({rec.end.get('reason')})")
                continue
            rows.append(predict_record(rec, hw))
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["experiment", "gpus", "seq_len", "algorithm"]).reset_index(drop=True)
    return df, skipped


def summary(df: pd.DataFrame, hw_name: str) -> dict:
    err = df.rel_error.abs()
    return {"cells": len(df), "median_abs_rel_error": float(err.median()), "mean_abs_rel_error": float(err.mean()),
            "max_abs_rel_error": float(err.max()), "within_20pct": int((err < TARGET).sum()),
            "median_signed_rel_error": float(df.rel_error.median()), "hardware": hw_name}


def to_markdown(df: pd.DataFrame, s: dict, skipped: list[str], hw_src: str) -> str:
    ok = "meets" if s["median_abs_rel_error"] < TARGET else "does NOT meet"
    lines = [
        "# Cost model validation on the local CPU sweep (predicted vs measured)",
        "",
        f"Profile `{s['hardware']}` ({hw_src}). {s['cells']} cells. Median absolute relative error "
        f"**{s['median_abs_rel_error']:.1%}** ({ok} the 20% target); mean {s['mean_abs_rel_error']:.1%}, max "
        f"{s['max_abs_rel_error']:.1%}; {s['within_20pct']}/{s['cells']} cells within 20%; median signed error "
        f"{s['median_signed_rel_error']:+.1%} (positive = the model predicts slower than measured).",
        "",
        "| experiment | algorithm | grid | seq_len | measured s (min-max) | predicted s | error "
        "| attn bytes predicted / counted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in df.iterrows():
        ab = (f"{r.attn_bytes_predicted:.0f} / {r.attn_bytes_counted:.0f}" if pd.notna(r.attn_bytes_counted)
              else f"{r.attn_bytes_predicted:.0f} / -")
        lines.append(f"| {r.experiment} | {r.algorithm} | {r.grid} | {r.seq_len} | {r.measured_s:.4f} "
                     f"({r.measured_min_s:.4f}-{r.measured_max_s:.4f}) | {r.predicted_s:.4f} | "
                     f"{r.rel_error:+.1%} | {ab} |")
    if skipped:
        lines += ["", f"Records not used ({len(skipped)}):", ""] + [f"- {x}" for x in skipped]
    return "\n".join(lines) + "\n"


def figure(df: pd.DataFrame, s: dict, out: Path) -> list[Path]:
    from attn2d.report.figures import save_figure  # first: it selects the Agg backend (MPLBACKEND)

    # isort: split
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    markers = {"ring": "o", "ring_contiguous": "v", "attn2d": "s", "attn2d_overlap": "^", "local": "D"}
    for (alg, P), d in df.groupby(["algorithm", "gpus"]):
        ax.scatter(d.measured_s, d.predicted_s, marker=markers.get(alg, "x"), label=f"{alg}, P = {P}", s=28)
    lo = min(df.measured_s.min(), df.predicted_s.min()) * 0.7
    hi = max(df.measured_s.max(), df.predicted_s.max()) * 1.4
    xs = [lo, hi]
    ax.plot(xs, xs, "k-", lw=1, label="predicted = measured")
    ax.fill_between(xs, [x * (1 - TARGET) for x in xs], [x * (1 + TARGET) for x in xs], color="grey", alpha=0.2,
                    label="±20%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured step time (s), median of timed steps")
    ax.set_ylabel("modelled step time (s)")
    ax.set_title(f"Cost model ({s['hardware']}) vs measured local CPU sweep\nmodelled vs measured: median |error| "
                 f"{s['median_abs_rel_error']:.1%}, max {s['max_abs_rel_error']:.1%}, {s['cells']} cells", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--experiments", nargs="+", default=["local_speedup", "local_time_per_step"])
    ap.add_argument("--hardware", default="local_cpu")
    ap.add_argument("--table", default="results/tables/costmodel_validation.csv")
    ap.add_argument("--figure", default="results/figures/costmodel_validation")
    a = ap.parse_args(argv)
    hw = load_hardware(a.hardware)
    df, skipped = collect(Path(a.runs), a.experiments, hw)
    if df.empty:
        print(f"no complete ok record under {a.runs}/{{{','.join(a.experiments)}}}; run the local sweep first "
              f"(snakemake --profile cluster_profiles/local)", file=sys.stderr)
        for x in skipped:
            print(f"  not used: {x}", file=sys.stderr)
        return 1
    s = summary(df, hw.name)
    table = Path(a.table)
    table.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(table, index=False)
    table.with_suffix(".md").write_text(to_markdown(df, s, skipped, hw.source))
    for p in figure(df, s, Path(a.figure)):
        print(f"wrote {p}")
    print(f"wrote {table} and {table.with_suffix('.md')}: {s['cells']} cells, median |error| "
          f"{s['median_abs_rel_error']:.1%}, max {s['max_abs_rel_error']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
