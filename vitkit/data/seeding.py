"""Reproducible data randomness: what an epoch shuffles and a batch draws is a function of a seed.

A training loader makes two kinds of random draws: the order of the samples (the sampler, in the
main process) and the augmentations (per-image transforms and batch ``collate_fn``s, in the loader
workers). Left to PyTorch's defaults both are a stream: the order of epoch e is the e-th permutation
drawn from the loader's generator, and a worker's augmentations continue where its previous batch
left off. A run resumed at epoch e starts both streams afresh, so it would see epoch 0's order
again and other augmentations than the uninterrupted run. Two rules make each draw a function of
where it happens instead:

* :class:`EpochShuffle`: the order of epoch e is the permutation seeded by (seed, e). Lightning calls
  ``set_epoch(e)`` before every epoch, but a loader with workers draws its first indices as soon as
  its iterator exists, which on resume is before that call (Lightning issue #21938), so the data
  modules also give the sampler the trainer's epoch count to read when a pass begins. Under DDP
  Lightning puts a ``DistributedSampler`` in its place, which follows the same rule.
* :class:`SeededBatches`: in a loader worker, Python's, NumPy's and torch's generators are re-seeded
  from (seed, the batch's sample indices) before the batch is read, so its per-image transforms and
  the ``collate_fn``'s batch augmentation draw the same numbers whichever worker reads it, and
  whenever: a resumed run draws what the uninterrupted one did, the augmentations do not depend on
  ``num_workers`` (once it is at least 1), and DDP ranks, which read disjoint indices, augment
  differently. Without workers the batches draw from the main process's generators, which
  :class:`~vitkit.training.RNGStateCheckpoint` saves and restores.

What neither can mend: a LightningModule that reads ``trainer.estimated_stepping_batches`` in
``configure_optimizers`` (vitkit's does, for its schedule) makes Lightning create the training
iterator before it restores a checkpoint's epoch count. With loader workers, the first epoch of a
resumed run then repeats epoch 0's batches; later epochs are those of the uninterrupted run, and
without workers the whole run is.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import RandomSampler, get_worker_info


def mix_seed(*numbers: int) -> int:
    """A 63-bit seed from any tuple of integers (NumPy's ``SeedSequence`` hash), for ``manual_seed``."""
    state = np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class EpochShuffle(RandomSampler):
    """A :class:`~torch.utils.data.RandomSampler` whose permutation for epoch e is seeded by (seed, e).

    The epoch is ``current_epoch()`` when a pass begins if given, else the last ``set_epoch``; with
    neither (a plain loop) each pass draws the next permutation of epoch 0's generator.
    """

    def __init__(
        self, data_source: Sized, seed: int = 0, current_epoch: Callable[[], int] | None = None
    ) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.current_epoch = current_epoch
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(mix_seed(self.seed, epoch))

    def __iter__(self) -> Iterator[int]:
        if self.current_epoch is not None:
            self.set_epoch(self.current_epoch())
        return super().__iter__()


class SeededBatches:
    """Dataset mixin: with ``augment_seed`` set, each batch read in a loader worker first re-seeds the
    worker's random generators from (``augment_seed``, the batch's indices).

    PyTorch's map-style fetcher reads a batch through ``__getitems__`` when a dataset defines it;
    the ``collate_fn`` runs next in the same worker, on the same re-seeded generators.
    """

    augment_seed: int | None = None

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        if self.augment_seed is not None and get_worker_info() is not None:
            seed = mix_seed(self.augment_seed, *indices)
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        return [self[i] for i in indices]  # type: ignore[index]
