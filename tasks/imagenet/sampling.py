"""Repeated augmentation: DeiT's training order, in which each image is drawn several times per epoch.

DeiT trains DeiT-S with its `RASampler` on: every epoch it shuffles the training set, repeats each index 3 times in
a row, pads the list (from its start) to a multiple of the number of replicas, and gives replica r the positions
r, r + W, r + 2W, ... (W replicas). The 3 copies of an image therefore go to 3 different replicas at about the same
step, each augmented in its own way. An epoch then stops after N // 256 · 256 / W indices per replica (rounded
down; N images), so an epoch still takes about N images in all, a third of them distinct.

`RepeatedAugmentationSampler` gives exactly these indices, with two differences that keep this suite's contracts
(`tasks/common/sampling.py`): the shuffle is `epoch_permutation(N, seed, epoch)` (DeiT seeds it with the epoch
alone, so every seed sees the same order), and its position is saved in checkpoints by torchdata's
`StatefulDataLoader`, so a run resumed mid-epoch continues with the indices it had not seen. A training set smaller
than 256 images, where DeiT's epoch would be empty, draws ceil(N / W) per replica, as timm's `RepeatAugSampler`
does. It subclasses `DistributedSampler`, so Lightning under DDP keeps it rather than wrapping it in its own
distributed sampler, and calls `set_epoch` on it at the start of every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch.utils.data import DistributedSampler

from tasks.common.sampling import EpochOrder, epoch_permutation

# DeiT rounds the images of an epoch down to a multiple of this before sharing them out among the replicas
EPOCH_ROUND = 256


def repeated_epoch_order(
    num_samples: int, seed: int, epoch: int, repeats: int, num_replicas: int, rank: int, length: int
) -> list[int]:
    """The indices replica `rank` of `num_replicas` draws in epoch `epoch`: `length` of them (see the module
    docstring)."""
    order = [index for index in epoch_permutation(num_samples, seed, epoch) for _ in range(repeats)]
    total = math.ceil(len(order) / num_replicas) * num_replicas  # padded with the list's own start
    return [order[position % len(order)] for position in range(rank, total, num_replicas)][:length]


def repeated_epoch_length(num_samples: int, num_replicas: int) -> int:
    """Indices per replica and epoch: DeiT's N // 256 · 256 / W, rounded down; ceil(N / W) below 256 images."""
    if num_samples >= EPOCH_ROUND:
        return num_samples // EPOCH_ROUND * EPOCH_ROUND // num_replicas
    return math.ceil(num_samples / num_replicas)


class RepeatedAugmentationSampler(DistributedSampler):
    """DeiT's repeated-augmentation order for replica `rank` of `num_replicas` (see the module docstring).

    Args:
        num_samples: N, the training images.
        seed: the run's seed (with the epoch, it fixes the shuffle).
        num_replicas, rank: W and this process's place among them (1 and 0 without DDP).
        repeats: copies of each image per epoch (`data.repeated_aug_repeats`; DeiT: 3).

    `len(sampler)` is the epoch length per replica; `num_samples` holds it too, as in `DistributedSampler`.
    """

    def __init__(self, num_samples: int, seed: int, num_replicas: int = 1, rank: int = 0, repeats: int = 3) -> None:
        if repeats < 1:
            raise ValueError(f"data.repeated_aug_repeats must be at least 1, got {repeats}")
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.dataset_size, self.repeats = int(num_samples), int(repeats)
        self.num_samples = repeated_epoch_length(self.dataset_size, self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def order(self, epoch: int) -> list[int]:
        """This replica's indices in epoch `epoch`."""
        return repeated_epoch_order(
            self.dataset_size, self.seed, epoch, self.repeats, self.num_replicas, self.rank, self.num_samples
        )

    def __iter__(self) -> Iterator[int]:
        return EpochOrder(self)  # resumable mid-epoch, as every loader of the suite

    def __len__(self) -> int:
        return self.num_samples
