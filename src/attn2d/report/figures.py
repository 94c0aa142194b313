"""Tables -> the paper's figures (seaborn; PNG and PDF), each labelled with where its numbers come from.

Kinds (an experiment's `experiment.figures` names them):
  speedup        bars of Ring Attention's step time / Attention2D's, one panel per model x P, x = sequence length,
                 bars Attention2D-NO and -O, a dashed line at 1x (paper: "Speedup over Ring Attn").
  time_per_step  step time (s) vs sequence length, Ring Attention and Attention2D-NO at each P (paper: "Training
                 time per step (Sec)").
  comm_bytes     attention bytes sent per device per training step (max over ranks) vs P, one line per
                 algorithm and sequence length.

A figure draws one or more *sources* side by side: "measured: <devices and nodes from the records>" (a table of
attn2d.report.collect) and "modelled: cost model <profile>" (rows of the cost model's projection table, columns
hardware, model, gpus, seq_len, algorithm, step_time_s, speedup_vs_ring). The source is written on every panel
and in the title. Failed cells are marked on the panels ("failed"), never silently left out.

    python -m attn2d.report.figures speedup --out results/figures/local_speedup/speedup \
        --measured results/tables/local_speedup.csv [--modelled projection.csv --hardware a100_4gpn]
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use(os.environ["MPLBACKEND"])
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

ALGORITHMS = {"ring": "Ring Attention", "attn2d": "Attention2D-NO", "attn2d_overlap": "Attention2D-O"}
MODELS = {"gpt3_760m": "GPT-3 760M", "gpt3_1p3b": "GPT-3 1.3B", "gpt3_2p7b": "GPT-3 2.7B", "gpt3_6p7b": "GPT-3 6.7B",
          "gpt3_13b": "GPT-3 13B", "tiny": "tiny GPT"}
PALETTE = {"Ring Attention": "#7f7f7f", "Attention2D-NO": "#1f77b4", "Attention2D-O": "#ff7f0e"}
FAILED_COLOR = "#d62728"


@dataclass
class Source:
    """Numbers of one provenance: `kind` is "measured", "modelled" or "reported"; `label` says exactly what."""

    kind: str
    label: str
    df: pd.DataFrame  # columns: model, gpus, seq_len, attention, status, reason, step_time_s, speedup_vs_ring, ...


def seq_label(n: int) -> str:
    """8192 -> "8K", 131072 -> "128K", 288 -> "288"."""
    n = int(n)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


WHERE = ("job_launcher", "partition", "device_name")  # what must be the same for cells to be compared


def mixed_origins(table: pd.DataFrame) -> dict[str, list[str]]:
    """The ok cells of a table by where they ran ("launcher slurm_cpu, partition cpu, device X" -> cells), when
    they ran in more than one place; {} otherwise (records without a `job` header count by device only)."""
    ok = table[table.status == "ok"]
    cols = [c for c in WHERE if c in ok.columns]
    if ok.empty or not cols:
        return {}
    groups: dict[str, list[str]] = {}
    for _, r in ok.iterrows():
        key = ", ".join(f"{c.replace('job_', '')} {r[c]}" for c in cols if pd.notna(r[c]))
        groups.setdefault(key or "unknown", []).append(str(r.get("cell")))
    return groups if len(groups) > 1 else {}


def measured(table: pd.DataFrame) -> Source:
    """A collect table as a source, labelled with the hardware its ok runs report. Cells that ran in different
    places (launcher, partition, device) are drawn, and the label says so, naming how many ran where (the cells
    are printed)."""
    import sys

    from attn2d.report.collect import hardware_summary

    label = f"measured: {hardware_summary(table)}"
    mixed = mixed_origins(table)
    if mixed:
        label += "\nMIXED ORIGINS, not comparable: " + "; ".join(f"{k} ({len(v)} cells)" for k, v in mixed.items())
        for k, v in mixed.items():
            print(f"figures: cells from {k}: {', '.join(v)}", file=sys.stderr)
    return Source("measured", label, table.copy())


def modelled(projection: pd.DataFrame, hardware: str, like: pd.DataFrame | None = None) -> Source:
    """Rows of the cost model's projection for `hardware`, restricted to the cells of `like` (model, gpus,
    seq_len, attention) where given."""
    df = projection.rename(columns={"algorithm": "attention"})
    df = df[df.hardware == hardware].copy()
    df["status"], df["reason"] = "ok", None
    if like is not None and len(df):
        keys = ["model", "gpus", "seq_len", "attention"]
        want = set(map(tuple, like[keys].astype(str).itertuples(index=False)))
        df = df[[tuple(r) in want for r in df[keys].astype(str).itertuples(index=False)]]
    return Source("modelled", f"modelled: cost model {hardware}", df.reset_index(drop=True))


def _prepare(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["Algorithm"] = df.attention.map(lambda a: ALGORITHMS.get(a, a))
    df["Model"] = df.model.map(lambda m: MODELS.get(m, m))
    df["seq"] = df.seq_len.map(seq_label)
    for c in ("step_time_s", "speedup_vs_ring"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def _model_order(models) -> list[str]:
    """Models smallest first, as the paper's panels (known names in MODELS' order, others after, by name)."""
    known = list(MODELS)
    return sorted(set(models), key=lambda m: (known.index(m) if m in known else len(known), m))


def _frame(frames: list[tuple[Source, pd.DataFrame]], src: Source) -> pd.DataFrame:
    return next(f for s, f in frames if s is src)


def _p_label(gpus: int, source: Source) -> str:
    unit = "GPUs" if source.kind != "measured" or "cpu" not in source.label.lower() else "ranks"
    return f"P = {int(gpus)} {unit}"


def save_figure(fig: plt.Figure, out: str | Path) -> list[Path]:
    """Write fig as out.png and out.pdf (parents made) and close it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".png"), out.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _suptitle(fig: plt.Figure, title: str, sources: Sequence[Source]) -> None:
    fig.suptitle(title + "\n" + "\n".join(s.label for s in sources), fontsize=10, y=1.0, va="bottom")


def _mark_failed(ax, x: float, y: float, text: str = "failed") -> None:
    ax.text(x, y, text, color=FAILED_COLOR, rotation=90, ha="center", va="bottom", fontsize=7)


REPORTED_COLOR = "#2ca02c"


def speedup_figure(sources: Sequence[Source], out: str | Path, title: str = "Speedup over Ring Attention",
                   reported: Sequence[dict] = ()) -> list[Path]:
    """Paper figure "Speedup over Ring Attn": panels model (rows) x [source, P] (columns); bars per sequence length
    for Attention2D-NO / -O; a dashed line at 1x; cells without a speedup (a failed run) marked "failed".
    `reported`: what the paper states, {gpus, speedup_max, what}: a dotted line at speedup_max on every panel of
    that P (the paper's maximum over its cells; its per-cell values are not known), named in the legend."""
    frames = [(s, _prepare(s.df)) for s in sources]
    models = _model_order(m for _, d in frames for m in d.model)
    cols = [(s, g) for s, d in frames for g in sorted(d.gpus.unique())]
    if not models or not cols:
        raise ValueError(f"speedup figure {out}: no rows in any source ({', '.join(s.label for s in sources)})")
    fig, axes = plt.subplots(len(models), len(cols), figsize=(3.6 * len(cols), 2.8 * len(models)), squeeze=False,
                             sharey="row")
    for i, model in enumerate(models):
        for j, (src, gpus) in enumerate(cols):
            ax = axes[i][j]
            d = _frame(frames, src)
            d = d[(d.model == model) & (d.gpus == gpus) & (d.attention != "ring")]
            seqs = sorted(d.seq_len.unique())
            order = [seq_label(n) for n in seqs]
            hue_order = [a for a in ("Attention2D-NO", "Attention2D-O") if a in set(d.Algorithm)]
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
                _mark_failed(ax, x, 0.05, "failed" if r.status != "ok" else "ring failed")
            ax.set_xlim(-0.5, max(len(order), 1) - 0.5)
            ax.set_title(f"{MODELS.get(model, model)}, {_p_label(gpus, src)}\n{src.kind}", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("speedup over Ring Attention" if j == 0 else "")
            if ax.get_legend() is not None:
                ax.get_legend().remove()
    handles = [plt.Rectangle((0, 0), 1, 1, color=PALETTE[a]) for a in ("Attention2D-NO", "Attention2D-O")]
    handles.append(plt.Line2D([], [], ls="--", color="black"))
    labels = ["Attention2D-NO", "Attention2D-O", "1x (Ring)"]
    for rep in reported:
        handles.append(plt.Line2D([], [], ls=":", color=REPORTED_COLOR, lw=1.5))
        labels.append(f"reported: {rep['what']} (the maximum over its cells)")
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", ncol=3 if not reported else 2, bbox_to_anchor=(0.5, 0.0),
               frameon=False)
    _suptitle(fig, title, sources)
    return save_figure(fig, out)


def time_per_step_figure(sources: Sequence[Source], out: str | Path,
                         title: str = "Training time per step (s) vs sequence length") -> list[Path]:
    """Paper figure "Training time per step (Sec)": one panel per source x model; x = sequence length (log2),
    y = median step time (log); a line per algorithm (colour) and P (marker); failed cells listed on the panel."""
    frames = [(s, _prepare(s.df)) for s in sources]
    panels = [(s, m) for s, d in frames for m in _model_order(d.model)]
    if not panels:
        raise ValueError(f"time-per-step figure {out}: no rows in any source")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    for ax, (src, model) in zip(axes[0], panels):
        d = _frame(frames, src)
        d = d[d.model == model].copy()
        d["P"] = d.gpus.map(lambda g: _p_label(g, src))
        ok = d.dropna(subset=["step_time_s"])
        if len(ok):
            sns.lineplot(data=ok, x="seq_len", y="step_time_s", hue="Algorithm", style="P", markers=True, dashes=True,
                         palette=PALETTE, ax=ax, errorbar=None,
                         hue_order=[a for a in ALGORITHMS.values() if a in set(ok.Algorithm)])
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
        ax.set_title(f"{MODELS.get(model, model)}\n{src.kind}", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("time per training step (s)")
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    _suptitle(fig, title, sources)
    return save_figure(fig, out)


ANALYTIC_P = (4, 9, 16, 36, 64)  # square grids the analytic lines are drawn at (where the sequence splits evenly)


def analytic_comm(table: pd.DataFrame, ps: Sequence[int] = ANALYTIC_P) -> pd.DataFrame:
    """Attention bytes one device sends per training step, from the algorithms' own analytic op lists (the
    comm_ops each implementation is tested against, via attn2d.costmodel), for every (model, seq_len, attention,
    dtype, batch_size) of `table` at every P in `ps` (square grids) over which the sequence splits evenly:
    layers x (forward + backward, + the forward again under activation checkpointing)."""
    from attn2d.distributed.grid import GridError
    from attn2d import costmodel as cm

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
    meas = pd.concat([_prepare(s.df) for s in measured_src], ignore_index=True)
    meas["bytes"] = pd.to_numeric(meas.attn_comm_bytes_sent, errors="coerce")
    lines = _prepare(analytic_comm(meas)) if analytic else pd.DataFrame(columns=meas.columns)
    if analytic:
        lines["bytes"] = lines.attn_comm_bytes_sent.astype(float)
    unit, scale = _byte_unit(pd.concat([meas.bytes.dropna(), lines.get("bytes", pd.Series(dtype=float))]))
    models, seqs = _model_order(meas.model), sorted(meas.seq_len.unique())
    size = (max(5.5, 3.4 * len(seqs)), 3.0 * len(models))
    fig, axes = plt.subplots(len(models), len(seqs), figsize=size, squeeze=False, sharex=True)
    order = [a for a in ALGORITHMS.values() if a in set(meas.Algorithm)]
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
            ax.set_title(f"{MODELS.get(model, model)}, N = {seq_label(n)}", fontsize=9)
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


def speedup_band_figure(projection: pd.DataFrame, out: str | Path, reported: Sequence[dict] = (),
                        title: str = "Speedup over Ring Attention, over the unknowns consistent with the stated "
                                     "maxima (modelled)") -> list[Path]:
    """Modelled: panels model (rows) x (hardware, P) (columns); per sequence length and Attention2D variant a bar
    at the most plausible point (speedup_plausible) with a whisker over the band (speedup_band_min .. _max) of
    the cost model's projection table; `reported` = [{hardware, gpus, speedup_max, what}]: a dotted line."""
    d = projection[~projection.algorithm.str.startswith("ring")].dropna(subset=["speedup_band_min"]).copy()
    if d.empty:
        raise ValueError(f"band figure {out}: the projection has no band columns (run with --inverse)")
    models = _model_order(d.model)
    cols = sorted({(h, int(g)) for h, g in zip(d.hardware, d.gpus)})
    fig, axes = plt.subplots(len(models), len(cols), figsize=(3.8 * len(cols), 2.8 * len(models)), squeeze=False,
                             sharey=True)
    algs = [a for a in ("attn2d", "attn2d_overlap") if a in set(d.algorithm)]
    w = 0.8 / max(1, len(algs))
    for i, model in enumerate(models):
        for j, (hw, gpus) in enumerate(cols):
            ax = axes[i][j]
            c = d[(d.model == model) & (d.hardware == hw) & (d.gpus == gpus)]
            seqs = sorted(c.seq_len.unique())
            for k, alg in enumerate(algs):
                a = c[c.algorithm == alg].set_index("seq_len").reindex(seqs)
                x = [n - 0.4 + w * (k + 0.5) for n in range(len(seqs))]
                y = a.speedup_plausible.to_numpy(dtype=float)
                ax.bar(x, y, width=w, color=PALETTE[ALGORITHMS[alg]], alpha=0.85)
                ax.vlines(x, a.speedup_band_min, a.speedup_band_max, color="black", lw=1)
                ax.scatter(x, a.speedup_band_min, marker="_", color="black", s=30)
                ax.scatter(x, a.speedup_band_max, marker="_", color="black", s=30)
            for rep in reported:
                if rep["hardware"] == hw and int(rep["gpus"]) == gpus:
                    ax.axhline(float(rep["speedup_max"]), ls=":", color=REPORTED_COLOR, lw=1.5)
            ax.axhline(1.0, ls="--", color="black", lw=1)
            ax.set_xticks(range(len(seqs)), [seq_label(n) for n in seqs])
            ax.set_title(f"{MODELS.get(model, model)}, P={gpus} ({hw})\nmodelled", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("speedup over the Ring baseline" if j == 0 else "")
    handles = [plt.Rectangle((0, 0), 1, 1, color=PALETTE[ALGORITHMS[a]]) for a in algs]
    labels = [f"{ALGORITHMS[a]}: most plausible point (modelled)" for a in algs]
    handles.append(plt.Line2D([], [], color="black"))
    labels.append("band: min-max over the region reproducing the stated maxima (modelled)")
    for rep in reported:
        handles.append(plt.Line2D([], [], ls=":", color=REPORTED_COLOR, lw=1.5))
        labels.append(f"reported: {rep['what']}")
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.suptitle(title, fontsize=10, y=1.0, va="bottom")
    return save_figure(fig, out)


def breakdown_figure(projection: pd.DataFrame, out: str | Path,
                     title: str = "Where the step time goes (modelled, cost model)") -> list[Path]:
    """Modelled: one stacked bar per projected cell (the term_* columns of the projection: attention compute,
    exposed attention communication per operation, rest of the model, exposed grad sync, optimizer, overheads),
    cells labelled algorithm / P / sequence length."""
    terms = [c for c in projection.columns if c.startswith("term_") and projection[c].fillna(0).abs().sum() > 0]
    if projection.empty or not terms:
        raise ValueError(f"breakdown figure {out}: no projected cells with term_* columns")
    d = projection.sort_values(["seq_len", "gpus", "algorithm"]).reset_index(drop=True)
    labels = [f"{ALGORITHMS.get(r.algorithm, r.algorithm)}\nP={r.gpus}, {seq_label(r.seq_len)}" for r in d.itertuples()]
    fig, ax = plt.subplots(figsize=(1.3 * len(d) + 3, 4.5))
    colors = sns.color_palette("tab20", len(terms))
    bottom = pd.Series(0.0, index=d.index)
    for t, col in zip(terms, colors):
        v = d[t].fillna(0.0)
        ax.bar(range(len(d)), v, bottom=bottom, color=col, label=t.removeprefix("term_").removesuffix("_s"))
        bottom += v
    ax.set_xticks(range(len(d)), labels, fontsize=7)
    ax.set_ylim(0, float(bottom.max()) * 1.05)
    ax.set_ylabel("seconds per training step (modelled)")
    models = ", ".join(MODELS.get(m, m) for m in d.model.unique())
    ax.set_title(f"{title}\n{models}, {', '.join(d.hardware.unique())}: modelled", fontsize=9)
    ax.legend(fontsize=6, bbox_to_anchor=(1.01, 1.0), loc="upper left", frameon=False)
    fig.tight_layout()
    return save_figure(fig, out)


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
