"""Recipes: a YAML file (``stratavit/recipes/<name>.yaml`` or a path) plus ``key=value`` overrides
-> a validated :class:`~stratavit.config.Config`.

This is the layer above the objectives: it resolves ``objectives.<name>`` sections through the
objectives registry (:data:`stratavit.objectives.OBJECTIVES`) into each objective's own config
dataclass, so :mod:`stratavit.config` never needs to know an objective. Overrides such as
``train.epochs=2`` or ``objectives.dino.out_dim=4096`` are checked key by key and value by value
before anything runs.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from stratavit.config import (
    Config,
    ConfigError,
    build_dataclass,
    check_override_path,
    parse_override,
    set_path,
    unknown_key,
    validate,
)
from stratavit.objectives import OBJECTIVES


def recipe_names() -> list[str]:
    """Names of the recipes shipped in ``stratavit/recipes``."""
    folder = resources.files("stratavit") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe_dict(recipe: str) -> dict[str, Any]:
    """Read a recipe by name, or a YAML file path, into a plain dict."""
    path = Path(recipe)
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        if not path.is_file():
            raise ConfigError(f"no such recipe file: {recipe}; give an existing YAML file or a recipe name "
                              f"(`stratavit recipes` lists them)")
        text = path.read_text()
    else:
        names = recipe_names()
        if recipe not in names:
            raise _unknown_recipe(recipe, names)
        text = (resources.files("stratavit") / "recipes" / f"{recipe}.yaml").read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"recipe {recipe} is not valid YAML{at} ({problem}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {recipe!r} is not a YAML mapping")
    data.setdefault("recipe", path.stem if path.exists() else recipe)
    return data


def _unknown_recipe(recipe: str, names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(recipe, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown recipe '{recipe}'.{hint} Available: {', '.join(names)}")


def _check_override(parts: list[str]) -> None:
    """Reject unknown keys in an override before merging, naming the allowed ones."""
    if parts[0] != "objectives":
        check_override_path(Config, parts)
        return
    if len(parts) == 1:
        raise ConfigError("set one objective field at a time, e.g. objectives.dino.out_dim=4096")
    if parts[1] not in OBJECTIVES:
        raise unknown_key(f"objectives.{parts[1]}", parts[1], list(OBJECTIVES))
    check_override_path(OBJECTIVES[parts[1]].config_class, parts, 2)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a plain mapping (a recipe or a saved config.yaml) into a :class:`Config`."""
    data = dict(data)
    objectives_raw = data.pop("objectives", None) or {}
    if not isinstance(objectives_raw, dict):
        raise ConfigError("objectives: expected a mapping of objective name -> settings")
    cfg = build_dataclass(Config, data)
    objectives: dict[str, Any] = {}
    for name, values in objectives_raw.items():
        if name not in OBJECTIVES:
            raise unknown_key(f"objectives.{name}", name, list(OBJECTIVES))
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"objectives.{name}: expected a mapping, got {values!r}")
        objectives[name] = build_dataclass(OBJECTIVES[name].config_class, values, f"objectives.{name}")
    cfg.objectives = objectives
    validate(cfg)
    return cfg


def resolve_config(recipe: str | dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Recipe (name, YAML path or dict) + ``key=value`` overrides -> validated :class:`Config`."""
    data = load_recipe_dict(recipe) if isinstance(recipe, str) else dict(recipe)
    for text in overrides or []:
        parts, value = parse_override(text)
        _check_override(parts)
        set_path(data, parts, value)
    return config_from_dict(data)


def load_config_file(path: Path) -> Config:
    """Read a run folder's resolved ``config.yaml`` back into a :class:`Config`."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a YAML mapping")
    return config_from_dict(data)
