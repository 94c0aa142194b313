"""submitit launchers that shape every job from its own grid (the `_target_` of conf/hydra/launcher/*.yaml).

hydra-submitit-launcher 1.2.0 builds ONE submitit executor per `-m` call from the primary config, so in
`-m grid=4x4,8x8` every job would get the 4x4 job's nodes and tasks. These launchers resolve `hydra.launcher` for
every sweep point, group the points by the config they resolve to, and submit one job array per group (all groups
before waiting on any; the local launcher instead runs the points one after the other). The job body and
`checkpoint` (requeue on pre-emption) are the plugin's, unchanged. Each job is named after its cell
(conf/hydra/launcher: `a2d:<exp>:<attention>:<grid>:<seq>:<model>`), so a sweep over cells is one job per cell.

As soon as a job is submitted, its id, name, log paths and launcher settings go to `<run dir>/job.json`
(attn2d.lifecycle) and to the log; while it waits, every change of the job's state is logged. Slurm's state is
polled at least every WATCH_DELAY_S (submitit's own default is 10 minutes), so a job that died without a result is
noticed within that time.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from submitit.slurm.slurm import SlurmInfoWatcher

from attn2d.lifecycle import write_job_file
from attn2d.records import now_iso
from attn2d.slurm import launcher_params, make_executor
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _plugin

log = logging.getLogger(__name__)
WATCH_DELAY_S = 30  # longest wait between two sacct polls of a job (submitit: 600)


def fast_slurm_watcher() -> None:
    """Poll Slurm for every job at least every WATCH_DELAY_S: submitit's shared watcher waits up to 10 minutes
    between two sacct calls late in a job, so a job that died without a result went unnoticed that long."""
    if getattr(submitit.SlurmJob.watcher, "_delay_s", 0) > WATCH_DELAY_S:
        submitit.SlurmJob.watcher = SlurmInfoWatcher(delay_s=WATCH_DELAY_S)


def _run_dir(job_cfg) -> Path:
    """Where a sweep point's record goes: hydra.sweep.dir / hydra.sweep.subdir."""
    return Path(str(job_cfg.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)


def _job_info(job, scheduler: str, launcher: str | None, params: dict[str, Any]) -> dict[str, Any]:
    """What job.json says of a submitted job (attn2d.lifecycle)."""
    return {"scheduler": scheduler, "job_id": str(job.job_id), "job_name": params.get("name"), "launcher": launcher,
            "partition": params.get("partition"), "account": params.get("account"),
            "folder": str(job.paths.folder), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
            "submitted_at": now_iso(), "pid": os.getpid(), "args": sys.argv[1:], "launcher_params": params}


def _wait(jobs: dict[int, Any]) -> None:
    """Wait for every job, logging each change of its state (and its nodes once known)."""
    seen: dict[int, str] = {}
    while True:
        running = [i for i, j in jobs.items() if not j.done()]
        for i, j in jobs.items():
            state = str(j.state)
            nodes = j.get_info(mode="cache").get("NodeList")  # Slurm: from the last sacct poll
            said = f"{state} on {nodes}" if state == "RUNNING" and nodes and nodes != "None assigned" else state
            if seen.get(i) != said and state != "UNKNOWN":  # UNKNOWN: sacct does not list it yet
                log.info(f"job {j.job_id}: {said}")
                seen[i] = said
        if not running:
            return
        time.sleep(1.0)


class _ShapePerJob:
    """Mixin over the plugin's launcher: one executor (one job array) per distinct resolved launcher config."""

    _EXECUTOR: str
    _ONE_AT_A_TIME = False  # True: run the sweep points one after the other (their ranks share one machine)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        assert len(job_overrides) > 0
        groups: dict[str, list[int]] = {}  # resolved launcher params (json) -> indices of its sweep points
        for i, overrides in enumerate(job_overrides):
            job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            groups.setdefault(json.dumps(launcher_params(job_cfg), sort_keys=True), []).append(i)

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir} ({len(groups)} job shape(s))")

        if self._EXECUTOR == "slurm":
            fast_slurm_watcher()
        launcher = self.config.hydra.runtime.choices.get("hydra/launcher")
        run_dirs = {}
        jobs = {}
        for key, members in groups.items():
            params = json.loads(key)
            executor = make_executor(self._EXECUTOR, params)
            shape = {k: params.get(k) for k in ("nodes", "tasks_per_node", "gpus_per_node", "partition")}
            job_params = []
            for i in members:
                idx = initial_job_idx + i
                log.info(f"\t#{idx} : {' '.join(filter_overrides(job_overrides[i]))}  {shape}")
                run_dirs[i] = _run_dir(self.hydra_context.config_loader.load_sweep_config(
                    self.config, list(job_overrides[i])))
                job_params.append(
                    (list(job_overrides[i]), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
                )
            if self._ONE_AT_A_TIME:  # each point's ranks get the machine's cores to themselves
                for i, args in zip(members, job_params):
                    jobs[i] = executor.submit(self, *args)
                    self._submitted(jobs[i], run_dirs[i], launcher, params)
                    _wait({i: jobs[i]})  # does not raise: a failed point does not stop the next ones
            else:
                submitted = executor.map_array(self, *zip(*job_params))  # submit every group first
                for i, job in zip(members, submitted):
                    jobs[i] = job
                    self._submitted(job, run_dirs[i], launcher, params)
        _wait(jobs)
        return [jobs[i].results()[0] for i in range(len(job_overrides))]

    def _submitted(self, job, run_dir: Path, launcher: str | None, params: dict[str, Any]) -> None:
        info = _job_info(job, self._EXECUTOR, launcher, params)
        path = write_job_file(run_dir, info)
        kind = "Slurm job" if self._EXECUTOR == "slurm" else "local job"
        log.info(f"{kind} {info['job_id']} ({info['job_name']}) submitted for {run_dir}; job file {path}; "
                 f"logs of rank 0: {info['stdout']} and {info['stderr']}")


class SlurmLauncher(_ShapePerJob, _plugin.SlurmLauncher):
    """hydra-submitit-launcher's Slurm launcher, each sweep point shaped by its own grid."""


class LocalLauncher(_ShapePerJob, _plugin.LocalLauncher):
    """hydra-submitit-launcher's local launcher, each sweep point shaped by its own grid, one point at a time: all
    points at once would put every point's ranks on the same cores (36 processes for a 3x3 x 4-point sweep on 2
    cores) and time the contention, not the algorithms."""

    _ONE_AT_A_TIME = True


