"""The experiment files (conf/experiment/*.yaml): each composes and validates at every cell, and expands into
exactly the paper's grid of cells with the paper's job shapes (attn2d.plan, the workflow's plan)."""
from __future__ import annotations

import itertools
import re
import shlex

import pytest
from omegaconf import OmegaConf

from attn2d import plan as C
from attn2d.config import CONF_DIR, compose, validate
from attn2d.report import checks
from attn2d.sweep import sweep_points, sweeper_params

SEQS = [2**13, 2**14, 2**15, 2**16, 2**17]  # the paper's x axis, 8K..128K
PAPER_MODELS = {"gpt3_760m", "gpt3_2p7b", "gpt3_13b"}
EXPERIMENTS = C.experiment_names(CONF_DIR)
REPRO = [e for e in EXPERIMENTS if not e.startswith("smoke_")]  # the files this repository reproduces figures with


@pytest.fixture(scope="module")
def paper():
    return C.plan(["a100_speedup", "a100_time_per_step", "h100_speedup"], conf_dir=CONF_DIR, launcher="slurm")


@pytest.fixture(scope="module")
def local():
    return C.plan(["local_speedup", "local_time_per_step", "local_comm_bytes"], conf_dir=CONF_DIR,
                  launcher="local_cpu")


def _set(cells, key):
    return {c.info[key] for c in cells}


def test_every_reproduction_file_is_headed_by_what_hardware_and_command():
    assert {"a100_speedup", "a100_time_per_step", "h100_speedup", "local_speedup", "local_time_per_step"} <= set(REPRO)
    for name in REPRO:
        head = []
        for line in (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines():
            if line.startswith("#"):
                head.append(line)
            elif line.strip():
                break
        text = "\n".join(head)
        assert head[0] == "# @package _global_", name
        for word in ("Reproduces", "Hardware:", "Command"):
            assert word in text, f"{name}.yaml: its header comment lacks {word!r}"
        assert f"experiment={name}" in text, f"{name}.yaml: its header shows no command running it"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_cell_composes_and_validates(name):
    """Each experiment at each of its cells is a config train.py accepts (grid vs launcher ranks, sequence vs
    layout, model shape). One compose per (grid, model, attention); the sequence lengths are set on it."""
    cfg0 = compose(experiment=name, return_hydra_config=True)
    points = [dict(p.split("=", 1) for p in pt) for pt in sweep_points(sweeper_params(cfg0))]
    by_shape: dict[tuple, list[str]] = {}
    for p in points:
        shape = tuple((k, v) for k, v in p.items() if k != "benchmark.seq_len")
        by_shape.setdefault(shape, []).append(p.get("benchmark.seq_len"))
    for shape, seqs in by_shape.items():
        cfg = compose([f"{k}={v}" for k, v in shape], return_hydra_config=True, experiment=name)
        for n in seqs:
            if n is not None:
                OmegaConf.update(cfg, "benchmark.seq_len", int(n))
            validate(cfg)  # raises ConfigError listing every problem


def test_a100_speedup_is_the_papers_grid(paper):
    cells = paper.experiments["a100_speedup"]
    assert len(cells) == 3 * 5 * 2 * 3 == 90
    assert _set(cells, "model") == PAPER_MODELS
    assert sorted(_set(cells, "seq_len")) == SEQS
    assert _set(cells, "attention") == {"ring", "attn2d", "attn2d_overlap"}
    want = set(itertools.product(PAPER_MODELS, SEQS, (16, 64), ("ring", "attn2d", "attn2d_overlap")))
    got = {(c.info["model"], c.info["seq_len"], c.info["world_size"], c.info["attention"]) for c in cells}
    assert got == want
    for c in cells:  # 16 GPUs = 4 nodes x 4, 64 GPUs = 16 nodes x 4, square grids, on the A100 partition
        r = c.resources
        assert (r.nodes, r.tasks_per_node, r.gpus_per_node) == (r.ranks // 4, 4, 4)
        assert r.gpus == r.ranks and c.info["rows"] == c.info["cols"]
        assert r.launcher == "slurm_a100" and r.partition and not r.local
        assert c.info["device"] == "cuda" and c.info["dtype"] == "bfloat16"
    assert len({c.run_dir for c in cells}) == 90  # one record (job) per cell


def test_a100_time_per_step_reuses_the_speedup_runs(paper):
    cells = paper.experiments["a100_time_per_step"]
    assert len(cells) == 1 * 5 * 2 * 2 == 20
    assert _set(cells, "model") == {"gpt3_2p7b"} and _set(cells, "attention") == {"ring", "attn2d"}
    assert {c.info["world_size"] for c in cells} == {16, 64}
    speedup_dirs = {c.run_dir for c in paper.experiments["a100_speedup"]}
    assert all(c.shared and c.home == "a100_speedup" and c.run_dir in speedup_dirs for c in cells)
    assert len(paper.jobs) == 90 + 30  # its cells add no job


def test_h100_is_64_gpus_on_64_nodes(paper):
    cells = paper.experiments["h100_speedup"]
    assert len(cells) == 3 * 5 * 1 * 2 == 30
    assert _set(cells, "attention") == {"ring", "attn2d"} and sorted(_set(cells, "seq_len")) == SEQS
    for c in cells:
        r = c.resources
        assert (r.ranks, r.nodes, r.tasks_per_node, r.gpus_per_node, r.gpus) == (64, 64, 1, 1, 64)
        assert r.launcher == "slurm_h100" and not c.shared


def test_local_reproduction_is_small(local):
    cells = local.experiments["local_speedup"]
    assert _set(cells, "model") == {"tiny"}
    assert {(c.info["rows"], c.info["cols"]) for c in cells} >= {(2, 2), (3, 3)}
    assert len(cells) == len(_set(cells, "seq_len")) * len({c.info["grid"] for c in cells}) * 3
    assert all(c.resources.local and c.resources.nodes == 1 and c.resources.tasks_per_node == c.resources.ranks
               for c in cells)
    assert all(c.info["device"] == "cpu" for c in cells)
    tps = local.experiments["local_time_per_step"]
    assert _set(tps, "attention") == {"ring", "attn2d"} and all(c.shared for c in tps)
    comm = local.experiments["local_comm_bytes"]  # P = 4, 9 from local_speedup's runs, P = 16 its own
    assert {c.info["world_size"] for c in comm} == {4, 9, 16} and len(comm) == 6
    assert {c.info["world_size"] for c in comm if not c.shared} == {16}
    assert len(local.jobs) == len(cells) + 2


def test_sweep_overrides_restrict_the_cells():
    p = C.plan(["a100_speedup"], conf_dir=CONF_DIR, launcher="slurm",
               sweep="model=gpt3_2p7b benchmark.seq_len=8192,16384,32768")
    cells = p.experiments["a100_speedup"]
    assert len(cells) == 1 * 3 * 2 * 3
    assert _set(cells, "model") == {"gpt3_2p7b"} and sorted(_set(cells, "seq_len")) == SEQS[:3]
    # per experiment: only a100_speedup is restricted
    p = C.plan(["a100_speedup", "h100_speedup"], conf_dir=CONF_DIR, launcher="slurm",
               sweep={"a100_speedup": "grid=8x8"})
    assert len(p.experiments["a100_speedup"]) == 45 and len(p.experiments["h100_speedup"]) == 30


def test_launcher_choice_and_launcher_overrides():
    p = C.plan(["a100_speedup"], conf_dir=CONF_DIR, launcher="slurm", sweep="model=gpt3_760m benchmark.seq_len=8192",
               overrides="hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=8 benchmark.steps=4")
    cells = p.experiments["a100_speedup"]
    r64 = next(c.resources for c in cells if c.info["world_size"] == 64)
    assert (r64.partition, r64.gpus_per_node, r64.nodes, r64.tasks_per_node) == ("gpu", 8, 8, 8)
    cmd = p.command(cells[0], python="python")
    assert "benchmark.steps=4" in cmd and "hydra.launcher" not in cmd  # where it runs is not what it is
    assert p.launcher_args(cells[0]) == ["hydra/launcher=slurm_a100", "hydra.launcher.partition=gpu",
                                         "hydra.launcher.gpus_per_node=8"]
    # a local experiment under "slurm" runs on the CPU Slurm launcher; a named launcher is used for every cell
    assert {c.resources.launcher for c in C.plan(["local_speedup"], conf_dir=CONF_DIR, launcher="slurm")
            .experiments["local_speedup"]} == {"slurm_cpu"}
    assert C.resolve_launcher("local_cpu", "slurm_a100") == "local_cpu"
    with pytest.raises(C.PlanError, match="launcher"):
        C.plan(["local_speedup"], conf_dir=CONF_DIR, overrides="hydra/launcher=slurm_a100")


def test_cell_names_are_hydras_override_dirname_and_commands_name_the_run_dir(paper):
    c = paper.experiments["a100_speedup"][0]
    assert c.name == ",".join(sorted(c.point))  # Hydra's override_dirname: sorted key=value, comma-joined
    assert re.fullmatch(r"attention=\w+,benchmark\.seq_len=\d+,grid=\dx\d,model=\w+", c.name)
    cmd = paper.command(c, python="python")
    assert cmd.startswith("python -m attn2d.train -m experiment=a100_speedup ")
    assert f"hydra.sweep.dir='{c.run_dir}'" in cmd.replace("'\"'\"'", "'")


def test_default_experiment_sets():
    assert set(C.default_experiments(CONF_DIR, paper=True)) == {"a100_speedup", "a100_time_per_step", "h100_speedup"}
    local = C.default_experiments(CONF_DIR, paper=False)
    assert set(local) == {"local_speedup", "local_time_per_step", "local_comm_bytes"}


def test_unknown_experiment_names_the_known_ones():
    with pytest.raises(C.PlanError, match="a100_speedup"):
        C.plan(["a100_speedupp"], conf_dir=CONF_DIR)


def test_a_shared_cell_has_the_same_home_whatever_the_selection():
    alone = C.plan(["a100_time_per_step"], conf_dir=CONF_DIR, launcher="slurm")
    cells = alone.experiments["a100_time_per_step"]
    assert len(cells) == 20 and {c.home for c in cells} == {"a100_speedup"}
    assert {c.run_dir for c in cells} <= {c.run_dir for c in C.plan(["a100_speedup"], conf_dir=CONF_DIR,
                                                                      launcher="slurm").experiments["a100_speedup"]}
    # a point that a100_speedup does not sweep (4096) is a100_time_per_step's own
    changed = C.plan(["a100_time_per_step"], conf_dir=CONF_DIR, launcher="slurm", sweep="benchmark.seq_len=4096")
    assert {c.home for c in changed.experiments["a100_time_per_step"]} == {"a100_time_per_step"}


def test_a_jobs_command_and_header_do_not_depend_on_the_selection():
    """Snakemake re-runs a cell when its params change; a shared cell's must be the same whichever experiments
    are selected, or selecting another experiment would re-run finished cells."""
    alone = C.plan(["a100_time_per_step"], conf_dir=CONF_DIR, launcher="slurm")
    both = C.plan(["a100_time_per_step", "a100_speedup"], conf_dir=CONF_DIR, launcher="slurm")
    home = C.plan(["a100_speedup"], conf_dir=CONF_DIR, launcher="slurm")
    for run_dir, job in alone.jobs.items():
        for other in (both, home):
            twin = other.jobs[run_dir]
            assert other.command(twin) == alone.command(job)
            assert other.job_info(twin) == alone.job_info(job)
            assert alone.job_info(job)["experiment"] == "a100_speedup"


def test_gpu_check_script_commands_compose_and_validate():
    """benchmarks/gpu_checks.sh (for users with a GPU; never run here): its training commands compose and
    validate, and the 760M run takes its MFU peak from the H100 profile."""
    text = (CONF_DIR.parent / "benchmarks" / "gpu_checks.sh").read_text().replace("\\\n", " ")
    runs = [shlex.split(line.replace('"$hw"', "h100_1gpn").replace('"$out', '"/tmp/x'))[3:]
            for line in text.splitlines() if line.startswith("python -m attn2d.train")]
    assert len(runs) == 2, runs
    for overrides in runs:
        cfg = compose([o for o in overrides if not o.startswith("hydra.")])
        validate(cfg)
        assert cfg.benchmark.device == "cuda" and cfg.benchmark.dtype == "bfloat16", overrides
    big = compose([o for o in runs[1] if not o.startswith("hydra.")])
    assert (big.model.name, big.benchmark.seq_len, big.grid.rows * big.grid.cols) == ("gpt3_760m", 8192, 1)
    assert big.benchmark.peak_tflops == 989.0


def test_reported_entries_are_checked_and_only_paper_speedups_have_them(paper, local):
    """`experiment.reported` (what the paper states, drawn on the speedup figures): the A100 and H100 maxima at
    64 GPUs; a malformed entry is an error naming the file."""
    assert [(r["gpus"], r["speedup_max"]) for r in paper.meta["a100_speedup"].reported] == [(64, 5.0)]
    assert [(r["gpus"], r["speedup_max"]) for r in paper.meta["h100_speedup"].reported] == [(64, 9.4)]
    assert all(m.reported == () for m in local.meta.values())  # nothing the paper reports at CPU scale
    with pytest.raises(ValueError, match=r"conf/experiment/x.yaml: experiment.reported entry .*'gpus': '64'"):
        checks.reported_entries("x", OmegaConf.create([{"gpus": "64", "speedup_max": 5, "what": "w"}]))
    with pytest.raises(ValueError, match=r"must be a list"):
        checks.reported_entries("x", OmegaConf.create({"gpus": 64}))
