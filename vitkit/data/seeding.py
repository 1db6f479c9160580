"""Reproducible data randomness: what an epoch shuffles and a batch draws is a function of a seed.

A training loader makes two kinds of random draws: the order of the samples (the sampler, in the
main process) and the augmentations (per-image transforms and batch ``collate_fn``s, in the loader
workers). Left to PyTorch's defaults both are a stream: the order of epoch e is the e-th permutation
drawn from the loader's generator, and a worker's augmentations continue where its previous batch
left off. A run resumed at epoch e starts both streams afresh, so it would see epoch 0's order
again and other augmentations than the uninterrupted run. Two rules make each draw a function of
where it happens instead:

* :class:`EpochShuffle`: the order of epoch e is the permutation seeded by (seed, e); Lightning calls
  ``set_epoch(e)`` before every epoch (:class:`RepeatedAugmentation`'s order likewise). Under DDP
  the data modules shard the epoch with a ``DistributedSampler`` seeded by the same seed, which
  shuffles epoch e by seed + e. A loader with workers draws its first indices as soon as its
  iterator exists, and Lightning makes the training iterator before it restores a checkpoint's
  epoch count and calls ``set_epoch`` (Lightning issue #21938; with vitkit's schedule, earlier
  still, through ``estimated_stepping_batches``), so the data modules' :class:`EpochLoader` starts
  each pass at its first batch instead: after ``set_epoch``.
* :class:`SeededBatches`: in a loader worker, Python's, NumPy's and torch's generators are re-seeded
  from (seed, the batch's sample indices) before the batch is read, so its per-image transforms and
  the ``collate_fn``'s batch augmentation draw the same numbers whichever worker reads it, and
  whenever: a resumed run draws what the uninterrupted one did, the augmentations do not depend on
  ``num_workers`` (once it is at least 1), and DDP ranks, which read disjoint indices, augment
  differently. Without workers the batches draw from the main process's generators, which
  :class:`~vitkit.training.RNGStateCheckpoint` saves and restores.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, get_worker_info


def mix_seed(*numbers: int) -> int:
    """A 63-bit seed from any tuple of integers (NumPy's ``SeedSequence`` hash), for ``manual_seed``."""
    state = np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class EpochShuffle(RandomSampler):
    """A :class:`~torch.utils.data.RandomSampler` whose permutation for epoch e is seeded by (seed, e).

    Without ``set_epoch`` calls (a plain loop) each pass draws the next permutation of epoch 0's
    generator.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(mix_seed(self.seed, epoch))


class RepeatedAugmentation(DistributedSampler):
    """Repeated augmentation (Hoffer et al. 2020; DeiT's ``RASampler``, timm's ``--aug-repeats``):
    each image of the shuffled epoch is drawn ``repeats`` times in a row, so its copies get
    different augmentations, in one batch on one device or spread over the DDP ranks (rank r takes
    every R-th entry). An epoch stays as long as without repeats (``ceil(N / R)`` per rank), so it
    covers about 1/``repeats`` of the images, each ``repeats`` times: the schedule is unchanged.

    The order of epoch e is seeded by (seed, e), as :class:`EpochShuffle`'s, on every rank alike.
    A :class:`~torch.utils.data.DistributedSampler`, so Lightning leaves it in place under DDP.
    """

    def __init__(
        self, dataset: Sized, repeats: int = 3, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if repeats < 1:
            raise ValueError(f"repeated_aug={repeats}: give the number of copies of each image (>= 1).")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.repeats = repeats
        self.num_samples = math.ceil(len(dataset) / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.dataset), generator=generator)
        repeated = order.repeat_interleave(self.repeats)  # [a, a, a, b, b, b, ...]
        if len(repeated) < self.total_size:  # a tiny dataset over many ranks: wrap around
            repeated = repeated.repeat(math.ceil(self.total_size / len(repeated)))
        # the epoch's first total_size entries, rank r taking every R-th from r on
        return iter(repeated[: self.total_size][self.rank :: self.num_replicas].tolist())


class EpochLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` whose pass over the data begins at its first batch, not
    when ``iter()`` is called, so that a ``set_epoch`` made in between decides the pass's order."""

    def __iter__(self) -> Iterator[Any]:
        return _StartOnFirstBatch(super().__iter__)


class _StartOnFirstBatch:
    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self._start = start
        self._batches: Iterator[Any] | None = None

    def __iter__(self) -> _StartOnFirstBatch:
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = self._start()
        return next(self._batches)


class SeededBatches:
    """Dataset mixin: with ``augment_seed`` set, each batch read in a loader worker first re-seeds the
    worker's random generators from (``augment_seed``, the batch's indices).

    PyTorch's map-style fetcher reads a batch through ``__getitems__`` when a dataset defines it;
    the ``collate_fn`` runs next in the same worker, on the same re-seeded generators.
    """

    augment_seed: int | None = None

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        if self.augment_seed is not None and get_worker_info() is not None:
            reseed(self.augment_seed, *indices)
        return [self[i] for i in indices]  # type: ignore[index]


def reseed(*numbers: int) -> None:
    """Re-seed torch's (CPU and CUDA), Python's and NumPy's generators from a tuple of integers."""
    seed = mix_seed(*numbers)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
