"""`ImageFolderDataModule`: ImageNet-1K, or any ImageFolder under DATA_DIR, with timm's transforms and mixing
(results/paper/official_code.md §5.2).

`data.dataset` names the folder `<data_dir>/<dataset>/{train,val}/<class>/<image>`; the class count comes from its
folders. The layout is checked before training (`tasks/imagenet/layout.py`).

Augmentation is timm's: `create_transform` builds the per-image transforms (training: RandomResizedCrop, flip,
RandAugment; evaluation: resize by `crop_pct`, centre crop), and timm's `Mixup` mixes each training batch on the
device (`on_after_batch_transfer`), folding the label smoothing into the soft targets it returns. With
`data.mixup=0` and `data.cutmix=0` targets stay hard and the module smooths them itself.

With `data.repeated_aug=true` the training order is DeiT's repeated augmentation (`tasks/imagenet/sampling.py`):
each epoch draws every image `repeated_aug_repeats` (3) times, on different replicas under DDP.

Protocol (`selection`, recorded in metrics.json): `best_test` evaluates on val during training and reports the
best top-1, as the official code does (val is ImageNet's test set); `holdout_val` and `final` evaluate on
`holdout_per_class` training images of each class, and test once on val the checkpoint they pick (`holdout_val`) or
the weights after the last epoch (`final`).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from results.run_record import checked_selection, validates_on_test
from tasks.common.datamodule import DataStatus, TaskDataModule
from tasks.common.sampling import seeded_loader
from tasks.imagenet.layout import PREPARE_HINT, SPLITS, FolderLayout, Samples, hold_out, load_layout
from tasks.imagenet.sampling import RepeatedAugmentationSampler

log = logging.getLogger(__name__)



class UnreadableImageError(OSError):
    """An image that passed the layout check fails to decode (e.g. a truncated file); the message names it."""


class ImageFolderSplit(Dataset):
    """Samples of one split -> {"x": transformed image (3, S, S) float, "target": class index}."""

    def __init__(self, samples: Samples, transform: Any) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, target = self.samples[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except OSError as error:
            raise UnreadableImageError(
                f"{path} cannot be decoded ({error}); delete or replace it (the layout check reads headers only)"
            ) from error
        return {"x": self.transform(rgb), "target": target}


class ImageFolderDataModule(TaskDataModule):
    """ImageFolder classification with timm's augmentation and Mixup/CutMix.

    Args:
        dataset: folder name under `data_dir` (`imagenet` is checked against ImageNet-1K's counts).
        data_dir: the data root (DATA_DIR).
        image_size: training crop and evaluation size S.
        batch_size: images per device and step (even when mixing: Mixup pairs each image with another).
        eval_batch_size: per device for evaluation (None: batch_size).
        num_workers, pin_memory: loader settings; `num_workers` processes also run the image check.
        seed: the run's seed (shuffling, the hold-out draw).
        selection: one of results.run_record.SELECTIONS (see the module docstring).
        holdout_per_class: training images per class held out under holdout_val.
        check_images: open every image before training (headers only) and report the unreadable ones.
        corrupt_images: error | skip: what an unreadable image does (skipped images are listed in metrics.json).
        mixup, cutmix: Mixup and CutMix alphas (0 turns each off).
        label_smoothing: folded into the mixed targets (without mixing, the module applies it).
        mixing: further timm `Mixup` arguments (prob, switch_prob, mode).
        train_transform, eval_transform: further timm `create_transform` arguments (auto_augment, color_jitter,
            re_prob, re_mode, interpolation, crop_pct...).
        repeated_aug: train in DeiT's repeated-augmentation order (`RepeatedAugmentationSampler`).
        repeated_aug_repeats: copies of each image per epoch under `repeated_aug` (DeiT: 3).
    """

    def __init__(
        self,
        dataset: str,
        data_dir: str | Path,
        image_size: int = 224,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        seed: int = 0,
        selection: str = "best_test",
        holdout_per_class: int = 10,
        check_images: bool = True,
        corrupt_images: str = "error",
        mixup: float = 0.8,
        cutmix: float = 1.0,
        label_smoothing: float = 0.1,
        mixing: dict[str, Any] | None = None,
        train_transform: dict[str, Any] | None = None,
        eval_transform: dict[str, Any] | None = None,
        repeated_aug: bool = False,
        repeated_aug_repeats: int = 3,
    ) -> None:
        super().__init__()
        checked_selection(selection)
        mixes = mixup > 0 or cutmix > 0
        if mixes and batch_size % 2:
            raise ValueError(
                f"data.batch_size={batch_size} must be even while Mixup/CutMix are on (data.mixup={mixup}, "
                f"data.cutmix={cutmix}): each image is mixed with another of the same batch"
            )
        self.dataset, self.root = dataset, Path(data_dir) / dataset
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers, self.pin_memory, self.seed = int(num_workers), bool(pin_memory), int(seed)
        self.selection, self.holdout_per_class = selection, int(holdout_per_class)
        self.check_images, self.corrupt_images = bool(check_images), corrupt_images
        self.mix_options = {"mixup_alpha": float(mixup), "cutmix_alpha": float(cutmix),
                            "label_smoothing": float(label_smoothing), **dict(mixing or {})} if mixes else None
        self.train_transform_options = dict(train_transform or {})
        self.eval_transform_options = dict(eval_transform or {})
        self.repeated_aug, self.repeated_aug_repeats = bool(repeated_aug), int(repeated_aug_repeats)
        self.layout: FolderLayout | None = None
        self.splits: dict[str, ImageFolderSplit] = {}
        self.mixer: Any = None

    def data_status(self) -> DataStatus:
        """Available when `<root>/train` and `<root>/val` hold class folders (their content is checked in setup)."""
        for split in SPLITS:
            folder = self.root / split
            if not folder.is_dir() or not any(entry.is_dir() for entry in folder.iterdir()):
                return DataStatus(False, f"no class folders in {folder}; {PREPARE_HINT}")
        return DataStatus(True, f"found {self.root}")

    def setup(self, stage: str | None = None) -> None:
        """Scan and check the folders and build the datasets, once; later calls do nothing."""
        if self.layout is not None:
            return
        from timm.data import Mixup, create_transform

        self.layout = load_layout(self.root, self.check_images, self.corrupt_images, self.num_workers)
        train, evaluation = self.layout.train, self.layout.val
        if not validates_on_test(self.selection):
            train, evaluation = hold_out(train, self.holdout_per_class, self.seed)
        train_transform = create_transform(self.image_size, is_training=True, **self.train_transform_options)
        eval_transform = create_transform(self.image_size, is_training=False, **self.eval_transform_options)
        self.splits = {
            "train": ImageFolderSplit(train, train_transform),
            "val": ImageFolderSplit(evaluation, eval_transform),
            "test": ImageFolderSplit(self.layout.val, eval_transform),
        }
        if self.mix_options is not None:
            self.mixer = Mixup(num_classes=len(self.layout.classes), **self.mix_options)
        self.data_info.update(
            {
                "dataset": self.dataset,
                **self.layout.summary(),
                "selection": self.selection,
                "evaluated_on": "val" if validates_on_test(self.selection)
                else f"{self.holdout_per_class} train images per class",
                "train_images": len(train),
                "repeated_aug": self.repeated_aug_repeats if self.repeated_aug else 0,
                "image_size": self.image_size,
            }
        )
        log.info("ImageFolder %s: %d classes, %s", self.root, len(self.layout.classes), self.data_info["sizes"])

    @property
    def num_classes(self) -> int:
        if self.layout is None:
            raise RuntimeError("ImageFolderDataModule.setup() must run before the class count is known")
        return len(self.layout.classes)

    def model_dims(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "image_size": self.image_size}

    def module_dims(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        """Mix training batches on the device (Mixup/CutMix with smoothed soft targets (B, K)); others pass."""
        if self.mixer is not None and self.trainer is not None and self.trainer.training:
            batch["x"], batch["target"] = self.mixer(batch["x"], batch["target"])
        return batch

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> Any:
        # evaluation loaders take each image once, also under DDP
        make = partial(seeded_loader, shuffle=True) if shuffle else self.evaluation_loader
        return make(self.splits[split], batch_size=batch_size, seed=self.seed, **self._loader_options(drop_last=shuffle))

    def _loader_options(self, drop_last: bool) -> dict[str, Any]:
        return {
            # Mixup pairs images within a batch; the official loader drops the short last one too
            "drop_last": drop_last,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def _repeated_aug_loader(self) -> StatefulDataLoader:
        """The training loader in DeiT's repeated-augmentation order, this process's share under DDP."""
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = RepeatedAugmentationSampler(
            len(self.splits["train"]), self.seed, replicas, rank, repeats=self.repeated_aug_repeats
        )
        # its own generator, as `seeded_loader` gives every loader: worker seeds never draw on the global RNG
        return StatefulDataLoader(
            self.splits["train"], batch_size=self.batch_size, sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed), **self._loader_options(drop_last=True),
        )

    def train_dataloader(self) -> Any:
        if self.repeated_aug:
            return self._repeated_aug_loader()
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> Any:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> Any:
        return self._loader("test", self.eval_batch_size, shuffle=False)
