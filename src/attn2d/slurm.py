"""Slurm shapes of a cell: the resolvers the launcher configs use, the submitit executor a launcher config makes,
and the sbatch script it would submit.

conf/hydra/launcher/*.yaml derive a job's shape from the grid with three resolvers, registered when this module
is imported (attn2d.config imports it, so `python -m attn2d.train` and `attn2d.config.compose` have them, and so
does the attn2d launcher plugin):

    ${attn2d.world:R,C}                      R*C ranks
    ${attn2d.slurm_nodes:R,C,G}              nodes for R*C ranks at G GPUs (= tasks) per node
    ${attn2d.slurm_tasks_per_node:R,C,G}     tasks on each of those nodes
    ${attn2d.job_name:EXP,ATT,R,C,N,MODEL}   the job's name: a2d:<exp>:<attention>:<R>x<C>:<N>:<model>

so `hydra.launcher.gpus_per_node=8` on the command line reshapes every job, and `squeue` names every cell.

`make_executor` configures submitit exactly as hydra-submitit-launcher 1.2.0 does (the launchers in
src/hydra_plugins/attn2d_launcher use it for every job shape). `sbatch_script(params)` renders the batch script
submitit would hand to `sbatch` for one job of a launcher config, without Slurm: tests and `.ci/run` check nodes,
tasks, GPUs and partition of every paper experiment with it.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import submitit
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

_BASE_KEYS = frozenset(OmegaConf.structured(BaseQueueConf).keys())  # submitit's generic parameter names
_INIT_KEYS = frozenset({"max_num_timeout"})  # given to the executor's constructor, not update_parameters


def world(rows: int, cols: int) -> int:
    """Ranks of a rows x cols grid."""
    return int(rows) * int(cols)


def _check_fill(rows: int, cols: int, per_node: int) -> int:
    w, g = world(rows, cols), int(per_node)
    if g < 1:
        raise ValueError(f"gpus_per_node must be at least 1 for a GPU launcher, got {g}")
    if w > g and w % g:
        raise ValueError(
            f"grid {rows}x{cols} has {w} ranks, which do not fill whole nodes of {g} GPUs "
            f"({w} % {g} = {w % g}); use a grid whose size is a multiple of {g}, or at most {g}"
        )
    return w


def slurm_nodes(rows: int, cols: int, per_node: int) -> int:
    """Nodes for a rows x cols grid with one rank per GPU and `per_node` GPUs per node (1 if it fits on one)."""
    w = _check_fill(rows, cols, per_node)
    return max(1, w // int(per_node))


def slurm_tasks_per_node(rows: int, cols: int, per_node: int) -> int:
    """Ranks (Slurm tasks) on each node: `per_node`, or the whole grid when it is smaller than one node."""
    w = _check_fill(rows, cols, per_node)
    return min(w, int(per_node))


_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.+=-]")


def job_name(experiment, attention, rows, cols, seq_len, model) -> str:
    """`a2d:<exp>:<attention>:<rows>x<cols>:<seq_len>:<model>`, each part reduced to characters safe in a Slurm job
    name (others become `_`), at most 128 characters."""
    parts = [str(experiment), str(attention), f"{rows}x{cols}", str(seq_len), str(model)]
    return ":".join(["a2d", *(_NAME_CHARS.sub("_", p) for p in parts)])[:128]


RESOLVERS = {
    "attn2d.world": world,
    "attn2d.slurm_nodes": slurm_nodes,
    "attn2d.slurm_tasks_per_node": slurm_tasks_per_node,
    "attn2d.job_name": job_name,
}


def register_resolvers() -> None:
    """Register the launcher resolvers with OmegaConf (idempotent)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


@dataclass(frozen=True)
class JobShape:
    """What a job asks for: `nodes` nodes, `tasks_per_node` ranks and `gpus_per_node` GPUs (0: CPU) on each."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def job_shape(launcher: Mapping[str, Any]) -> JobShape:
    """The shape of the job a `hydra.launcher` node (resolved, e.g. launcher_params) starts; a launcher without
    nodes (a local one) runs on one node, one without GPUs on none."""
    return JobShape(nodes=int(launcher.get("nodes") or 1), tasks_per_node=int(launcher.get("tasks_per_node") or 1),
                    gpus_per_node=int(launcher.get("gpus_per_node") or 0))


def launcher_params(cfg: DictConfig) -> dict[str, Any]:
    """`hydra.launcher` of a config composed with the hydra node, resolved, without `_target_`: the keyword
    arguments the launcher is built with."""
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert isinstance(params, dict)
    params.pop("_target_", None)
    return params


def launcher_world_size(cfg: DictConfig) -> int | None:
    """Ranks the launcher will start (hydra.launcher.tasks_per_node * nodes), if the config says."""
    launcher = OmegaConf.select(cfg, "hydra.launcher", default=None)
    if launcher is None or "tasks_per_node" not in launcher:
        return None
    return job_shape(launcher).ranks


def make_executor(cluster: str, params: dict[str, Any]):
    """A submitit executor for `cluster` ("slurm" | "local") configured as hydra-submitit-launcher 1.2.0's
    `launch` configures it: max_num_timeout at construction, BaseQueueConf keys as generic submitit parameters,
    every other key prefixed with the cluster name."""
    init = {f"{cluster}_{k}": v for k, v in params.items() if k in _INIT_KEYS}
    executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster=cluster, **init)
    rest = {k: v for k, v in params.items() if k not in _INIT_KEYS | {"submitit_folder"}}
    if rest.get("additional_parameters"):  # a null extra flag (reservation: null) is no flag
        rest["additional_parameters"] = {k: v for k, v in rest["additional_parameters"].items() if v is not None}
    executor.update_parameters(**{k if k in _BASE_KEYS else f"{cluster}_{k}": v for k, v in rest.items()})
    return executor


def sbatch_script(params: dict[str, Any], folder: str | Path | None = None) -> str:
    """The sbatch script submitit would submit for one job of a Slurm launcher with `params` (its
    `submitit_folder`, unless `folder` is given). No Slurm needed: submitit's check that `srun` exists is bypassed,
    since nothing is submitted."""
    folder = str(folder if folder is not None else params["submitit_folder"])
    with mock.patch.object(submitit.SlurmExecutor, "affinity", return_value=2):
        inner = make_executor("slurm", {**params, "submitit_folder": folder})._executor
    return inner._make_submission_file_text(inner._submitit_command_str, uid="render")


_SBATCH = re.compile(r"^#SBATCH --([\w-]+)(?:=(.*))?$")


def sbatch_flags(script: str) -> dict[str, str]:
    """The `#SBATCH --key=value` lines of a batch script as {key: value} ("" for a bare flag such as --exclusive)."""
    flags = {}
    for line in script.splitlines():
        m = _SBATCH.match(line.strip())
        if m:
            flags[m.group(1)] = (m.group(2) or "").strip("'\"")
    return flags


def _key(override: str) -> str:
    """The key an override sets: `+a.b=1` -> `a.b`."""
    return override.split("=", 1)[0].lstrip("+~")


def main(argv: list[str] | None = None) -> int:
    """python -m attn2d.slurm [--script] EXPERIMENT [OVERRIDE ...]: the sbatch flags (or whole script) of the job
    of every grid in the experiment's sweep, then the jobs by shape, e.g. `python -m attn2d.slurm a100_speedup
    hydra.launcher.account=x`. An override of a swept key (`grid=4x4`, `attention=ring,attn2d`) replaces its values;
    exit status 1 if a grid cannot be placed on the launcher's nodes."""
    # the CLI sits above composition and the planner, both of which import this module (for its resolvers)
    from attn2d.config import compose
    from attn2d.sweep import sweep_points, sweeper_params  # here: attn2d.sweep -> attn2d.config -> this module

    ap = argparse.ArgumentParser(prog="python -m attn2d.slurm", description=main.__doc__)
    ap.add_argument("--script", action="store_true", help="print the whole batch script")
    ap.add_argument("experiment")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    swept = sweeper_params(compose([f"experiment={args.experiment}"], return_hydra_config=True))
    sweep = [o for o in args.overrides if _key(o) in swept]
    fixed = [o for o in args.overrides if _key(o) not in swept]
    if "grid" not in swept:  # a fixed grid= is the only grid
        grid_ovr = [o for o in fixed if _key(o) == "grid"]
        swept["grid"] = grid_ovr[-1].split("=", 1)[1] if grid_ovr else None
        fixed = [o for o in fixed if _key(o) != "grid"]
    if swept["grid"] is None:
        swept["grid"] = str(compose([f"experiment={args.experiment}", *fixed],
                                    return_hydra_config=True).hydra.runtime.choices["grid"])
    points = sweep_points(swept, sweep)
    per_grid = Counter(dict(o.split("=", 1) for o in p)["grid"] for p in points)
    shapes: Counter = Counter()
    bad = []
    for grid, n_cells in per_grid.items():
        try:
            cfg = compose([f"experiment={args.experiment}", *fixed, f"grid={grid}"], return_hydra_config=True)
            params = launcher_params(cfg)
        except Exception as e:  # noqa: BLE001 - a grid the launcher's nodes cannot hold, said in one line
            msg = str(e).splitlines()[0]
            cause = e.__cause__ or e.__context__
            while cause is not None and isinstance(cause, Exception):
                msg = str(cause).splitlines()[0] or msg
                cause = cause.__cause__ or cause.__context__
            bad.append(grid)
            print(f"{args.experiment} grid={grid}: cannot be placed: {msg}")
            continue
        launcher = cfg.hydra.runtime.choices["hydra/launcher"]
        if not str(cfg.hydra.launcher._target_).endswith("SlurmLauncher"):
            print(f"{args.experiment} grid={grid}: {launcher} runs {params['tasks_per_node']} local processes")
            shapes[f"local, {params['tasks_per_node']} processes"] += n_cells
            continue
        script = sbatch_script(params)
        if args.script:
            print(f"# {args.experiment} grid={grid} ({launcher})\n{script}")
        else:
            keys = ("partition", "account", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time",
                    "qos", "constraint", "reservation", "exclusive", "requeue", "signal")
            flags = sbatch_flags(script)
            shown = " ".join(f"--{k}" + (f"={flags[k]}" if flags[k] else "") for k in keys if k in flags)
            if "account" not in flags:
                shown += " account: none (cluster default)"
            print(f"{args.experiment} grid={grid} ({launcher}, {n_cells} jobs): {shown}")
        js = job_shape(params)
        shapes[f"{js.nodes} nodes x {js.tasks_per_node} tasks x {js.gpus_per_node} GPUs, partition "
               f"{params.get('partition')}"] += n_cells
    total = sum(shapes.values())
    print(f"jobs by shape ({total} jobs, {len(points)} cells):")
    for shape, n in shapes.items():
        print(f"  {shape}: {n}")
    if bad:
        print(f"grids that cannot be placed: {', '.join(bad)} (nothing would be submitted for them)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
