"""Repeated augmentation (DeiT's RASampler semantics): shares per replica, 3 copies per image, the epoch length,
the per-epoch order, and a loader that resumes mid-epoch; and the datamodule that uses it."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from tasks.imagenet.data import ImageFolderDataModule
from tasks.imagenet.sampling import RepeatedAugmentationSampler, repeated_epoch_length, repeated_epoch_order
from tests.fixtures.imagenet import FIXTURE_CLASSES, write_image_folder


def shares(num_samples: int, replicas: int, seed: int = 0, epoch: int = 0) -> list[list[int]]:
    samplers = [RepeatedAugmentationSampler(num_samples, seed, replicas, rank) for rank in range(replicas)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


@pytest.mark.parametrize("num_samples,replicas", [(768, 3), (1000, 4), (600, 6)])
def test_replicas_share_out_three_copies_of_each_drawn_image(num_samples, replicas):
    per_replica = shares(num_samples, replicas)
    length = num_samples // 256 * 256 // replicas  # DeiT: the epoch rounded down to 256 images, shared out
    assert all(len(share) == length for share in per_replica)
    counts = Counter(index for share in per_replica for index in share)
    assert set(counts.values()) == {3}  # each drawn image 3 times in all...
    assert all(len(set(share)) == len(share) for share in per_replica)  # ...its copies on 3 different replicas
    assert len(counts) == length * replicas // 3  # a third of the epoch's draws are distinct images


def test_the_whole_repeated_list_holds_every_image_three_times_and_pads_from_its_start():
    order = [repeated_epoch_order(10, 0, 0, 3, 4, rank, length=100) for rank in range(4)]
    positions = [index for step in zip(*order) for index in step]  # rank r holds positions r, r + 4, ...
    assert len(positions) == 32  # 30 padded to a multiple of 4 replicas
    assert Counter(positions[:30]) == Counter({index: 3 for index in range(10)})
    assert positions[30:] == positions[:2] and positions[:3] == [positions[0]] * 3


def test_epoch_length_is_deits_and_covers_small_sets():
    assert repeated_epoch_length(1_281_167, 4) == 320_256  # ImageNet on DeiT-S's 4 GPUs: 1,281,024 / 4
    assert repeated_epoch_length(1_281_167, 6) == 213_504
    assert repeated_epoch_length(12, 1) == 12 and repeated_epoch_length(12, 5) == 3  # below 256: ceil(N / W)
    assert len(RepeatedAugmentationSampler(1000, 0, 4, 1)) == 192


def test_matches_timms_copy_of_deits_sampler_at_seed_zero():
    # timm's RepeatAugSampler is DeiT's RASampler; it shuffles with torch.randperm seeded by the epoch, which is
    # what epoch_permutation draws for seed 0
    from timm.data.distributed_sampler import RepeatAugSampler

    dataset = range(1000)
    for replicas, rank, epoch in [(1, 0, 0), (4, 1, 2), (3, 2, 5), (8, 7, 1)]:
        reference = RepeatAugSampler(dataset, num_replicas=replicas, rank=rank)
        reference.set_epoch(epoch)
        ours = RepeatedAugmentationSampler(len(dataset), 0, replicas, rank)
        ours.set_epoch(epoch)
        assert list(ours) == list(reference)


def test_order_depends_on_seed_and_epoch_only():
    first = shares(1000, 4, seed=7, epoch=0)
    assert shares(1000, 4, seed=7, epoch=0) == first  # deterministic, also in a fresh sampler
    assert shares(1000, 4, seed=7, epoch=1) != first  # set_epoch reshuffles
    assert shares(1000, 4, seed=8, epoch=0) != first
    state = torch.get_rng_state()
    shares(300, 2)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def loader(sampler: RepeatedAugmentationSampler) -> StatefulDataLoader:
    return StatefulDataLoader(list(range(sampler.dataset_size)), batch_size=8, sampler=sampler, drop_last=True)


def test_a_loader_resumes_mid_epoch_on_the_remaining_batches():
    sampler = RepeatedAugmentationSampler(600, seed=3, num_replicas=2, rank=1)
    sampler.set_epoch(4)
    uninterrupted = [batch.tolist() for batch in loader(sampler)]
    interrupted = loader(sampler)
    iterator = iter(interrupted)
    seen = [next(iterator).tolist() for _ in range(5)]
    state = interrupted.state_dict()
    fresh = RepeatedAugmentationSampler(600, seed=3, num_replicas=2, rank=1)  # a new process: epoch not set yet
    resumed = loader(fresh)
    resumed.load_state_dict(state)
    assert seen + [batch.tolist() for batch in resumed] == uninterrupted
    assert len(uninterrupted) == 512 // 2 // 8


def test_lightning_keeps_it_under_ddp():
    # Lightning wraps any sampler that is not a DistributedSampler in its own, which would split the repeated list
    # a second time
    assert isinstance(RepeatedAugmentationSampler(10, 0), DistributedSampler)
    with pytest.raises(ValueError, match="data.repeated_aug_repeats"):
        RepeatedAugmentationSampler(10, 0, repeats=0)


def test_the_datamodule_trains_on_its_replicas_share(tmp_path):
    write_image_folder(tmp_path / "folder", FIXTURE_CLASSES[:3], {"train": 4, "val": 1})
    dm = ImageFolderDataModule("folder", tmp_path, image_size=32, batch_size=2, num_workers=0, pin_memory=False,
                               repeated_aug=True)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=3, global_rank=2)
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, RepeatedAugmentationSampler)
    assert (sampler.num_replicas, sampler.rank, sampler.repeats, len(sampler)) == (3, 2, 3, 4)
    assert list(sampler) == repeated_epoch_order(12, 0, 0, 3, 3, 2, 4)
    off = ImageFolderDataModule("folder", tmp_path, image_size=32, batch_size=2, num_workers=0, pin_memory=False)
    off.setup("fit")
    assert not isinstance(off.train_dataloader().sampler, RepeatedAugmentationSampler)


@pytest.mark.distributed
def test_ddp_ranks_train_on_their_repeated_shares(tmp_path):
    # Two CPU processes of the real entry point: Lightning must keep the sampler (not wrap it), give each rank its
    # share, and reshuffle per epoch.
    import json
    import subprocess
    import sys

    data_dir = tmp_path / "data"
    write_image_folder(data_dir / "folder", FIXTURE_CLASSES, {"train": 50, "val": 1})
    command = [
        sys.executable, "-m", "experiments.train", "experiment=imagenet/hierarchical", "trainer=ddp",
        f"paths.data_dir={data_dir}", "data.dataset=folder", f"hydra.run.dir={tmp_path / 'run'}",
        "data.repeated_aug=true", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
        "data.pin_memory=false", "model.dims=[8,16,32,64]", "model.depths=[1,1,1,1]", "model.heads=1",
        "trainer.max_epochs=2", "logger=csv", "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false",
        "+callbacks.record._target_=tests.fixtures.imagenet.RecordTrainingOrder", f"+callbacks.record.out_dir={tmp_path}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    orders = []
    for epoch in (0, 1):
        ranks = [json.loads((tmp_path / f"rank{rank}_epoch{epoch}.json").read_text()) for rank in (0, 1)]
        assert {record["sampler"] for record in ranks} == {"RepeatedAugmentationSampler"}
        shares_of_epoch = [record["indices"] for record in ranks]
        assert shares_of_epoch == [repeated_epoch_order(300, 0, epoch, 3, 2, rank, 128) for rank in (0, 1)]
        orders.append(shares_of_epoch)
    assert orders[0] != orders[1]
