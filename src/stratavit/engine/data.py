"""The data of a pre-training run: the multi-crop training loader and the dataset-pass images."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from stratavit.config import Config, ConfigError
from stratavit.data.datasets import (
    DataError,
    Indexed,
    build_dataset,
    check_image_sizes,
    set_skip_log,
)
from stratavit.data.sampling import ResumableSampler
from stratavit.data.shard_format import is_shard_dir
from stratavit.data.shards import shard_loader
from stratavit.data.views import MultiCropTransform, collate_views, eval_transform


def _check_size(n: int, cfg: Config) -> None:
    """DataError unless every process gets at least one full batch of the ``n`` images."""
    if n < cfg.data.batch_size:
        raise DataError(
            f"{cfg.data.path} has {n} images, fewer than data.batch_size={cfg.data.batch_size}; "
            "lower data.batch_size or add images"
        )
    world = cfg.train.devices * cfg.train.num_nodes
    if world > 1 and n // world < cfg.data.batch_size:
        raise DataError(
            f"{cfg.data.path} has {n} images: {n // world} per process for {world} processes, fewer than "
            f"data.batch_size={cfg.data.batch_size}; lower data.batch_size or add images"
        )


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: taskset, cgroup cpusets, SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def resolve_num_workers(cfg: Config) -> int:
    """``data.num_workers`` as a number: itself, or for ``auto`` min(8, cores per training process
    − 1), at least 0 (one core per process stays with the training loop itself)."""
    n = cfg.data.num_workers
    if n != "auto":
        return int(n)
    processes = max(1, int(cfg.train.devices)) if isinstance(cfg.train.devices, int) else 1
    return max(0, min(8, usable_cores() // processes - 1))


def with_num_workers(cfg: Config) -> Config:
    """A copy of ``cfg`` whose ``data.num_workers`` is the number :func:`resolve_num_workers` picks."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=resolve_num_workers(cfg)))


class _IgnoreStopSignals:
    """A loader's ``worker_init_fn``: the worker ignores SIGINT and SIGTERM, then runs ``inner``.

    The training process stops at a step boundary on those signals
    (:mod:`stratavit.engine.callbacks.interrupt`) and then ends its workers; killed by the Ctrl-C or
    SIGTERM that reaches the whole process group, they would take that step with them. A class,
    not a closure: spawned (and, from Python 3.14, forkserver) workers receive it pickled.
    """

    def __init__(self, inner: Callable[[int], Any] | None = None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def ignore_stop_signals(loader: DataLoader) -> DataLoader:
    """Make ``loader``'s workers ignore SIGINT and SIGTERM (before its own ``worker_init_fn``)."""
    if not isinstance(loader.worker_init_fn, _IgnoreStopSignals):
        loader.worker_init_fn = _IgnoreStopSignals(loader.worker_init_fn)
    return loader


def build_train_loader(cfg: Config, patch_size: int, skip_log: Path | None = None) -> DataLoader:
    """Multi-crop training loader: batches are :class:`~stratavit.data.views.MultiViewBatch`.

    Unreadable images are skipped; with ``skip_log`` their paths are appended to that file by
    whichever process (loader worker) met them. ``data.num_workers=auto`` is resolved here
    (:func:`resolve_num_workers`); the workers ignore SIGINT and SIGTERM (:func:`ignore_stop_signals`).
    """
    return ignore_stop_signals(_train_loader(with_num_workers(cfg), patch_size, skip_log))


def _train_loader(cfg: Config, patch_size: int, skip_log: Path | None) -> DataLoader:
    if cfg.data.path is None:
        raise ConfigError("no training data: pass --data DIR (an ImageFolder directory) or a named set such as cifar10")
    transform = MultiCropTransform(cfg.views, patch_size)
    if is_shard_dir(cfg.data.path):  # tar shards: streamed, split across processes and workers
        return shard_loader(cfg, transform, skip_log)
    ds = build_dataset(cfg.data.path, split="train", transform=transform, root=cfg.data.root, limit=cfg.data.limit, seed=cfg.train.seed)
    if skip_log is not None:
        set_skip_log(ds, skip_log)
    check_image_sizes(
        ds, cfg.views.global_size, cfg.data.path, cfg.data.allow_upsampling, multiple=patch_size,
        local_size=cfg.views.local_size if cfg.views.local_crops else None, resize=cfg.views.resize,
    )
    n = len(ds)  # type: ignore[arg-type]
    _check_size(n, cfg)
    # The order of each epoch and each sample's views are pure functions of (seed, epoch, index):
    # a run resumed mid-epoch continues exactly (stratavit.data.sampling).
    return DataLoader(
        Indexed(ds, seed=cfg.train.seed),
        batch_size=cfg.data.batch_size,
        sampler=ResumableSampler(n, cfg.train.seed, cfg.data.batch_size),
        drop_last=True,
        num_workers=int(cfg.data.num_workers),
        collate_fn=collate_views,
        persistent_workers=int(cfg.data.num_workers) > 0,
        pin_memory=torch.cuda.is_available(),
    )


def dataset_pass_images(cfg: Config) -> Dataset:
    """The training images (after ``data.limit``) with the evaluation transform, yielding
    ``(image, label, index)``: what a dataset pass (E-step) embeds."""
    assert cfg.data.path is not None
    plain = build_dataset(
        cfg.data.path, split="train", transform=eval_transform(cfg.views.global_size, cfg.views.mean, cfg.views.std),
        root=cfg.data.root, limit=cfg.data.limit, seed=cfg.train.seed,
    )
    return Indexed(plain)
