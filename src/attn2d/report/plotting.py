"""What every figure shares: the sources it draws (measured / modelled, each labelled with where its numbers come
from), the names and colours of algorithms and models, and how a figure is titled, marked and saved.

Algorithm names on figures are the registry's labels (attn2d.attention: "Ring Attention", "Attention2D-NO",
"Attention2D-O"); the paper's three have the paper's colours (PALETTE) and are the ones drawn, in that order.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402  (after MPLBACKEND: the backend is chosen on import)

matplotlib.use(os.environ["MPLBACKEND"])
import matplotlib.pyplot as plt  # noqa: E402  (after matplotlib.use)
import pandas as pd  # noqa: E402

from attn2d.attention import ATTENTION  # noqa: E402  (the registry, its built-in algorithms registered)
from attn2d.report.collect import hardware_summary  # noqa: E402

MODELS = {"gpt3_760m": "GPT-3 760M", "gpt3_1p3b": "GPT-3 1.3B", "gpt3_2p7b": "GPT-3 2.7B", "gpt3_6p7b": "GPT-3 6.7B",
          "gpt3_13b": "GPT-3 13B", "tiny": "tiny GPT"}
PALETTE = {"Ring Attention": "#7f7f7f", "Attention2D-NO": "#1f77b4", "Attention2D-O": "#ff7f0e"}  # by label
FAILED_COLOR = "#d62728"
REPORTED_COLOR = "#2ca02c"
WHERE = ("job_launcher", "partition", "device_name")  # what must be the same for cells to be compared


def algorithm_label(name: str) -> str:
    """The label tables and figures print for an attention algorithm (the registry's; an unknown name as it is)."""
    return ATTENTION[name].label if name in ATTENTION else name


def is_ring(name: str) -> bool:
    """Whether `name` is a Ring Attention variant (the speedup baselines; a 1-D ring of ranks)."""
    return name in ATTENTION and ATTENTION[name].ranks == "ring"


def drawn(labels) -> list[str]:
    """The algorithm labels among `labels` that figures draw, in the paper's order (PALETTE's)."""
    present = set(labels)
    return [a for a in PALETTE if a in present]


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


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """A source's rows with the columns figures draw by: Algorithm, Model (labels), seq (8K), numeric times."""
    df = df.copy()
    df["Algorithm"] = df.attention.map(algorithm_label)
    df["Model"] = df.model.map(model_label)
    df["seq"] = df.seq_len.map(seq_label)
    for c in ("step_time_s", "speedup_vs_ring"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def model_label(model: str) -> str:
    return MODELS.get(model, model)


def model_order(models) -> list[str]:
    """Models smallest first, as the paper's panels (known names in MODELS' order, others after, by name)."""
    known = list(MODELS)
    return sorted(set(models), key=lambda m: (known.index(m) if m in known else len(known), m))


def frame(frames: list[tuple[Source, pd.DataFrame]], src: Source) -> pd.DataFrame:
    return next(f for s, f in frames if s is src)


def p_label(gpus: int, source: Source) -> str:
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


def suptitle(fig: plt.Figure, title: str, sources: Sequence[Source]) -> None:
    fig.suptitle(title + "\n" + "\n".join(s.label for s in sources), fontsize=10, y=1.0, va="bottom")


def mark_failed(ax, x: float, y: float, text: str = "failed") -> None:
    ax.text(x, y, text, color=FAILED_COLOR, rotation=90, ha="center", va="bottom", fontsize=7)
