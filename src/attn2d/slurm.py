"""Slurm shapes of a cell: the resolvers the launcher configs use, the submitit executor a launcher config makes,
and the sbatch script it would submit.

conf/hydra/launcher/*.yaml derive a job's shape from the grid with three resolvers, registered when this module
is imported (attn2d.config imports it, so `python -m attn2d.train` and `attn2d.config.compose` have them):

    ${attn2d.world:R,C}                      R*C ranks
    ${attn2d.slurm_nodes:R,C,G}              nodes for R*C ranks at G GPUs (= tasks) per node
    ${attn2d.slurm_tasks_per_node:R,C,G}     tasks on each of those nodes

so `hydra.launcher.gpus_per_node=8` on the command line reshapes every job.

`make_executor` configures submitit exactly as hydra-submitit-launcher 1.2.0 does (the launchers in
src/hydra_plugins/attn2d_launcher use it for every job shape). `sbatch_script(params)` renders the batch script
submitit would hand to `sbatch` for one job of a launcher config, without Slurm: tests and `.ci/run` check nodes,
tasks, GPUs and partition of every paper experiment with it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from unittest import mock

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import DictConfig, OmegaConf

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


RESOLVERS = {
    "attn2d.world": world,
    "attn2d.slurm_nodes": slurm_nodes,
    "attn2d.slurm_tasks_per_node": slurm_tasks_per_node,
}


def register_resolvers() -> None:
    """Register the launcher resolvers with OmegaConf (idempotent)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def launcher_params(cfg: DictConfig) -> dict[str, Any]:
    """`hydra.launcher` of a config composed with the hydra node, resolved, without `_target_`: the keyword
    arguments the launcher is built with."""
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert isinstance(params, dict)
    params.pop("_target_", None)
    return params


def make_executor(cluster: str, params: dict[str, Any]):
    """A submitit executor for `cluster` ("slurm" | "local") configured as hydra-submitit-launcher 1.2.0's
    `launch` configures it: max_num_timeout at construction, BaseQueueConf keys as generic submitit parameters,
    every other key prefixed with the cluster name."""
    import submitit

    init = {f"{cluster}_{k}": v for k, v in params.items() if k in _INIT_KEYS}
    executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster=cluster, **init)
    rest = {k: v for k, v in params.items() if k not in _INIT_KEYS | {"submitit_folder"}}
    executor.update_parameters(**{k if k in _BASE_KEYS else f"{cluster}_{k}": v for k, v in rest.items()})
    return executor


def sbatch_script(params: dict[str, Any], folder: str | Path | None = None) -> str:
    """The sbatch script submitit would submit for one job of a Slurm launcher with `params` (its
    `submitit_folder`, unless `folder` is given). No Slurm needed: submitit's check that `srun` exists is bypassed,
    since nothing is submitted."""
    import submitit

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


def main(argv: list[str] | None = None) -> None:
    """python -m attn2d.slurm [--script] EXPERIMENT [OVERRIDE ...]: the sbatch flags (or whole script) of the job
    of every grid in the experiment's sweep, e.g. `python -m attn2d.slurm a100_speedup hydra.launcher.account=x`."""
    import argparse

    from attn2d.config import compose

    ap = argparse.ArgumentParser(prog="python -m attn2d.slurm", description=main.__doc__)
    ap.add_argument("--script", action="store_true", help="print the whole batch script")
    ap.add_argument("experiment")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    base = compose([f"experiment={args.experiment}", *args.overrides], return_hydra_config=True)
    sweep = OmegaConf.to_container(base.hydra.sweeper.params or {}, resolve=False)
    grids = str(sweep.get("grid", base.hydra.runtime.choices["grid"])).split(",")
    for grid in (g.strip() for g in grids):
        cfg = compose([f"experiment={args.experiment}", *args.overrides, f"grid={grid}"], return_hydra_config=True)
        params = launcher_params(cfg)
        launcher = cfg.hydra.runtime.choices["hydra/launcher"]
        if not str(cfg.hydra.launcher._target_).endswith("SlurmLauncher"):
            print(f"{args.experiment} grid={grid}: {launcher} runs {params['tasks_per_node']} local processes")
            continue
        script = sbatch_script(params)
        if args.script:
            print(f"# {args.experiment} grid={grid} ({launcher})\n{script}")
            continue
        keys = ("partition", "account", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time",
                "exclusive", "requeue", "signal")
        flags = sbatch_flags(script)
        shown = " ".join(f"--{k}" + (f"={flags[k]}" if flags[k] else "") for k in keys if k in flags)
        print(f"{args.experiment} grid={grid} ({launcher}): {shown}")


if __name__ == "__main__":
    main()
