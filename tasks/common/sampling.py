"""Data order shared by every domain: an epoch-seeded sampler and the loader factories that use it.

Loaders are torchdata's `StatefulDataLoader`: Lightning saves its position in every checkpoint and restores it on
resume, so a run resumed from a checkpoint written mid-epoch continues with the batches it had not seen yet.

Under DDP, Lightning shards the training order (every process takes its share of the same epoch permutation, padded
with repeats to equal length, which training tolerates). Evaluation must not repeat a sample: `evaluation_loader`
gives each process every world_size-th sample of the split, so a metric summed over the processes counts each sample
exactly once and its denominator is the split's size.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

# torchdata's loader calls torch.set_vital, which torch now deprecates: a warning about torchdata's internals, printed
# at every run, that a user can do nothing about.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The order of epoch `epoch`: a permutation drawn from a private generator seeded with
    `seed * 1_000_003 + epoch` (so that seed s at epoch 1 does not replay seed s+1 at epoch 0). The global torch RNG
    (model init, dropout) neither affects nor is affected by it."""
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


class EpochOrder(Iterator[int]):
    """One epoch's order of a sampler (its `order(epoch)`) and the position in it; its state (epoch, position) is
    what a checkpoint keeps.

    torchdata saves this state with the loader's and, on resume, loads it into a fresh iterator, which then
    continues the saved epoch at the saved position. Without a loaded state, the epoch is read from the sampler at
    the first draw, not at creation: Lightning creates the first iterator of a run before it sets the epoch.
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.epoch: int | None = None
        self.position = 0
        self.order: list[int] | None = None

    def __next__(self) -> int:
        if self.order is None:
            self.epoch = self.sampler.epoch if self.epoch is None else self.epoch
            self.order = self.sampler.order(self.epoch)
        if self.position >= len(self.order):
            raise StopIteration
        self.position += 1
        return self.order[self.position - 1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch if self.epoch is None else self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.order = int(state["epoch"]), int(state["position"]), None


class EpochSeededSampler(Sampler[int]):
    """A random permutation of `range(num_samples)` per epoch (`epoch_permutation`).

    The order depends only on (seed, epoch), never on how many batches were drawn before, and the iterator's
    position is saved in checkpoints, so a run resumed from a checkpoint, also one written mid-epoch, shuffles
    exactly like an uninterrupted one. Lightning calls `set_epoch` at the start of every training epoch.
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

    def order(self, epoch: int) -> list[int]:
        """The indices of epoch `epoch`."""
        return epoch_permutation(self.num_samples, self.seed, epoch)

    def __iter__(self) -> Iterator[int]:
        return EpochOrder(self)

    def __len__(self) -> int:
        return self.num_samples


def seeded_loader(
    dataset: Dataset, *, batch_size: int, seed: int, shuffle: bool, sampler: Sampler | None = None, **kwargs: Any
) -> StatefulDataLoader:
    """A resumable loader whose order and worker seeds depend only on `seed` (and the epoch, when shuffled).

    Shuffled loaders use `EpochSeededSampler`, unless `sampler` gives the order (a process's share under DDP, DeiT's
    repeated augmentation). Every loader gets its own generator, so creating an iterator never draws on the global
    RNG: the sanity check of a resumed run then cannot shift the dropout masks that follow (see
    tasks.common.callbacks.RngStateCheckpoint).
    """
    if sampler is None and shuffle:
        sampler = EpochSeededSampler(len(dataset), seed)
    return StatefulDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(seed), **kwargs
    )


class ShardedOrder(UnrepeatedDistributedSampler):
    """This process's share of an evaluation that visits the samples in `order`: its entries rank, rank +
    world_size, ..., none repeated."""

    def __init__(self, dataset: Dataset, order: Sequence[int], world_size: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        if sorted(order) != list(range(len(dataset))):
            raise ValueError("ShardedOrder: order must hold every index of the dataset once")
        self.order = list(order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order[self.rank :: self.num_replicas])


def evaluation_loader(dataset: Dataset, *, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                      order: Sequence[int] | None = None, **kwargs: Any) -> StatefulDataLoader:
    """An evaluation loader in dataset order, or in `order` (every index once, e.g. by length, so that batches of
    similar samples can be cut short); with `world_size` > 1 this process's share: samples rank, rank + world_size,
    ... of that order, none repeated (Lightning's default distributed sampler pads the shares with repeats, which a
    metric would count twice). Pass the trainer's `world_size` and `global_rank`."""
    sampler: Sampler[int] | None = None
    if world_size > 1 or order is not None:
        sampler = ShardedOrder(dataset, range(len(dataset)) if order is None else order, world_size, rank)
    return seeded_loader(dataset, batch_size=batch_size, seed=seed, shuffle=False, sampler=sampler, **kwargs)
