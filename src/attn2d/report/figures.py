"""Tables -> the paper's figures (seaborn; PNG and PDF), each labelled with where its numbers come from.

Kinds (an experiment's `experiment.figures` names them):
  speedup        bars of Ring Attention's step time / Attention2D's, one panel per model x P, x = sequence length,
                 bars Attention2D-NO and -O, a dashed line at 1x (paper: "Speedup over Ring Attn").
  time_per_step  step time (s) vs sequence length, Ring Attention and Attention2D-NO at each P (paper: "Training
                 time per step (Sec)").
  comm_bytes     attention bytes sent per device per training step (max over ranks) vs P, one line per
                 algorithm and sequence length.

A figure draws one or more *sources* side by side (attn2d.report.plotting): "measured: <devices and nodes from the
records>" (a table of attn2d.report.collect) and "modelled: cost model <profile>" (rows of the cost model's
projection table, columns hardware, model, gpus, seq_len, algorithm, step_time_s, speedup_vs_ring). The source is
written on every panel and in the title. Failed cells are marked on the panels ("failed"), never silently left out.
The cost model's own figures (band, breakdown) are in attn2d.report.figures_modelled.

    python -m attn2d.report.figures speedup --out results/figures/local_speedup/speedup \
        --measured results/tables/local_speedup.csv [--modelled projection.csv --hardware a100_4gpn]
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker
import pandas as pd
import seaborn as sns

from attn2d import costmodel as cm
from attn2d.distributed.grid import GridError
from attn2d.report.collect import BASELINE
from attn2d.report.plotting import (
    FAILED_COLOR,
    PALETTE,
    REPORTED_COLOR,
    Source,
    algorithm_label,
    drawn,
    frame,
    is_ring,
    mark_failed,
    measured,
    model_label,
    model_order,
    modelled,
    p_label,
    prepare,
    save_figure,
    seq_label,
    suptitle,
)


def speedup_figure(sources: Sequence[Source], out: str | Path, title: str = "Speedup over Ring Attention",
                   reported: Sequence[dict] = ()) -> list[Path]:
    """Paper figure "Speedup over Ring Attn": panels model (rows) x [source, P] (columns); bars per sequence length
    for Attention2D-NO / -O; a dashed line at 1x; cells without a speedup (a failed run) marked "failed".
    `reported`: what the paper states, {gpus, speedup_max, what}: a dotted line at speedup_max on every panel of
    that P (the paper's maximum over its cells; its per-cell values are not known), named in the legend."""
    frames = [(s, prepare(s.df)) for s in sources]
    models = model_order(m for _, d in frames for m in d.model)
    cols = [(s, g) for s, d in frames for g in sorted(d.gpus.unique())]
    if not models or not cols:
        raise ValueError(f"speedup figure {out}: no rows in any source ({', '.join(s.label for s in sources)})")
    fig, axes = plt.subplots(len(models), len(cols), figsize=(3.6 * len(cols), 2.8 * len(models)), squeeze=False,
                             sharey="row")
    for i, model in enumerate(models):
        for j, (src, gpus) in enumerate(cols):
            ax = axes[i][j]
            d = frame(frames, src)
            d = d[(d.model == model) & (d.gpus == gpus) & ~d.attention.map(is_ring)]
            seqs = sorted(d.seq_len.unique())
            order = [seq_label(n) for n in seqs]
            hue_order = drawn(d.Algorithm)
            ok = d.dropna(subset=["speedup_vs_ring"])
            if len(ok):
                sns.barplot(data=ok, x="seq", y="speedup_vs_ring", hue="Algorithm", order=order, hue_order=hue_order,
                            palette=PALETTE, ax=ax, errorbar=None)
            ax.axhline(1.0, ls="--", color="black", lw=1)
            for rep in reported:
                if int(rep["gpus"]) == int(gpus):
                    ax.axhline(float(rep["speedup_max"]), ls=":", color=REPORTED_COLOR, lw=1.5)
            for _, r in d[d.speedup_vs_ring.isna()].iterrows():  # failed: the cell or its ring baseline
                k = hue_order.index(r.Algorithm) if r.Algorithm in hue_order else 0
                x = order.index(r.seq) - 0.4 + 0.8 * (k + 0.5) / max(1, len(hue_order))
                mark_failed(ax, x, 0.05, "failed" if r.status != "ok" else "ring failed")
            ax.set_xlim(-0.5, max(len(order), 1) - 0.5)
            ax.set_title(f"{model_label(model)}, {p_label(gpus, src)}\n{src.kind}", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("speedup over Ring Attention" if j == 0 else "")
            if ax.get_legend() is not None:
                ax.get_legend().remove()
    bars = [a for a in PALETTE if a != algorithm_label(BASELINE)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=PALETTE[a]) for a in bars]
    handles.append(plt.Line2D([], [], ls="--", color="black"))
    labels = [*bars, "1x (Ring)"]
    for rep in reported:
        handles.append(plt.Line2D([], [], ls=":", color=REPORTED_COLOR, lw=1.5))
        labels.append(f"reported: {rep['what']} (the maximum over its cells)")
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", ncol=3 if not reported else 2, bbox_to_anchor=(0.5, 0.0),
               frameon=False)
    suptitle(fig, title, sources)
    return save_figure(fig, out)


def time_per_step_figure(sources: Sequence[Source], out: str | Path,
                         title: str = "Training time per step (s) vs sequence length") -> list[Path]:
    """Paper figure "Training time per step (Sec)": one panel per source x model; x = sequence length (log2),
    y = median step time (log); a line per algorithm (colour) and P (marker); failed cells listed on the panel."""
    frames = [(s, prepare(s.df)) for s in sources]
    panels = [(s, m) for s, d in frames for m in model_order(d.model)]
    if not panels:
        raise ValueError(f"time-per-step figure {out}: no rows in any source")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    for ax, (src, model) in zip(axes[0], panels):
        d = frame(frames, src)
        d = d[d.model == model].copy()
        d["P"] = [p_label(g, src) for g in d.gpus]
        ok = d.dropna(subset=["step_time_s"])
        if len(ok):
            sns.lineplot(data=ok, x="seq_len", y="step_time_s", hue="Algorithm", style="P", markers=True, dashes=True,
                         palette=PALETTE, ax=ax, errorbar=None,
                         hue_order=drawn(ok.Algorithm))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        seqs = sorted(d.seq_len.unique())
        ax.set_xticks(seqs, [seq_label(n) for n in seqs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        failed = d[d.step_time_s.isna()]
        if len(failed):
            lines = [f"failed: {r.Algorithm}, {r.P}, {r.seq}" for _, r in failed.iterrows()]
            ax.text(0.02, 0.98, "\n".join(lines[:8] + ([f"... {len(lines) - 8} more"] if len(lines) > 8 else [])),
                    transform=ax.transAxes, va="top", fontsize=7, color=FAILED_COLOR)
        ax.set_title(f"{model_label(model)}\n{src.kind}", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("time per training step (s)")
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    suptitle(fig, title, sources)
    return save_figure(fig, out)


ANALYTIC_P = (4, 9, 16, 36, 64)  # square grids the analytic lines are drawn at (where the sequence splits evenly)


def analytic_comm(table: pd.DataFrame, ps: Sequence[int] = ANALYTIC_P) -> pd.DataFrame:
    """Attention bytes one device sends per training step, from the algorithms' own analytic op lists (the
    comm_ops each implementation is tested against, via attn2d.costmodel), for every (model, seq_len, attention,
    dtype, batch_size) of `table` at every P in `ps` (square grids) over which the sequence splits evenly:
    layers x (forward + backward, + the forward again under activation checkpointing)."""
    keys = ["model", "seq_len", "attention", "dtype", "batch_size", "activation_checkpointing", "causal"]
    t = table.copy()
    for k, default in (("activation_checkpointing", False), ("causal", True)):
        if k not in t:
            t[k] = default
        t[k] = t[k].fillna(default).astype(bool)
    rows = []
    for (model, n, alg, dtype, batch, ckpt, causal), _ in t.groupby(keys, dropna=True):
        shape = cm.load_model(model)
        wl = cm.Workload(seq_len=int(n), batch_size=int(batch), dtype=str(dtype), causal=bool(causal),
                         activation_checkpointing=bool(ckpt))
        for p in ps:
            r = math.isqrt(p)
            try:
                ops = cm.comm_ops_for(alg, shape, wl, r, r)
            except GridError:  # N is not a multiple of P (or 2P for the zigzag layout): no such run exists
                continue
            per_layer = cm.comm_volume_per_rank(ops) + (cm.comm_volume_per_rank(ops, "fwd") if ckpt else 0)
            rows.append({"model": model, "seq_len": int(n), "attention": alg, "gpus": p,
                         "attn_comm_bytes_sent": shape.n_layer * per_layer})
    return pd.DataFrame(rows)


def _byte_unit(values: pd.Series) -> tuple[str, float]:
    top = float(values.max()) if len(values) else 1.0
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if top >= scale:
            return unit, scale
    return "B", 1.0


def comm_bytes_figure(sources: Sequence[Source], out: str | Path,
                      title: str = "Attention communication per device vs P", analytic: bool = True) -> list[Path]:
    """Bytes the attention sends per device per training step (max over ranks) vs P: measured markers (one source
    at a time), and lines from the algorithms' analytic volumes over square grids up to P = 64 (labelled as such).
    Panels: model (rows) x sequence length (columns); colour: algorithm (Attention2D-O moves the same bytes as -NO,
    drawn thinner on top)."""
    measured_src = [s for s in sources if "attn_comm_bytes_sent" in s.df]
    if not measured_src:
        raise ValueError(f"communication figure {out}: no source has attn_comm_bytes_sent "
                         f"({', '.join(s.label for s in sources)})")
    meas = pd.concat([prepare(s.df) for s in measured_src], ignore_index=True)
    meas["bytes"] = pd.to_numeric(meas.attn_comm_bytes_sent, errors="coerce")
    lines = prepare(analytic_comm(meas)) if analytic else pd.DataFrame(columns=meas.columns)
    if analytic:
        lines["bytes"] = lines.attn_comm_bytes_sent.astype(float)
    unit, scale = _byte_unit(pd.concat([meas.bytes.dropna(), lines.get("bytes", pd.Series(dtype=float))]))
    models, seqs = model_order(meas.model), sorted(meas.seq_len.unique())
    size = (max(5.5, 3.4 * len(seqs)), 3.0 * len(models))
    fig, axes = plt.subplots(len(models), len(seqs), figsize=size, squeeze=False, sharex=True)
    order = drawn(meas.Algorithm)
    widths = {"Ring Attention": 2.0, "Attention2D-NO": 4.0, "Attention2D-O": 1.5}
    for i, model in enumerate(models):
        for j, n in enumerate(seqs):
            ax = axes[i][j]
            for alg in order:
                ln = lines[(lines.model == model) & (lines.seq_len == n) & (lines.Algorithm == alg)] if analytic else []
                if len(ln):
                    ax.plot(ln.gpus, ln.bytes / scale, color=PALETTE[alg], lw=widths[alg], alpha=0.7, zorder=1)
                m = meas[(meas.model == model) & (meas.seq_len == n) & (meas.Algorithm == alg)]
                ok = m.dropna(subset=["bytes"])
                ax.scatter(ok.gpus, ok.bytes / scale, color=PALETTE[alg], edgecolor="black", s=40, zorder=3)
                for _, r in m[m.bytes.isna()].iterrows():
                    ax.annotate("failed", (r.gpus, 0), xycoords=("data", "axes fraction"), color=FAILED_COLOR,
                                fontsize=7, rotation=90, va="bottom", ha="center")
            ax.set_xscale("log")
            ps = sorted(set(meas.gpus) | (set(ANALYTIC_P) if analytic else set()))
            ax.set_xticks(ps, [str(int(p)) for p in ps])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_title(f"{model_label(model)}, N = {seq_label(n)}", fontsize=9)
            ax.set_xlabel("P (processes)" if i == len(models) - 1 else "")
            ax.set_ylabel(f"attention {unit} sent per device per step" if j == 0 else "")
            ax.set_ylim(bottom=0)
    handles = [plt.Line2D([], [], color=PALETTE[a], lw=widths[a]) for a in order]
    labels = list(order)
    handles += [plt.Line2D([], [], ls="", marker="o", markerfacecolor="white", markeredgecolor="black"),
                plt.Line2D([], [], color="black")]
    labels += [measured_src[0].label if len(measured_src) == 1 else "measured", "analytic (attention comm_ops)"]
    fig.legend(handles, labels, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.08), frameon=False, fontsize=8)
    fig.tight_layout()
    names = [s.label for s in measured_src] + (["modelled: analytic per-rank volumes of the algorithms' comm_ops"]
                                               if analytic else [])
    fig.suptitle(title + "\n" + "\n".join(names), fontsize=10, y=1.0, va="bottom")
    return save_figure(fig, out)


KINDS: dict[str, Callable[..., list[Path]]] = {
    "speedup": speedup_figure,
    "time_per_step": time_per_step_figure,
    "comm_bytes": comm_bytes_figure,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("--out", required=True, help="path without suffix; .png and .pdf are written")
    ap.add_argument("--measured", type=Path, help="a table of attn2d.report.collect")
    ap.add_argument("--modelled", type=Path, help="the cost model's projection table")
    ap.add_argument("--hardware", help="cost-model profile whose projection rows are drawn (with --modelled)")
    ap.add_argument("--cells", type=Path, help="with --modelled and no --measured: a CSV whose model, gpus, "
                                               "seq_len, attention columns name the cells to draw")
    ap.add_argument("--title", default=None)
    ap.add_argument("--reported", default=None,
                    help="speedup figures: JSON list of what the paper states, [{gpus, speedup_max, what}, ...]")
    a = ap.parse_args(argv)
    sources: list[Source] = []
    like = None
    if a.measured:
        table = pd.read_csv(a.measured)
        sources.append(measured(table))
        like = table
    elif a.cells:
        like = pd.read_csv(a.cells)
    if a.modelled:
        if not a.hardware:
            ap.error("--modelled needs --hardware (the cost-model profile to draw)")
        src = modelled(pd.read_csv(a.modelled), a.hardware, like)
        if len(src.df):
            sources.append(src)
        else:
            print(f"figures: {a.modelled} has no rows for hardware {a.hardware} and these cells; drawn without it")
    if not sources:
        ap.error("nothing to draw: give --measured, or --modelled with rows for --hardware")
    kwargs = {"title": a.title} if a.title else {}
    if a.reported and a.kind == "speedup":
        kwargs["reported"] = json.loads(a.reported)
    for p in KINDS[a.kind](sources, a.out, **kwargs):
        print(p)


if __name__ == "__main__":
    main()
