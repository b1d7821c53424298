"""Data order shared by every domain: an epoch-seeded sampler and the DataLoader factory that uses it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSeededSampler(Sampler[int]):
    """Random permutation of `range(num_samples)` drawn from a generator seeded with `seed * 1_000_003 + epoch`
    (so that seed s at epoch 1 does not replay seed s+1 at epoch 0).

    The order depends only on (seed, epoch), never on how many batches were drawn before, so a run resumed
    from a checkpoint shuffles exactly like an uninterrupted one. Lightning calls `set_epoch` at the start
    of every training epoch (also when the sampler is wrapped for DDP).
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        if int(num_samples) != num_samples or num_samples < 0:
            raise ValueError(f"EpochSeededSampler: num_samples must be a non-negative int, got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation for `epoch` (0-based)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        # A private generator: the global torch RNG (model init, dropout) neither affects nor is affected by it.
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def seeded_loader(dataset: Dataset, *, batch_size: int, seed: int, shuffle: bool, **kwargs: Any) -> DataLoader:
    """A DataLoader whose order and worker seeds depend only on `seed` (and the epoch, when shuffled).

    Shuffled loaders use `EpochSeededSampler`. Every loader gets its own generator, so creating an iterator never
    draws on the global RNG: the sanity check of a resumed run then cannot shift the dropout masks that follow
    (see tasks.common.callbacks.RngStateCheckpoint).
    """
    sampler = EpochSeededSampler(len(dataset), seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(seed), **kwargs
    )
