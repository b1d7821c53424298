"""The Long Range Arena networks of the paper (results/paper/official_code.md §2.2): a sequence classifier and a dual encoder.

Both follow the official Flax model:
token embedding N(0, 1) → [zero-initialised CLS prepended] → + positions (the Flax sinusoid, or learned N(0, 0.02))
→ dropout → pre-LN blocks (attention, then Dense(mlp) → GELU(tanh) → dropout → Dense → dropout) → final LayerNorm
(eps 1e-6) → pooling → head.
Initialisation matches Flax: attention and MLP kernels xavier-uniform, MLP biases N(0, 1e-6), head kernels LeCun
truncated normal, head biases zero.

Unlike the official code, padding is masked: a padded token is neither a source nor a sink, and the pooled output of
a padded sequence equals that of the unpadded one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowformer.dropout import Dropout
from flowformer.nn.blocks import Encoder, FeedForward
from flowformer.nn.embeddings import LearnedPositionalEncoding

POOLINGS = ("cls", "mean", "first")
_TRUNC_STD_CORRECTION = 0.87962566103423978  # std of a unit normal truncated to [-2, 2], as in jax's variance_scaling


def lra_sinusoid_table(max_len: int, d_model: int, min_scale: float = 1.0, max_scale: float = 10000.0) -> Tensor:
    """The LRA/Flax fixed position table (max_len, D): sines in the first half, cosines in the second.

    It differs from Vaswani et al.: the halves are concatenated, not interleaved, and frequencies are spaced with
    D/2 − 1 in the denominator. An odd D leaves the last column zero, as in Flax.
    """
    if d_model < 4:
        raise ValueError(f"the LRA sinusoid needs d_model >= 4, got {d_model}")
    half = d_model // 2
    position = np.arange(max_len, dtype=np.float64)[:, None]
    scale_factor = -math.log(max_scale / min_scale) / (half - 1)
    div_term = min_scale * np.exp(np.arange(half) * scale_factor)
    table = np.zeros((max_len, d_model), dtype=np.float32)
    table[:, :half] = np.sin(position * div_term)
    table[:, half : 2 * half] = np.cos(position * div_term)
    return torch.from_numpy(table)


class LRASinusoidalPositions(nn.Module):
    """x (B, L, D) -> x + table[:L] with `lra_sinusoid_table` (a fixed buffer, not saved in checkpoints)."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.register_buffer("table", lra_sinusoid_table(max_len, d_model), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.table[: x.shape[1]].to(x.dtype)


def lecun_normal_(weight: Tensor) -> Tensor:
    """Flax's default Dense kernel init: truncated normal (±2σ) with variance 1/fan_in."""
    fan_in = weight.shape[1]
    std = math.sqrt(1.0 / fan_in) / _TRUNC_STD_CORRECTION
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _init_dense(layer: nn.Linear) -> None:
    lecun_normal_(layer.weight)
    nn.init.zeros_(layer.bias)


def _init_encoder(encoder: nn.Module) -> None:
    """Flax initialisation of the blocks: every kernel xavier-uniform; MLP biases N(0, 1e-6); other biases zero."""
    mlp_layers = {id(layer) for module in encoder.modules() if isinstance(module, FeedForward) for layer in module}
    for module in encoder.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                if id(module) in mlp_layers:
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)


class LRAEncoder(nn.Module):
    """Embedding, optional CLS, positions, dropout, pre-LN blocks and final LayerNorm.

    forward(tokens (B, L) int64, padding_mask (B, L) bool or None) -> (encoded (B, L', D), mask (B, L') or None),
    where L' = L + 1 when a CLS token is prepended.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        qkv_dim: int,
        mlp_dim: int,
        dropout: float,
        attention: dict[str, Any] | str,
        cls_token: bool,
        pos_emb: str = "sinusoidal",
        ln_eps: float = 1e-6,
        activation: str = "gelu_tanh",
    ) -> None:
        super().__init__()
        if qkv_dim % n_heads:
            raise ValueError(f"qkv_dim={qkv_dim} must be divisible by n_heads={n_heads}")
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, std=1.0)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if cls_token else None
        table_len = max_len + int(cls_token)
        if pos_emb == "sinusoidal":
            self.positions: nn.Module = LRASinusoidalPositions(table_len, d_model)
        elif pos_emb == "learned":
            self.positions = LearnedPositionalEncoding(table_len, d_model, init_scale=0.02, init="normal")
        else:
            raise ValueError(f"model.pos_emb must be 'sinusoidal' or 'learned', got {pos_emb!r}")
        self.dropout = Dropout(dropout)
        self.encoder = Encoder(
            n_layers,
            final_norm=True,
            d_model=d_model,
            n_heads=n_heads,
            d_ff=mlp_dim,
            attention=attention,
            dropout=dropout,
            norm_first=True,
            activation=activation,
            ln_eps=ln_eps,
            d_head=qkv_dim // n_heads,
        )
        _init_encoder(self.encoder)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if tokens.shape[1] > self.max_len:
            raise ValueError(
                f"input length {tokens.shape[1]} exceeds the model's max_len={self.max_len}; "
                "check data.max_len (the datamodule truncates to it)"
            )
        x = self.embedding(tokens)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
            if padding_mask is not None:
                padding_mask = torch.cat([padding_mask.new_zeros(x.shape[0], 1), padding_mask], dim=1)
        x = self.dropout(self.positions(x))
        return self.encoder(x, padding_mask), padding_mask


def pool(encoded: Tensor, padding_mask: Tensor | None, mode: str) -> Tensor:
    """(B, L, D) -> (B, D). `cls`/`first` take position 0; `mean` averages the non-padded positions."""
    if mode in ("cls", "first"):
        return encoded[:, 0]
    if mode == "mean":
        if padding_mask is None:
            return encoded.mean(dim=1)
        keep = (~padding_mask).unsqueeze(-1).to(encoded.dtype)
        return (encoded * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")


class LRASequenceClassifier(nn.Module):
    """ListOps, Text, Image and Pathfinder: encoder → pooling → Dense(mlp) → ReLU → Dense(classes).

    forward(tokens (B, L) int64, padding_mask (B, L) bool or None, True = padding) -> logits (B, num_classes).
    `pooling="cls"` prepends a zero-initialised CLS token (so positions run to max_len + 1); `"mean"` averages.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_len: int,
        d_model: int = 512,
        n_layers: int = 1,
        n_heads: int = 2,
        qkv_dim: int = 512,
        mlp_dim: int = 1024,
        dropout: float = 0.1,
        attention: dict[str, Any] | str = "flow_lra_official",
        pooling: str = "cls",
        pos_emb: str = "sinusoidal",
        ln_eps: float = 1e-6,
        activation: str = "gelu_tanh",
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"LRASequenceClassifier pooling must be 'cls' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.encoder = LRAEncoder(
            vocab_size, max_len, d_model, n_layers, n_heads, qkv_dim, mlp_dim, dropout, attention,
            cls_token=pooling == "cls", pos_emb=pos_emb, ln_eps=ln_eps, activation=activation,
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(d_model, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, num_classes))
        for layer in self.head:
            if isinstance(layer, nn.Linear):
                _init_dense(layer)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        encoded, mask = self.encoder(tokens, padding_mask)
        return self.head(pool(encoded, mask, self.pooling))


class LRADualEncoder(nn.Module):
    """Retrieval (AAN): one shared encoder for both documents, concat → Dense(mlp) → ReLU → Dense(mlp/2) → ReLU →
    Dense(classes).

    forward(tokens1 (B, L1), tokens2 (B, L2), padding_mask1, padding_mask2) -> logits (B, num_classes).
    As in the official code no CLS token is prepended: `pooling="first"` takes position 0, the document's first byte
    (after attention it has seen the whole document). `pooling="mean"` is offered as an alternative.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_len: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        qkv_dim: int = 128,
        mlp_dim: int = 512,
        dropout: float = 0.1,
        attention: dict[str, Any] | str = "flow_lra_official",
        pooling: str = "first",
        pos_emb: str = "sinusoidal",
        ln_eps: float = 1e-6,
        activation: str = "gelu_tanh",
    ) -> None:
        super().__init__()
        if pooling not in ("first", "mean"):
            raise ValueError(f"LRADualEncoder pooling must be 'first' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.encoder = LRAEncoder(
            vocab_size, max_len, d_model, n_layers, n_heads, qkv_dim, mlp_dim, dropout, attention,
            cls_token=False, pos_emb=pos_emb, ln_eps=ln_eps, activation=activation,
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Linear(2 * d_model, mlp_dim),
            nn.ReLU(),
            nn.Linear(mlp_dim, mlp_dim // 2),
            nn.ReLU(),
            nn.Linear(mlp_dim // 2, num_classes),
        )
        for layer in self.head:
            if isinstance(layer, nn.Linear):
                _init_dense(layer)

    def embed(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """One document (B, L) -> pooled (B, D) through the shared encoder."""
        encoded, mask = self.encoder(tokens, padding_mask)
        return pool(encoded, mask, self.pooling)

    def forward(
        self,
        tokens1: Tensor,
        tokens2: Tensor,
        padding_mask1: Tensor | None = None,
        padding_mask2: Tensor | None = None,
    ) -> Tensor:
        pooled = torch.cat([self.embed(tokens1, padding_mask1), self.embed(tokens2, padding_mask2)], dim=-1)
        return self.head(pooled)


__all__ = [
    "LRADualEncoder",
    "LRAEncoder",
    "LRASequenceClassifier",
    "LRASinusoidalPositions",
    "lecun_normal_",
    "lra_sinusoid_table",
    "pool",
]
