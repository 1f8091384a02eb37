"""Starting or continuing a run in a run folder: its config, and where a continued run resumes."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from stratavit.config import Config, ConfigError, to_dict
from stratavit.engine.callbacks.checkpoint import data_position
from stratavit.recipe import load_config_file, resolve_config
from stratavit.run_folder import RunFolder


def resolve_run_config(
    run_dir: Path, recipe: str | None, overrides: Sequence[str], resume: bool
) -> tuple[Config, bool]:
    """The config of a new run, or of the run in ``run_dir`` continued (with ``overrides`` on top).

    Returns ``(config, resuming)``.
    """
    run = RunFolder(run_dir)
    if run.checkpoint.exists() and run.config.exists():
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


def read_resume_point(run: RunFolder, cfg: Config) -> ResumePoint:
    """The run's ``last.ckpt`` as a :class:`ResumePoint`; ConfigError if ``cfg`` ends before it."""
    state = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    point = ResumePoint(run.checkpoint, int(state.get("global_step", 0)), int(state.get("epoch", 0)), data_position(state))
    del state
    t = cfg.train
    if point.epoch > t.epochs or (t.max_steps is not None and point.step > t.max_steps):
        raise ConfigError(
            f"{run.root} was checkpointed at epoch {point.epoch}, step {point.step}, already past "
            f"train.epochs={t.epochs} / train.max_steps={t.max_steps}; continue without "
            "that override (the run's config.yaml has its own) or raise it"
        )
    return point


def prepare_resume(run: RunFolder, cfg: Config, loader: DataLoader) -> ResumePoint:
    """Continue the run in ``run``: drop the metrics rows written after its checkpoint and move the
    loader to the checkpoint's data position (the same batches, in the same order, as the
    uninterrupted run)."""
    point = read_resume_point(run, cfg)
    truncate_metrics(run.metrics, point.step)
    resume_data = getattr(loader.sampler, "resume", None)  # ResumableSampler, or the shard loader's hook
    if point.position is not None and callable(resume_data):
        resume_data(*point.position)
    return point
