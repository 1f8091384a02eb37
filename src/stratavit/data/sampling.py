"""Deterministic randomness that survives a restart: the data order and each sample's views.

A killed and resumed run continues the uninterrupted one exactly (on CPU) because nothing random
in it depends on history that a checkpoint does not hold:

* **Data order**: epoch ``e`` visits the samples in :func:`epoch_permutation` ``(n, seed, e)``, a
  pure function. :class:`ResumableSampler` shards it across DDP ranks and can start an epoch after
  its first ``k`` batches (the position of the checkpoint).
* **Views**: the sampler yields ``(epoch, index)`` keys, so the epoch travels with every index into
  loader workers (persistent ones too); :class:`~stratavit.data.datasets.Indexed` makes the views of a
  sample inside :func:`seeded_rng` ``(sample_seed(seed, epoch, index))``. The views of a sample
  are thus the same with any number of workers, on any rank, before or after a restart.
* **Training step** (drop path, anything drawn from the global RNG):
  :class:`~stratavit.engine.callbacks.checkpoint.BatchSeed` seeds the global RNG before every batch from
  ``(seed, epoch, batch, rank)``.
* **State**: :class:`~stratavit.engine.callbacks.checkpoint.LastCheckpoint` writes a step checkpoint once the
  step is completely done (teacher EMA update and logged metrics included) and records the data
  position that :meth:`ResumableSampler.resume` continues from.

Bitwise equality holds for one machine and one torch version (``torch.randperm`` and the
transforms' draws are what they are there); the guarantee is "same seed, same metrics".
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

_MASK64 = (1 << 64) - 1

# Domain tags: the same (seed, epoch) gives unrelated streams for the order and for the views.
_ORDER, _SAMPLE, _BATCH = 0x0D, 0x5A, 0xBA


def _splitmix64(x: int) -> int:
    """The SplitMix64 finaliser: a cheap, well-mixing bijection on 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """Hash integers (any sign, order matters) to a seed in ``[0, 2**63)``; a pure function."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the random augmentation of sample ``index`` in epoch ``epoch`` of a run."""
    return mix_seed(_SAMPLE, seed, epoch, index)


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The seed of the global RNG for training batch ``batch`` of epoch ``epoch`` on ``rank``."""
    return mix_seed(_BATCH, seed, epoch, batch, rank)


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU RNG and Python's ``random`` seeded by ``seed``, then restore both.

    These are the RNGs torchvision's transforms draw from (``torch.rand``/``randint``/``randperm``
    for the v1 transforms, ``random`` for ``RandomOrder``/``RandomChoice``). Restoring keeps the
    caller's streams untouched (with ``num_workers=0`` the body runs in the training process).
    Costs about 15 µs (``torch.manual_seed``, which also seeds every GPU, would cost 90).
    """
    cpu = torch.default_generator
    torch_state, py_state = cpu.get_state(), random.getstate()
    cpu.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        cpu.set_state(torch_state)
        random.setstate(py_state)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a permutation ``(n,)`` (int64) of ``range(n)``, a pure function."""
    g = torch.Generator().manual_seed(mix_seed(_ORDER, seed, epoch))
    return torch.randperm(n, generator=g)


def shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of an epoch's ``order``: ``order[rank : total : world]`` (``(n // world,)``).

    The ``n % world`` samples at the end of the order are dropped, so the ranks' shares are
    disjoint and equal in size (a permutation, unlike ``DistributedSampler``'s padding, never
    repeats a sample within an epoch).
    """
    total = (order.numel() // world) * world
    return order[rank:total:world]


class ResumableSampler(DistributedSampler):
    """Shuffled, sharded, resumable sampler; yields ``(epoch, index)`` keys.

    Per epoch each rank gets :func:`shard` of :func:`epoch_permutation`, cut to whole batches
    (the loader's ``drop_last=True``), so ``len(self) = (n // world) // batch_size * batch_size``.
    Lightning calls :meth:`set_epoch` before each epoch. It is a ``DistributedSampler`` only so that
    Lightning keeps it under DDP instead of wrapping it in its own; the rank and the number of
    ranks are read from ``torch.distributed`` when needed (Lightning creates the process group
    after the loader), unless given.

    Args:
        size: number of samples in the data set.
        seed: the run's seed.
        batch_size: per-process batch size of the loader.
        num_replicas, rank: fix the sharding (tests); default: from ``torch.distributed``, else 1 and 0.
    """

    def __init__(
        self, size: int, seed: int, batch_size: int, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        # DistributedSampler.__init__ is not called: it needs the process group, which does not exist yet.
        Sampler.__init__(self)
        if size < 1 or batch_size < 1:
            raise ValueError(f"ResumableSampler needs size >= 1 and batch_size >= 1 (got {size}, {batch_size})")
        self.size = size
        self.seed = seed
        self.batch_size = batch_size
        self._num_replicas = num_replicas
        self._rank = rank
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self.shuffle, self.drop_last = True, True  # what DistributedSampler readers look for

    @property  # type: ignore[override]
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property  # type: ignore[override]
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def batches_per_epoch(self) -> int:
        """Whole batches per epoch on each rank."""
        return (self.size // self.num_replicas) // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration epoch ``epoch`` without its first ``batches_done`` batches.

        This position wins over :meth:`set_epoch` for that one iteration (it comes from the
        checkpoint; Lightning may create the loader iterator before or after it sets the epoch);
        the epochs after it are whole. ``batches_done`` past the end of the epoch carries over
        into the next epoch(s), as when the checkpoint was taken after an epoch's last batch.
        """
        if epoch < 0 or batches_done < 0:
            raise ValueError(f"cannot resume at epoch {epoch}, batch {batches_done}")
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(batches_done))

    def keys(self, epoch: int, skip: int = 0) -> list[tuple[int, int]]:
        """The ``(epoch, index)`` keys of this rank in ``epoch`` after its first ``skip`` samples."""
        mine = shard(epoch_permutation(self.size, self.seed, epoch), self.rank, self.num_replicas)
        return [(epoch, i) for i in mine[skip : len(self)].tolist()]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch, skip = self.epoch, 0
        if self._resume is not None:
            start, done = self._resume
            extra, batches = divmod(done, max(1, self.batches_per_epoch()))
            epoch, skip = start + extra, batches * self.batch_size
            self.epoch, self._resume = epoch, None
        return iter(self.keys(epoch, skip))
