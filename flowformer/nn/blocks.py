"""Transformer blocks around any registered attention: pre-LN or post-LN, bidirectional or causal."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from flowformer.attention.layer import MultiHeadAttention
from flowformer.dropout import Dropout

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # JAX's default GELU, used by the official LRA code
    "relu": nn.ReLU,
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is dropped with probability `rate` and kept ones
    are scaled by 1 / (1 - rate); the identity in evaluation. x: (B, ...) -> (B, ...)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep) if keep > 0.0 else x * mask

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class FeedForward(nn.Sequential):
    """Linear -> activation -> dropout -> Linear -> dropout (position-wise; equals the official Conv1d k=1).

    inner_dropout=False drops the dropout after the activation (GPT-2's MLP has only the one after its output
    projection); an identity keeps its place, so the layers' indices and checkpoint keys stay the same.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str, inner_dropout: bool = True) -> None:
        super().__init__(
            nn.Linear(d_model, d_ff),
            make_activation(activation),
            Dropout(dropout) if inner_dropout else nn.Identity(),
            nn.Linear(d_ff, d_model),
            Dropout(dropout),
        )


class EncoderBlock(nn.Module):
    """Self-attention + feed-forward with residuals.

    norm_first=True (pre-LN):  x += drop(attn(LN(x)));  x += ffn(LN(x))
    norm_first=False (post-LN): x = LN(x + drop(attn(x)));  x = LN(x + ffn(x))
    causal=True makes it a decoder block (token i attends to tokens <= i). ffn_inner_dropout: see `FeedForward`.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        attention: dict[str, Any] | str = "flow",
        dropout: float = 0.1,
        norm_first: bool = True,
        activation: str = "gelu",
        ln_eps: float = 1e-5,
        causal: bool = False,
        d_head: int | None = None,
        ffn_inner_dropout: bool = True,
    ) -> None:
        super().__init__()
        self.norm_first, self.causal = norm_first, causal
        self.attention = MultiHeadAttention(d_model, n_heads, attention, d_head=d_head)
        self.norm1 = nn.LayerNorm(d_model, eps=ln_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=ln_eps)
        self.dropout = Dropout(dropout)
        self.ffn = FeedForward(d_model, d_ff, dropout, activation, inner_dropout=ffn_inner_dropout)

    def _attend(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        return self.dropout(self.attention(x, causal=self.causal, key_padding_mask=padding_mask))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, L, D); padding_mask: (B, L) bool, True = padding. Returns (B, L, D)."""
        if self.norm_first:
            x = x + self._attend(self.norm1(x), padding_mask)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self._attend(x, padding_mask))
        return self.norm2(x + self.ffn(x))


class CausalDecoderBlock(EncoderBlock):
    """A causal self-attention block (GPT-style decoder without cross-attention)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["causal"] = True
        super().__init__(*args, **kwargs)


class Encoder(nn.Module):
    """A stack of `EncoderBlock`s, optionally followed by a final LayerNorm."""

    def __init__(self, n_layers: int, final_norm: bool = True, **block_kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderBlock(**block_kwargs) for _ in range(n_layers))
        d_model, ln_eps = block_kwargs["d_model"], block_kwargs.get("ln_eps", 1e-5)
        self.final_norm = nn.LayerNorm(d_model, eps=ln_eps) if final_norm else nn.Identity()

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, padding_mask)
        return self.final_norm(x)


__all__ = ["CausalDecoderBlock", "Encoder", "EncoderBlock", "FeedForward", "make_activation"]
