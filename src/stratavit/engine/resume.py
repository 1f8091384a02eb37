"""Starting or continuing a run in a run folder: its config, and where a continued run resumes.

A continued run starts from ``checkpoints/last.ckpt``, or with ``from_previous`` from
``checkpoints/previous.ckpt`` (the one before it, kept by
:func:`stratavit.engine.callbacks.checkpoint.save_atomically`): the way on when ``last.ckpt`` is
damaged, which :func:`read_resume_point` reports in one line naming that command.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from stratavit.config import Config, ConfigError, to_dict
from stratavit.engine.callbacks.checkpoint import data_position
from stratavit.recipe import load_config_file, resolve_config
from stratavit.run_folder import RunFolder


def resolve_run_config(
    run_dir: Path, recipe: str | None, overrides: Sequence[str], resume: bool, from_previous: bool = False
) -> tuple[Config, bool]:
    """The config of a new run, or of the run in ``run_dir`` continued (with ``overrides`` on top).

    Returns ``(config, resuming)``.
    """
    run = RunFolder(run_dir)
    if from_previous and not (run.previous_checkpoint.exists() and run.config.exists()):
        raise ConfigError(f"--from-previous: there is no earlier checkpoint to continue from ({run.previous_checkpoint} "
                          "does not exist); drop --from-previous")
    if (run.checkpoint.exists() or from_previous) and run.config.exists():
        cfg = load_config_file(run.config)
        if recipe is not None and recipe != cfg.recipe:
            raise ConfigError(
                f"{run_dir} holds a '{cfg.recipe}' run; pass --recipe {cfg.recipe} to continue it, "
                f"or choose another --out for a new '{recipe}' run"
            )
        if overrides:
            cfg = resolve_config(to_dict(cfg), list(overrides))
        return cfg, True
    if resume:
        raise ConfigError(f"--resume: no checkpoint at {run.checkpoint}; nothing to continue (drop --resume to start)")
    if recipe is None:
        raise ConfigError("choose a recipe with --recipe (see `stratavit recipes`)")
    return resolve_config(recipe, list(overrides)), False


def truncate_metrics(path: Path, from_step: int) -> None:
    """Drop rows logged at or after ``from_step`` (written after the checkpoint of a killed run),
    and a last line cut short by a kill in the middle of writing it."""
    if not path.exists():
        return
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(complete, newline="")))
    fields = list(rows[0].keys()) if rows else None
    if not fields:
        return
    kept = [r for r in rows if r.get("step", "") == "" or int(float(r["step"])) < from_step]
    if len(kept) == len(rows) and complete == text:
        return
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(kept)
    os.replace(tmp, path)


@dataclass
class ResumePoint:
    """Where a continued run starts: its checkpoint, the optimiser steps done, and the data position."""

    checkpoint: Path
    step: int
    epoch: int
    position: tuple[int, int] | None
    """``(epoch, batches of it done)``; None for checkpoints from before it was recorded."""


def _load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, memory-mapped (nothing big is read); raises what ``torch.load`` raises."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or "global_step" not in state:
        raise ValueError("not a stratavit training checkpoint")
    return state


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint holds, or None if it cannot be read."""
    try:
        return int(_load_state(path)["global_step"])
    except Exception:
        return None


def damaged_message(run: RunFolder, path: Path, error: BaseException) -> str:
    """One line: ``path`` (the checkpoint a continued run needs) cannot be read, it is kept, and the
    command that goes on: from ``previous.ckpt`` when that one reads, else a new folder."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    head = f"{path} is damaged ({reason}); it is kept as is. "
    if path == run.checkpoint and run.previous_checkpoint.exists():
        step = checkpoint_step(run.previous_checkpoint)
        if step is not None:
            return (head + f"Continue from the checkpoint before it (step {step}) with: "
                    f"stratavit pretrain --out {run.root} --from-previous")
    return (head + "There is no earlier checkpoint to go back to: start over in a new folder with: "
            f"stratavit pretrain --recipe {run.config} --out NEW_RUN_DIR")


def read_resume_point(run: RunFolder, cfg: Config, from_previous: bool = False) -> ResumePoint:
    """The run's ``last.ckpt`` (or ``previous.ckpt``) as a :class:`ResumePoint`; ConfigError if it
    cannot be read (:func:`damaged_message`) or if ``cfg`` ends before it."""
    path = run.previous_checkpoint if from_previous else run.checkpoint
    try:
        state = _load_state(path)
    except Exception as e:  # truncated, not a zip, not a checkpoint, unreadable
        raise ConfigError(damaged_message(run, path, e)) from None
    point = ResumePoint(path, int(state.get("global_step", 0)), int(state.get("epoch", 0)), data_position(state))
    del state
    t = cfg.train
    if point.epoch > t.epochs or (t.max_steps is not None and point.step > t.max_steps):
        raise ConfigError(
            f"{run.root} was checkpointed at epoch {point.epoch}, step {point.step}, already past "
            f"train.epochs={t.epochs} / train.max_steps={t.max_steps}; continue without "
            "that override (the run's config.yaml has its own) or raise it"
        )
    return point


SET_ASIDE = "last.ckpt.set-aside"
"""Where ``--from-previous`` moves ``last.ckpt`` (beside it) before the run continues from ``previous.ckpt``."""


def prepare_resume(point: ResumePoint, loader: DataLoader) -> ResumePoint:
    """Move the loader to the checkpoint's data position: the same batches, in the same order, as
    the uninterrupted run. Changes nothing on disk (see :func:`begin_run`)."""
    resume_data = getattr(loader.sampler, "resume", None)  # ResumableSampler, or the shard loader's hook
    if point.position is not None and callable(resume_data):
        resume_data(*point.position)
    return point


def begin_run(run: RunFolder, point: ResumePoint | None) -> None:
    """The changes a run makes to its folder before training, once every check has passed: drop
    the ``metrics.csv`` rows written after the checkpoint it continues from (all of them for a run
    that starts afresh: they are an earlier start's that never wrote a checkpoint) and, continuing
    from ``previous.ckpt``, move ``last.ckpt`` aside (:data:`SET_ASIDE`), so that the next
    checkpoint does not make it the new ``previous.ckpt``."""
    if point is not None and point.checkpoint == run.previous_checkpoint and run.checkpoint.exists():
        os.replace(run.checkpoint, run.checkpoint.with_name(SET_ASIDE))
    truncate_metrics(run.metrics, point.step if point is not None else 0)
