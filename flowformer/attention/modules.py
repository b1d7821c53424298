"""`nn.Module` wrapper around Flow-Attention, so that every registered attention has the same module interface."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from flowformer.attention.flow import FlowOptions, apply_flow_attention


class FlowAttention(nn.Module):
    """Flow-Attention with fixed options; call as `op(q, k, v, causal=..., key_padding_mask=..., ...)`.

    q (B, H, L, d), k (B, H, S, d), v (B, H, S, dv) -> (B, H, L, dv). The keyword options are the fields of
    `FlowOptions` (see `flow_attention`); the module keeps them as `self.options`, which the step mode takes as is
    (`flow_attention_prefill(q, k, v, options=op.options)`).

    Padded sources and sinks take no part in the flows, so outputs at real positions do not depend on the padding
    (`padding_invariant`, read by `MultiHeadAttention`).
    """

    padding_invariant = True

    def __init__(self, head_dim: int, n_heads: int, **options: Any) -> None:
        super().__init__()
        self.head_dim, self.n_heads = head_dim, n_heads
        self.options = FlowOptions.resolve(None, options)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        query_padding_mask: Tensor | None = None,
    ) -> Tensor:
        return apply_flow_attention(
            q, k, v, self.options, causal=causal, key_padding_mask=key_padding_mask,
            query_padding_mask=query_padding_mask,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in vars(self.options).items())
