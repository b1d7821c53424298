"""`ImageFolderDataModule`: ImageNet-1K, or any ImageFolder under DATA_DIR, with timm's transforms and mixing
(results/paper/official_code.md §5.2).

`data.dataset` names the folder `<data_dir>/<dataset>/{train,val}/<class>/<image>`; the class count comes from its
folders. The layout is checked before training (`tasks/imagenet/layout.py`), the images once per folder: the check's
result is cached, keyed by the folder's listing, so later runs and the other DDP ranks read it instead of opening
every image again.

An image that fails to decode while loading (a truncated JPEG passes the header check) raises an error naming it
and the fix, or under `data.corrupt_images=skip` is replaced by the next image of its split: batches keep their size
and the seeded order is kept. Each skipped path is logged, appended to
`<run dir>/skipped_while_loading/<host>-<pid>.tsv` (loader workers and DDP ranks write there too), and listed in
metrics.json under `data.skipped_while_loading`.

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
import os
import socket
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
from tasks.imagenet.layout import (
    PREPARE_HINT,
    SPLITS,
    FolderLayout,
    Samples,
    check_level,
    hold_out,
    load_layout,
    refuse_truncated_loading,
)
from tasks.imagenet.sampling import RepeatedAugmentationSampler

log = logging.getLogger(__name__)

# below the run directory (the Trainer's default_root_dir): what loader processes skipped, one file per process
SKIP_LOG = "skipped_while_loading"


class UnreadableImageError(OSError):
    """An image fails to decode while loading (e.g. a truncated file, which the header check passes); the message
    names it and the fix."""


def decode_rgb(path: str) -> Image.Image:
    """The image at `path`, decoded and converted to RGB; `UnreadableImageError` naming it when it does not decode.

    A truncated file raises too: PIL's `LOAD_TRUNCATED_IMAGES`, which would pad it with grey, must be off
    (`refuse_truncated_loading`).
    """
    refuse_truncated_loading()
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except MemoryError:
        raise
    except Exception as error:  # PIL raises many types for a broken file (OSError, SyntaxError, ValueError...)
        raise UnreadableImageError(
            f"{path} cannot be decoded ({type(error).__name__}: {error}). The file is damaged, e.g. cut short by an "
            "interrupted copy or extraction: re-extract it from its archive (`make data-imagenet` for ImageNet) or "
            "replace it, or train past it with data.corrupt_images=skip (it is then replaced by the next image and "
            "listed in metrics.json under data.skipped_while_loading); data.check_images=decode finds every such "
            "file before training"
        ) from error


def read_skip_log(folder: Path) -> dict[str, str]:
    """Path -> reason of the images listed in a skip log folder (`ImageFolderSplit.skip_log`); {} when none."""
    skipped: dict[str, str] = {}
    if folder.is_dir():
        for file in sorted(folder.glob("*.tsv")):
            for line in file.read_text(encoding="utf-8").splitlines():
                path, _, reason = line.partition("\t")
                skipped.setdefault(path, reason)
    return skipped


class ImageFolderSplit(Dataset):
    """Samples of one split -> {"x": transformed image (3, S, S) float, "target": class index}.

    An image that does not decode raises `UnreadableImageError` (corrupt_images="error"), or (corrupt_images="skip")
    is replaced by the next sample of the split that decodes, so the batch keeps its size and the order stays the
    seeded one. A skipped image is logged once per process, kept in `skipped` (path -> reason) and, when `skip_log`
    names a folder, appended to `<skip_log>/<host>-<pid>.tsv`, where the main process can read what its loader
    workers and the other DDP ranks skipped.
    """

    def __init__(self, samples: Samples, transform: Any, corrupt_images: str = "error",
                 skip_log: Path | None = None) -> None:
        self.samples, self.transform = samples, transform
        self.corrupt_images, self.skip_log = corrupt_images, skip_log
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                rgb = decode_rgb(path)
            except UnreadableImageError as error:
                if self.corrupt_images != "skip":
                    raise
                self._skip(path, error)
                continue
            return {"x": self.transform(rgb), "target": target}
        first = self.samples[0][0] if self.samples else None
        raise UnreadableImageError(
            f"none of the {len(self.samples)} images of this split decodes (the first is {first}; each is logged "
            "above): the folder is damaged. Re-extract it (`make data-imagenet` for ImageNet)"
        )

    def _skip(self, path: str, error: UnreadableImageError) -> None:
        if path in self.skipped:
            return
        reason = " ".join(f"{type(error.__cause__).__name__}: {error.__cause__}".split())
        self.skipped[path] = reason
        log.warning("skipping %s, which does not decode (%s): data.corrupt_images=skip replaces it by the next image",
                    path, reason)
        if self.skip_log is not None:
            self.skip_log.mkdir(parents=True, exist_ok=True)
            with open(self.skip_log / f"{socket.gethostname()}-{os.getpid()}.tsv", "a", encoding="utf-8") as file:
                file.write(f"{path}\t{reason}\n")


class ImageFolderDataModule(TaskDataModule):
    """ImageFolder classification with timm's augmentation and Mixup/CutMix.

    Args:
        dataset: folder name under `data_dir` (`imagenet` is checked against ImageNet-1K's counts).
        data_dir: the data root (DATA_DIR).
        image_size: training crop and evaluation size S.
        batch_size: images per device and step (even when mixing: Mixup pairs each image with another).
        eval_batch_size: per device for evaluation (None: batch_size).
        num_workers, pin_memory: loader settings; `num_workers` threads also walk the folders and `num_workers`
            processes run the image check.
        seed: the run's seed (shuffling, the hold-out draw).
        selection: one of results.run_record.SELECTIONS (see the module docstring).
        holdout_per_class: training images per class held out under holdout_val.
        check_images: off | header | decode (true: header, false: off): how thoroughly every image is checked
            before training (`tasks/imagenet/layout.py`); the result is cached, keyed by the folder's listing.
        corrupt_images: error | skip: what an unreadable image does, found by the check or while loading (skipped
            images are listed in metrics.json: `skipped_images`, `skipped_while_loading`).
        cache_dir: the folder of the image check's cache (None: `<root>/.image_check.json` where the data folder
            is writable, else the user's cache folder).
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
        check_images: bool | str = "header",
        corrupt_images: str = "error",
        cache_dir: str | Path | None = None,
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
        self.num_workers, self.pin_batches, self.seed = int(num_workers), bool(pin_memory), int(seed)
        self.selection, self.holdout_per_class = selection, int(holdout_per_class)
        self.check_images, self.corrupt_images = check_level(check_images), corrupt_images
        self.cache_dir = cache_dir
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

        refuse_truncated_loading()
        self.layout = load_layout(self.root, self.check_images, self.corrupt_images, self.num_workers, self.cache_dir)
        train, evaluation = self.layout.train, self.layout.val
        if not validates_on_test(self.selection):
            train, evaluation = hold_out(train, self.holdout_per_class, self.seed)
        train_transform = create_transform(self.image_size, is_training=True, **self.train_transform_options)
        eval_transform = create_transform(self.image_size, is_training=False, **self.eval_transform_options)
        self.splits = {
            "train": ImageFolderSplit(train, train_transform, self.corrupt_images),
            "val": ImageFolderSplit(evaluation, eval_transform, self.corrupt_images),
            "test": ImageFolderSplit(self.layout.val, eval_transform, self.corrupt_images),
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
                "skipped_while_loading": [],  # filled at teardown
                "train_images": len(train),
                "repeated_aug": self.repeated_aug_repeats if self.repeated_aug else 0,
                "image_size": self.image_size,
            }
        )
        log.info("ImageFolder %s: %d classes, %s", self.root, len(self.layout.classes), self.data_info["sizes"])

    def skipped_while_loading(self) -> list[str]:
        """The images replaced while loading under corrupt_images=skip, sorted: those this process skipped and those
        in the run directory's skip log (loader workers, other DDP ranks, earlier attempts of a resumed run)."""
        skipped = {path for split in self.splits.values() for path in split.skipped}
        folder = self._skip_log()
        if folder is not None:
            skipped.update(read_skip_log(folder))
        return sorted(skipped)

    def teardown(self, stage: str) -> None:
        """Record the images skipped while loading (`data.skipped_while_loading` in metrics.json)."""
        if self.layout is not None:
            self.data_info["skipped_while_loading"] = self.skipped_while_loading()

    def _skip_log(self) -> Path | None:
        """The run directory's skip log folder (the Trainer's default_root_dir); None without a Trainer."""
        run_dir = getattr(self.trainer, "default_root_dir", None)
        return Path(run_dir) / SKIP_LOG if run_dir is not None else None

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
        """Mix training batches on the device (Mixup/CutMix with smoothed soft targets (B, K)); others pass. On a
        CUDA device the images go channels-last, the layout of the model's convolutions there (`ImageNetModule`)."""
        if self.mixer is not None and self.trainer is not None and self.trainer.training:
            batch["x"], batch["target"] = self.mixer(batch["x"], batch["target"])
        if batch["x"].is_cuda:
            batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)
        return batch

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> Any:
        self.splits[split].skip_log = self._skip_log()
        # evaluation loaders take each image once, also under DDP
        return self.loader(self.splits[split], shuffle=shuffle, batch_size=batch_size, seed=self.seed,
                           **self._loader_options(drop_last=shuffle))

    def _loader_options(self, drop_last: bool) -> dict[str, Any]:
        return {
            # Mixup pairs images within a batch; the official loader drops the short last one too
            "drop_last": drop_last,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory(self.pin_batches),
            "persistent_workers": self.num_workers > 0,
        }

    def _repeated_aug_loader(self) -> StatefulDataLoader:
        """The training loader in DeiT's repeated-augmentation order, this process's share under DDP."""
        replicas, rank = self.process_share()
        self.splits["train"].skip_log = self._skip_log()
        sampler = RepeatedAugmentationSampler(
            len(self.splits["train"]), self.seed, replicas, rank, repeats=self.repeated_aug_repeats
        )
        return seeded_loader(self.splits["train"], batch_size=self.batch_size, seed=self.seed, shuffle=True,
                             sampler=sampler, **self._loader_options(drop_last=True))

    def train_dataloader(self) -> Any:
        if self.repeated_aug:
            return self._repeated_aug_loader()
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> Any:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> Any:
        return self._loader("test", self.eval_batch_size, shuffle=False)
