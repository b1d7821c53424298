"""`nn.Module` wrapper around `flow_attention`, so that every registered attention has the same module interface."""

from __future__ import annotations

from torch import Tensor, nn

from flowformer.attention.flow import flow_attention


class FlowAttention(nn.Module):
    """Flow-Attention with fixed options; call as `op(q, k, v, causal=..., key_padding_mask=..., ...)`.

    q (B, H, L, d), k (B, H, S, d), v (B, H, S, dv) -> (B, H, L, dv). See `flow_attention` for the options.
    """

    def __init__(
        self,
        head_dim: int,
        n_heads: int,
        *,
        competition: bool = True,
        allocation: bool = True,
        clamp: float | None = 1.0,
        eps: float = 1e-6,
        kernel: str = "sigmoid",
        competition_over: str = "keys",
        chunk_size: int | None = None,
        backend: str = "eager",
    ) -> None:
        super().__init__()
        self.head_dim, self.n_heads = head_dim, n_heads
        self.options = dict(
            competition=competition,
            allocation=allocation,
            clamp=clamp,
            eps=eps,
            kernel=kernel,
            competition_over=competition_over,
            chunk_size=chunk_size,
            backend=backend,
        )

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
        return flow_attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.options.items())
