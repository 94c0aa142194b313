"""The cost model's own figures, drawn from its projection table (every one labelled modelled):
  speedup_band_figure  the speedup over the unknowns consistent with the paper's stated maxima (a band per cell);
  breakdown_figure     where the step time goes, term by term (stacked bars).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from attn2d.report.plotting import (
    PALETTE,
    REPORTED_COLOR,
    algorithm_label,
    drawn,
    is_ring,
    model_label,
    model_order,
    save_figure,
    seq_label,
)


def speedup_band_figure(projection: pd.DataFrame, out: str | Path, reported: Sequence[dict] = (),
                        title: str = "Speedup over Ring Attention, over the unknowns consistent with the stated "
                                     "maxima (modelled)") -> list[Path]:
    """Modelled: panels model (rows) x (hardware, P) (columns); per sequence length and Attention2D variant a bar
    at the most plausible point (speedup_plausible) with a whisker over the band (speedup_band_min .. _max) of
    the cost model's projection table; `reported` = [{hardware, gpus, speedup_max, what}]: a dotted line."""
    d = projection[~projection.algorithm.map(is_ring)].dropna(subset=["speedup_band_min"]).copy()
    if d.empty:
        raise ValueError(f"band figure {out}: the projection has no band columns (run with --inverse)")
    models = model_order(d.model)
    cols = sorted({(h, int(g)) for h, g in zip(d.hardware, d.gpus)})
    fig, axes = plt.subplots(len(models), len(cols), figsize=(3.8 * len(cols), 2.8 * len(models)), squeeze=False,
                             sharey=True)
    names = {algorithm_label(a): a for a in set(d.algorithm)}
    algs = [names[a] for a in drawn(names)]
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
                ax.bar(x, y, width=w, color=PALETTE[algorithm_label(alg)], alpha=0.85)
                ax.vlines(x, a.speedup_band_min, a.speedup_band_max, color="black", lw=1)
                ax.scatter(x, a.speedup_band_min, marker="_", color="black", s=30)
                ax.scatter(x, a.speedup_band_max, marker="_", color="black", s=30)
            for rep in reported:
                if rep["hardware"] == hw and int(rep["gpus"]) == gpus:
                    ax.axhline(float(rep["speedup_max"]), ls=":", color=REPORTED_COLOR, lw=1.5)
            ax.axhline(1.0, ls="--", color="black", lw=1)
            ax.set_xticks(range(len(seqs)), [seq_label(n) for n in seqs])
            ax.set_title(f"{model_label(model)}, P={gpus} ({hw})\nmodelled", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("speedup over the Ring baseline" if j == 0 else "")
    handles = [plt.Rectangle((0, 0), 1, 1, color=PALETTE[algorithm_label(a)]) for a in algs]
    labels = [f"{algorithm_label(a)}: most plausible point (modelled)" for a in algs]
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
    labels = [f"{algorithm_label(r.algorithm)}\nP={r.gpus}, {seq_label(r.seq_len)}" for r in d.itertuples()]
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
    models = ", ".join(model_label(m) for m in d.model.unique())
    ax.set_title(f"{title}\n{models}, {', '.join(d.hardware.unique())}: modelled", fontsize=9)
    ax.legend(fontsize=6, bbox_to_anchor=(1.01, 1.0), loc="upper left", frameon=False)
    fig.tight_layout()
    return save_figure(fig, out)
