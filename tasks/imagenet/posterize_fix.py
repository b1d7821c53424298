"""Keep timm's RandAugment running under Pillow >= 13, with the images older Pillow gave.

RandAugment `rand-m9-mstd0.5-inc1` draws each op's magnitude from N(9, 0.5) clipped to [0, 10]; at 10 its
PosterizeIncreasing op keeps 0 bits. Older Pillow turned that into a black image (every bit masked off), which
is what the official run trained on; Pillow 13 raises "bits must be between or equal to 1 and 8" instead, for
about 1 image in 800: one batch in a few crashes the run. `install()` swaps timm's posterize op for one that
returns the black image at 0 bits and calls timm's own otherwise; on a Pillow that accepts 0 bits it changes
nothing.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageOps

_TIMM_POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def pillow_rejects_zero_bits() -> bool:
    try:
        ImageOps.posterize(Image.new("L", (1, 1)), 0)
    except ValueError:
        return True
    return False


def posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, with 0 bits kept giving the all-black image of older Pillow."""
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def install() -> None:
    """Route timm's posterize ops through `posterize` where Pillow rejects 0 bits (before building transforms:
    each op binds its function when it is built)."""
    from timm.data import auto_augment

    if pillow_rejects_zero_bits():
        auto_augment.NAME_TO_OP.update({name: posterize for name in _TIMM_POSTERIZE_OPS})
