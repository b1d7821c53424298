"""Samplers shared by every domain."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSeededSampler(Sampler[int]):
    """Random permutation of `range(num_samples)` drawn from a generator seeded with `seed * 1_000_003 + epoch` (so that seed s at epoch 1 does not replay seed s+1 at epoch 0).

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
