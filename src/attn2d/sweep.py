"""An experiment's Hydra sweep -> its points, expanded as Hydra's basic sweeper expands `-m` (the cartesian
product of every key's values, keys in order), through Hydra's public override parser; a point's name is Hydra's
`override_dirname` (sorted `key=value`, comma-joined). attn2d.plan makes cells of the points."""
from __future__ import annotations

import itertools
import shlex
from collections.abc import Iterable, Mapping

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from attn2d.report.checks import PlanError


def split_overrides(text: str | Iterable[str] | None) -> list[str]:
    """Hydra overrides from a shell-like string ("model=a,b benchmark.steps=3") or a list of them."""
    if text is None:
        return []
    if isinstance(text, str):
        try:
            return shlex.split(text)
        except ValueError as e:  # an unbalanced quote
            raise PlanError(f"overrides {text!r} are not shell-like words ({e}); quote a value holding spaces or "
                            "quotes for Hydra, e.g. key='\"a b\"'") from None
    return [str(t) for t in text]


def sweep_points(params: Mapping[str, str], sweep: Iterable[str] = ()) -> list[tuple[str, ...]]:
    """The sweep points of `params` ({key: "v1,v2"}, an experiment's hydra.sweeper.params) after the overrides in
    `sweep` ("key=v1,v2" replaces that key's values, a new key adds a dimension), expanded as Hydra's basic
    sweeper does: the cartesian product of each key's values, keys in order (a later override of a key replaces
    its values in place)."""
    parser = OverridesParser.create()
    merged: dict[str, str] = {str(k): str(v) for k, v in params.items()}
    for ov in parser.parse_overrides(list(sweep)):
        merged[ov.get_key_element()] = str(ov.input_line).split("=", 1)[1]
    values: dict[str, list[str]] = {}
    for ov in parser.parse_overrides([f"{k}={v}" for k, v in merged.items()]):
        key = ov.get_key_element()
        if not ov.is_sweep_override():
            values[key] = [f"{key}={ov.get_value_element_as_str()}"]
        elif ov.is_discrete_sweep():
            values[key] = [f"{key}={v}" for v in ov.sweep_string_iterator()]
        else:
            raise PlanError(f"BasicSweeper does not support sweep type : {ov.value_type.name}")
    return list(itertools.product(*values.values()))


def sweeper_params(cfg: DictConfig) -> dict[str, str]:
    """An experiment's `hydra.sweeper.params` as {key: "v1,v2"} ({} when it sweeps nothing)."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    return {str(k): str(v) for k, v in (OmegaConf.to_container(params) if params else {}).items()}


def cell_name(point: Iterable[str]) -> str:
    """Hydra's override_dirname of a sweep point: sorted key=value, joined by commas."""
    name = ",".join(sorted(point))
    return name or "default"


def point_dict(point: Iterable[str]) -> dict[str, str]:
    return dict(p.split("=", 1) for p in point)


def set_dotted(cfg: DictConfig, point: Iterable[str]) -> None:
    """Apply a sweep point's dotted overrides (benchmark.seq_len=...) to a config composed with its groups."""
    parser = OverridesParser.create()
    for ov in parser.parse_overrides([p for p in point if "." in p.split("=", 1)[0]]):
        OmegaConf.update(cfg, ov.key_or_group, ov.value(), force_add=ov.is_add() or ov.is_force_add())
