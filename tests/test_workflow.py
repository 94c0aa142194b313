"""The Snakemake workflow and the report package: the dry run lists one job per paper cell with its Slurm shape;
records -> tables -> figures (synthetic records, a failed cell, a malformed record); one real local run of two cells
and the re-run of a failed cell. Snakemake runs in a scratch directory that links Snakefile, workflow/ and conf/."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from attn2d import plan as C
from attn2d import records
from attn2d.config import CONF_DIR
from attn2d.report import collect as K
from attn2d.report import figures as F

ROOT = CONF_DIR.parent
SMK = [sys.executable, "-m", "snakemake"]


def workdir(tmp: Path) -> Path:
    for name in ("Snakefile", "workflow", "conf", "src"):  # src: the cost-model rules depend on its code
        (tmp / name).symlink_to(ROOT / name)
    return tmp


def snakemake(wd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([*SMK, *args], cwd=wd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"snakemake {' '.join(args)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def dry_run_cells(out: str) -> list[dict]:
    """The `rule cell:` blocks of a dry run: {wildcards, resources} each."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n)", out):
        if not re.search(r"^\s*(local)?rule cell:", block, re.M):
            continue
        res = re.search(r"^\s*resources: (.*)$", block, re.M).group(1)
        wc = re.search(r"^\s*wildcards: home=(\w+), cell=(\S+)$", block, re.M)
        jobs.append({"home": wc.group(1), "cell": wc.group(2),
                     "res": dict(kv.split("=", 1) for kv in re.findall(r"(\w+=[^,]*)(?:, |$)", res))})
    return jobs


# ---------------------------------------------------------------------------------------------- dry runs
def test_slurm_dry_run_lists_one_job_per_paper_cell_with_its_shape(tmp_path, slurm_profile):
    out = snakemake(workdir(tmp_path), "--profile", str(slurm_profile), "-n").stdout
    jobs = dry_run_cells(out)
    assert re.search(r"^cell\s+120$", out, re.M), "job stats should count 90 A100 + 30 H100 cells"
    assert len(jobs) == 120 and len({(j["home"], j["cell"]) for j in jobs}) == 120
    for j in jobs:
        r = j["res"]
        world = int(re.search(r"grid=(\d)x(\d)", j["cell"]).group(1)) ** 2
        if j["home"] == "a100_speedup":  # 16 GPUs = 4 nodes x 4, 64 GPUs = 16 nodes x 4
            assert (r["launcher"], r["partition"], r["gpus_per_node"]) == ("slurm_a100", "a100", "4")
            assert (int(r["nodes"]), int(r["gpus"])) == (world // 4, world)
        else:  # H100: 64 nodes x 1 GPU
            assert j["home"] == "h100_speedup"
            assert (r["launcher"], r["partition"], r["nodes"], r["gpus_per_node"], r["gpus"]) == \
                ("slurm_h100", "h100", "64", "1", "64")
        assert int(r["runtime"]) > 0
    assert sum(j["home"] == "a100_speedup" and "grid=8x8" in j["cell"] for j in jobs) == 45
    # the tables of all three experiments are built, a100_time_per_step from a100_speedup's records
    for e in ("a100_speedup", "a100_time_per_step", "h100_speedup"):
        assert f"results/tables/{e}.csv" in out
    assert "results/figures/a100_time_per_step/time_per_step.png" in out


def test_slurm_dry_run_honours_sweep_and_launcher_overrides(tmp_path, slurm_profile):
    out = snakemake(workdir(tmp_path), "--profile", str(slurm_profile), "-n", "--config",
                    "experiments=[a100_speedup]", "sweep=model=gpt3_2p7b benchmark.seq_len=8192,16384,32768",
                    "launcher_overrides=hydra.launcher.partition=gpu hydra.launcher.account=proj1",
                    "cluster_checks=false").stdout  # (a cluster here may have no partition gpu)
    jobs = dry_run_cells(out)
    assert len(jobs) == 1 * 3 * 2 * 3
    assert all("model=gpt3_2p7b" in j["cell"] for j in jobs)
    assert {j["res"]["partition"] for j in jobs} == {"gpu"} and {j["res"]["account"] for j in jobs} == {"proj1"}
    assert "hydra.launcher.partition=gpu" in out  # passed on to the Hydra launcher


# ---------------------------------------------------------------------------------------------- synthetic records
RING_S, NO_S, O_S = 2.0, 0.8, 1.6  # step times the synthetic records hold (median of 3 steps)


def write_synthetic(root: Path, cells, fail=lambda c: False) -> None:
    """A record per cell; step times RING_S / NO_S / O_S (x P/4 so P matters), comm bytes by the paper's formulas."""
    for c in cells:
        i = c.info
        P, N = i["world_size"], i["seq_len"]
        t = {"ring": RING_S, "attn2d": NO_S, "attn2d_overlap": O_S}[i["attention"]] * P / 4
        header = {"cell": dict(i), "config": {}, "versions": {}, "hosts": ["node0"] * P,
                  "devices": ["cpu: Synthetic CPU"] * P, "git_rev": None, "started_at": records.now_iso(),
                  "launcher": "submitit"}
        steps = [{"step": k, "step_time_s": t * f, "tokens_per_s": N / t, "tflops_per_gpu": 1e-5, "mfu": None,
                  "max_mem_gib": 0.5, "comm_bytes_sent": 1000 * P, "comm_bytes_received": 1000 * P,
                  "comm_messages": 9, "attn_comm_bytes_sent": 100 * N // P, "attn_comm_messages": 6, "loss": 5.0,
                  "comm_by_op": {}} for k, f in ((1, 1.1), (2, 1.0), (3, 0.9))]
        if fail(c):
            records.write(root / c.run_dir, header, [], "failed", "RuntimeError: synthetic failure of this cell")
        else:
            records.write(root / c.run_dir, header, steps)


def _is_failing(c) -> bool:
    return c.info["attention"] == "attn2d_overlap" and c.info["world_size"] == 9 and c.info["seq_len"] == 576


@pytest.fixture(scope="module")
def small_plan():
    """The local profile's default experiments at two sequence lengths (as the Snakemake tests select them)."""
    return C.plan(C.default_experiments(CONF_DIR, paper=False), conf_dir=CONF_DIR, launcher="local_cpu",
                  sweep="benchmark.seq_len=288,576")  # both split over 16 ranks in every layout


def test_collect_tables_speedups_and_failed_cells(tmp_path, small_plan):
    write_synthetic(tmp_path, small_plan.jobs.values(), fail=_is_failing)
    cells = small_plan.experiments["local_speedup"]
    df = K.collect([tmp_path / c.record for c in cells], "local_speedup")
    assert len(df) == len(cells) == 2 * 2 * 3
    failed = df[df.status == "failed"]
    assert len(failed) == 1 and failed.iloc[0].reason == "RuntimeError: synthetic failure of this cell"
    assert pd.isna(failed.iloc[0].step_time_s) and pd.isna(failed.iloc[0].speedup_vs_ring)
    ok = df[df.status == "ok"].set_index(["attention", "gpus", "seq_len"])
    assert ok.loc[("attn2d", 4, 288), "step_time_s"] == pytest.approx(NO_S)  # median of 1.1t, t, 0.9t
    assert ok.loc[("attn2d", 9, 576), "speedup_vs_ring"] == pytest.approx(RING_S / NO_S)
    assert ok.loc[("attn2d_overlap", 4, 576), "speedup_vs_ring"] == pytest.approx(RING_S / O_S)
    assert ok.loc[("ring", 9, 288), "speedup_vs_ring"] == pytest.approx(1.0)
    assert ok.loc[("ring", 9, 288), "attn_comm_bytes_sent"] == 100 * 288 // 9
    assert K.hardware_summary(df) == "cpu: Synthetic CPU; 1 node"
    K.write_tables(df, tmp_path / "t.csv", tmp_path / "t.md", "local_speedup")
    md = (tmp_path / "t.md").read_text()
    assert "| failed |" in md and "synthetic failure of this cell" in md and "11 ok, 1 failed" in md
    assert len(pd.read_csv(tmp_path / "t.csv")) == 12


def test_malformed_and_unfinished_records_are_rejected_naming_the_file(tmp_path, small_plan):
    cells = small_plan.experiments["local_speedup"][:2]
    write_synthetic(tmp_path, cells)
    bad = tmp_path / cells[1].record
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"kind": "step", "step": 2, "step_time_s": "fast"}'] + lines[3:]) + "\n")
    paths = [str(tmp_path / c.record) for c in cells]
    p = subprocess.run([sys.executable, "-m", "attn2d.report.collect", "--experiment", "x", "--csv",
                        str(tmp_path / "x.csv"), "--md", str(tmp_path / "x.md"), *paths],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and str(bad) in p.stderr and "line 3" in p.stderr
    assert not (tmp_path / "x.csv").exists()
    # a run that died half-way left only metrics.jsonl.partial: never read as complete
    half = tmp_path / "half"
    half.mkdir()
    (half / records.PARTIAL).write_text(lines[0] + "\n")
    with pytest.raises(records.RecordError, match=str(half)):
        K.collect([half], "x")


def test_figures_from_measured_and_modelled_sources(tmp_path, small_plan):
    write_synthetic(tmp_path, small_plan.jobs.values(), fail=_is_failing)
    cells = small_plan.experiments["local_speedup"]
    table = K.collect([tmp_path / c.record for c in cells], "local_speedup")
    src = F.measured(table)
    assert src.label == "measured: cpu: Synthetic CPU; 1 node"
    # a projection in the cost model's columns; only this hardware's rows for these cells are drawn
    proj = table[["model", "gpus", "seq_len", "attention"]].rename(columns={"attention": "algorithm"})
    proj = pd.concat([proj.assign(hardware="h_test"), proj.assign(hardware="other")], ignore_index=True)
    proj["nodes"], proj["grid"], proj["step_time_s"] = 1, "2x2", 1.0
    proj["speedup_vs_ring"] = proj.algorithm.map({"ring": 1.0, "attn2d": 3.0, "attn2d_overlap": 2.5})
    model = F.modelled(proj, "h_test", like=table[table.attention != "attn2d_overlap"])
    assert model.label == "modelled: cost model h_test"
    assert len(model.df) == 8 and set(model.df.attention) == {"ring", "attn2d"}
    for kind in F.KINDS:
        paths = F.KINDS[kind]([src, model] if kind != "comm_bytes" else [src], tmp_path / "fig" / kind)
        assert [p.suffix for p in paths] == [".png", ".pdf"]
        assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match="no rows"):
        F.speedup_figure([F.Source("measured", "measured: nothing", table.iloc[:0])], tmp_path / "empty")


def test_speedup_figure_draws_what_the_paper_reports_beside_measured_and_modelled(tmp_path, small_plan, monkeypatch):
    """An experiment's `reported` (the paper's stated maximum) is a labelled dotted line on the panels of its P
    only; the CLI takes it as JSON (as the workflow passes it from the experiment file)."""
    write_synthetic(tmp_path, small_plan.jobs.values())
    table = K.collect([tmp_path / c.record for c in small_plan.experiments["local_speedup"]], "local_speedup")
    gpus = sorted(table.gpus.unique())
    drawn = []
    monkeypatch.setattr(F, "save_figure", lambda fig, out: drawn.append(fig) or [])
    rep = {"gpus": int(gpus[-1]), "speedup_max": 7.5, "what": "paper: up to 7.5x"}
    F.speedup_figure([F.measured(table)], tmp_path / "s", reported=[rep])
    (fig,) = drawn
    panels = [ax for ax in fig.axes if ax.get_title()]
    with_line = [ax for ax in panels if any(list(l.get_ydata()) == [7.5, 7.5] and l.get_color() == F.REPORTED_COLOR
                                            for l in ax.get_lines())]
    assert with_line and all(f"P = {gpus[-1]} " in ax.get_title() for ax in with_line)
    assert len(with_line) < len(panels)  # not on the panels of the other P
    assert any("reported: paper: up to 7.5x" in t.get_text() for t in fig.legends[0].get_texts())
    table.to_csv(tmp_path / "t.csv", index=False)
    F.main(["speedup", "--measured", str(tmp_path / "t.csv"), "--out", str(tmp_path / "cli"),
            "--reported", json.dumps([rep])])
    assert any(list(l.get_ydata()) == [7.5, 7.5] for ax in drawn[-1].axes for l in ax.get_lines())


def test_snakemake_builds_tables_figures_and_report_from_records(tmp_path, small_plan):
    """With every record present no cell runs; tables (failed cell included), figures and the HTML report."""
    wd = workdir(tmp_path)
    write_synthetic(wd, small_plan.jobs.values(), fail=_is_failing)
    cfg = ["--config", "launcher=local_cpu", "sweep=benchmark.seq_len=288,576", "modelled=false",
           "allow_failed_cells=true"]  # one synthetic cell failed: accepted, the figures show it
    run = snakemake(wd, "--cores", "2", *cfg)
    assert "1 of" in run.stderr and "allow_failed_cells=true" in run.stderr  # listed, accepted: exit 0
    for e, kinds in (("local_speedup", ("speedup",)), ("local_time_per_step", ("time_per_step",)),
                     ("local_comm_bytes", ("comm_bytes",))):
        t = pd.read_csv(wd / f"results/tables/{e}.csv")
        assert len(t) == len(small_plan.experiments[e])
        for k in kinds:
            assert (wd / f"results/figures/{e}/{k}.png").stat().st_size > 10_000
            assert (wd / f"results/figures/{e}/{k}.pdf").exists()
    t = pd.read_csv(wd / "results/tables/local_speedup.csv")
    assert list(t[t.status == "failed"].reason) == ["RuntimeError: synthetic failure of this cell"]
    tps = pd.read_csv(wd / "results/tables/local_time_per_step.csv")
    assert set(tps.experiment) == {"local_time_per_step"} and set(tps.attention) == {"ring", "attn2d"}
    plan = pd.read_csv(wd / "results/tables/cells/local_speedup.csv")
    assert len(plan) == 12 and set(plan.launcher) == {"local_cpu"}
    snakemake(wd, "--cores", "2", *cfg, "--report", "report.html")
    html = (wd / "report.html").read_text(errors="replace")
    assert "Speedup over Ring Attention" in html and "local_speedup" in html


# ---------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_real_local_run_of_two_cells_and_retry_of_a_failed_one(tmp_path):
    """Two real cells (tiny model, 2x2 gloo ranks, 1 step) through Snakemake, Hydra's submitit local launcher and
    train.py; then a failed record makes the next run (dry) redo that cell and only that cell."""
    wd = workdir(tmp_path)
    cfg = ["--config", "experiments=[local_speedup]", "sweep=benchmark.seq_len=144 grid=2x2 attention=ring,attn2d",
           "overrides=benchmark.warmup_steps=0 benchmark.steps=1", "modelled=false"]
    snakemake(wd, "--cores", "2", *cfg, timeout=600)
    t = pd.read_csv(wd / "results/tables/local_speedup.csv").set_index("attention")
    assert set(t.index) == {"ring", "attn2d"}
    for a, r in t.iterrows():  # each cell either ran or says why not
        assert (r.status == "ok" and r.step_time_s > 0 and r.steps == 1) or \
            (r.status == "failed" and isinstance(r.reason, str) and r.reason), (a, r.to_dict())
    assert t.loc["attn2d", "status"] == "ok", t.loc["attn2d", "reason"]
    assert "cpu" in t.loc["attn2d", "hardware"]
    if t.loc["ring", "status"] == "ok":
        assert t.loc["attn2d", "speedup_vs_ring"] == pytest.approx(t.loc["ring", "step_time_s"] /
                                                                  t.loc["attn2d", "step_time_s"])
    assert (wd / "results/figures/local_speedup/speedup.png").exists()
    # nothing left to do
    assert "Nothing to be done" in snakemake(wd, "-n", "--cores", "2", *cfg).stdout
    # make the attn2d cell a failed one, as run_cell.py leaves it: the next run redoes it, and only it
    run_dir = Path(t.loc["attn2d", "record"]).parent
    rec = records.read_record(wd / run_dir)
    records.write(wd / run_dir, rec.header, [], "failed", "RuntimeError: injected failure")
    (wd / run_dir / "failed").mkdir(exist_ok=True)
    shutil.copy(wd / run_dir / records.METRICS, wd / run_dir / "failed" / "attempt-1.jsonl")
    if t.loc["ring", "status"] == "failed":
        assert (wd / Path(t.loc["ring", "record"]).parent / "failed" / "attempt-1.jsonl").exists()
    out = snakemake(wd, "-n", "--cores", "2", *cfg).stdout
    redo = {j["cell"] for j in dry_run_cells(out)}
    assert run_dir.name in redo and "Params have changed" in out
    assert ("attention=ring,benchmark.seq_len=144,grid=2x2,model=tiny" in redo) == (t.loc["ring", "status"] != "ok")
    # retry_failed=false keeps failed cells as they are
    keep = snakemake(wd, "-n", "--cores", "2", *cfg, "retry_failed=false").stdout
    assert not dry_run_cells(keep)


# ---------------------------------------------------------------------------------------------- run_cell.py
def _run_cell():
    spec = importlib.util.spec_from_file_location("run_cell", ROOT / "workflow" / "scripts" / "run_cell.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


INFO = {"experiment": "e", "model": "tiny", "attention": "attn2d", "grid": "2x2", "rows": 2, "cols": 2,
        "world_size": 4, "seq_len": 144, "batch_size": 1, "dtype": "float32", "device": "cpu"}


def _cell_args(run_dir: Path, *extra: str) -> list[str]:
    return ["--run-dir", str(run_dir), "--info", json.dumps(INFO), "--nodes", "1", "--gpus-per-node", "0",
            "--launcher", "local_cpu", *extra, "--"]


def test_run_cell_writes_a_failed_record_when_the_run_leaves_none(tmp_path):
    rc = _run_cell()
    crash = ("import sys; print('Traceback (most recent call last):'); print('ValueError: grid 3x3 needs 9 ranks'); "
             "sys.exit(3)")
    for attempt in (1, 2):
        assert rc.main(_cell_args(tmp_path / "cell", "--launcher-args=hydra.launcher.timeout_min=5")
                       + [sys.executable, "-c", crash]) == 0
        rec = records.read_record(tmp_path / "cell")
        assert rec.status == "failed" and rec.cell["nodes"] == 1 and rec.cell["world_size"] == 4
        assert rec.end["reason"] == ("attn2d.train exited with status 3 without a record: "
                                     "ValueError: grid 3x3 needs 9 ranks")
        assert "hydra/launcher=local_cpu hydra.launcher.timeout_min=5" in rec.header["config"]["command"]
        assert (tmp_path / "cell" / "failed" / f"attempt-{attempt}.jsonl").read_text() == rec.path.read_text()
    # a run that writes its own record (ok) is left alone and adds no failed copy
    header = {"cell": {**INFO, "nodes": 1, "gpus_per_node": 0}, "config": {}, "versions": {}, "hosts": [],
              "devices": [], "git_rev": None, "started_at": records.now_iso()}
    step = {"step": 1, "step_time_s": 0.5, "tokens_per_s": 1.0, "tflops_per_gpu": 0.0, "mfu": None,
            "max_mem_gib": None, "comm_bytes_sent": 0, "comm_bytes_received": 0, "comm_messages": 0,
            "attn_comm_bytes_sent": 0, "attn_comm_messages": 0, "loss": 1.0, "comm_by_op": {}}
    writes_ok = "import json, sys; from attn2d import records; records.write(sys.argv[1], *json.loads(sys.argv[2]))"
    assert rc.main(_cell_args(tmp_path / "cell") + [sys.executable, "-c", writes_ok, str(tmp_path / "cell"),
                                                    json.dumps([header, [step]])]) == 0
    assert records.read_record(tmp_path / "cell").ok
    assert len(list((tmp_path / "cell" / "failed").glob("*.jsonl"))) == 2


def test_run_cell_kills_a_run_past_its_time_limit(tmp_path):
    rc = _run_cell()
    t0 = time.monotonic()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]  # ignores the launcher args appended to it
    assert rc.main(_cell_args(tmp_path / "cell", "--timeout-min", "0.02") + sleeper) == 0
    assert time.monotonic() - t0 < 30
    rec = records.read_record(tmp_path / "cell")
    assert rec.status == "failed" and rec.end["reason"].startswith("timed out after 0.02 min")
