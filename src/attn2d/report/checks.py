"""Plan-time checks: what can be known wrong before any job is submitted (attn2d.plan.plan collects them into ONE
PlanError listing every problem).

- experiments: each selected experiment has its file; its `experiment.reported` entries are well formed;

- keys: every sweep / override key must be a key (or config group) of the composed config; the nearest valid key
  is suggested (`benchmark.seqlen` -> "did you mean benchmark.seq_len?");
- cells: each cell's config must pass attn2d.config.validate (grid vs ranks, sequence vs layout, the attention's
  world, model shape): the rules live there, this only applies them per cell;
- names: a cell's name is its run dir, so it may hold only plain characters (no quotes, `$`, `;`, spaces, `/`);
- baselines: one ring cell per (model, seq_len, gpus, batch_size, dtype) of an experiment (the speedup baseline);
- cluster: partitions (`sinfo`) and accounts (`sacctmgr`) the jobs ask for must exist, where those commands answer
  (otherwise a note says what was not checked).
"""
from __future__ import annotations

import difflib
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from attn2d.config import ConfigError, validate

SAFE_NAME = re.compile(r"^[A-Za-z0-9_.,=+\-:\[\]@%]+$")  # characters a cell name (a run dir) may hold
CLUSTER_TIMEOUT_S = 10


class PlanError(ValueError):
    """An experiment, sweep or launcher choice that cannot be expanded into cells."""


def why(e: Exception) -> str:
    """An exception's message on one line (Hydra's span several)."""
    text = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("See https://"))
    return text or type(e).__name__


def report(problems: Sequence[str], per_cell: Mapping[str, list[str]]) -> str:
    """The PlanError message: every problem once, those of cells with (up to three of) the cells that have it."""
    lines = list(dict.fromkeys(problems))
    for problem, where in per_cell.items():
        more = f" and {len(where) - 3} more" if len(where) > 3 else ""
        lines.append(f"{problem} [{len(where)} cell(s): {'; '.join(where[:3])}{more}]")
    return (f"the plan has {len(lines)} problem(s); no job was submitted:\n  - " + "\n  - ".join(lines))


def unknown_experiment(conf_dir: Path, experiment: str, known: Sequence[str]) -> str:
    return (f"experiment {experiment!r} has no file {conf_dir}/experiment/{experiment}.yaml; "
            f"known experiments: {', '.join(known)}")


def reported_entries(exp: str, rep) -> tuple[dict, ...]:
    """The experiment file's `experiment.reported` list, checked: each entry {gpus: int, speedup_max: number,
    what: text}."""
    entries = OmegaConf.to_container(rep, resolve=True) if rep else []
    if not isinstance(entries, list):
        raise ValueError(f"conf/experiment/{exp}.yaml: experiment.reported must be a list of "
                         f"{{gpus, speedup_max, what}}, got {entries!r}")
    for e in entries:
        ok = (isinstance(e, dict) and set(e) == {"gpus", "speedup_max", "what"} and isinstance(e["gpus"], int)
              and isinstance(e["speedup_max"], (int, float)) and isinstance(e["what"], str))
        if not ok:
            raise ValueError(f"conf/experiment/{exp}.yaml: experiment.reported entry {e!r} is not "
                             "{gpus: <int>, speedup_max: <number>, what: <text>}")
    return tuple(entries)


def flat_keys(cfg: DictConfig) -> set[str]:
    """Every dotted key of `cfg` (inner nodes included, lists not entered), plus its config group names."""
    out: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{prefix}{k}"
                out.add(key)
                walk(v, key + ".")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None) or {}
    out.update(str(k) for k in choices)
    return out


def nearest(key: str, valid: Iterable[str]) -> str:
    """ "; did you mean X?" for the closest valid key (a sibling first), else the keys its parent has, else ""."""
    valid = set(valid)
    parent, _, leaf = key.rpartition(".")
    siblings = sorted(v.rpartition(".")[2] for v in valid if v.rpartition(".")[0] == parent and "." in v or
                      (not parent and "." not in v))
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
    close = [] if parent in valid else difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.8)
    if close:
        return f"; did you mean {close[0]}?"
    if parent in valid and siblings:
        return f"; {parent} has: {', '.join(siblings)}"
    return ""


def key_problems(overrides: Sequence[str], cfg: DictConfig, what: str) -> list[str]:
    """Overrides whose key is not in `cfg` (`+key=` adds a key and is not checked; `~key` must exist)."""
    parser = OverridesParser.create()
    valid = flat_keys(cfg)
    problems = []
    for o in overrides:
        try:
            (ov,) = parser.parse_overrides([o])
        except Exception as e:  # noqa: BLE001 - Hydra's grammar errors
            problems.append(f"{what} {o!r} is not a Hydra override: {str(e).splitlines()[0]}")
            continue
        if ov.is_add() or ov.is_force_add():
            continue
        key = ov.key_or_group
        if key not in valid:
            problems.append(f"{what} key {key!r} (in {o!r}) is not a key of the config{nearest(key, valid)}")
    return problems


def name_problem(name: str) -> str | None:
    if SAFE_NAME.match(name):
        return None
    bad = "".join(sorted({ch for ch in name if not SAFE_NAME.match(ch)}))
    return (f"the cell's name (its run dir) holds characters it may not hold ({bad!r}): sweep values must be "
            f"plain words, numbers or lists (letters, digits and _ . , = + - : [ ] @ %)")


def cell_problems(cfg: DictConfig) -> list[str]:
    """attn2d.config.validate's problems of one cell's composed config (one per line)."""
    try:
        validate(cfg)
    except ConfigError as e:
        return [ln.strip()[2:] for ln in str(e).splitlines()[1:] if ln.strip().startswith("- ")] or [str(e)]
    return []


def baseline_problems(experiment: str, cells: Iterable[Any], keys: Sequence[str], baseline: str) -> list[str]:
    """More than one `baseline` cell per (keys) in one experiment: the speedup's baseline would be ambiguous."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for c in cells:
        i = {**c.info, "gpus": c.info.get("world_size")}
        if i.get("attention") == baseline:
            groups[tuple(i.get(k) for k in keys)].append(f"{c.name} (grid {i.get('rows')}x{i.get('cols')})")
    return [f"experiment {experiment}: {len(names)} {baseline} cells share {', '.join(keys)} = "
            f"{', '.join(map(str, key))}, so the speedup baseline is ambiguous; keep one of: {'; '.join(names)}"
            for key, names in groups.items() if len(names) > 1]


def _ask(cmd: list[str]) -> tuple[list[str] | None, str]:
    """The output lines of a cluster command, or None and why it could not answer."""
    if shutil.which(cmd[0]) is None:
        return None, f"{cmd[0]} not found"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=CLUSTER_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{cmd[0]} did not answer ({e})"
    if p.returncode != 0:
        said = (p.stderr or p.stdout).strip().splitlines()
        return None, f"{cmd[0]} failed: {said[-1] if said else f'exit status {p.returncode}'}"
    return [ln.strip() for ln in p.stdout.splitlines() if ln.strip()], ""


def cluster_problems(wanted: Mapping[str, Mapping[str, list[str]]]) -> tuple[list[str], list[str]]:
    """wanted: {"partition"|"account": {value: [cells]}} -> (problems, notes). Checked only where the cluster's
    commands answer; each unchecked kind gets a note."""
    problems, notes = [], []
    asks = {"partition": ["sinfo", "-h", "-o", "%R"],
            "account": ["sacctmgr", "-n", "-P", "show", "assoc", "format=account"]}
    for kind, cmd in asks.items():
        values = wanted.get(kind) or {}
        if not values:
            continue
        known, why = _ask(cmd)
        if known is None:
            notes.append(f"plan: {kind}s not checked against the cluster ({why}): {', '.join(sorted(values))}")
            continue
        known_set = set(known)
        for v, cells in sorted(values.items()):
            if v not in known_set:
                problems.append(f"{kind} {v!r} does not exist on this cluster ({' '.join(cmd)} lists: "
                                f"{', '.join(sorted(known_set)) or 'none'}){nearest(v, known_set)}; "
                                f"asked for by {len(cells)} cell(s), e.g. {cells[0]}; set it with --config "
                                f"launcher_overrides=hydra.launcher.{kind}=<name>")
    return problems, notes


