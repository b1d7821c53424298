"""Self-attention in timm's layout (one fused `qkv` projection, an output `proj`) around any registered attention op.

The vision networks use it: the hierarchical Flowformer (the official CV module has this very layout,
results/paper/official_code.md §1.4) and DeiT-S, where timm's `VisionTransformer` builds it as its attention layer.
Keeping timm's parameter names means timm's DeiT-S weights load into any attention variant.
"""

from __future__ import annotations

import copy
import copyreg
from typing import Any

import torch
from torch import Tensor, nn

from flowformer.attention.registry import build_attention, split_attention_config
from flowformer.dropout import Dropout


class QkvAttention(nn.Module):
    """x (B, N, C) -> qkv (fused Linear) -> heads -> registered op -> merge -> proj -> (B, N, C).

    Args:
        dim: token width C (divisible by `num_heads`).
        num_heads: number of heads H (head width C / H).
        attention: the `model.attention` config node (`{"name": ..., <op options>}`) or a registered name.
        qkv_bias, proj_bias: biases of the two projections. A `proj_bias` key in the attention node overrides both
            (as `flowformer.attention.MultiHeadAttention` does for its four projections): `flow_lra_official` has
            bias-free projections.
        proj_drop: dropout after the output projection.
        attn_drop, qk_norm, scale_norm: timm's options; only their defaults (off) are supported, because a linear
            attention forms no attention matrix to drop out from and the ops have no norm hooks.
        device, dtype: where to build the projections (timm passes them).
        **unused: further keyword arguments of other timm versions (e.g. `norm_layer`, `depth`), ignored.

    An op that ties keys to queries (Reformer's LSH, `op.shares_qk`) gets a `qkv` projection without the key third,
    which would otherwise receive no gradient (and stall DDP).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attention: dict[str, Any] | str = "flow",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        qk_norm: bool = False,
        scale_norm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads (model.heads)")
        if attn_drop or qk_norm or scale_norm:
            raise NotImplementedError(
                f"QkvAttention supports attn_drop=0, qk_norm=False and scale_norm=False; got attn_drop={attn_drop}, "
                f"qk_norm={qk_norm}, scale_norm={scale_norm}"
            )
        name, options, layer_options = split_attention_config(attention)
        if "proj_bias" in layer_options:
            qkv_bias = proj_bias = bool(layer_options["proj_bias"])
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.op = build_attention(name, head_dim=self.head_dim, n_heads=num_heads, **options)
        self.shares_qk = bool(getattr(self.op, "shares_qk", False))
        parts = 2 if self.shares_qk else 3
        self.qkv = nn.Linear(dim, parts * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)
        self.proj_drop = Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, **unused: Any) -> Tensor:
        """x: (B, N, C) -> (B, N, C). `attn_mask` must be None (a linear attention takes no dense mask);
        `is_causal` is passed to the op."""
        if attn_mask is not None:
            raise NotImplementedError("QkvAttention takes no attn_mask: linear attentions form no (N, N) matrix")
        batch, length, width = x.shape
        heads = self.qkv(x).reshape(batch, length, -1, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.shares_qk:
            q, v = heads.unbind(0)
            k = q
        else:
            q, k, v = heads.unbind(0)
        out = self.op(q, k, v, causal=is_causal)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, length, width)))


class _BoundAttentionType(type):
    """The type of `bind_attention`'s classes; its pickle reducer (registered below) rebuilds such a class from its
    attention config, since a class made at run time cannot be found by name when unpickling."""

    bound_attention: dict[str, Any] | str


def _reduce_bound_class(cls: _BoundAttentionType) -> tuple[Any, tuple[Any, ...]]:
    return bind_attention, (cls.bound_attention,)


copyreg.pickle(_BoundAttentionType, _reduce_bound_class)


def bind_attention(attention: dict[str, Any] | str) -> type[QkvAttention]:
    """A `QkvAttention` subclass with `attention` fixed, for timm's `attn_layer` argument (timm builds the layer
    itself and checks that it is a class, so a partial would not do).

    The class pickles as "bind `attention`" (timm keeps it among the model's arguments), and so do its instances:
    `torch.save(model)`, `strategy=ddp_spawn` and deep copies work.
    """
    name, _, _ = split_attention_config(attention)
    bound = copy.deepcopy(attention)

    class BoundQkvAttention(QkvAttention, metaclass=_BoundAttentionType):
        bound_attention = bound

        def __init__(self, dim: int, num_heads: int = 8, **kwargs: Any) -> None:
            super().__init__(dim, num_heads, attention=bound, **kwargs)

    BoundQkvAttention.__name__ = BoundQkvAttention.__qualname__ = f"QkvAttention[{name}]"
    return BoundQkvAttention
