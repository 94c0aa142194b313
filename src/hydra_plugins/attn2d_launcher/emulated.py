"""Hydra launcher `emulated`: every sweep point runs `attn2d.train` on an emulated cluster on this machine
(attn2d.distributed.emulate): one network namespace per node, each rank started inside its node's namespace
(`ip netns exec`, its own session, killed by process group on timeout or first failure), gloo on the shaped links.

Hydra's own run_job sets up each point (output dir = hydra.sweep.dir/subdir, .hydra files); the task it runs is
the emulated cell instead of the in-process function. The points run one after the other (their ranks share the
cores). The record's header gets `emulation`: nodes, ranks per node, NIC mode, rate, placement and the bytes each
NIC carried per timed step.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class EmulatedLauncher(BasicLauncher):
    def __init__(self, ranks_per_node: int = 1, nic: str = "shared", rate: str = "100mbit", timeout_s: float = 600,
                 **_: Any) -> None:
        super().__init__()
        self.defaults = {"ranks_per_node": ranks_per_node, "nic": nic, "rate": rate, "timeout_s": timeout_s}
        self._overrides: list[str] = []

    def _cell(self, cfg: DictConfig) -> dict:
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
