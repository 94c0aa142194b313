"""Config composition and validation, and the OmegaConf resolvers the YAML files use.

`validate(cfg, world_size=None)` checks a composed config before anything starts: unknown or missing keys in
every group, the grid against the job's ranks (the real world size, or `hydra.launcher.tasks_per_node * nodes`
when composed with the hydra node), the sequence against the attention's token layout, heads and dims against the
model. All problems are collected and raised together as one ConfigError whose lines name the values involved and
what would be right.

The model group is validated against attn2d.model.GPTConfig (the one model dataclass) as an OmegaConf structured
schema. The launcher configs' resolvers (${attn2d.world:R,C}, ${attn2d.slurm_nodes:R,C,G}, ...) are attn2d.slurm's,
registered when it is imported (this module imports it for the launcher's world size).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from attn2d.attention import ATTENTION
from attn2d.attention.layout import CHUNKS_PER_RANK
from attn2d.attention.registry import distributed_names
from attn2d.distributed.grid import GridError, check_timeout
from attn2d.distributed.placement import rank_nodes
from attn2d.dtypes import TRAIN_DTYPES
from attn2d.model import GPTConfig
from attn2d.slurm import launcher_world_size

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/ (package installed editable)


class ConfigError(ValueError):
    """A composed config that cannot run; the message lists every problem found."""


def _process_start(pid: int) -> float:
    """Start time (epoch seconds) of process `pid`, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # fields 3.. of proc(5)
    btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("btime"))
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in clock ticks since boot


@functools.lru_cache(maxsize=1)
def launch_time() -> float:
    """When this job was launched: under torchrun the start of its agent (the parent of every local rank), so all
    ranks of a node resolve one time; elsewhere the first call's time."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            return _process_start(os.getppid())
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return time.time()


# ${attn2d.now:%Y-%m-%d_%H-%M-%S} (conf/config.yaml's hydra.run.dir): Hydra's ${now:} but one value for every rank
# of a torchrun launch, so the ranks share one run dir instead of leaving second dirs holding only train.log.
OmegaConf.register_new_resolver(
    "attn2d.now", lambda pattern: datetime.datetime.fromtimestamp(launch_time()).strftime(pattern), replace=True)


def timeout_s_of(cfg: DictConfig) -> float:
    """benchmark.timeout_s, checked (a finite number > 0) before any process group exists; ConfigError if not."""
    value = OmegaConf.select(cfg, "benchmark.timeout_s", default=300.0)
    try:
        return check_timeout(value, "benchmark.timeout_s").total_seconds()
    except GridError as e:
        raise ConfigError(f"invalid config: {e}") from None


# ---------------------------------------------------------------------------------------------- group schemas
@dataclass
class AttentionConf:
    name: str  # attn2d.attention registry key
    causal: bool = True


@dataclass
class GridConf:
    rows: int
    cols: int
    placement: Any = "row"  # which grid dimension lies inside a node: row | col | [node of each rank]


@dataclass
class BenchmarkConf:
    seq_len: int
    batch_size: int = 1
    warmup_steps: int = 1
    steps: int = 3
    dtype: str = "float32"  # float32 | bfloat16 (autocast, fp32 params) | float64
    device: str = "cpu"  # cpu | cuda | auto
    seed: int = 0
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-4
    weight_decay: float = 0.0
    fsdp: bool = False  # FSDP2 (fully_shard) over the sequence-parallel ranks
    activation_checkpointing: bool = False
    timeout_s: float = 300.0  # every collective; a dead rank ends the job instead of hanging it
    peak_tflops: float | None = None  # per GPU, for MFU; null -> mfu null
    progress: bool = True  # progress bar on rank 0
    cpu_threads: int = 1  # torch threads per rank on CPU (0: the host's cores / its ranks); tiny runs: fastest on 1


GROUPS = {"model": GPTConfig, "attention": AttentionConf, "grid": GridConf, "benchmark": BenchmarkConf}
# each group's keys and those it must give: its schema's fields (required: those without a default); the model
# group's name comes first and is required, and activation_checkpointing is benchmark.activation_checkpointing's
KEYS = {s: tuple(f.name for f in dataclasses.fields(c)) for s, c in GROUPS.items()}
REQUIRED = {s: tuple(f.name for f in dataclasses.fields(c) if f.default is dataclasses.MISSING)
            for s, c in GROUPS.items()}
KEYS["model"] = ("name", *(k for k in KEYS["model"] if k not in ("name", "activation_checkpointing")))
REQUIRED["model"] = ("name", *REQUIRED["model"])
# top-level keys besides the groups: hardware (cost-model profile, free-form), experiment (free-form metadata of
# an experiment file), hydra (present when composed with return_hydra_config=True)
TOP_LEVEL = set(GROUPS) | {"experiment_name", "run_dir", "hardware", "experiment", "hydra", "emulation"}
DEVICES = ("cpu", "cuda", "auto")
OPTIMIZERS = ("adamw", "sgd")


def _check_keys(section: str, node: Any, errors: list[str]) -> Any:
    """Unknown and missing keys, then types (through OmegaConf's structured merge). Returns a filled instance of
    the group's schema, or None."""
    schema = GROUPS[section]
    if not isinstance(node, DictConfig):
        errors.append(f"{section}: expected a mapping (a config group), got {type(node).__name__}")
        return None
    unknown = sorted(set(node.keys()) - set(KEYS[section]))
    missing = [n for n in REQUIRED[section] if n not in node]
    if unknown:
        errors.append(f"{section}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(KEYS[section])}")
    if missing:
        errors.append(f"{section}: missing required key(s) {', '.join(missing)}")
    if unknown or missing:
        return None
    try:
        values = OmegaConf.to_container(node, resolve=True)  # interpolations resolve against the whole config
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))  # a filled `schema`
    except Exception as e:  # noqa: BLE001 - OmegaConf raises several types for bad values
        key = getattr(e, "full_key", None)
        errors.append(f"{section}{'.' + key if key else ''}: {str(e).splitlines()[0]}")
        return None


@dataclass
class Settings:
    """The validated groups, typed and with every default filled in (what train.py reads)."""

    model: GPTConfig
    attention: AttentionConf
    grid: GridConf
    benchmark: BenchmarkConf

    def gpt(self) -> GPTConfig:
        """The model a run builds: the model group with benchmark.activation_checkpointing."""
        return run_model(self.model, self.benchmark.seq_len, self.benchmark.activation_checkpointing)


def run_model(model: GPTConfig, seq_len: int | None, activation_checkpointing: bool = False) -> GPTConfig:
    """`model` for a run over seq_len tokens: learned positions without max_seq_len get a table of seq_len."""
    return dataclasses.replace(model, max_seq_len=model.max_seq_len or seq_len,
                               activation_checkpointing=activation_checkpointing)


def validate(cfg: DictConfig, world_size: int | None = None) -> Settings:
    """Raise ConfigError listing every problem of a composed config (see the module docstring); return Settings."""
    errors: list[str] = []
    unknown = sorted(set(cfg.keys()) - TOP_LEVEL)
    if unknown:
        errors.append(f"unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TOP_LEVEL))}")
    typed = {}
    for section in GROUPS:
        if section not in cfg:
            errors.append(f"missing config group '{section}' (pick one, e.g. {section}=...)")
            continue
        typed[section] = _check_keys(section, cfg[section], errors)
    m, a, g, b = (typed.get(s) for s in ("model", "attention", "grid", "benchmark"))

    if b is not None:
        if b.dtype not in TRAIN_DTYPES:
            errors.append(f"benchmark.dtype {b.dtype!r} is not one of {', '.join(TRAIN_DTYPES)}")
        if b.device not in DEVICES:
            errors.append(f"benchmark.device {b.device!r} is not one of {', '.join(DEVICES)}")
        if b.optimizer not in OPTIMIZERS:
            errors.append(f"benchmark.optimizer {b.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        for key, low in (("seq_len", 1), ("batch_size", 1), ("steps", 1), ("warmup_steps", 0), ("cpu_threads", 0)):
            if getattr(b, key) < low:
                errors.append(f"benchmark.{key} is {getattr(b, key)}, it must be >= {low}")
        try:
            check_timeout(b.timeout_s, "benchmark.timeout_s")
        except GridError as e:
            errors.append(str(e))

    impl = None
    if a is not None:
        impl = ATTENTION.get(a.name)
        if impl is None:
            errors.append(f"attention.name {a.name!r} is not registered; known: {', '.join(sorted(ATTENTION))}")

    if g is not None:
        P = g.rows * g.cols
        if g.rows < 1 or g.cols < 1:
            errors.append(f"grid {g.rows}x{g.cols} must have rows >= 1 and cols >= 1")
        elif isinstance(g.placement, str) or isinstance(g.placement, (list, tuple)):
            try:
                rank_nodes(g.rows, g.cols, P, g.placement)
            except (ValueError, TypeError) as e:
                errors.append(f"grid.placement: {e}")
        else:
            errors.append(f"grid.placement {g.placement!r}: give row, col or a list of {P} node ids")
        tasks, source = world_size, "the world has"
        if tasks is None:
            source = "the launcher starts (hydra.launcher.tasks_per_node * nodes)"
            try:
                tasks = launcher_world_size(cfg)
            except Exception as e:  # noqa: BLE001 - e.g. a resolver refusing a grid that does not fill whole nodes
                errors.append(f"hydra.launcher: {str(e).splitlines()[0]}")
        if tasks is not None and tasks != P:
            hint = (f"; this grid needs {P} ranks: run it with `torchrun --nproc-per-node {P} -m attn2d.train ...` "
                    "or a launcher (`python -m attn2d.train -m hydra/launcher=local_cpu ...`, or a Slurm one)"
                    if tasks == 1 and world_size == 1 and P > 1 else "")
            errors.append(f"grid {g.rows}x{g.cols} needs {P} ranks, but {source} {tasks}; "
                          f"grids that fit {tasks} ranks: "
                          + ", ".join(f"{d}x{tasks // d}" for d in range(1, tasks + 1) if tasks % d == 0) + hint)
        if impl is not None and impl.ranks == "one" and P != 1:
            errors.append(f"attention {impl.name!r} runs on one process only, but grid {g.rows}x{g.cols} has {P} "
                          f"ranks; use grid=1x1, or a distributed attention ({', '.join(distributed_names())})")
        if impl is not None and b is not None and P >= 1:
            chunks = CHUNKS_PER_RANK.get(impl.layout, 1)
            try:
                impl.check_layout(b.seq_len, P, where=f"over the {P} ranks of grid {g.rows}x{g.cols} in attention "
                                  f"{impl.name!r}'s {impl.layout} layout"
                                  + (f" ({chunks} chunks per rank)" if chunks > 1 else ""))
            except GridError as e:
                errors.append(f"benchmark.{e}")

    if m is not None:
        try:
            run_model(m, b.seq_len if b is not None else None).check()
        except ValueError as e:
            errors.append(f"model {m.name}: {e}")
        if m.positions == "learned" and b is not None and m.max_seq_len is not None and m.max_seq_len < b.seq_len:
            errors.append(f"model {m.name}: learned positions table has max_seq_len {m.max_seq_len} < "
                          f"benchmark.seq_len {b.seq_len}; set model.max_seq_len >= {b.seq_len} or null")
        for key in ("n_layer", "d_model", "n_head", "vocab_size"):
            if getattr(m, key) < 1:
                errors.append(f"model.{key} is {getattr(m, key)}, it must be >= 1")

    if len(errors) == 1:
        raise ConfigError(f"invalid config: {errors[0]}")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return Settings(m, a, g, b)


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False, config_name: str = "config", *,
            experiment: str | None = None, conf_dir: str | Path = CONF_DIR) -> DictConfig:
    """The config `python -m attn2d.train [experiment=<experiment>] <overrides>` runs, composed outside a Hydra app
    (tests, the planner, the workflow): compose(["model=tiny", "grid=2x2"]). Each (conf_dir, overrides, working
    directory) is composed once per process (conf/ does not change under it); every call returns its own copy."""
    ovr = (*([f"experiment={experiment}"] if experiment else []), *overrides)
    key = (str(Path(conf_dir).resolve()), config_name, ovr, return_hydra_config, os.getcwd())
    if key not in _COMPOSED:
        with initialize_config_dir(config_dir=key[0], version_base="1.3"):
            _COMPOSED[key] = hydra_compose(config_name, overrides=list(ovr), return_hydra_config=return_hydra_config)
    return copy.deepcopy(_COMPOSED[key])


_COMPOSED: dict[tuple, DictConfig] = {}  # compose()'s cache
