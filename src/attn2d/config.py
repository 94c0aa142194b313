"""Config composition and validation, and the OmegaConf resolvers the YAML files use.

`validate(cfg, world_size=None)` checks a composed config before anything starts: unknown or missing keys in
every group, the grid against the job's ranks (the real world size, or `hydra.launcher.tasks_per_node * nodes`
when composed with the hydra node), the sequence against the attention's token layout, heads and dims against the
model. All problems are collected and raised together as one ConfigError whose lines name the values involved and
what would be right.

The launcher configs' resolvers (${attn2d.world:R,C}, ${attn2d.slurm_nodes:R,C,G}, ...) live in attn2d.slurm; this
module imports it, so composing through `compose()` or `python -m attn2d.train` registers them first.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import attn2d.slurm  # noqa: F401 - registers the launcher resolvers before any composition
from attn2d.distributed.grid import GridError, check_timeout
from attn2d.dtypes import TRAIN_DTYPES
from attn2d.model import GPTConfig

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
class ModelConf:
    name: str
    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    head_dim: Optional[int] = None  # null: d_model // n_head
    n_kv_head: Optional[int] = None  # k/v heads (grouped-query attention, must divide n_head); null: n_head
    mlp_ratio: int = 4
    positions: str = "rotary"  # rotary | learned
    max_seq_len: Optional[int] = None  # learned positions: table size (null: benchmark.seq_len)
    rope_base: float = 10000.0
    init_std: float = 0.02


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
    peak_tflops: Optional[float] = None  # per GPU, for MFU; null -> mfu null
    progress: bool = True  # progress bar on rank 0
    cpu_threads: int = 1  # torch threads per rank on CPU (0: the host's cores / its ranks); tiny CPU runs are fastest on 1


GROUPS = {"model": ModelConf, "attention": AttentionConf, "grid": GridConf, "benchmark": BenchmarkConf}
# top-level keys besides the groups: hardware (cost-model profile, free-form), experiment (free-form metadata of
# an experiment file), hydra (present when composed with return_hydra_config=True)
TOP_LEVEL = set(GROUPS) | {"experiment_name", "run_dir", "hardware", "experiment", "hydra", "emulation"}
DEVICES = ("cpu", "cuda", "auto")
OPTIMIZERS = ("adamw", "sgd")


def _check_keys(section: str, node: Any, schema: type, errors: list[str]) -> Any:
    """Unknown and missing keys, then types (through OmegaConf's structured merge). Returns a filled `schema` instance, or None."""
    if not isinstance(node, DictConfig):
        errors.append(f"{section}: expected a mapping (a config group), got {type(node).__name__}")
        return None
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(node.keys()) - set(fields))
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in node]
    if unknown:
        errors.append(f"{section}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
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


def launcher_world_size(cfg: DictConfig) -> int | None:
    """Ranks the launcher will start (hydra.launcher.tasks_per_node * nodes), if the config says."""
    launcher = OmegaConf.select(cfg, "hydra.launcher", default=None)
    if launcher is None or "tasks_per_node" not in launcher:
        return None
    return int(launcher.tasks_per_node) * int(launcher.get("nodes", 1) or 1)


@dataclass
class Settings:
    """The validated groups, typed and with every default filled in (what train.py reads)."""

    model: ModelConf
    attention: AttentionConf
    grid: GridConf
    benchmark: BenchmarkConf


def validate(cfg: DictConfig, world_size: int | None = None) -> Settings:
    """Raise ConfigError listing every problem of a composed config (see the module docstring); return Settings."""
    from attn2d.attention import ATTENTION  # the registry (importing it registers the built-in algorithms)
    from attn2d.attention.layout import CHUNKS_PER_RANK
    from attn2d.attention.registry import distributed_names

    errors: list[str] = []
    unknown = sorted(set(cfg.keys()) - TOP_LEVEL)
    if unknown:
        errors.append(f"unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TOP_LEVEL))}")
    typed = {}
    for section, schema in GROUPS.items():
        if section not in cfg:
            errors.append(f"missing config group '{section}' (pick one, e.g. {section}=...)")
            continue
        typed[section] = _check_keys(section, cfg[section], schema, errors)
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
            from attn2d.distributed.placement import rank_nodes

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
            gpt_config(m, seq_len=b.seq_len if b is not None else None).check()
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


def gpt_config(model: Any, seq_len: int | None = None, activation_checkpointing: bool = False) -> GPTConfig:
    """The model group (ModelConf, DictConfig or mapping) as a GPTConfig; learned positions default to seq_len."""
    m = dataclasses.asdict(model) if dataclasses.is_dataclass(model) else dict(model)
    return GPTConfig(
        n_layer=int(m["n_layer"]), d_model=int(m["d_model"]), n_head=int(m["n_head"]), vocab_size=int(m["vocab_size"]),
        head_dim=None if m.get("head_dim") is None else int(m["head_dim"]), mlp_ratio=int(m.get("mlp_ratio", 4)),
        n_kv_head=None if m.get("n_kv_head") is None else int(m["n_kv_head"]),
        positions=str(m.get("positions", "rotary")), max_seq_len=m.get("max_seq_len") or seq_len,
        rope_base=float(m.get("rope_base", 10000.0)), init_std=float(m.get("init_std", 0.02)),
        activation_checkpointing=activation_checkpointing,
    )


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
