"""The paper's ImageNet network: a 4-stage hierarchical vision transformer with any registered attention
(results/paper/official_code.md §5.1).

A 4×4/4 convolution stem, a learned absolute position embedding added once at stage 1, stages of pre-LN blocks
separated by 2×2/2 convolutions, a final LayerNorm, global average pooling and a linear head. Blocks carry
layer-scale on the MLP branch only and stochastic depth rising linearly over all blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flowformer.models.qkv_attention import QkvAttention
from flowformer.nn.blocks import DropPath, FeedForward


def _per_stage(value: int | Sequence[int], stages: int, key: str) -> list[int]:
    """An int (the same in every stage) or one value per stage, as a list of `stages` ints."""
    values = [int(value)] * stages if isinstance(value, int) else [int(v) for v in value]
    if len(values) != stages:
        raise ValueError(f"model.{key} needs one value per stage ({stages}, as model.dims has); got {list(values)}")
    return values


class HierarchicalBlock(nn.Module):
    """x += DropPath(Attn(LN(x))); x += DropPath(γ ⊙ MLP(LN(x))), with γ initialised to `layer_scale`.

    forward: x (B, N, C) -> (B, N, C).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        attention: dict[str, Any] | str,
        mlp_ratio: float,
        drop_path: float,
        layer_scale: float,
        ln_eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = QkvAttention(dim, heads, attention)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout=0.0, activation="gelu")
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma * self.mlp(self.norm2(x)))


class HierarchicalFlowformer(nn.Module):
    """The hierarchical network of the paper's ImageNet table, with any registered attention.

    forward(x (B, 3, S, S)) -> logits (B, num_classes), S = `image_size` (a multiple of patch_size · 2^(stages-1)).

    Args:
        num_classes: classifier outputs (from the data).
        image_size: S, which fixes the size of the stage-1 position embedding (from the data).
        attention: the `model.attention` config node or a registered name.
        dims: stage widths (96, 192, 384, 768).
        depths: blocks per stage (3, 3, 10, 3).
        heads: heads per stage, one int for every stage (the official code's 12) or one per stage.
        patch_size: stem kernel and stride (4).
        mlp_ratio: MLP hidden width / stage width (4).
        drop_path: the last block's stochastic-depth rate; the first block's is 0 (0.2).
        layer_scale: initial value of γ on the MLP branch (1e-5).
        ln_eps: LayerNorm ε (1e-6).
        in_chans: input channels (3).
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int = 224,
        attention: dict[str, Any] | str = "flow",
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (3, 3, 10, 3),
        heads: int | Sequence[int] = 12,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.2,
        layer_scale: float = 1e-5,
        ln_eps: float = 1e-6,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        depths = _per_stage(depths, len(dims), "depths")
        heads = _per_stage(heads, len(dims), "heads")
        reduction = patch_size * 2 ** (len(dims) - 1)
        if image_size % reduction:
            raise ValueError(
                f"data.image_size={image_size} must be a multiple of {reduction} (patch_size {patch_size} and "
                f"{len(dims) - 1} 2x downsamplings), e.g. {max(reduction, image_size // reduction * reduction)}"
            )
        self.image_size, self.grid = image_size, image_size // patch_size
        self.downsamples = nn.ModuleList(
            [nn.Conv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size)]
            + [nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2) for i in range(1, len(dims))]
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dims[0]))
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(
                    HierarchicalBlock(dim, n_heads, attention, mlp_ratio, rates[start + j], layer_scale, ln_eps)
                    for j in range(depth)
                )
            )
            for dim, depth, n_heads, start in zip(dims, depths, heads, starts)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=ln_eps)
        self.head = nn.Linear(dims[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that timm's optimiser factory keeps out of weight decay (besides 1-D parameters)."""
        return {"pos_embed"}

    def forward_features(self, x: Tensor) -> Tensor:
        """x (B, 3, S, S) -> pooled features (B, dims[-1]) after the final LayerNorm."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of {self.image_size}x{self.image_size} (the model's image_size, which sizes the "
                f"position embedding); got {tuple(x.shape[-2:])}. Set data.image_size to match."
            )
        for index, (downsample, stage) in enumerate(zip(self.downsamples, self.stages)):
            x = downsample(x)
            batch, channels, height, width = x.shape
            tokens = x.flatten(2).transpose(1, 2)  # (B, H·W, C)
            if index == 0:
                tokens = tokens + self.pos_embed
            tokens = stage(tokens)
            x = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return self.norm(tokens).mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))
