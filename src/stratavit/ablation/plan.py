"""The plan of an ablation: which recipes, which seeds, under what equal budget, evaluated how.

A :class:`Plan` is what ``stratavit ablate`` records in ``ABL/ablation_plan.json`` and checks on
every re-run: the same plan continues, a different one is refused naming what differs
(:func:`plan_differences`). Recipes and seeds may be added to a recorded plan; everything else
(data, budget, overrides, evaluation sets and options) must stay the same, or the runs would not
be comparable.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from stratavit.ablation.errors import AblationError
from stratavit.config import Config, parse_override
from stratavit.data.datasets import NAMED_DATASETS, SAMPLE_NAME

__all__ = ["Plan", "budget_words", "build_plan", "default_eval_sets", "plan_differences", "route_overrides", "run_label"]

# keys ablate sets itself, per run or from --steps / --budget
_OWN_KEYS = {
    "train.seed": "the seed is set per run by --seeds",
    "train.max_steps": "the equal budget is set by --steps or --budget",
    "train.epochs": "the equal budget is set by --steps or --budget",
    "train.budget": "the equal budget is set by --budget",
}
_SPEED_ONLY = {"num_workers"}  # evaluation options that change the speed, never a number: may differ on a re-run
_UNITS = {"s": "s", "m": "min", "h": "h", "d": "d"}  # the duration units of train.budget


@dataclass
class Plan:
    """Recipes × seeds trained on ``data`` under the same budget, evaluated with the same options.

    ``budget`` (``"10m"``: equal wall time, the config key ``train.budget``) or ``steps`` (equal
    optimiser steps: ``train.max_steps`` = ``train.epochs`` = steps, so the schedules end at the
    last step); ``overrides`` apply to every run; ``eval_options``: every evaluation option
    (:meth:`stratavit.evaluation.options.Options.to_dict`).
    """

    recipes: list[str]
    seeds: list[int]
    data: str
    budget: str | None = None
    steps: int | None = None
    overrides: list[str] = field(default_factory=list)
    eval_train: str = ""
    eval_test: str = ""
    eval_options: dict[str, Any] = field(default_factory=dict)

    def train_overrides(self, seed: int) -> list[str]:
        """The config overrides of the run of ``seed``: the plan's, the budget's, then the seed."""
        own = [f"train.budget={self.budget}"] if self.budget is not None else [
            f"train.max_steps={self.steps}", f"train.epochs={self.steps}"]
        return [*self.overrides, *own, f"train.seed={seed}"]

    @property
    def budget_label(self) -> str:
        """``"10 min"`` or ``"200 steps"``: how the headline names the budget."""
        return budget_words(self.budget) if self.budget is not None else f"{self.steps} steps"

    def protocol(self) -> dict[str, Any]:
        """Everything but the recipes and seeds: what makes two runs comparable."""
        d = {k: v for k, v in asdict(self).items() if k not in ("recipes", "seeds")}
        d["eval_options"] = {k: v for k, v in self.eval_options.items() if k not in _SPEED_ONLY}
        return d

    def fingerprint(self) -> str:
        """A short hash of :meth:`protocol`, recorded in each run's ``results.json`` meta."""
        return hashlib.sha1(json.dumps(self.protocol(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def check(self) -> None:
        """Refuse a plan that cannot make a fair comparison (one line saying what to change)."""
        for recipe in self.recipes:
            if "=" in recipe:
                raise AblationError(f"--recipes {recipe}: looks like an override; put key=value overrides after "
                                    "the options (e.g. after --out), not right after --recipes")
        labels = [run_label(r) for r in self.recipes]
        if len(set(labels)) != len(labels):
            raise AblationError(f"--recipes {' '.join(self.recipes)}: each recipe once, please")
        if not self.seeds:
            raise AblationError("--seeds must be at least 1 (3 or more give usable intervals)")
        if (self.budget is None) == (self.steps is None):
            raise AblationError("choose the equal budget: --budget 10m (equal wall time) or --steps N (equal "
                                "optimiser steps), one of the two")
        if self.steps is not None and self.steps < 1:
            raise AblationError(f"--steps {self.steps}: give a positive number of optimiser steps")
        for text in self.overrides:
            key = ".".join(parse_override(text)[0])
            if key in _OWN_KEYS:
                raise AblationError(f"override {text!r}: {_OWN_KEYS[key]}; drop it")


def route_overrides(eval_tokens: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(training overrides, evaluation options)``: the ``key=value`` given after ``--eval`` whose key
    is a training config section (``backbone.``, ``data.``, ``train.``, ...) join the training
    overrides (``--eval`` takes every ``key=value`` after it; the two namespaces do not overlap)."""
    sections = {f.name for f in fields(Config)}
    to_train = [t for t in eval_tokens if t.partition("=")[0].split(".")[0].strip() in sections]
    return [*overrides, *to_train], [t for t in eval_tokens if t not in to_train]


def run_label(recipe: str) -> str:
    """The folder name of a recipe's runs: the recipe name, or a YAML file's stem."""
    return Path(recipe).stem if recipe.endswith((".yaml", ".yml")) or "/" in recipe else recipe


def budget_words(budget: str) -> str:
    """``"10m"`` -> ``"10 min"``, ``"1h30m"`` -> ``"1 h 30 min"``, ``"900"`` -> ``"900 s"``; anything else as given."""
    text = str(budget).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return f"{text} s"
    if text and re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+", text):
        return " ".join(f"{n} {_UNITS[u]}" for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", text))
    return str(budget)


def default_eval_sets(data: str, train: str | None, test: str | None) -> tuple[str, str]:
    """The labelled sets every run is evaluated on: as given, or a named set's own train / test split.

    Your own ``--data`` folder has no held-out labelled split stratavit could trust, so it needs
    ``--eval-train`` and ``--eval-test``.
    """
    if train and test:
        return train, test
    if train or test:
        raise AblationError("give both --eval-train and --eval-test (labelled ImageFolder dirs or named sets)")
    name = data.partition(":")[0]
    if name in (*NAMED_DATASETS, SAMPLE_NAME) and not Path(data).exists():
        return name, f"{name}:test"
    raise AblationError(
        f"--data {data} has no labelled test split stratavit knows: give the labelled evaluation sets with "
        "--eval-train DIR --eval-test DIR (ImageFolder dirs, the same for every run)"
    )


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _words(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value) or "none"
    return "none" if value is None else str(value)


def plan_differences(recorded: Plan, given: Plan) -> list[str]:
    """What differs between the recorded plan and the one given, ``"steps 2 there, 3 here"`` each;
    recipes and seeds may be added (not removed)."""
    out = []
    for name in ("recipes", "seeds"):
        there, here = getattr(recorded, name), getattr(given, name)
        if not set(there) <= set(here):
            out.append(f"{name} {_words(there)} there, {_words(here)} here (they may only be added to)")
    for name in ("data", "budget", "steps", "overrides", "eval_train", "eval_test"):
        there, here = getattr(recorded, name), getattr(given, name)
        if there != here:
            out.append(f"{name.replace('_', '-')} {_words(there)} there, {_words(here)} here")
    there, here = _flat(recorded.eval_options), _flat(given.eval_options)
    for key in sorted((set(there) | set(here)) - _SPEED_ONLY):
        if there.get(key) != here.get(key):
            out.append(f"eval option {key} {_words(there.get(key))} there, {_words(here.get(key))} here")
    return out


def _normalised(spec: str | None) -> str | None:
    """A path that exists, made absolute (a re-run from another folder is the same plan); a named set as is."""
    return str(Path(spec).resolve()) if spec and Path(spec).exists() else spec


def build_plan(
    recipes: Sequence[str], seeds: int, data: str, *, budget: str | None, steps: int | None,
    overrides: Sequence[str] = (), eval_train: str | None = None, eval_test: str | None = None,
    eval_options: Mapping[str, Any] | None = None,
) -> Plan:
    """A checked :class:`Plan`; seeds ``0 .. seeds-1``, paths made absolute, eval sets defaulted.

    ``eval_options``: the evaluation options, already complete (``Options.to_dict()``).
    """
    train, test = default_eval_sets(data, eval_train, eval_test)
    options = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (eval_options or {}).items()}
    for name in ("train", "val"):  # the dense probe's folders
        if isinstance(options.get("dense"), dict) and options["dense"].get(name):
            options["dense"][name] = _normalised(options["dense"][name])
    plan = Plan(
        recipes=list(recipes), seeds=list(range(seeds)), data=_normalised(data) or data, budget=budget, steps=steps,
        overrides=list(overrides), eval_train=_normalised(train) or train, eval_test=_normalised(test) or test,
        eval_options=options,
    )
    plan.check()
    return plan
