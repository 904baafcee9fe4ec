r"""YAML configs with ``dotted.key=value`` overrides from the command line."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping

import yaml


def load_config(path, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    r"""Read a YAML config and apply ``a.b.c=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the config must be a mapping")
    base = config.pop("base", None)
    if base is not None:  # one level of inheritance: configs/<model>.yaml on top of a shared file
        parent = load_config(path.parent / base)
        config = merge(parent, config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key.sub=value")
        key, value = item.split("=", 1)
        set_dotted(config, key.strip(), yaml.safe_load(value))
    return config


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    r"""Recursive dictionary merge; ``update`` wins.

    A mapping that names a different ``strategy`` than the inherited one replaces it instead of
    being merged into it, so that the settings of one strategy (``grid_size`` of grid regions)
    never reach another (sequential regions)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
                and value.get("strategy", out[key].get("strategy")) == out[key].get("strategy"):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(config: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
