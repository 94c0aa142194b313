"""submitit launchers that shape every job from its own grid (the `_target_` of conf/hydra/launcher/*.yaml).

hydra-submitit-launcher 1.2.0 builds ONE submitit executor per `-m` call from the primary config, so in
`-m grid=4x4,8x8` every job would get the 4x4 job's nodes and tasks. These launchers resolve `hydra.launcher` for
every sweep point, group the points by the config they resolve to, and submit one job array per group (all groups
before waiting on any; the local launcher instead runs the points one after the other). The job body and `checkpoint` (requeue on pre-emption) are the plugin's, unchanged.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _plugin

from attn2d.slurm import launcher_params, make_executor

log = logging.getLogger(__name__)


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

        jobs = {}
        for key, members in groups.items():
            params = json.loads(key)
            executor = make_executor(self._EXECUTOR, params)
            shape = {k: params.get(k) for k in ("nodes", "tasks_per_node", "gpus_per_node", "partition")}
            job_params = []
            for i in members:
                idx = initial_job_idx + i
                log.info(f"\t#{idx} : {' '.join(filter_overrides(job_overrides[i]))}  {shape}")
                job_params.append(
                    (list(job_overrides[i]), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
                )
            if self._ONE_AT_A_TIME:  # each point's ranks get the machine's cores to themselves
                for i, args in zip(members, job_params):
                    jobs[i] = executor.submit(self, *args)
                    jobs[i].wait()  # does not raise: a failed point does not stop the next ones
            else:
                jobs.update(zip(members, executor.map_array(self, *zip(*job_params))))  # submit every group first
        return [jobs[i].results()[0] for i in range(len(job_overrides))]


class SlurmLauncher(_ShapePerJob, _plugin.SlurmLauncher):
    """hydra-submitit-launcher's Slurm launcher, each sweep point shaped by its own grid."""


class LocalLauncher(_ShapePerJob, _plugin.LocalLauncher):
    """hydra-submitit-launcher's local launcher, each sweep point shaped by its own grid, one point at a time: all
    points at once would put every point's ranks on the same cores (36 processes for a 3x3 x 4-point sweep on 2
    cores) and time the contention, not the algorithms."""

    _ONE_AT_A_TIME = True


