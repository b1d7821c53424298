"""DeiT-S with any registered attention: timm's `VisionTransformer`, with `QkvAttention` as its attention layer.

The paper's "DeiT + Flowformer" column has no official code (results/paper/official_code.md §5.1); this builds it
from timm's own DeiT-S definition, so everything but the attention op is timm's. The attention keeps timm's
parameter names (`qkv`, `proj`), so timm's DeiT-S weights load into every variant (`pretrained=True`).
timm is the optional `vision` extra and is imported only when a model is built.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from flowformer.models.qkv_attention import bind_attention

DEIT_SMALL = "deit_small_patch16_224"
# the first timm release whose VisionTransformer takes `attn_layer`
MIN_TIMM = "1.0.23"


def _require_timm() -> None:
    """Fail with the command that fixes it when timm is absent or too old to swap the attention layer."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as error:
        raise ImportError(
            f"DeiT-S is built with timm, the optional `vision` extra: pip install -e '.[vision]' ({error})"
        ) from error
    if "attn_layer" not in inspect.signature(VisionTransformer.__init__).parameters:
        import timm

        raise ImportError(
            f"timm {timm.__version__} cannot swap the attention of VisionTransformer (attn_layer arrived in timm "
            f"{MIN_TIMM}); upgrade it: pip install -U 'timm>={MIN_TIMM}'"
        )


def deit_small(
    num_classes: int,
    image_size: int = 224,
    attention: dict[str, Any] | str = "flow",
    drop_path: float = 0.1,
    pretrained: bool = False,
) -> nn.Module:
    """timm's DeiT-S (patch 16, width 384, depth 12, 6 heads) with `attention` in every block.

    forward(x (B, 3, S, S)) -> logits (B, num_classes), S = `image_size`.

    Args:
        num_classes: classifier outputs (from the data).
        image_size: S (from the data); the position embedding has (S / 16)² + 1 entries.
        attention: the `model.attention` config node or a registered name.
        drop_path: stochastic-depth rate of the last block (DeiT-S: 0.1).
        pretrained: load timm's ImageNet-1K DeiT-S weights (downloads them once; the head is reset when
            num_classes differs and the position embedding resampled when image_size does).
    """
    _require_timm()
    import timm

    return timm.create_model(
        DEIT_SMALL,
        pretrained=pretrained,
        num_classes=num_classes,
        img_size=image_size,
        drop_path_rate=drop_path,
        attn_layer=bind_attention(attention),
    )
