"""The UEA time-series classifier of the paper (results/paper/official_code.md §3.3, after mvts_transformer)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowformer.attention.layer import MultiHeadAttention
from flowformer.dropout import Dropout
from flowformer.nn.blocks import Encoder
from flowformer.nn.embeddings import LearnedPositionalEncoding


class TimeSeriesClassifier(nn.Module):
    """Linear input projection ×√D, learned positions, post-LN encoder, then GELU -> dropout -> mask -> flatten ->
    Linear(max_len·D -> classes).

    forward(x (B, T, C), padding_mask (B, T) bool, True = padding) -> logits (B, num_classes), for T <= max_len.
    The flatten head reads `max_len` positions; a batch shorter than that is taken as padded to it. Where every
    attention op ignores padding (`MultiHeadAttention.padding_invariant`), the encoder runs at the batch's own
    length and the head sees zeros beyond it, as it would at padded positions: the same function as the padded
    batch, at a fraction of the work when the data cuts each batch to its longest series. Otherwise the batch is
    padded to `max_len` first.
    """

    def __init__(
        self,
        feat_dim: int,
        num_classes: int,
        max_len: int,
        d_model: int = 512,
        n_heads: int = 8,
        n_layers: int = 2,
        d_ff: int = 2048,
        dropout: float = 0.1,
        attention: dict[str, Any] | str = "flow",
        activation: str = "gelu",
        norm_first: bool = False,
        pos_init_scale: float = 0.02,
    ) -> None:
        super().__init__()
        self.max_len, self.d_model = max_len, d_model
        self.input_proj = nn.Linear(feat_dim, d_model)
        self.positions = LearnedPositionalEncoding(max_len, d_model, init_scale=pos_init_scale, init="uniform")
        self.dropout = Dropout(dropout)
        self.encoder = Encoder(
            n_layers,
            final_norm=True,
            d_model=d_model,
            n_heads=n_heads,
            d_ff=d_ff,
            attention=attention,
            dropout=dropout,
            norm_first=norm_first,
            activation=activation,
        )
        self.head_dropout = Dropout(dropout)
        self.classifier = nn.Linear(max_len * d_model, num_classes)
        self.runs_short_batches = all(
            module.padding_invariant for module in self.modules() if isinstance(module, MultiHeadAttention))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        batch, length, _ = x.shape
        if length > self.max_len:
            raise ValueError(f"expected series of at most max_len={self.max_len} steps, got length {length}")
        if length < self.max_len and not self.runs_short_batches:
            x, padding_mask = self._pad_to_max_len(x, padding_mask)
        h = self.dropout(self.positions(self.input_proj(x) * math.sqrt(self.d_model)))
        h = self.encoder(h, padding_mask)
        h = self.head_dropout(F.gelu(h))
        if padding_mask is not None:
            h = h * (~padding_mask)[..., None].to(h.dtype)
        if h.shape[1] < self.max_len:  # the positions beyond the batch are padding: zeros
            h = F.pad(h, (0, 0, 0, self.max_len - h.shape[1]))
        return self.classifier(h.reshape(batch, -1))

    def _pad_to_max_len(self, x: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """x and its padding mask padded at the end to `max_len` steps (the new steps are padding)."""
        missing = self.max_len - x.shape[1]
        if padding_mask is None:
            padding_mask = x.new_zeros(x.shape[:2], dtype=torch.bool)
        return F.pad(x, (0, 0, 0, missing)), F.pad(padding_mask, (0, missing), value=True)


__all__ = ["TimeSeriesClassifier"]
