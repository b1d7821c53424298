"""`make data-imagenet`: put ImageNet-1K (ILSVRC-2012) into the ImageFolder layout and check it.

ImageNet cannot be downloaded anonymously: register at https://image-net.org (free for non-commercial research),
accept the terms, and download from the ILSVRC-2012 page:

    ILSVRC2012_img_train.tar       (138 GB, 1,281,167 images in 1000 per-class tars)
    ILSVRC2012_img_val.tar         (6.3 GB, 50,000 images in one flat folder)
    ILSVRC2012_devkit_t12.tar.gz   (2.5 MB, holds the validation ground truth)

Put them in $DATA_DIR/imagenet/ and run `make data-imagenet` (`python -m tasks.imagenet.prepare`). It
1. unpacks the training tar into train/<wnid>/ (torchvision's ImageNet helpers, which check the archives' MD5):
   first the 1000 per-class tars into train/, then each into its class folder, deleting the tar once it is out;
2. unpacks the validation tar, or takes an already unpacked flat val/ folder, and sorts its images into
   val/<wnid>/ from the devkit's ground truth (data/ILSVRC2012_validation_ground_truth.txt gives each image's
   ILSVRC2012_ID in file-name order; data/meta.mat maps the IDs to WordNet ids);
3. checks the result as training does (1000 classes, 1,281,167 / 50,000 images), and decodes every image
   (`--check decode`, the default: a file cut short by an interrupted extraction fails here, not days into
   training; `--check header` only parses the headers). The result goes into the image check's cache
   (<root>/.image_check.json, see tasks/imagenet/layout.py), keyed by the folder's listing, so training runs on
   this folder read it instead of opening every image again.
Steps already done are skipped, so the command can be rerun after an interruption: a per-class tar still in
train/ is a class not fully unpacked, and a rerun unpacks it again.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from results.roots import data_root
from tasks.imagenet.layout import ImageFolderError, TruncatedLoadingError, load_layout

log = logging.getLogger(__name__)

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"


class PrepareError(RuntimeError):
    """A file this command needs is missing or malformed; the message names it and where to get it."""


def _obtain_hint(root: Path) -> str:
    return (
        f"Download {TRAIN_ARCHIVE}, {VAL_ARCHIVE} and {DEVKIT_ARCHIVE} from https://image-net.org (an account is "
        f"needed) into {root}, then rerun `make data-imagenet`. `python -m tasks.imagenet.prepare --help` says more."
    )


def val_wnids_from_devkit(devkit: Path) -> list[str]:
    """The WordNet id of each validation image, in file-name order, from an unpacked devkit folder.

    meta.mat lists the synsets (ILSVRC2012_ID, WNID, ...; the 1000 classes are the leaves, num_children == 0);
    the ground-truth file holds one ILSVRC2012_ID per line, for ILSVRC2012_val_00000001.JPEG onwards.
    """
    from scipy.io import loadmat

    meta, truth = devkit / META, devkit / GROUND_TRUTH
    for path in (meta, truth):
        if not path.is_file():
            raise PrepareError(f"{path} is missing: --devkit must be {DEVKIT_ARCHIVE} or the folder it unpacks to")
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    labels = [int(line) for line in truth.read_text().split()]
    unknown = sorted(set(labels) - set(wnid_of))
    if unknown:
        raise PrepareError(f"{truth} holds ILSVRC2012_IDs that {meta} does not list as classes: {unknown[:10]}")
    return [wnid_of[label] for label in labels]


def read_devkit(devkit: Path) -> list[str]:
    """`val_wnids_from_devkit` for the devkit archive or its unpacked folder."""
    if devkit.is_dir():
        return val_wnids_from_devkit(devkit)
    if not devkit.is_file():
        raise PrepareError(f"{devkit} does not exist. {_obtain_hint(devkit.parent)}")
    with tempfile.TemporaryDirectory() as scratch, tarfile.open(devkit) as archive:
        archive.extractall(scratch, filter="data")
        folders = [path for path in Path(scratch).iterdir() if path.is_dir()]
        return val_wnids_from_devkit(folders[0] if len(folders) == 1 else Path(scratch))


def sort_val_folder(val_dir: Path, wnids: list[str]) -> int:
    """Move the flat images of `val_dir` (sorted by name) into `val_dir/<wnid>/`; returns how many moved.

    `wnids[i]` is the class of the i-th image in file-name order, as the ground-truth file lists them.
    """
    images = sorted(path for path in val_dir.iterdir() if path.is_file())
    if len(images) != len(wnids):
        raise PrepareError(
            f"{val_dir} holds {len(images)} files but the ground truth lists {len(wnids)} images; unpack "
            f"{VAL_ARCHIVE} into an empty {val_dir} and rerun"
        )
    for image, wnid in zip(images, wnids):
        (val_dir / wnid).mkdir(exist_ok=True)
        shutil.move(str(image), val_dir / wnid / image.name)
    return len(images)


def _is_flat(folder: Path) -> bool:
    return folder.is_dir() and any(entry.is_file() for entry in os.scandir(folder))


def _has_classes(folder: Path) -> bool:
    return folder.is_dir() and any(entry.is_dir() for entry in os.scandir(folder))


def unpack_train(root: Path) -> None:
    """Unpack `root`/ILSVRC2012_img_train.tar into `root`/train/<wnid>/, or finish an interrupted unpacking.

    torchvision writes the per-class tars into train/ first, then unpacks each into train/<wnid>/ and deletes it,
    so a tar left in train/ beside class folders is a class whose unpacking did not finish (its folder may hold part
    of it): it is unpacked again, over what is there. Without class folders the whole archive is unpacked.
    """
    from torchvision.datasets.imagenet import parse_train_archive
    from torchvision.datasets.utils import extract_archive

    train = root / "train"
    if not _has_classes(train):
        if not (root / TRAIN_ARCHIVE).is_file():
            raise PrepareError(f"no class folders in {train}, no {root / TRAIN_ARCHIVE}. {_obtain_hint(root)}")
        log.info("unpacking %s into %s", TRAIN_ARCHIVE, train)
        parse_train_archive(str(root))
        return
    leftover = sorted(train.glob("*.tar"))
    if leftover:
        log.info("finishing an interrupted unpacking of %s: %d class tars left in %s", TRAIN_ARCHIVE, len(leftover), train)
    for archive in leftover:
        extract_archive(str(archive), str(archive.with_suffix("")), remove_finished=True)


def prepare(root: Path, devkit: Path | None = None, workers: int = 8, check: str = "decode") -> None:
    """Unpack and sort what is missing under `root` (see the module docstring), then check the layout and every
    image at level `check` (decode or header), caching the result for training runs."""
    from torchvision.datasets.imagenet import parse_val_archive

    devkit = devkit or root / DEVKIT_ARCHIVE
    unpack_train(root)
    val_dir = root / "val"
    if _is_flat(val_dir):
        log.info("sorting the flat %s into class folders from %s", val_dir, devkit)
        sort_val_folder(val_dir, read_devkit(devkit))
    elif not _has_classes(val_dir):
        if not (root / VAL_ARCHIVE).is_file():
            raise PrepareError(f"no images in {val_dir} and no {root / VAL_ARCHIVE}. {_obtain_hint(root)}")
        log.info("unpacking %s into %s and sorting it from %s", VAL_ARCHIVE, val_dir, devkit)
        parse_val_archive(str(root), wnids=read_devkit(devkit))
    layout = load_layout(root, check_images=check, corrupt_images="error", workers=workers)
    verb = "decodes" if check == "decode" else "opens"
    print(f"{root}: {len(layout.classes)} classes, {len(layout.train):,} train and {len(layout.val):,} val images, "
          f"every image {verb}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data_dir = data_root()
    parser.add_argument("--root", type=Path, default=data_dir / "imagenet", help="default: $DATA_DIR/imagenet")
    parser.add_argument("--devkit", type=Path, default=None,
                        help=f"{DEVKIT_ARCHIVE} or its unpacked folder (default: <root>/{DEVKIT_ARCHIVE})")
    parser.add_argument("--workers", type=int, default=8, help="processes that check the images")
    parser.add_argument("--check", choices=("decode", "header"), default="decode",
                        help="decode every image (finds truncated files) or only parse the headers (default: decode)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare(args.root, args.devkit, args.workers, args.check)
    except (PrepareError, ImageFolderError, TruncatedLoadingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
