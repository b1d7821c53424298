"""Positional encodings added to token embeddings."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sin/cos encoding (Vaswani et al.): x (B, L, D) -> x + PE[:L]."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.table[: x.shape[1]].to(x.dtype)


class LearnedPositionalEncoding(nn.Module):
    """A learned (max_len, D) table added to x (B, L, D).

    init="normal" draws N(0, init_scale²); init="uniform" draws U(-init_scale, init_scale) (the time-series code).
    """

    def __init__(self, max_len: int, d_model: int, init_scale: float = 0.02, init: str = "normal") -> None:
        super().__init__()
        self.table = nn.Parameter(torch.empty(max_len, d_model))
        if init == "normal":
            nn.init.normal_(self.table, std=init_scale)
        elif init == "uniform":
            nn.init.uniform_(self.table, -init_scale, init_scale)
        else:
            raise ValueError(f"unknown positional-encoding init {init!r}; expected 'normal' or 'uniform'")

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] > self.table.shape[0]:
            raise ValueError(f"sequence length {x.shape[1]} exceeds the positional table ({self.table.shape[0]})")
        return x + self.table[: x.shape[1]]


def fairseq_sinusoids(positions: Tensor, d_model: int) -> Tensor:
    """fairseq's sinusoidal embedding of integer `positions` (L,) -> (L, D), computed in fp32 as fairseq does.

    Unlike `SinusoidalPositionalEncoding`, sines fill the first half and cosines the second (not interleaved), and
    the frequencies are 10000^(-i / (D/2 - 1)); an odd D leaves the last column zero.
    """
    half = d_model // 2
    if half < 2:
        raise ValueError(f"fairseq's sinusoids need d_model >= 4, got {d_model}")
    frequency = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device) * -(math.log(10000) / (half - 1)))
    angles = positions.to(torch.float32)[:, None] * frequency[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(table, (0, d_model % 2))


class FairseqSinusoidalPositions(nn.Module):
    """fairseq's `SinusoidalPositionalEmbedding` for unpadded (or right-padded) token sequences.

    fairseq numbers the tokens of a sequence from `padding_idx + 1` (2 with its dictionary), so token i gets the
    sinusoid of position i + padding_idx + 1. `forward(length, offset)` returns the rows of tokens offset ..
    offset + length − 1 (offset > 0 continues a sequence during generation), with no length limit.
    """

    def __init__(self, d_model: int, padding_idx: int = 1) -> None:
        super().__init__()
        self.d_model, self.first_position = d_model, padding_idx + 1

    def forward(self, length: int, offset: int = 0, device: torch.device | None = None) -> Tensor:
        """(length, D) fp32 position embeddings of tokens offset .. offset + length − 1."""
        positions = torch.arange(offset, offset + length, device=device) + self.first_position
        return fairseq_sinusoids(positions, self.d_model)
