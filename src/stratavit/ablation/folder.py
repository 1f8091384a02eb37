"""The ablation folder: its runs, its state file (the plan and each run's last status) and its outputs.

::

    ABL/ablation_plan.json           the plan (recipes, seeds, budget, overrides, evaluation) + run status
    ABL/runs/<recipe>/seed<s>/       a stratavit run folder (pretrain), evaluated into its eval/
    ABL/ablation.md                  the table: mean ± 95 % interval per metric and recipe, verdicts vs the base
    ABL/ablation.csv                 long form: recipe, seed, metric, value
    ABL/ablation.json                everything above, machine-readable
    ABL/ablation.png                 per-metric means with interval bars, recipes side by side
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stratavit.ablation.errors import AblationError
from stratavit.ablation.plan import Plan, plan_differences, run_label

__all__ = ["AblationFolder", "State", "open_state"]

STATE = "ablation_plan.json"
OUTPUTS = ("ablation.md", "ablation.csv", "ablation.json", "ablation.png")
FORMAT = 1


@dataclass(frozen=True)
class AblationFolder:
    """Paths of one ablation folder (``AblationFolder(Path("abl")).run_dir("mcvt", 0)``)."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run_dir(self, recipe: str, seed: int) -> Path:
        return self.runs / run_label(recipe) / f"seed{seed}"

    def output(self, suffix: str) -> Path:
        """``ablation.md`` / ``.csv`` / ``.json`` / ``.png``."""
        return self.root / f"ablation.{suffix}"

    def clear(self) -> None:
        """Delete what an ablation wrote here (runs, state, outputs); nothing else."""
        shutil.rmtree(self.runs, ignore_errors=True)
        for path in (self.state, *(self.root / name for name in OUTPUTS)):
            path.unlink(missing_ok=True)


@dataclass
class State:
    """The recorded plan and, per run (``"mcvt/seed0"``), its last status: ``trained``, ``evaluated`` or
    ``failed`` (with the ``stage`` and a one-line ``error``), and the seconds it took."""

    folder: AblationFolder
    plan: Plan
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def save(self) -> None:
        """Write the state file atomically (a kill never leaves half of it)."""
        data = {"stratavit_ablation": FORMAT, "plan": self.plan.to_dict(), "runs": self.runs}
        tmp = self.folder.state.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.folder.state)

    def record(self, key: str, **entry: Any) -> None:
        self.runs[key] = {**self.runs.get(key, {}), **entry}
        self.save()


def _read(folder: AblationFolder) -> tuple[Plan, dict[str, dict[str, Any]]]:
    try:
        data = json.loads(folder.state.read_text())
        return Plan.from_dict(data["plan"]), dict(data.get("runs") or {})
    except (ValueError, KeyError, TypeError):
        raise AblationError(f"{folder.state} is damaged; pass --overwrite to start the ablation over "
                            "(its finished runs are deleted)") from None


def open_state(root: Path, plan: Plan, overwrite: bool = False) -> State:
    """The state of the ablation in ``root`` for ``plan``: new, continued, or (``overwrite``) started over.

    Raises:
        AblationError: ``root`` holds an ablation with another plan (naming what differs), or files
            that are not an ablation's.
    """
    folder = AblationFolder(Path(root))
    if folder.root.exists() and not folder.root.is_dir():
        raise AblationError(f"--out {root} is a file; give a folder for the ablation")
    if folder.state.exists():
        if overwrite:
            folder.clear()
        else:
            recorded, runs = _read(folder)
            differences = plan_differences(recorded, plan)
            if differences:
                raise AblationError(
                    f"{root} holds an ablation with another plan ({'; '.join(differences)}); re-run it with its own "
                    "settings to continue, choose another --out, or pass --overwrite to start over (deletes its runs)"
                )
            state = State(folder, plan, runs)
            state.save()
            return state
    elif folder.root.exists() and any(folder.root.iterdir()):
        raise AblationError(f"{root} is not empty and holds no ablation; choose a new or empty --out folder")
    folder.root.mkdir(parents=True, exist_ok=True)
    state = State(folder, plan)
    state.save()
    return state
