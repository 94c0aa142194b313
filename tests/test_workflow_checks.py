"""The workflow as a careful user expects it: every planned problem found before a job is submitted (one error),
failed cells listed at the end with a non-zero exit, no config value reaching a shell, corrupt records set aside
and their cells re-run, changed launcher settings reported, a dry run summarised by job shape, and a fresh clone
that runs its cells. Snakemake runs in a scratch directory, as in tests/test_workflow.py."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from attn2d import plan as C
from attn2d import records
from attn2d.config import CONF_DIR
from attn2d.report import figures as F
from test_workflow import SMK, dry_run_cells, workdir, write_synthetic

ROOT = CONF_DIR.parent
PWNED = "PWNED"


def smk(wd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*SMK, *args], cwd=wd, capture_output=True, text=True, timeout=timeout)


def no_pwned(*roots: Path) -> None:
    found = [p for r in roots for p in r.rglob(PWNED)] + [r / PWNED for r in roots if (r / PWNED).exists()]
    assert not found, f"a config value reached a shell: {found}"


# ---------------------------------------------------------------------------------------------- plan time
def test_plan_lists_every_problem_in_one_error():
    """A misspelt sweep key (nearest key named), attention=local on 4 ranks, ring on 2x2 and on 1x4 (ambiguous
    baseline): all in one PlanError, before anything runs."""
    t0 = time.monotonic()
    with pytest.raises(C.PlanError) as e:
        C.plan(["local_speedup"], conf_dir=CONF_DIR, launcher="local_cpu",
               sweep="benchmark.seqlen=144 attention=local,ring grid=2x2,1x4")
    msg = str(e.value)
    assert time.monotonic() - t0 < 30
    assert "sweep key 'benchmark.seqlen'" in msg and "did you mean benchmark.seq_len?" in msg
    assert "attention 'local' runs on one process only, but grid 2x2 has 4 ranks" in msg
    assert "speedup baseline is ambiguous" in msg and "grid=1x4" in msg and "grid=2x2" in msg
    assert msg.startswith("the plan has ") and "no job was submitted" in msg


def test_plan_checks_override_and_launcher_keys_and_layouts():
    with pytest.raises(C.PlanError) as e:
        C.plan(["local_speedup"], conf_dir=CONF_DIR, launcher="local_cpu",
               overrides="benchmark.sed=3 hydra.launcher.timeout_mn=5", sweep="benchmark.seq_len=145 grid=2x2")
    msg = str(e.value)
    assert "override key 'benchmark.sed'" in msg and "did you mean benchmark.seed?" in msg
    assert "launcher override key 'hydra.launcher.timeout_mn'" in msg
    assert "did you mean hydra.launcher.timeout_min?" in msg
    assert "benchmark.seq_len 145 cannot be split over the 4 ranks" in msg


def _fake_cluster(tmp_path: Path, partitions: str, accounts: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, out in (("sinfo", partitions), ("sacctmgr", accounts)):
        (bin_dir / name).write_text(f"#!/bin/sh\nprintf '{out}'\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_plan_checks_partitions_and_accounts_where_the_cluster_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(_fake_cluster(tmp_path, "cpu\\na100\\n", "root\\nproj1\\n")))
    kw = dict(conf_dir=CONF_DIR, launcher="slurm_cpu", sweep="benchmark.seq_len=144 grid=2x2", check_cluster=True)
    with pytest.raises(C.PlanError) as e:
        C.plan(["local_speedup"], overrides="hydra.launcher.partition=gpu hydra.launcher.account=proj2", **kw)
    msg = str(e.value)
    assert "partition 'gpu' does not exist on this cluster" in msg and "a100, cpu" in msg
    assert "account 'proj2' does not exist" in msg and "did you mean proj1?" in msg
    ok = C.plan(["local_speedup"], overrides="hydra.launcher.account=proj1", **kw)
    assert len(ok.jobs) == 3 and not ok.notes
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no Slurm commands: skipped, with a note
    notes = C.plan(["local_speedup"], **kw).notes
    assert any("partitions not checked" in n and "sinfo not found" in n for n in notes)


# ---------------------------------------------------------------------------------------------- snakemake
def test_misspelt_sweep_key_stops_the_workflow_fast_and_submits_nothing(tmp_path):
    wd = workdir(tmp_path)
    t0 = time.monotonic()
    p = smk(wd, "--cores", "1", "--config", "launcher=slurm_cpu", "experiments=[local_speedup]",
            "sweep=benchmark.seqlen=144", "modelled=false", "cluster_checks=false", timeout=120)
    assert time.monotonic() - t0 < 30
    assert p.returncode != 0 and "did you mean benchmark.seq_len?" in p.stderr
    assert not (wd / "runs").exists()


def test_dry_run_ends_with_jobs_by_shape_and_names_the_default_account(tmp_path, slurm_profile):
    p = smk(workdir(tmp_path), "--profile", str(slurm_profile), "-n", "--config", "experiments=[h100_speedup]",
            "modelled=false", "cluster_checks=false")
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "account=none (cluster default)" in out and "account=default" not in out
    tail = out[out.rindex("This was a dry-run"):]
    assert "cell jobs by shape (30 in all):" in tail
    assert "launcher=slurm_h100, nodes=64, tasks_per_node=1, gpus_per_node=1, partition=h100: 30 jobs" in tail


PAYLOAD = '"$(cd ..;touch PWNED)"'  # Hydra keeps the double quotes: the shell would run what is inside


def test_injection_through_sweep_and_overrides_is_rejected_at_plan_time(tmp_path):
    (tmp_path / "wd").mkdir()
    wd = workdir(tmp_path / "wd")
    cfg = wd / "payload.yaml"
    cfg.write_text(json.dumps({"experiments": ["local_speedup"], "modelled": False,
                               "sweep": f"benchmark.seq_len=144 grid=2x2 benchmark.seed='{PAYLOAD}'",
                               "overrides": f"benchmark.steps='{PAYLOAD}'"}))
    p = smk(wd, "--cores", "1", "--configfile", str(cfg), timeout=120)
    assert p.returncode != 0, p.stdout[-2000:]
    # the override: a value of the wrong type; the sweep value: a cell name no run dir may have
    assert "benchmark.steps: Value '$(cd ..;touch PWNED)' of type 'str' could not be converted to Integer" \
        in p.stderr, p.stderr[-2000:]
    assert "the cell's name (its run dir) holds characters it may not hold" in p.stderr
    assert 'benchmark.seed="$(cd ..;touch PWNED)"' in p.stderr
    assert not (wd / "runs").exists()
    no_pwned(tmp_path)


@pytest.mark.slow
def test_a_failed_cell_fails_the_workflow_after_its_tables_and_no_value_reaches_a_shell(tmp_path):
    """One real cell that fails at run time (device=cuda on a CPU host), with a launcher-override payload and a
    --config payload: the tables and figure are drawn (the cell as failed), the failed cells are listed with their
    reason, the exit status is 1, and no file PWNED appears."""
    (tmp_path / "wd").mkdir()
    wd = workdir(tmp_path / "wd")
    cfg = wd / "payload.yaml"
    cfg.write_text(json.dumps({
        "experiments": ["local_speedup"], "modelled": False,
        "sweep": "benchmark.seq_len=144 grid=2x2 attention=attn2d",
        "overrides": "benchmark.device=cuda benchmark.steps=1 benchmark.warmup_steps=0",
        "launcher_overrides": f"hydra.launcher.name='{PAYLOAD}'"}))
    p = smk(wd, "--cores", "2", "--configfile", str(cfg), "--config", "projection=x'$(touch PWNED)'", timeout=400)
    no_pwned(tmp_path)
    cell = "runs/local_speedup/attention=attn2d,benchmark.seq_len=144,grid=2x2,model=tiny"
    assert p.returncode == 1, p.stderr[-3000:]
    assert "1 of 1 planned cells FAILED" in p.stderr and cell in p.stderr and "cuda" in p.stderr
    t = pd.read_csv(wd / "results/tables/local_speedup.csv")
    assert list(t.status) == ["failed"] and "cuda" in t.reason[0]
    assert (wd / "results/figures/local_speedup/speedup.png").stat().st_size > 0
    rec = records.read_record(wd / cell)
    assert not rec.ok


def test_a_failed_record_makes_the_exit_status_1_after_the_tables(tmp_path):
    """Synthetic records, one failed: the table is written, the cell listed, exit 1."""
    wd = workdir(tmp_path)
    plan = C.plan(["local_speedup"], conf_dir=CONF_DIR, launcher="local_cpu", sweep="benchmark.seq_len=144 grid=2x2")
    write_synthetic(wd, plan.jobs.values(), fail=lambda c: c.info["attention"] == "attn2d")
    cfg = ["--config", "experiments=[local_speedup]", "sweep=benchmark.seq_len=144 grid=2x2", "modelled=false"]
    p = smk(wd, "--cores", "1", *cfg, "--", "results/tables/local_speedup.csv")
    assert p.returncode == 1 and "RuntimeError: synthetic failure of this cell" in p.stderr
    assert "1 of 3 planned cells FAILED" in p.stderr and "allow_failed_cells=true" in p.stderr
    assert "failed" in set(pd.read_csv(wd / "results/tables/local_speedup.csv").status)  # drawn before exit 1
    # accepted: tests/test_workflow.py::test_snakemake_builds_tables_figures_and_report_from_records (exit 0)


# ---------------------------------------------------------------------------------------------- records
SMALL = ["--config", "experiments=[local_speedup]", "sweep=benchmark.seq_len=144 grid=2x2", "modelled=false"]


def _small(wd: Path):
    plan = C.plan(["local_speedup"], conf_dir=CONF_DIR, launcher="local_cpu", sweep="benchmark.seq_len=144 grid=2x2")
    write_synthetic(wd, plan.jobs.values())
    return plan


def test_corrupt_and_superseded_records_are_set_aside_and_their_cells_run_again(tmp_path):
    """One record with a NaN step time (read as ok before), one made with another time limit than the plan's:
    a dry run names both and moves nothing; a run (rerun_changed_launcher=true) moves them aside, kept, so that
    their cells run again."""
    wd = workdir(tmp_path)
    plan = _small(wd)
    corrupt, changed = list(plan.jobs.values())[:2]
    bad = wd / corrupt.record
    text = re.sub(r'"step_time_s": [0-9.e+-]+', '"step_time_s": NaN', bad.read_text(), count=1)
    assert "NaN" in text
    bad.write_text(text)
    rec = records.read_record(wd / changed.record)
    job = {"launcher": "local_cpu", "scheduler": "local", "job_id": "1", "job_name": None, "partition": None,
           "account": None, "nodelist": None, "requeue_count": None,
           "launcher_params": {**changed.resources.params, "timeout_min": 5}}  # the schema's job fields
    records.write(wd / changed.run_dir, {**rec.header, "job": job}, rec.steps)

    dry = smk(wd, "-n", "--cores", "1", *SMALL)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "non-finite number NaN" in dry.stderr and f"moves it to {corrupt.run_dir}/corrupt/" in dry.stderr
    assert f"{changed.run_dir}: launcher settings changed since its record (timeout_min 5 -> 60)" in dry.stderr
    assert "rerun_changed_launcher=true" in dry.stderr
    assert bad.exists() and (wd / changed.record).exists()  # a dry run moves nothing

    p = smk(wd, "--cores", "1", *SMALL, "rerun_changed_launcher=true", "--", "results/tables/cells/local_speedup.csv")
    assert p.returncode == 0, p.stderr[-2000:]
    kept = bad.parent / "corrupt" / "metrics-1.jsonl"
    assert kept.read_text() == text and f"moved to {kept.relative_to(wd)}" in p.stderr
    assert (wd / changed.run_dir / "superseded" / "metrics-1.jsonl").exists()
    assert not bad.exists() and not (wd / changed.record).exists()  # so the next run runs both cells


def test_a_figure_says_when_its_cells_ran_in_different_places(tmp_path, capsys):
    t = pd.DataFrame({"status": ["ok", "ok", "ok"], "cell": ["a", "b", "c"], "device_name": ["cpu"] * 3,
                      "job_launcher": ["slurm_cpu", "slurm_cpu", "slurm_a100"], "partition": ["cpu", "cpu", "a100"],
                      "nodes": [1, 1, 1]})
    src = F.measured(t)
    assert "MIXED ORIGINS" in src.label
    assert "launcher slurm_a100, partition a100, device_name cpu (1 cells)" in src.label
    assert "c" in capsys.readouterr().err
    assert "MIXED" not in F.measured(t.iloc[:2]).label


# ---------------------------------------------------------------------------------------------- fresh clone
def test_a_fresh_clone_runs_its_cells(tmp_path):
    """What the repository ships lives in results/reference/; results/tables and results/figures (what a run
    writes) are untracked and ignored, so a clone's dry run plans the cells instead of "Nothing to be done"."""
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert not [f for f in tracked if f.startswith(("results/tables/", "results/figures/"))]
    assert any(f.startswith("results/reference/tables/") for f in tracked)
    # everything a run writes is ignored, so a run never makes the tree (and its records' git_rev) "+dirty"
    written = ["results/tables/local_speedup.csv", "results/tables/cells/local_speedup.csv",
               "results/tables/projection_paper.csv", "results/tables/costmodel/validation_local.md",
               "results/figures/local_speedup/speedup.png", "results/figures/costmodel/validation_local.pdf",
               "results/logs/cells/x/y.log", "runs/local_speedup/x/metrics.jsonl"]
    ignored = subprocess.run(["git", "check-ignore", *written], cwd=ROOT, capture_output=True, text=True)
    assert set(ignored.stdout.split()) == set(written)
    wd = workdir(tmp_path)
    for f in tracked:  # the clone's results/ as committed
        (wd / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, wd / f)
    out = smk(wd, "-n", "--cores", "1", "--config", "launcher=slurm_cpu", "experiments=[local_speedup]",
              "sweep=benchmark.seq_len=144 grid=2x2", "modelled=false", "cluster_checks=false")
    assert out.returncode == 0 and len(dry_run_cells(out.stdout)) == 3, out.stdout[-2000:]


def test_a_cells_command_is_a_quoted_argument_list():
    """An override value with a space, quotes and shell syntax stays ONE argument of the cell's command (the cell
    rule pastes the command after `--` as shell words)."""
    value = "'\"x y;$(touch PWNED)\"'"
    plan = C.plan(["local_speedup"], conf_dir=CONF_DIR, launcher="local_cpu", sweep="benchmark.seq_len=144 grid=2x2",
                  overrides=f"model.name={value}")
    cell = next(iter(plan.jobs.values()))
    args = shlex.split(plan.command(cell, "python"))
    assert 'model.name="x y;$(touch PWNED)"' in args
    assert f"hydra.sweep.dir='{cell.run_dir}'" in args and args[:4] == ["python", "-m", "attn2d.train", "-m"]
