"""Cost-model projection of the paper's A100 and H100 experiments: a table and the paper-shaped figures, modelled.

    python workflow/scripts/costmodel_projection.py --out results/tables/projection_paper.csv \
        --figures results/figures/modelled [--experiments a100_speedup a100_time_per_step h100_speedup]

Cells: every cell of each experiment (attn2d.plan.plan expands conf/experiment/<name>.yaml exactly as the
workflow does), each priced with the experiment's own cost-model profile (its `hardware` choice) and its benchmark
settings (batch, dtype, FSDP, activation checkpointing). Columns: hardware, model, gpus, nodes, grid, seq_len,
algorithm, step_time_s, speedup_vs_ring, then the breakdown (attention fwd/bwd compute and communication, rest of
the model, optimizer, gradient sync), attn_comm_bytes_sent (per device per step) and source = "modelled".
Figures (attn2d.report.figures, every panel labelled "modelled: cost model <profile>"): speedup (A100, H100),
time per step (A100), attention bytes per device. --sensitivity: the speedup of attn2d over ring at 64 GPUs as
the unknown inter-node bandwidth and the kernel rate vary.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

from attn2d.attention import get_attention
from attn2d.costmodel import Link, Workload, comm_ops_for, load_hardware, load_model, read_profile, repo_root, step_time
from attn2d.costmodel import inverse as inv
from attn2d.costmodel.hardware import conf_path
from attn2d.dtypes import short_name
from attn2d.plan import experiment_config as compose
from attn2d.plan import plan
from attn2d.report.collect import BASELINE

PAPER_EXPERIMENTS = ("a100_speedup", "a100_time_per_step", "h100_speedup")
COLUMNS = ["hardware", "model", "gpus", "nodes", "grid", "seq_len", "algorithm", "step_time_s", "speedup_vs_ring"]


def experiment_cells(experiments, conf_dir: Path) -> list[dict]:
    """One dict per distinct cell: the cell's info plus its experiment's hardware profile and benchmark flags."""
    p = plan(list(experiments), conf_dir=conf_dir, launcher="slurm")
    seen, out = set(), []
    for exp, cells in p.experiments.items():
        base = compose(conf_dir, exp)
        b = base.benchmark
        hw = p.meta[exp].hardware
        for c in cells:
            i = c.info
            key = (hw, i["model"], i["world_size"], i["grid"], i["seq_len"], i["attention"])
            if key in seen:
                continue
            seen.add(key)
            out.append({**i, "hardware": hw, "experiment": exp, "fsdp": bool(b.fsdp),
                        "activation_checkpointing": bool(b.activation_checkpointing),
                        "causal": bool(base.attention.get("causal", True))})
    return out


def _workload(c: dict) -> Workload:
    dtype = short_name(c["dtype"])
    return Workload(seq_len=int(c["seq_len"]), batch_size=int(c["batch_size"]), dtype=dtype, causal=c["causal"],
                    fsdp=c["fsdp"], activation_checkpointing=c["activation_checkpointing"])


def baseline_times(shape, wl: Workload, P: int, hw) -> dict:
    """{baseline: step time} of every Ring variant the paper may have run (attn2d.costmodel.inverse.BASELINES)."""
    return {b: step_time(alg, shape, wl, P, 1, hw, overlap=ov).step_time_s for b, (alg, ov) in inv.BASELINES.items()}


def project(cells: list[dict]) -> pd.DataFrame:
    rows = []
    hws, models = {}, {}
    for c in cells:
        hw = hws.setdefault((c["hardware"], c["gpus_per_node"]),
                            load_hardware(c["hardware"], gpus_per_node=int(c["gpus_per_node"]) or None))
        m = models.setdefault(c["model"], load_model(c["model"]))
        wl = _workload(c)
        rows_, cols_ = int(c["rows"]), int(c["cols"])
        st = step_time(c["attention"], m, wl, rows_, cols_, hw)
        r, k = get_attention(c["attention"]).cost_grid(rows_, cols_)
        ops = comm_ops_for(c["attention"], m, wl, r, k)
        per_layer = {ph: sum(o.bytes_sent for o in ops if o.phase == ph) for ph in ("fwd", "bwd")}
        attn_bytes = m.n_layer * (per_layer["fwd"] * (2 if wl.activation_checkpointing else 1) + per_layer["bwd"])
        rows.append({
            "hardware": c["hardware"], "model": c["model"], "gpus": int(c["world_size"]), "nodes": int(c["nodes"]),
            "grid": c["grid"], "seq_len": int(c["seq_len"]), "algorithm": c["attention"],
            "step_time_s": st.step_time_s, "speedup_vs_ring": None, "experiment": c["experiment"],
            "batch_size": wl.batch_size, "dtype": c["dtype"], "fsdp": wl.fsdp,
            "activation_checkpointing": wl.activation_checkpointing,
            **{k2: v for k2, v in st.as_dict().items() if k2.endswith("_s") and k2 != "step_time_s"},
            "attn_comm_bytes_sent": attn_bytes, "source": "modelled",
            **{f"vs_{b}_s": t for b, t in baseline_times(m, wl, rows_ * cols_, hw).items()},
            **{(f"term_{k}" if k.endswith("_s") else f"term_{k.replace('.', '_')}_s"): v
               for k, v in st.breakdown().items()},
        })
    df = pd.DataFrame(rows)
    ring = df[df.algorithm == BASELINE].set_index(["hardware", "model", "gpus", "seq_len"])["step_time_s"]
    keys = pd.MultiIndex.from_frame(df[["hardware", "model", "gpus", "seq_len"]])
    df["speedup_vs_ring"] = ring.reindex(keys).to_numpy() / df.step_time_s.to_numpy()
    # against each Ring variant (the paper's baseline is NOT FOUND); vs_ring_s equals the ring cell's own time
    for b in ("ring_nooverlap", "ring_contiguous", "ring_contiguous_nooverlap"):
        df[f"speedup_vs_{b}"] = df[f"vs_{b}_s"] / df.step_time_s
    df = df.drop(columns=[c for c in df.columns if c.startswith("vs_")])
    # per-term columns: exposed communication of an op is 0 where the algorithm has no such op
    terms = [c for c in df.columns if c.startswith("term_")]
    df[terms] = df[terms].fillna(0.0)
    order = COLUMNS + [c for c in df.columns if c not in COLUMNS]
    return df[order].sort_values(["hardware", "model", "gpus", "seq_len", "algorithm"]).reset_index(drop=True)


def reported(experiments, conf_dir: Path) -> list[dict]:
    """What the paper states per experiment (its `experiment.reported`), with the experiment's hardware."""
    out = []
    for exp in experiments:
        base = compose(conf_dir, exp)
        hw = base.hardware.get("name") if "hardware" in base and base.hardware else None
        for rep in (base.experiment.get("reported") or []):
            if all(r["what"] != rep["what"] for r in out):
                out.append({**dict(rep), "hardware": hw})
    return out


def band(df: pd.DataFrame, inverse: pd.DataFrame) -> pd.DataFrame:
    """Add the speedup band over the region consistent with the paper's stated maxima (paper_inverse.csv, from
    workflow/scripts/costmodel_inverse.py): speedup_band_min / _max (over the region's samples, each against its
    own baseline variant) and speedup_plausible (the most plausible point), all modelled."""
    samples = inv.region_samples(inverse)
    spec = {}
    for hw_name in sorted(df.hardware.unique()):
        spec[hw_name] = tuple(read_profile(conf_path("hardware", hw_name, "hardware profile")).network.inter
                              .public_nic_GBps)
    point = inv.plausible_point(inverse, spec)
    models, bases = {}, {}
    lo, hi, best = [], [], []
    for r in df.itertuples():
        if get_attention(r.algorithm).ranks == "ring" or r.hardware not in samples:
            lo.append(None), hi.append(None), best.append(None)
            continue
        m = models.setdefault(r.model, load_model(r.model))
        gpn = max(1, int(r.gpus) // max(1, int(r.nodes)))
        base = bases.setdefault((r.hardware, gpn), load_hardware(r.hardware, gpus_per_node=gpn))
        rows_, cols_ = (int(x) for x in r.grid.split("x"))
        cell = inv.Cell(m, int(r.seq_len), rows_, cols_, (r.algorithm,), int(r.batch_size),
                        short_name(r.dtype))

        def speedup(sc, nic, base=base, cell=cell, alg=r.algorithm):
            return inv.cell_speedups(inv.profile(base, sc, nic), sc, cell)[alg]

        vals = [speedup(sc, nic) for sc, nic in samples[r.hardware]]
        lo.append(min(vals)), hi.append(max(vals))
        best.append(speedup(*point[r.hardware]) if r.hardware in point else None)
    df = df.copy()
    df["speedup_band_min"], df["speedup_band_max"], df["speedup_plausible"] = lo, hi, best
    df["band_source"] = ("modelled: region reproducing the stated maxima (results/tables/costmodel/"
                         "paper_inverse.csv); plausible = its point nearest public NIC specs")
    return df


def draw(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The paper-shaped figures from the projection, through attn2d.report.figures (labelled modelled)."""
    from attn2d.report import figures as F  # matplotlib: only when drawing

    paths: list[Path] = []
    for hw in sorted(df.hardware.unique()):
        d = df[df.hardware == hw]
        src = F.modelled(df, hw)
        gpus = ", ".join(str(g) for g in sorted(d.gpus.unique()))
        paths += F.speedup_figure([src], out_dir / f"{hw}_speedup",
                                  title=f"Speedup over Ring Attention (modelled, {hw}, {gpus} GPUs)")
        paths += F.comm_bytes_figure([src], out_dir / f"{hw}_comm_bytes",
                                     title=f"Attention communication per device (modelled, {hw})")
        tps = d[d.experiment == "a100_time_per_step"]
        if len(tps) or (hw.startswith("a100") and "gpt3_2p7b" in set(d.model)):
            like = tps if len(tps) else d[(d.model == "gpt3_2p7b") & d.algorithm.isin(["ring", "attn2d"])]
            paths += F.time_per_step_figure([F.modelled(df, hw, like.rename(columns={"algorithm": "attention"}))],
                                            out_dir / f"{hw}_time_per_step",
                                            title=f"Training time per step (modelled, {hw})")
    return paths


def sensitivity(models=("gpt3_2p7b",), seq_lens=(32768, 131072)) -> pd.DataFrame:
    """How the modelled speedup of attn2d over ring at 64 GPUs depends on the two assumptions the paper does not
    give: the inter-node bandwidth per node (scaled from each profile's value) and the attention kernel rate; also
    against the contiguous (not load-balanced) ring, a weaker baseline the paper may have used (NOT FOUND)."""
    rows = []
    for hw_name in ("a100_4gpn", "h100_1gpn"):
        base = load_hardware(hw_name)
        for bw_gbps in (12.5, 25.0, 50.0, 100.0, 200.0, 400.0):
            f = bw_gbps * 1e9 / base.inter.bw_bytes_per_s
            for kernel_x in (0.5, 1.0, 2.0):
                hw = replace(base, inter=Link(base.inter.alpha_s, base.inter.bw_bytes_per_s * f),
                             inter_rank_bw_bytes_per_s=(base.inter_rank_bw_bytes_per_s or 0) * f or None,
                             attn_fwd_flops_per_s=base.attn_fwd_flops_per_s * kernel_x,
                             attn_bwd_flops_per_s=base.attn_bwd_flops_per_s * kernel_x)
                for m in models:
                    shape = load_model(m)
                    for n in seq_lens:
                        wl = Workload(seq_len=n, fsdp=True, activation_checkpointing=True)
                        t = {a: step_time(a, shape, wl, 8, 8, hw).step_time_s
                             for a in ("ring", "ring_contiguous", "attn2d")}
                        rows.append({"hardware": hw_name, "model": m, "gpus": 64, "seq_len": n,
                                     "inter_node_GBps_per_node": bw_gbps, "attn_kernel_rate_x": kernel_x,
                                     "ring_step_time_s": t["ring"], "ring_contiguous_step_time_s": t["ring_contiguous"],
                                     "attn2d_step_time_s": t["attn2d"], "speedup_vs_ring": t["ring"] / t["attn2d"],
                                     "speedup_vs_ring_contiguous": t["ring_contiguous"] / t["attn2d"],
                                     "source": "modelled"})
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/tables/projection_paper.csv")
    ap.add_argument("--figures", default="results/figures/modelled", help="directory for the figures ('' = none)")
    ap.add_argument("--experiments", nargs="+", default=list(PAPER_EXPERIMENTS))
    ap.add_argument("--conf", default=None, help="config directory (default: the repository's conf/)")
    ap.add_argument("--sensitivity", default=None,
                    help="also write the speedup's sensitivity to inter-node bandwidth and kernel rate (CSV)")
    ap.add_argument("--inverse", default=None, help="paper_inverse.csv (costmodel_inverse.py): add the band columns")
    ap.add_argument("--band-figures", default=None, help="directory for the band and breakdown figures (modelled)")
    a = ap.parse_args(argv)
    conf = Path(a.conf) if a.conf else repo_root() / "conf"
    df = project(experiment_cells(a.experiments, conf))
    if a.inverse:
        df = band(df, pd.read_csv(a.inverse))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(f"wrote {out} ({len(df)} modelled cells)")
    best = df.dropna(subset=["speedup_vs_ring"]).groupby("hardware").speedup_vs_ring.max()
    for hw, s in best.items():
        print(f"  {hw}: largest modelled speedup over ring {s:.2f}x")
    if a.sensitivity:
        sens = sensitivity()
        Path(a.sensitivity).parent.mkdir(parents=True, exist_ok=True)
        sens.to_csv(a.sensitivity, index=False)
        print(f"wrote {a.sensitivity} ({len(sens)} rows)")
    if a.figures:
        for p in draw(df, Path(a.figures)):
            print(f"wrote {p}")
    if a.band_figures:
        from attn2d.report import figures_modelled as F  # matplotlib: only when drawing

        out_dir = Path(a.band_figures)
        paths = []
        if "speedup_band_min" in df:
            paths += F.speedup_band_figure(df, out_dir / "paper_band_speedup",
                                           reported=reported(a.experiments, conf))
        cells = df[(df.hardware == "a100_4gpn") & (df.model == "gpt3_2p7b") & df.seq_len.isin([32768, 131072])
                   & df.algorithm.isin(["ring", "attn2d"])]
        paths += F.breakdown_figure(cells, out_dir / "breakdown_a100_2p7b")
        for p in paths:
            print(f"wrote {p}")


if __name__ == "__main__":
    sys.exit(main())
