"""Hydra launcher `emulated`: every sweep point runs `attn2d.train` on an emulated cluster on the local machine
(attn2d.distributed.emulate): one network namespace per node, each rank started inside its node's namespace
(`ip netns exec`, its own session, killed by process group on timeout or first failure), gloo on the shaped links.

Hydra's own run_job sets up each point (output dir = hydra.sweep.dir/subdir, .hydra files); the task it runs is
the emulated cell instead of the in-process function. The points run one after the other (their ranks share the
cores). The record's header gets `emulation`: nodes, ranks per node, NIC mode, rate, placement and the bytes each
NIC carried per timed step.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class EmulatedLauncher(Launcher):
    def __init__(self, ranks_per_node: int = 1, nic: str = "shared", rate: str = "100mbit", timeout_s: float = 600,
                 **_: Any) -> None:
        super().__init__()
        self.defaults = {"ranks_per_node": ranks_per_node, "nic": nic, "rate": rate, "timeout_s": timeout_s}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self._overrides: list[str] = []

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep the context and config; the task is always the emulated cell, not `task_function`."""
        self.config, self.hydra_context = config, hydra_context

    def _cell(self, cfg: DictConfig) -> dict:
        # here, not at the top: Hydra imports every plugin module whenever any Hydra app or compose() starts, and
        # this one pulls in torch
        from attn2d.distributed.emulate import run_cell

        hc = HydraConfig.get()
        params = {k: OmegaConf.select(hc, f"launcher.{k}", default=v) for k, v in self.defaults.items()}
        placement = OmegaConf.to_container(cfg.grid, resolve=True).get("placement", "row")
        res = run_cell(self._overrides, hc.runtime.output_dir, int(cfg.grid.rows), int(cfg.grid.cols),
                       int(params["ranks_per_node"]), str(params["nic"]), str(params["rate"]), placement,
                       float(params["timeout_s"]))
        if res["status"] != "ok":
            raise RuntimeError(f"emulated cell failed (rank exit codes {res['codes']}); per-rank logs in "
                               f"{res['run_dir']}/ranks/")
        return res

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        runs = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} (emulated cluster)")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            self._overrides = [o for o in overrides if not o.startswith("hydra.")]
            runs.append(run_job(hydra_context=self.hydra_context, task_function=self._cell, config=sweep_config,
                                job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
        return runs
