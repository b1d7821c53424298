"""DeiT-S with any registered attention: timm's `VisionTransformer`, with `QkvAttention` as its attention layer.

The paper's "DeiT + Flowformer" column has no official code (results/paper/official_code.md §5.1); this builds it
from timm's own DeiT-S definition, so everything but the attention op is timm's. The attention keeps timm's
parameter names (`qkv`, `proj`), so timm's DeiT-S weights load into every variant (`pretrained=True`): what an
op adds (Performer's random features) keeps its initialisation, what it lacks (biases that `proj_bias: false`
removes) is left out, an op that ties keys to queries (Reformer) takes the query and value thirds of timm's fused
`qkv`, and the log says which tensors did not load.
timm is the optional `vision` extra and is imported only when a model is built.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowformer.attention.registry import split_attention_config
from flowformer.models.qkv_attention import QkvAttention, bind_attention

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class PretrainedLoad:
    """What `load_timm_weights` did, by parameter name.

    loaded: our tensors that took timm's values (the adapted ones among them).
    adapted: fused `qkv` tensors that took timm's query and value thirds (ops that tie keys to queries).
    missing: our state entries that kept their initialisation (timm has no such tensor, or one of another shape).
    unused: timm's tensors that went nowhere.
    """

    loaded: tuple[str, ...]
    adapted: tuple[str, ...]
    missing: tuple[str, ...]
    unused: tuple[str, ...]


def _summarise(keys: Iterable[str]) -> str:
    """'blocks.*.attn.op.projection (12)': parameter names with block indices folded, and how many of each."""
    counts = Counter(re.sub(r"\.\d+\.", ".*.", key) for key in keys)
    return ", ".join(f"{key} ({count})" if count > 1 else key for key, count in sorted(counts.items()))


def load_timm_weights(model: nn.Module, state: Mapping[str, Tensor], variant: str) -> PretrainedLoad:
    """Load timm's DeiT-S `state` into `model` (a `deit_small` of any attention variant) wherever it fits.

    Tensors load by name when the shapes agree. A layer whose op ties keys to queries has a `qkv` of two thirds
    of timm's: it takes timm's query and value thirds. Every other tensor keeps its initialisation, and a warning
    names `variant` and the tensors that did not load either way.
    """
    ours = model.state_dict()
    state = dict(state)
    adapted = []
    for prefix, layer in model.named_modules():
        if isinstance(layer, QkvAttention) and layer.shares_qk:
            for name in ("weight", "bias"):
                key = f"{prefix}.qkv.{name}"
                if key in state and key in ours and state[key].shape[0] == 3 * ours[key].shape[0] // 2:
                    query, _, value = state[key].chunk(3)
                    state[key] = torch.cat([query, value])
                    adapted.append(key)
    fitting = {key: value for key, value in state.items() if key in ours and ours[key].shape == value.shape}
    model.load_state_dict(fitting, strict=False)
    result = PretrainedLoad(
        loaded=tuple(key for key in ours if key in fitting),
        adapted=tuple(adapted),
        missing=tuple(key for key in ours if key not in fitting),
        unused=tuple(key for key in state if key not in fitting),
    )
    if adapted:
        log.warning(
            "model.pretrained: the %s attention ties keys to queries, so its qkv took the query and value thirds of "
            "timm's fused qkv (the key third is dropped): %s", variant, _summarise(adapted),
        )
    if result.missing or result.unused:
        log.warning(
            "model.pretrained: timm's %s weights fit the %s attention variant in part: %d of its %d state entries "
            "loaded. Kept at initialisation: %s. Unused from timm: %s.",
            DEIT_SMALL, variant, len(result.loaded), len(ours), _summarise(result.missing) or "none",
            _summarise(result.unused) or "none",
        )
    return result


def timm_pretrained_state(num_classes: int, image_size: int) -> dict[str, Tensor]:
    """timm's ImageNet-1K DeiT-S weights (downloaded once), with the head reset when num_classes differs from 1000
    and the position embedding resampled when image_size differs from 224, as timm's own loader does."""
    import timm

    reference = timm.create_model(DEIT_SMALL, pretrained=True, num_classes=num_classes, img_size=image_size)
    return reference.state_dict()


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
        pretrained: load timm's ImageNet-1K DeiT-S weights (`timm_pretrained_state`, downloaded once) as far as
            the variant's tensors match them (`load_timm_weights`).
    """
    _require_timm()
    import timm

    model = timm.create_model(
        DEIT_SMALL,
        pretrained=False,
        num_classes=num_classes,
        img_size=image_size,
        drop_path_rate=drop_path,
        attn_layer=bind_attention(attention),
    )
    if pretrained:
        name, _, _ = split_attention_config(attention)
        load_timm_weights(model, timm_pretrained_state(num_classes, image_size), variant=name)
    return model
