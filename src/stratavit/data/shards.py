"""Read tar shards (layout: :mod:`stratavit.data.shard_format`): stream them for training, read any sample by index."""

from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from stratavit import distributed
from stratavit.data.errors import DataError
from stratavit.data.sampling import sample_seed, seeded_rng
from stratavit.data.shard_format import (
    DECODE_ERRORS,
    DEFAULT_SHUFFLE_BUFFER,
    TAR_ERRORS,
    decode_sample,
    read_index,
    read_shard,
    split_name,
    tar_members,
)
from stratavit.data.views import collate_views

if TYPE_CHECKING:
    from stratavit.config import Config

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ reading


def _plan(counts: Sequence[int], order: Sequence[int], begin: int, end: int) -> list[tuple[int, int, int]]:
    """Positions ``begin .. end-1`` of the shards concatenated in ``order``, as ``(shard, start, stop)``."""
    pieces, at = [], 0
    for s in order:
        lo, hi = max(begin, at), min(end, at + counts[s])
        if lo < hi:
            pieces.append((s, lo - at, hi - at))
        at += counts[s]
        if at >= end:
            break
    return pieces


def _shares(n: int, parts: int, unit: int = 1) -> list[int]:
    """Split ``n`` items into ``parts`` shares of whole ``unit``s, as even as possible (the rest is dropped)."""
    units = n // unit
    return [(units // parts + (i < units % parts)) * unit for i in range(parts)]


class _SkipRecorder:
    """Counts, logs and (with ``skip_log``) records unreadable samples, like ImageFolderDataset."""

    bad_files: list[str]
    skip_log: Path | None

    def _record_bad(self, name: str, error: object) -> None:
        if name in self.bad_files:
            return
        self.bad_files.append(name)
        log.warning("skipping unreadable sample %s (%s)", name, error)
        if self.skip_log is not None:
            with open(self.skip_log, "a") as fh:  # one short line: an atomic append
                fh.write(name + "\n")


class ShardDataset(_SkipRecorder, IterableDataset):
    """Stream ``(transform(img), label)`` — or ``(x, label, index)`` with ``with_index`` — from shards.

    **Who reads what.** Each epoch the shard order is shuffled, seeded by ``(seed, epoch)`` (same on every
    process) and the shards are laid end to end: a sequence of ``n`` samples (``n = total``, or
    ``limit`` if smaller: the first ``limit`` global indices). Process ``rank`` of ``world`` takes
    the contiguous block ``[rank·n/world, (rank+1)·n/world)`` of that sequence, exactly
    ``n // world`` samples; the last ``n % world`` samples of the epoch's order are not read that
    epoch (a different tail every epoch, since the shard order changes). Inside a process the block
    is cut again into contiguous parts for the loader workers. With ``batch_size``, every worker's
    part is a whole number of batches, so with ``DataLoader(drop_last=True)`` each process yields
    exactly ``len(self) // batch_size`` full batches (DDP needs the same number everywhere) and at
    most ``batch_size - 1`` more samples per process go unread. No sample is read twice; blocks may
    start or end inside a shard (the reader skips over the headers before its part), so any number
    of shards works with any ``world × workers``; shards much larger than a worker's part only cost
    that header scan.

    **Shuffling.** Shard order per epoch, then a buffer of ``shuffle_buffer`` undecoded samples per
    worker (seeded by seed, epoch, rank and worker). Call :meth:`set_epoch` before each epoch
    (stratavit's training loader gets it called by Lightning); it reaches persistent loader workers
    through shared memory. Each sample's transform runs under
    :func:`~stratavit.data.sampling.seeded_rng` ``(sample_seed(seed, epoch, index))``, as in the
    ImageFolder loader, so its views do not depend on the worker or rank that makes them.

    **Resuming.** :meth:`resume` ``(epoch, batches_done)`` makes epoch ``epoch`` skip the batches a
    killed run already trained on (for the loader's round-robin over workers); the skipped samples
    are read (to replay the shuffle buffer) but not decoded.

    **Unreadable samples** (undecodable image, missing member, truncated shard) are skipped,
    counted in :attr:`bad_files` (``shard-000003.tar:KEY``), logged, appended to :attr:`skip_log`
    when set, and replaced by another sample of the same worker's stream (a fresh transform of the
    previous readable image), so the counts above hold.

    Args:
        root: shard folder (with ``index.json``).
        rank, world_size: this process and the number of processes; default: torch.distributed's
            at iteration time (read in the main process, where Lightning has set it up).
        batch_size: the loader's batch size, to cut worker parts into whole batches (see above).
        limit: use only the first ``limit`` global indices (a random subset: the writer shuffled).
        with_index: yield ``(x, label, global index)``, the index being the sample's position in
            the shard set (``KEY``), the same in every epoch.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int | None = None,
        limit: int | None = None,
        with_index: bool = False,
    ) -> None:
        self.index = read_index(root)
        self.root = self.index.root
        self.classes = list(self.index.classes)
        self.transform = transform
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.batch_size = batch_size
        self.with_index = with_index
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed's are used)")
        if world_size is not None and not 0 <= int(rank) < int(world_size):  # type: ignore[arg-type]
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self._fixed = None if rank is None else (int(rank), int(world_size))  # type: ignore[arg-type]
        self._seen: tuple[int, int] | None = None
        n = self.index.total if limit is None else min(int(limit), self.index.total)
        self.num_samples = n
        """Samples in use (``limit`` applied), over all processes."""
        self._counts = [max(0, min(c, n - o)) for c, o in zip(self.index.counts, self.index.offsets)]
        # [epoch, resume epoch (-1: none), batches of it to skip]; shared with (persistent) workers
        self._state = torch.tensor([0, -1, 0], dtype=torch.int64).share_memory_()
        self.bad_files = []
        self.skip_log = None
        """If set, unreadable samples are also appended to this file (works from loader workers)."""

    # -- process layout
    def _rank_world(self) -> tuple[int, int]:
        if self._fixed is not None:
            return self._fixed
        if get_worker_info() is None or self._seen is None:
            # main process (or a forked worker that inherited the process group)
            self._seen = (distributed.rank(), distributed.world_size())
        return self._seen

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch`` from the next iteration on (also seen by persistent workers)."""
        self._state[0] = int(epoch)
        self._rank_world()

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    def batches_per_epoch(self) -> int:
        """Loader batches per epoch on each process (``batch_size`` or 1 sample per batch)."""
        return len(self) // (self.batch_size or 1)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue a run that stopped after ``batches_done`` batches of ``epoch``.

        Iterations of that epoch (``batches_done`` past its end carries into the next epochs) skip
        its first batches; other epochs are whole. Sets the epoch too (a later :meth:`set_epoch`
        with the same epoch, as Lightning makes, changes nothing).
        """
        if epoch < 0 or batches_done < 0:
            raise ValueError(f"cannot resume at epoch {epoch}, batch {batches_done}")
        extra, batches = divmod(int(batches_done), max(1, self.batches_per_epoch()))
        self._state[0] = int(epoch) + extra
        self._state[1] = int(epoch) + extra
        self._state[2] = batches

    def _batches_done(self, epoch: int) -> int:
        """Batches of ``epoch`` trained on before a restart (see :meth:`resume`), else 0."""
        return int(self._state[2]) if int(self._state[1]) == epoch else 0

    def _skip(self, done_batches: int, per_rank: int, worker: int, workers: int) -> int:
        """Samples of (logical) ``worker``'s stream among the first ``done_batches`` loader batches."""
        if done_batches == 0:
            return 0
        unit = self.batch_size or 1
        batches = [s // unit for s in _shares(per_rank, workers, unit)]
        done, left = [0] * workers, done_batches
        while left > 0 and any(d < b for d, b in zip(done, batches)):
            for w in range(workers):  # the DataLoader takes batches from its workers in turn
                if left > 0 and done[w] < batches[w]:
                    done[w] += 1
                    left -= 1
        return done[worker] * unit

    def __len__(self) -> int:
        """Samples this process yields per epoch: ``n // world`` (rounded down to whole batches)."""
        _, world = self._rank_world()
        return sum(_shares(self.num_samples // world, 1, self.batch_size or 1))

    def worker_plan(self, epoch: int, rank: int, world: int, worker: int, workers: int) -> list[tuple[int, int, int]]:
        """``(shard, start, stop)`` pieces one worker reads in ``epoch`` (pure; for tests and tools)."""
        shards = [s for s, c in enumerate(self._counts) if c > 0]
        if self.shuffle:
            shards = [shards[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(shards))]
        per_rank = self.num_samples // world
        shares = _shares(per_rank, workers, self.batch_size or 1)
        begin = rank * per_rank + sum(shares[:worker])
        return _plan(self._counts, shards, begin, begin + shares[worker])

    # -- streaming
    def _raw(self, pieces: list[tuple[int, int, int]]) -> Iterator[tuple[str, int, dict[str, bytes] | None, Any]]:
        """``(name, global index, parts or None, error)`` for every position of ``pieces``."""
        for s, start, stop in pieces:
            got, error = 0, None
            try:
                for pos, key, parts in read_shard(self.index.path(s), start, stop):
                    got += 1
                    yield f"{self.index.shards[s]}:{key}", self.index.offsets[s] + pos, parts, None
            except TAR_ERRORS as e:
                error = f"unreadable shard: {type(e).__name__}: {e}"
            for pos in range(start + got, stop):
                yield f"{self.index.shards[s]}:#{pos}", self.index.offsets[s] + pos, None, error or "missing from the shard"

    def _buffered(self, items: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        size = self.shuffle_buffer
        if size <= 1:
            yield from items
            return
        buf: list[Any] = []
        for item in items:
            if len(buf) < size:
                buf.append(item)
                continue
            j = rng.randrange(size)
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf

    def _item(self, img: Image.Image, label: int, index: int, epoch: int, seed_index: int) -> tuple[Any, ...]:
        """``(transform(img), label[, index])``, the transform's RNG seeded by ``(seed, epoch, seed_index)``.

        ``seed_index`` is ``index``, or for a replacement the index of the unreadable sample it replaces.
        """
        if self.transform is None:
            x: Any = img
        else:
            with seeded_rng(sample_seed(self.seed, epoch, seed_index)):
                x = self.transform(img)
        return (x, label, index) if self.with_index else (x, label)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        done = self._batches_done(epoch)
        # The loader takes batches from its workers in turn, starting with worker 0. After ``done``
        # batches the uninterrupted run would take the next one from part ``done % workers``: so
        # worker w reads part (w + done) % workers.
        part = (worker + done) % workers
        pieces = self.worker_plan(epoch, rank, world, part, workers)
        rng = random.Random(f"{self.seed}/{epoch}/{rank}/{part}")
        stream = self._buffered(self._raw(pieces), rng)
        for _ in range(self._skip(done, self.num_samples // world, part, workers)):
            next(stream, None)  # trained on before the restart: read, not decoded
        last: tuple[Image.Image, int, int] | None = None
        owed: list[int] = []  # indices of unreadable samples met before any readable one
        for name, index, parts, error in stream:
            if parts is not None:
                try:
                    img, label = decode_sample(parts)
                    last = (img, label, index)
                except DECODE_ERRORS as e:
                    error = f"{type(e).__name__}: {e}"
            if error is not None:
                self._record_bad(name, error)
                if last is None:
                    owed.append(index)  # replaced by the next readable sample
                    continue
            assert last is not None
            for seed_index in [index, *owed]:  # a replacement gets the views of the sample it replaces
                yield self._item(*last, epoch, seed_index)
            owed = []
        if owed:
            expected = sum(stop - start for _, start, stop in pieces)
            raise DataError(f"none of the {expected} samples of {self.root} this loader worker reads could be decoded; see the log")


class ShardMapDataset(_SkipRecorder, Dataset):
    """Random access to a shard folder: item ``i`` is ``(transform(img), label)`` of global index ``i``.

    Each shard's member table (tar headers only) is read on first use and kept per process.
    An unreadable sample is skipped: the next readable one is returned (as ImageFolderDataset does).
    ``limit`` keeps the first ``limit`` global indices (a random subset: the writer shuffled).
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None, limit: int | None = None) -> None:
        self.index = read_index(root)
        self.root = self.index.root
        self.classes = list(self.index.classes)
        self.transform = transform
        self._n = self.index.total if limit is None else min(int(limit), self.index.total)
        self._tables: dict[int, list[dict[str, tuple[int, int]]]] = {}
        self.bad_files = []
        self.skip_log = None

    def __len__(self) -> int:
        return self._n

    def _table(self, shard: int) -> list[dict[str, tuple[int, int]]]:
        """Per sample of ``shard``: ``{extension: (byte offset, size)}``."""
        if shard not in self._tables:
            table: list[dict[str, tuple[int, int]]] = []
            key = None
            try:
                with open(self.index.path(shard), "rb") as fh:
                    for name, size, offset in tar_members(fh):
                        k, ext = split_name(name)
                        if k != key:
                            table.append({})
                            key = k
                        table[-1][ext] = (offset, size)
            except TAR_ERRORS as e:
                log.warning("shard %s is damaged after %d samples (%s)", self.index.path(shard), len(table), e)
            self._tables[shard] = table
        return self._tables[shard]

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image and label of global index ``index``, skipping forward past unreadable samples."""
        for offset in range(self._n):
            i = (index + offset) % self._n
            s, pos = self.index.locate(i)
            name = f"{self.index.shards[s]}:#{pos}"
            try:
                table = self._table(s)
                if pos >= len(table):
                    raise KeyError("missing from the shard")
                parts: dict[str, bytes] = {}
                with open(self.index.path(s), "rb") as fh:
                    for ext, (off, size) in table[pos].items():
                        fh.seek(off)
                        parts[ext] = fh.read(size)
                return decode_sample(parts)
            except DECODE_ERRORS as e:
                self._record_bad(name, e)
        raise DataError(f"none of the {self._n} samples in {self.root} could be read")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self._n:
            raise IndexError(index)
        img, label = self.load(index)
        return (self.transform(img) if self.transform is not None else img), label


# ------------------------------------------------------------------------------------------ training


def shard_loader(cfg: "Config", transform: Callable[[Image.Image], Any], skip_log: Path | None = None) -> DataLoader:
    """The training loader over the shard folder ``cfg.data.path``: items ``(views, label, index)``.

    Same batches as the ImageFolder loader (``collate_views``, ``drop_last``); the shard order
    follows Lightning's epoch (it calls ``set_epoch`` on the loader's sampler, which forwards it to
    the data set). ``data.limit`` keeps the first ``limit`` global indices.
    """
    assert cfg.data.path is not None
    ds = ShardDataset(
        cfg.data.path, transform, seed=cfg.train.seed, limit=cfg.data.limit, batch_size=cfg.data.batch_size, with_index=True
    )
    ds.skip_log = Path(skip_log) if skip_log is not None else None
    world = max(1, int(cfg.train.devices)) * max(1, int(cfg.train.num_nodes))
    if ds.num_samples // world < cfg.data.batch_size:
        raise DataError(
            f"{cfg.data.path} has {ds.num_samples} samples in use, {ds.num_samples // world} per process for {world} "
            f"process(es): fewer than data.batch_size={cfg.data.batch_size}; lower data.batch_size or add images"
        )
    # Our __len__ is exact (whole batches per worker), so Lightning's generic caveat does not apply.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    loader = DataLoader(
        ds,
        batch_size=cfg.data.batch_size,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_views,
        persistent_workers=cfg.data.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    # An IterableDataset's loader has no sampler of ours: hang the data set's epoch and resume hooks
    # on the one it has (Lightning calls ``sampler.set_epoch`` before every epoch).
    loader.sampler.set_epoch = ds.set_epoch  # type: ignore[union-attr]
    loader.sampler.resume = ds.resume  # type: ignore[union-attr]
    return loader

