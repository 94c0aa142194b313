"""Experiment -> cells: the one place that turns `conf/experiment/<name>.yaml` into the runs of the workflow.

A *cell* is one point of an experiment's Hydra sweep (`hydra.sweeper.params`), e.g. model=gpt3_2p7b,
benchmark.seq_len=8192, grid=4x4, attention=ring: one training run, one Slurm job, one record
`runs/<experiment>/<cell>/metrics.jsonl`. The cells are expanded as Hydra's basic sweeper expands them (the
cartesian product of every override's values, keys in order), so `python -m attn2d.train -m experiment=X` and the
Snakemake workflow run the same points, and a cell's name is Hydra's `override_dirname` of its sweep point
(sorted `key=value`, comma-joined).

Shared cells: an experiment that includes another (a100_time_per_step includes a100_speedup) has cells whose
config is identical to cells of the other. Such a cell is run once, in the run dir of its `home` (the experiment
with the largest sweep that runs it, see `plan`); every experiment's table reads that record. "Identical" means:
same sweep point, same launcher, and the same composed config apart from `experiment_name`, the `experiment`
metadata and the swept keys.

Resources of a cell (its job shape, partition, account, time limit) are read from the composed `hydra.launcher`
of the cell's grid (conf/hydra/launcher/*.yaml derive nodes from the grid), so the Snakemake dry run shows what
the Slurm job will ask for. The checks the plan applies live in attn2d.report.checks.
"""
from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from attn2d import records, slurm
from attn2d.config import compose
from attn2d.report import checks
from attn2d.report.checks import PlanError
from attn2d.report.collect import BASELINE, CELL_KEYS
from attn2d.sweep import cell_name, point_dict, set_dotted, split_overrides, sweep_points, sweeper_params

SLURM = "slurm"  # launcher choice meaning "each experiment's own Slurm launcher"
LOCAL_TO_SLURM = {"local_cpu": "slurm_cpu"}  # what a local experiment uses under launcher=slurm


@dataclass(frozen=True)
class Resources(slurm.JobShape):
    """What one cell's job asks of the scheduler (from the resolved `hydra.launcher`): its shape, and where."""

    launcher: str  # hydra/launcher option, e.g. slurm_a100
    local: bool  # submitit local executor (runs on this machine)
    partition: str  # "" where the launcher has none
    account: str  # "" where the launcher leaves it to Slurm
    timeout_min: int
    params: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)  # resolved hydra.launcher


@dataclass(frozen=True)
class Cell:
    """One run of one experiment: its sweep point, where its record lives, what its job needs."""

    experiment: str  # the experiment (table) listing this cell
    name: str  # Hydra override_dirname of the sweep point
    point: tuple[str, ...]  # the sweep point as Hydra overrides, e.g. ("model=gpt3_760m", ...)
    home: str  # the experiment whose run dir holds the record (== experiment unless shared)
    info: Mapping[str, Any] = field(hash=False, compare=False)  # model, attention, rows, cols, seq_len, ...
    resources: Resources = field(hash=False, compare=False)

    @property
    def run_dir(self) -> str:
        return f"runs/{self.home}/{self.name}"

    @property
    def record(self) -> str:
        return f"{self.run_dir}/metrics.jsonl"

    @property
    def shared(self) -> bool:
        return self.home != self.experiment


@dataclass(frozen=True)
class Experiment:
    """What an experiment file says about itself: its `experiment:` metadata and its cost-model profile."""

    name: str
    reproduces: str
    figures: tuple[str, ...]  # figure kinds drawn from its table (attn2d.report.figures.KINDS)
    hardware: str  # cost-model profile (conf/hardware option) of the hardware it was designed for
    launcher: str  # the hydra/launcher option its cells run with here
    reported: tuple[dict, ...] = ()  # what the paper states of its figure: {gpus, speedup_max, what}


@dataclass
class Plan:
    """The cells of several experiments; `jobs` holds one cell per distinct run dir (the Snakemake jobs)."""

    launcher: str
    task_overrides: tuple[str, ...]  # fixed overrides for every cell (not part of a cell's name)
    launcher_overrides: tuple[str, ...]  # hydra.launcher.* overrides for every cell
    experiments: dict[str, list[Cell]] = field(default_factory=dict)
    meta: dict[str, Experiment] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the plan-time checks could not check, and why

    @property
    def jobs(self) -> dict[str, Cell]:
        out: dict[str, Cell] = {}
        for cells in self.experiments.values():
            for c in cells:
                out.setdefault(c.run_dir, c)
        return out

    @staticmethod
    def job_info(cell: Cell) -> dict[str, Any]:
        """The header fields of the run a cell's job makes (experiment = its home, whichever experiment asked for
        it; without the job shape, which belongs to where it runs): the same whatever the selection."""
        return {**{k: v for k, v in cell.info.items() if k not in ("nodes", "gpus_per_node")},
                "experiment": cell.home}

    def command(self, cell: Cell, python: str = "python") -> str:
        """The training command of `cell` without its launcher (what the cell IS; changing it re-runs the cell):
        a one-point Hydra multirun whose run dir is the cell's."""
        args = [python, "-m", "attn2d.train", "-m", f"experiment={cell.home}", *sorted(cell.point),
                *self.task_overrides,
                f"hydra.sweep.dir='{cell.run_dir}'", "hydra.sweep.subdir=."]  # quoted: the name has = and ,
        return shlex.join(args)

    def launcher_args(self, cell: Cell) -> list[str]:
        """Where the cell runs: hydra/launcher=<option> and the hydra.launcher.* overrides (Hydra's submitit
        launcher submits the job and blocks until it ends)."""
        return [f"hydra/launcher={cell.resources.launcher}", *self.launcher_overrides]


def cells_rows(cells: Iterable[Cell]) -> list[dict[str, Any]]:
    """The cells as table rows: name, run dir, shared or not, header fields, job shape."""
    rows = []
    for c in cells:
        r = c.resources
        rows.append({"experiment": c.experiment, "cell": c.name, "run_dir": c.run_dir, "home": c.home,
                     **{k: v for k, v in c.info.items() if k != "experiment"}, "gpus": r.ranks,
                     "launcher": r.launcher, "partition": r.partition, "account": r.account,
                     "tasks_per_node": r.tasks_per_node, "timeout_min": r.timeout_min})
    return rows


def experiment_names(conf_dir: str | Path) -> list[str]:
    return sorted(p.stem for p in (Path(conf_dir) / "experiment").glob("*.yaml"))


def _is_local(cfg: DictConfig) -> bool:
    return str(OmegaConf.select(cfg, "hydra.launcher._target_", default="")).endswith("LocalLauncher")


def experiment_config(conf_dir: str | Path, experiment: str, overrides: Iterable[str] = ()) -> DictConfig:
    """The config `python -m attn2d.train experiment=<experiment> <overrides>` runs, hydra node included."""
    return compose(list(overrides), return_hydra_config=True, experiment=experiment, conf_dir=conf_dir)


def default_experiments(conf_dir: str | Path, paper: bool) -> list[str]:
    """The experiments that reproduce a figure (`experiment.figures` not empty): with paper=True those whose own
    launcher is a Slurm one (the paper's hardware), else those whose own launcher is local (CPU scale)."""
    out = []
    for name in experiment_names(conf_dir):
        cfg = experiment_config(conf_dir, name)
        figures = OmegaConf.select(cfg, "experiment.figures", default=None)
        if figures and _is_local(cfg) != paper:
            out.append(name)
    return out


def resolve_launcher(choice: str, own: str) -> str:
    """The hydra/launcher option a cell runs with: `choice` ("slurm" = the experiment's own Slurm launcher, a
    local one mapped to its Slurm twin) or any launcher option name, used for every cell."""
    if choice == SLURM:
        return LOCAL_TO_SLURM.get(own, own)
    return choice


def resources(cfg: DictConfig, launcher: str) -> Resources:
    """A cell's job from the resolved `hydra.launcher` of a config composed for that cell's grid."""
    params = slurm.launcher_params(cfg)
    shape = slurm.job_shape(params)
    ranks = int(cfg.grid.rows) * int(cfg.grid.cols)
    if shape.ranks != ranks:
        raise PlanError(f"launcher {launcher} asks for nodes={shape.nodes} x tasks_per_node={shape.tasks_per_node} "
                        f"= {shape.ranks} tasks, but grid {cfg.grid.rows}x{cfg.grid.cols} has {ranks} ranks; "
                        "they must be equal")
    return Resources(
        nodes=shape.nodes,
        tasks_per_node=shape.tasks_per_node,
        gpus_per_node=shape.gpus_per_node,
        launcher=launcher,
        local=_is_local(cfg),
        partition=str(params.get("partition") or ""),
        account=str(params.get("account") or ""),
        timeout_min=int(params.get("timeout_min") or 0),
        params=params,
    )


def _fingerprint(cfg: DictConfig, swept: Iterable[str], launcher: str) -> str:
    """What makes two experiments' cells the same run: the composed config without hydra, experiment_name, the
    `experiment` metadata and the swept keys (a swept group removes its whole node), plus the launcher."""
    c = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(c, dict)
    c.pop("hydra", None)
    c.pop("experiment_name", None)
    c.pop("experiment", None)  # metadata: what the experiment reproduces and draws
    for key in swept:
        node, *path = key.lstrip("+~").split(".")
        if not path:
            c.pop(node, None)
            continue
        d = c.get(node)
        for p in path[:-1]:
            d = d.get(p) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(path[-1], None)
    return json.dumps([launcher, c], sort_keys=True, default=str)


def _info(cfg: DictConfig, experiment: str, point: dict[str, str], res: Resources) -> dict[str, Any]:
    """The cell's header fields (as the record contract names them), read from the config composed for its grid
    and the sweep point (group choices by option name)."""
    choices = cfg.hydra.runtime.choices
    b = cfg.benchmark
    return records.cell(
        experiment=experiment, model=point.get("model", choices.get("model")),
        attention=point.get("attention", choices.get("attention")), grid=point.get("grid", choices.get("grid")),
        rows=int(cfg.grid.rows), cols=int(cfg.grid.cols), world_size=res.ranks, nodes=res.nodes,
        gpus_per_node=res.gpus_per_node, seq_len=int(point.get("benchmark.seq_len", b.seq_len)),
        batch_size=int(point.get("benchmark.batch_size", b.batch_size)),
        dtype=str(point.get("benchmark.dtype", b.dtype)), device=str(point.get("benchmark.device", b.device)))


@dataclass
class _Sweep:
    """An experiment's base config, launcher and sweep points, as the plan needs them."""

    base: DictConfig
    launcher: str
    points: list[tuple[str, ...]]  # with the user's sweep overrides (selected experiments)
    size: int  # cells of its own sweep, without overrides (orders the homes)
    fingerprint: str
    task_overrides: tuple[str, ...] = ()  # the plan's overrides less those with unknown keys (already reported)


def _sweep(conf_dir: str | Path, exp: str, launcher: str, task_ovr: Sequence[str], user_sweep: Sequence[str],
           problems: list[str]) -> _Sweep | None:
    """The experiment's sweep, its problems appended to `problems` (unknown keys with the nearest valid key; the
    sweep goes on without them so that the cells' own problems are found too), or None if it cannot be expanded."""
    task_ovr, user_sweep = list(task_ovr), list(user_sweep)
    try:
        base = experiment_config(conf_dir, exp, task_ovr)
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors: say which key is wrong
        plain = experiment_config(conf_dir, exp)
        found = checks.key_problems(task_ovr, plain, "override")
        problems.extend(f"experiment {exp}: {m}" for m in found or [f"overrides {' '.join(task_ovr)}: {checks.why(e)}"])
        if not found:
            return None
        task_ovr = [o for o in task_ovr if not checks.key_problems([o], plain, "override")]
        base = experiment_config(conf_dir, exp, task_ovr)
    found = checks.key_problems(user_sweep, base, "sweep")
    problems.extend(f"experiment {exp}: {m}" for m in found)
    if found:
        user_sweep = [o for o in user_sweep if not checks.key_problems([o], base, "sweep")]
    eff = resolve_launcher(launcher, str(base.hydra.runtime.choices.get("hydra/launcher")))
    try:
        points = sweep_points(sweeper_params(base), user_sweep)
    except Exception as e:  # noqa: BLE001 - a sweep value Hydra's grammar refuses
        problems.append(f"experiment {exp}: sweep {' '.join(user_sweep)!r}: {checks.why(e)}")
        return None
    swept = list(point_dict(points[0]).keys()) if points else []
    size = len(sweep_points(sweeper_params(base))) if user_sweep else len(points)
    return _Sweep(base, eff, points, size, _fingerprint(base, swept, eff), tuple(task_ovr))


def plan(
    experiments: Iterable[str],
    *,
    conf_dir: str | Path = "conf",
    launcher: str = "local_cpu",
    sweep: str | Iterable[str] | Mapping[str, Any] | None = None,
    overrides: str | Iterable[str] | None = None,
    check_cells: bool = True,
    check_cluster: bool = False,
) -> Plan:
    """Expand `experiments` into cells (tables keep this order), checking what can be checked before any job runs.

    sweep: Hydra sweep overrides that restrict or extend every selected experiment's sweep ("model=gpt3_2p7b
        benchmark.seq_len=8192,16384"), or {experiment: overrides} for one experiment at a time.
    overrides: fixed overrides for every cell ("benchmark.steps=3"); hydra.launcher.* ones set the Slurm job
        (partition, account, timeout_min, ...) and are not part of what makes a cell.
    check_cells: validate every cell's config (attn2d.config.validate), its name and the speedup baselines.
    check_cluster: ask the cluster (sinfo, sacctmgr) whether the partitions and accounts exist.
    Raises PlanError listing EVERY problem found (unknown keys with the nearest valid one, cells that cannot run,
    ambiguous baselines, partitions the cluster does not have); notes on what was not checked go to `Plan.notes`.

    A cell's home (the run dir holding its record) is, among ALL files of conf/experiment/ that run the same
    config at the same point (selected experiments with the sweep above, the others with their own), the one with
    the largest sweep (then by name): a100_speedup for a100_time_per_step's cells. The same run lands in the same
    place whatever the selection."""
    selected = list(dict.fromkeys(experiments))
    fixed = split_overrides(overrides)
    for o in fixed:
        if o.split("=", 1)[0].lstrip("+~") in ("hydra/launcher", "experiment"):
            raise PlanError(f"override {o!r}: choose the launcher with the workflow's `launcher` key and the "
                            f"experiments with `experiments`, not with an override")
    launcher_ovr = tuple(o for o in fixed if o.lstrip("+~").startswith("hydra."))
    task_ovr = tuple(o for o in fixed if not o.lstrip("+~").startswith("hydra."))
    result = Plan(launcher=launcher, task_overrides=task_ovr, launcher_overrides=launcher_ovr)
    if not selected:
        return result

    known = experiment_names(conf_dir)
    for exp in sorted(set(selected) - set(known)):
        raise PlanError(checks.unknown_experiment(Path(conf_dir).resolve(), exp, known))
    problems: list[str] = []
    per_cell: dict[str, list[str]] = {}  # problem -> the cells that have it
    sweeps: dict[str, _Sweep] = {}
    for exp in known:
        user = split_overrides(sweep.get(exp) if isinstance(sweep, Mapping) else sweep) if exp in selected else []
        found: list[str] = []
        sw = _sweep(conf_dir, exp, launcher, task_ovr, user, found)
        if exp in selected:
            problems.extend(found)
        if sw is not None and not (found and exp not in selected):
            sweeps[exp] = sw
    homes: dict[tuple[str, tuple[str, ...]], str] = {}  # (fingerprint, point) -> home experiment
    for exp, sw in sorted(sweeps.items(), key=lambda kv: (-kv[1].size, kv[0])):
        for point in sw.points:
            homes.setdefault((sw.fingerprint, tuple(sorted(point))), exp)

    for exp in (e for e in selected if e in sweeps):
        sw = sweeps[exp]
        composed: dict[tuple[str, ...], DictConfig | None] = {}
        lov = list(launcher_ovr)  # less those with unknown keys (reported once)
        if lov:
            plain = experiment_config(conf_dir, exp, [*sw.task_overrides, f"hydra/launcher={sw.launcher}"])
            found = checks.key_problems(lov, plain, "launcher override")
            problems.extend(f"experiment {exp}: {m}" for m in found)
            lov = [o for o in lov if not checks.key_problems([o], plain, "launcher override")]
        cells = []
        for point in sw.points:
            pd = point_dict(point)
            name = cell_name(point)
            groups = tuple(f"{k}={v}" for k, v in pd.items() if "." not in k and (check_cells or k == "grid"))
            if groups not in composed:  # one compose per group choice (the launcher derives the job from the grid)
                ovr = [*sw.task_overrides, *groups, f"hydra/launcher={sw.launcher}"]
                try:
                    composed[groups] = experiment_config(conf_dir, exp, [*ovr, *lov])
                except Exception as e:  # noqa: BLE001 - a group option or launcher value Hydra refuses
                    problems.append(f"experiment {exp}: {' '.join(groups)} {' '.join(lov)}: {checks.why(e)}")
                    composed[groups] = None
            cfg = composed[groups]
            if cfg is None:
                continue
            bad = []
            if check_cells:
                bad += [m for m in [checks.name_problem(name)] if m]
                try:
                    set_dotted(cfg, point)
                    bad += checks.cell_problems(cfg)
                except Exception as e:  # noqa: BLE001 - a value OmegaConf refuses
                    bad.append(checks.why(e))
            try:
                res = resources(cfg, sw.launcher)
            except PlanError as e:
                bad.append(str(e))
            for m in dict.fromkeys(bad):
                per_cell.setdefault(m, []).append(f"{exp}/{name}")
            if bad:
                continue
            home = homes[(sw.fingerprint, tuple(sorted(point)))]
            cells.append(Cell(exp, name, point, home, _info(cfg, exp, pd, res), res))
        if check_cells:
            problems += checks.baseline_problems(exp, cells, CELL_KEYS, BASELINE)
        result.experiments[exp] = cells
        m = sw.base.get("experiment") or {}
        reported = checks.reported_entries(exp, m.get("reported"))
        result.meta[exp] = Experiment(exp, str(m.get("reproduces", "")), tuple(m.get("figures", ())),
                                      str(sw.base.hydra.runtime.choices.get("hardware") or ""), sw.launcher,
                                      reported)
    if check_cluster:
        wanted: dict[str, dict[str, list[str]]] = {"partition": {}, "account": {}}
        for c in result.jobs.values():
            if not c.resources.local:
                for kind, v in (("partition", c.resources.partition), ("account", c.resources.account)):
                    if v:
                        wanted[kind].setdefault(v, []).append(c.run_dir)
        found, result.notes = checks.cluster_problems(wanted)
        problems += found
    if problems or per_cell:
        raise PlanError(checks.report(problems, per_cell))
    return result
