"""A small real image set in the ImageFolder layout, written from scikit-learn's bundled digits (no download).

    python -m tasks.imagenet.digits --out $DATA_DIR/digits [--size 32] [--val-fraction 0.2] [--seed 0] [--overwrite]

writes `<out>/{train,val}/<digit>/<index>.png`: the 1,797 8×8 grey-level digits (16 levels), upsampled to
size × size, split per class into train and val. An `<out>` that already holds a split is refused (another seed
or fraction would leave images of the old split beside the new one, some in both train and val); `--overwrite`
deletes its train/ and val/ first. Then train on it like on ImageNet:

    python -m experiments.train experiment=imagenet/hierarchical data.dataset=digits data.image_size=32 ...
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

# the digits' grey levels run from 0 (background) to 16 (ink)
DIGIT_LEVELS = 16


class DigitsExistError(FileExistsError):
    """The output folder already holds a train/ or val/ split; the message says how to replace it."""


def write_digits(
    out: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0, overwrite: bool = False
) -> dict[str, int]:
    """Write the digits as PNG files in the ImageFolder layout under `out`; returns the image count per split.

    Ink is dark on white, scaled bicubically from 8×8 to size × size. The split is stratified by class. An `out`
    holding train/ or val/ is refused, unless `overwrite` deletes both first.
    """
    out = Path(out)
    existing = [out / split for split in ("train", "val") if (out / split).exists()]
    if existing and not overwrite:
        raise DigitsExistError(
            f"{out} already holds {' and '.join(path.name for path in existing)}: writing another split there would "
            "leave old images beside the new ones (the same digit in train and val). Rerun with --overwrite to "
            f"replace them, or delete {out}"
        )
    for path in existing:
        shutil.rmtree(path)
    digits = load_digits()
    pixels = (255 - digits.images * (255 / DIGIT_LEVELS)).round().astype(np.uint8)  # (N, 8, 8)
    indices = np.arange(len(pixels))
    train, val = train_test_split(indices, test_size=val_fraction, stratify=digits.target, random_state=seed)
    counts = {}
    for split, members in (("train", train), ("val", val)):
        for index in sorted(members):
            folder = out / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[index], mode="L").resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / f"{index:04d}.png")
        counts[split] = len(members)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the dataset folder to write, e.g. $DATA_DIR/digits")
    parser.add_argument("--size", type=int, default=32, help="side of the written images in pixels (default 32)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class written to val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--overwrite", action="store_true", help="delete <out>/train and <out>/val first")
    args = parser.parse_args(argv)
    try:
        counts = write_digits(args.out, args.size, args.val_fraction, args.seed, args.overwrite)
    except DigitsExistError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {counts['train']} train and {counts['val']} val images of 10 classes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
