"""Multi-head attention: input/output projections around any registered attention op."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from flowformer.attention.registry import build_attention, split_attention_config
from flowformer.dropout import Dropout


class MultiHeadAttention(nn.Module):
    """Projects x (B, L, D) and context (B, S, D) into heads, applies the op, merges heads, projects back.

    Args:
        d_model: model width D.
        n_heads: number of heads H.
        attention: the `model.attention` config node (`{"name": ..., <op options>, "proj_bias": bool}`) or a name.
        d_head: head width (default D / H). The inner width is H · d_head.
        bias: bias on the four projections (overridden by `proj_bias` in the attention node).
        dropout: dropout after the output projection.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        attention: dict[str, Any] | str = "flow",
        d_head: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        name, options, layer_options = split_attention_config(attention)
        bias = layer_options.get("proj_bias", bias)
        if d_head is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; set d_head explicitly")
            d_head = d_model // n_heads
        inner = n_heads * d_head
        self.n_heads, self.d_head = n_heads, d_head
        self.op = build_attention(name, head_dim=d_head, n_heads=n_heads, **options)
        # Ops that share queries and keys (Reformer's LSH) get no key projection: it would receive no gradient.
        self.shares_qk = bool(getattr(self.op, "shares_qk", False))
        # Ops whose real positions ignore padding, at any length, say so (`padding_invariant`); a model may then run
        # a batch cut to its longest sequence. An op that does not say so is taken to depend on the padded length.
        self.padding_invariant = bool(getattr(self.op, "padding_invariant", False))
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.k_proj = None if self.shares_qk else nn.Linear(d_model, inner, bias=bias)
        self.v_proj = nn.Linear(d_model, inner, bias=bias)
        self.out_proj = nn.Linear(inner, d_model, bias=bias)
        self.dropout = Dropout(dropout)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.d_head).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        query_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, L, D); context: (B, S, D) or None for self-attention. Returns (B, L, D)."""
        if context is None:
            context = x
            if key_padding_mask is None:
                key_padding_mask = query_padding_mask
            if query_padding_mask is None:
                query_padding_mask = key_padding_mask
        q = self._split_heads(self.q_proj(x))
        k = q if self.k_proj is None else self._split_heads(self.k_proj(context))
        v = self._split_heads(self.v_proj(context))
        out = self.op(q, k, v, causal=causal, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.dropout(self.out_proj(out))
