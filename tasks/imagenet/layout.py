"""The ImageFolder layout (`<root>/{train,val}/<class>/<image>`) and the checks run on it before training.

Checks, each failing with the path at fault and the fix:
- both split folders exist and hold class folders;
- train and val have the same class folders, and no class folder is empty;
- a folder named `imagenet` holds ImageNet-1K's counts (1000 classes, 1,281,167 / 50,000 images);
- every image opens (its header parses); the unreadable ones are listed, then skipped or fatal
  (`data.corrupt_images`). Files with other extensions are not images to ImageFolder and are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import track
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
CORRUPT_IMAGE_POLICIES = ("error", "skip")
PREPARE_HINT = "`make data-imagenet` explains how to obtain ImageNet and sorts its val images into class folders"
# below this many images a progress bar would only flicker
PROGRESS_MIN_IMAGES = 10_000


class ImageFolderError(ValueError):
    """The folder does not have the ImageFolder layout the data module expects; the message names the path."""


@dataclass(frozen=True)
class ExpectedCounts:
    """The class and image counts a known dataset must have."""

    classes: int
    train: int
    val: int


# checked for a folder named `imagenet` (ILSVRC-2012)
KNOWN_COUNTS = {"imagenet": ExpectedCounts(classes=1000, train=1_281_167, val=50_000)}

Samples = list[tuple[str, int]]  # (image path, class index), class folders and files in sorted order


@dataclass
class FolderLayout:
    """A checked ImageFolder: class names (sorted folder names), samples per split, and the unreadable images."""

    root: Path
    classes: list[str]
    train: Samples
    val: Samples
    unreadable: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The provenance recorded in metrics.json (`data`)."""
        return {
            "root": str(self.root),
            "num_classes": len(self.classes),
            "sizes": {"train": len(self.train), "val": len(self.val)},
            "skipped_images": list(self.unreadable),
        }


def class_files(split_dir: Path) -> dict[str, list[str]]:
    """Class folder name -> its image files (sorted), for one split folder."""
    if not split_dir.is_dir():
        raise ImageFolderError(f"{split_dir} does not exist: expected <root>/train and <root>/val. {PREPARE_HINT}")
    folders = sorted(entry for entry in split_dir.iterdir() if entry.is_dir())
    if not folders:
        raise ImageFolderError(
            f"{split_dir} holds no class folders: images must sit in {split_dir}/<class>/ (`make data-imagenet` "
            "sorts a flat ImageNet val folder into class folders)"
        )
    return {folder.name: sorted(str(path) for path in folder.iterdir() if _is_image(path)) for folder in folders}


def _is_image(path: Path) -> bool:
    return has_file_allowed_extension(path.name, IMG_EXTENSIONS)


def check_classes(root: Path, splits: dict[str, dict[str, list[str]]]) -> list[str]:
    """The class names shared by every split; raises when the splits disagree or a class folder is empty."""
    train = set(splits["train"])
    for split, files in splits.items():
        extra = sorted(set(files) - train)
        if extra:
            raise ImageFolderError(
                f"{root / split} has class folders that {root / 'train'} lacks: {_first(extra)}. Every class needs "
                "training images; remove these folders or add them to train"
            )
        missing = sorted(train - set(files))
        if missing:
            raise ImageFolderError(
                f"{root / split} lacks class folders that {root / 'train'} has: {_first(missing)}; both splits need "
                "the same classes"
            )
        empty = sorted(name for name, paths in files.items() if not paths)
        if empty:
            raise ImageFolderError(
                f"empty class folder(s) in {root / split}: {_first(empty)} (no file with an image extension "
                f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder"
            )
    return sorted(train)


def check_counts(root: Path, classes: Sequence[str], sizes: dict[str, int]) -> None:
    """For a folder named like a known dataset, its class and image counts must be the known ones."""
    expected = KNOWN_COUNTS.get(root.name)
    if expected is None:
        return
    found = ExpectedCounts(len(classes), sizes["train"], sizes["val"])
    if found != expected:
        raise ImageFolderError(
            f"{root} is named {root.name!r} but holds {found.classes} classes and {found.train:,} / {found.val:,} "
            f"train / val images, where {root.name} has {expected.classes} and {expected.train:,} / "
            f"{expected.val:,}. Complete it ({PREPARE_HINT}), or train on a subset under another folder name "
            f"(data.dataset=<folder>)"
        )


def open_error(path: str) -> str | None:
    """Why the image at `path` cannot be opened, or None when its header parses."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for a broken file; each is a reason to report it
        return f"{type(error).__name__}: {error}"
    return None


def unreadable_images(paths: Sequence[str], workers: int = 0) -> list[tuple[str, str]]:
    """(path, reason) for every image that does not open, checked in `workers` processes (0: in this one)."""
    chunk = 256
    if workers > 1 and len(paths) > chunk:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return _failures(paths, pool.map(open_error, paths, chunksize=chunk))
    return _failures(paths, map(open_error, paths))


def _failures(paths: Sequence[str], reasons: Iterable[str | None]) -> list[tuple[str, str]]:
    if len(paths) >= PROGRESS_MIN_IMAGES:
        reasons = track(reasons, total=len(paths), description="checking that every image opens", transient=True)
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


def load_layout(root: Path, check_images: bool = True, corrupt_images: str = "error", workers: int = 0) -> FolderLayout:
    """Scan and check `<root>/{train,val}` (see the module docstring); returns the samples to train on."""
    if corrupt_images not in CORRUPT_IMAGE_POLICIES:
        raise ValueError(f"data.corrupt_images must be one of {CORRUPT_IMAGE_POLICIES}, got {corrupt_images!r}")
    if not root.is_dir():
        raise ImageFolderError(f"{root} does not exist (data.data_dir / data.dataset). {PREPARE_HINT}")
    splits = {split: class_files(root / split) for split in SPLITS}
    classes = check_classes(root, splits)
    check_counts(root, classes, {split: sum(map(len, files.values())) for split, files in splits.items()})
    samples = {split: [(path, index) for index, name in enumerate(classes) for path in files[name]]
               for split, files in splits.items()}
    failures = []
    if check_images:
        failures = unreadable_images([path for split in SPLITS for path, _ in samples[split]], workers)
    if failures and corrupt_images == "error":
        listing = "\n".join(f"  {path}: {reason}" for path, reason in failures[:20])
        raise ImageFolderError(
            f"{len(failures)} image(s) under {root} cannot be opened:\n{listing}\nReplace or delete them, or skip "
            "them with data.corrupt_images=skip (they are then listed in metrics.json under data.skipped_images)"
        )
    unreadable = [path for path, _ in failures]
    for path, reason in failures:
        log.warning("skipping unreadable image %s (%s)", path, reason)
    bad = set(unreadable)
    kept = {split: [sample for sample in samples[split] if sample[0] not in bad] for split in SPLITS}
    return FolderLayout(root, classes, kept["train"], kept["val"], unreadable)


def hold_out(samples: Samples, per_class: int, seed: int) -> tuple[Samples, Samples]:
    """(kept, held out): `per_class` random images of every class held out of `samples`, drawn with `seed`.

    A class needs more than `per_class` images, so that some remain to train on.
    """
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    small = sorted(index for index, members in by_class.items() if len(members) <= per_class)
    if small:
        raise ImageFolderError(
            f"data.holdout_per_class={per_class} leaves no training image in the class(es) of index {_first(small)}; "
            "lower it or add images"
        )
    rng = np.random.default_rng(seed)
    held: set[tuple[str, int]] = set()
    for members in by_class.values():
        held.update(members[i] for i in rng.permutation(len(members))[:per_class])
    return [s for s in samples if s not in held], [s for s in samples if s in held]


def _first(names: Sequence[str], shown: int = 10) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(str(n) for n in names[:shown]) + more
