"""Launchers and profiles: the job shapes of the paper's experiments, command-line overrides, per-grid shaping of
one sweep, and the Snakemake profiles. No Slurm needed (tests/test_slurm.py runs a real one-node cluster)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from attn2d.config import compose
from attn2d.records import read_record
from attn2d.slurm import launcher_params, sbatch_flags, sbatch_script, slurm_nodes, slurm_tasks_per_node

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# The paper's hardware (paper-notes.md, Sec. 5): A100 nodes with 4 GPUs (16 GPUs = 4 nodes, 64 GPUs = 16 nodes),
# H100 nodes with ONE GPU (64 GPUs = 64 nodes). ranks -> (nodes, tasks per node = GPUs per node).
PAPER_SHAPES = {
    "a100": {16: (4, 4), 64: (16, 4)},
    "h100": {64: (64, 1)},
}
PAPER_EXPERIMENTS = {"a100_speedup": "a100", "a100_time_per_step": "a100", "h100_speedup": "h100"}


def _experiment_launchers() -> dict[str, str]:
    """experiment name -> its own hydra/launcher option."""
    out = {}
    for f in sorted((CONF / "experiment").glob("*.yaml")):
        cfg = compose([f"experiment={f.stem}"], return_hydra_config=True)
        out[f.stem] = str(cfg.hydra.runtime.choices["hydra/launcher"])
    return out


def _grids(experiment: str) -> list[str]:
    cfg = compose([f"experiment={experiment}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params or {}, resolve=False)
    return [g.strip() for g in str(params.get("grid", cfg.hydra.runtime.choices["grid"])).split(",")]


def test_node_and_task_resolvers():
    assert (slurm_nodes(4, 4, 4), slurm_tasks_per_node(4, 4, 4)) == (4, 4)
    assert (slurm_nodes(8, 8, 4), slurm_tasks_per_node(8, 8, 4)) == (16, 4)
    assert (slurm_nodes(8, 8, 1), slurm_tasks_per_node(8, 8, 1)) == (64, 1)
    assert (slurm_nodes(1, 2, 4), slurm_tasks_per_node(1, 2, 4)) == (1, 2)  # smaller than one node
    with pytest.raises(ValueError, match=r"grid 2x3 has 6 ranks.*nodes of 4 GPUs.*6 % 4 = 2"):
        slurm_nodes(2, 3, 4)


def test_every_slurm_experiment_is_a_paper_experiment_on_its_hardware():
    launchers = _experiment_launchers()
    slurm = {name: l for name, l in launchers.items() if l.startswith("slurm_")}
    assert slurm == {name: f"slurm_{hw}" for name, hw in PAPER_EXPERIMENTS.items()}, (
        "an experiment on a Slurm launcher must be listed in PAPER_EXPERIMENTS with its hardware")


@pytest.mark.parametrize("experiment", sorted(PAPER_EXPERIMENTS))
def test_paper_experiment_sbatch_shape(experiment):
    """The sbatch script of every grid of a paper experiment asks for the paper's nodes x GPUs."""
    hw = PAPER_EXPERIMENTS[experiment]
    grids = _grids(experiment)
    assert {int(g.split("x")[0]) * int(g.split("x")[1]) for g in grids} == set(PAPER_SHAPES[hw])
    for g in grids:
        rows, cols = map(int, g.split("x"))
        nodes, per_node = PAPER_SHAPES[hw][rows * cols]
        cfg = compose([f"experiment={experiment}", f"grid={g}"], return_hydra_config=True)
        flags = sbatch_flags(sbatch_script(launcher_params(cfg)))
        assert flags["partition"] == hw
        assert (int(flags["nodes"]), int(flags["ntasks-per-node"]), int(flags["gpus-per-node"])) == (
            nodes, per_node, per_node), f"{experiment} grid {g}: {flags}"
        assert "requeue" in flags and flags["signal"].startswith("USR2@"), flags  # pre-emption -> requeue
        assert "exclusive" in flags  # timings on whole nodes


def test_launcher_keys_are_overridable_from_the_command_line():
    cfg = compose(["experiment=a100_speedup", "grid=8x8", "hydra.launcher.gpus_per_node=8",
                   "hydra.launcher.partition=gpu", "hydra.launcher.account=proj123", "hydra.launcher.timeout_min=90",
                   "hydra.launcher.qos=high", "hydra.launcher.setup=[module load cuda]"], return_hydra_config=True)
    script = sbatch_script(launcher_params(cfg))
    flags = sbatch_flags(script)
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("8", "8", "8")  # 64 ranks / 8
    assert (flags["partition"], flags["account"], flags["time"], flags["qos"]) == ("gpu", "proj123", "90", "high")
    assert "\nmodule load cuda\n" in script


def test_local_and_cpu_launchers_take_one_rank_per_grid_cell():
    for grid, ranks in (("2x2", 4), ("3x3", 9), ("1x2", 2)):
        local = launcher_params(compose([f"grid={grid}", "hydra/launcher=local_cpu"], return_hydra_config=True))
        assert (local["nodes"], local["tasks_per_node"], local["gpus_per_node"]) == (1, ranks, 0)
        cpu = compose([f"grid={grid}", "hydra/launcher=slurm_cpu"], return_hydra_config=True)
        flags = sbatch_flags(sbatch_script(launcher_params(cpu)))
        assert (flags["partition"], flags["nodes"], flags["ntasks-per-node"]) == ("cpu", "1", str(ranks))
        assert "gpus-per-node" not in flags


def test_misfit_grid_is_refused_when_composed():
    with pytest.raises(Exception, match=r"grid 2x3 has 6 ranks"):
        launcher_params(compose(["grid=2x3", "hydra/launcher=slurm_a100"], return_hydra_config=True))


def _fake_slurm(tmp_path: Path) -> tuple[dict, Path]:
    """PATH with a fake `sbatch` (keeps each script, answers like Slurm) and a placeholder `srun` (submitit only
    checks that it exists)."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(
        '#!/bin/bash\nid=$((900000 + $(ls "$FAKE_SBATCH_DIR" | wc -l)))\n'
        'cp "$1" "$FAKE_SBATCH_DIR/$id.sh"\necho "Submitted batch job $id"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SBATCH_DIR": str(scripts)}
    return env, scripts


@pytest.mark.parametrize("experiment", sorted(PAPER_EXPERIMENTS))
def test_real_launcher_submits_one_job_shape_per_grid(experiment, tmp_path):
    """`python -m attn2d.train -m experiment=X` through the real Hydra launcher, with a fake sbatch on PATH: one
    sweep over the experiment's grids submits one script per grid, each with the paper's shape."""
    hw, grids = PAPER_EXPERIMENTS[experiment], _grids(experiment)
    env, scripts = _fake_slurm(tmp_path)
    cmd = [sys.executable, "-m", "attn2d.train", "-m", f"experiment={experiment}", "model=gpt3_760m",
           "benchmark.seq_len=8192", "attention=ring", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 90
        while len(list(scripts.iterdir())) < len(grids) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # a wrong launcher would submit more
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # it waits on jobs that will never run
        out = proc.communicate()[0].decode(errors="replace")
    shapes = sorted((int(f["nodes"]), int(f["ntasks-per-node"]), int(f["gpus-per-node"]), f["partition"])
                    for f in (sbatch_flags(p.read_text()) for p in scripts.iterdir()))
    expected = sorted((n, t, t, hw) for n, t in (PAPER_SHAPES[hw][int(g.split("x")[0]) * int(g.split("x")[1])]
                                                 for g in grids))
    assert shapes == expected, out[-3000:]
    names = sorted(sbatch_flags(p.read_text())["job-name"] for p in scripts.iterdir())  # squeue names the cell
    assert names == sorted(f"a2d:{experiment}:ring:{g}:8192:gpt3_760m" for g in grids), names


def test_one_local_sweep_runs_each_grid_with_its_own_world(tmp_path):
    """-m grid=1x2,2x2 with local_cpu: the plugin alone would start the first grid's 2 ranks for both."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "attn2d.train", "-m", "experiment=smoke_cpu", "attention=attn2d", "grid=1x2,2x2",
           "benchmark.seq_len=48", "benchmark.steps=1", "benchmark.progress=false", "hydra/launcher=local_cpu",
           f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${grid.rows}x${grid.cols}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = {}
    for grid, world in (("1x2", 2), ("2x2", 4)):
        rec = recs[grid] = read_record(sweep / grid / "metrics.jsonl")
        assert rec.ok and rec.cell["world_size"] == world, rec.cell
        # where it ran: the header's job key and the job file the launcher wrote at submission agree
        job, submitted = rec.header["job"], json.loads((sweep / grid / "job.json").read_text())
        assert (job["launcher"], job["scheduler"], job["partition"]) == ("local_cpu", "local", None), job
        assert job["job_id"] == submitted["job_id"] and job["job_name"] == f"a2d:smoke_cpu:attn2d:{grid}:48:tiny"
        assert job["launcher_params"]["tasks_per_node"] == world and Path(submitted["stderr"]).is_file()
    # the local launcher runs the points one after the other (second-resolution timestamps: <=, not <)
    assert recs["1x2"].end["finished_at"] <= recs["2x2"].header["started_at"], (recs["1x2"].end, recs["2x2"].header)


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_every_profile_key_is_commented(profile):
    for name in ("config.yaml", "workflow.yaml"):
        text = (REPO / "cluster_profiles" / profile / name).read_text()
        keys = yaml.safe_load(text)
        assert keys, name
        for line in text.splitlines():
            m = re.match(r"^([\w-]+):", line)
            if m:
                assert "#" in line, f"cluster_profiles/{profile}/{name}: key {m.group(1)} has no comment"
        if name == "config.yaml":
            assert keys["executor"] == "local" and keys["configfile"] == f"cluster_profiles/{profile}/workflow.yaml"


def test_literal_slurm_profile_name_resolves_to_cluster_profiles():
    """`snakemake --profile slurm` looks for ./slurm first (tooling-notes Sec. 1): the committed link."""
    link = REPO / "slurm"
    assert link.is_symlink() and os.readlink(link) == "cluster_profiles/slurm"
    assert (link / "config.yaml").is_file()
    assert yaml.safe_load((REPO / "cluster_profiles/slurm/workflow.yaml").read_text())["launcher"] == "slurm"
    assert yaml.safe_load((REPO / "cluster_profiles/local/workflow.yaml").read_text())["launcher"] == "local_cpu"


def test_pixi_manifest_has_the_environments_tasks_and_packages_of_pyproject():
    import tomllib

    pixi = tomllib.loads((REPO / "pixi.toml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert pixi["environments"] == {"default": ["cpu"], "cuda": ["cuda"]}
    tasks = {**pixi["tasks"], **pixi["feature"]["cuda"]["tasks"]}
    assert tasks["test"] == "python -m pytest -q"  # the README's test command, in the environment's python
    assert tasks["reproduce-local"] == "snakemake --profile cluster_profiles/local"
    assert tasks["reproduce"] == "snakemake --profile slurm"
    experiment = re.search(r"experiment=(\w+)", tasks["smoke-gpu"]).group(1)
    assert (CONF / "experiment" / f"{experiment}.yaml").is_file()
    # every package pyproject.toml names is in pixi.toml (conda-forge names where they differ)
    conda_name = {"torch": ("pytorch-cpu", "pytorch-gpu"), "matplotlib": ("matplotlib-base",)}
    pixi_names = set(pixi["dependencies"]) | set(pixi["pypi-dependencies"])
    for feature in pixi["feature"].values():
        pixi_names |= set(feature.get("dependencies", {}))
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for req in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
        wanted = conda_name.get(name, (name,))
        assert set(wanted) <= pixi_names, f"pyproject.toml requires {req!r}; pixi.toml lacks {wanted}"


def test_readme_set_up_commands_are_what_ci_runs():
    """The README's two set-up commands (install + main job; tests) are the ones .ci/run runs on a fresh machine."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    setup, tests = blocks[0].strip(), blocks[1].strip()
    assert tests == ".venv/bin/python -m pytest -q" and f"\n{tests}\n" in ci
    steps = [s.strip() for s in setup.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[-1] == "snakemake --profile cluster_profiles/local"
    where = []
    for step in steps[1:]:  # activate, the pip lines and the main job (under a timeout in CI), in this order
        m = re.search(rf"^(timeout \S+ )?{re.escape(step)}(\s|$)", ci, flags=re.M)
        assert m, f"README set-up step {step!r} is not run by .ci/run"
        where.append(m.start())
    assert where == sorted(where), "the README's set-up steps run in another order in .ci/run"


def test_gpu_smoke_ci_is_wired_and_parses():
    """.ci/gpu-smoke (for a self-hosted GPU runner; cannot run here): valid bash, run by the GitHub workflow, and it
    runs the smoke experiment, the kernel self-checks and the README's test command."""
    script = REPO / ".ci" / "gpu-smoke"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "attn2d.train experiment=smoke_gpu" in text and "benchmarks/bench_kernels.py --device cuda" in text
    assert "\n.venv/bin/python -m pytest -q\n" in text
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "gpu-smoke.yml").read_text())
    (job,) = workflow["jobs"].values()
    assert "gpu" in job["runs-on"] and any(step.get("run") == "bash .ci/gpu-smoke" for step in job["steps"])


def test_readme_describes_every_figure_the_experiments_draw():
    readme = (REPO / "README.md").read_text()
    for f in sorted((CONF / "experiment").glob("*.yaml")):
        cfg = compose([f"experiment={f.stem}"])
        for kind in OmegaConf.select(cfg, "experiment.figures", default=None) or []:
            assert f"`{f.stem}/{kind}`" in readme, f"README.md's figure table lacks {f.stem}/{kind}"
