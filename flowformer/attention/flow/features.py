"""The per-token inputs of Flow-Attention: the feature map φ, the padding weights and the token counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flowformer.attention.flow.options import KERNELS


def feature_map(x: Tensor, kernel: str) -> Tensor:
    """The non-negative projection φ applied to queries and keys.

    `sigmoid` is the paper's kernel. `relu` is the official LRA (JAX) kernel, relu(x) + 1e-6.
    """
    if kernel == "sigmoid":
        return torch.sigmoid(x)
    if kernel == "relu":
        return F.relu(x) + 1e-6
    raise ValueError(f"unknown flow-attention kernel {kernel!r}; expected one of {KERNELS}")


def map_rows(raw: Tensor, rows: slice, kernel: str, real: Tensor | None, out: Tensor | None = None) -> Tensor:
    """φ(raw[rows]), zeroed at padding, written into `out` when given (else into a fresh tensor). It works in place,
    so it serves only where autograd does not trace it; the autograd path maps with `feature_map`."""
    if kernel == "sigmoid":
        block = torch.sigmoid(raw[..., rows, :], out=out)
    else:  # relu(x) + 1e-6, as `feature_map`
        block = torch.clamp_min(raw[..., rows, :], 0.0, out=out).add_(1e-6)
    if real is not None:
        block.mul_(real[..., rows, :])
    return block


def feature_map_grad(mapped: Tensor, kernel: str) -> Tensor:
    """dφ/dx from φ(x) itself (0 at padding, where the mapped value was zeroed)."""
    if kernel == "sigmoid":
        return mapped * (1.0 - mapped)
    # relu(x) + 1e-6 exceeds 1e-6 where x > 0, except for x below ~1e-13 in fp32 (the sum rounds back to 1e-6),
    # where the gradient is taken as 0: a difference autograd through `feature_map` would not make, and negligible
    return (mapped > 1e-6).to(mapped.dtype)


def real_token_weights(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """(B, N) bool padding mask (True = pad) -> (B, 1, N, 1) weights in the dtype of `like`, 1 on real tokens."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise TypeError(f"padding masks must be bool with True meaning padding, got dtype {mask.dtype}")
    return (~mask).to(like.dtype)[:, None, :, None]


@dataclass(frozen=True)
class FlowInputs:
    """Queries, keys and values ready for a flow pass, with their real-token weights.

    q, k: (B, H, L|S, d), feature-mapped unless `mapped` is False (then the pass maps them block by block);
    padded rows are zero once mapped. v: (B, H, S, dv), padded rows zeroed. q_real, k_real: (B, 1, N, 1) weights,
    1 on real tokens, or None without a mask.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    q_real: Tensor | None
    k_real: Tensor | None
    mapped: bool = True

    def rows(self, rows: slice, kernel: str) -> FlowInputs:
        """The tokens `rows` of a causal self-attention (L == S) input, feature-mapped."""
        q_real = None if self.q_real is None else self.q_real[..., rows, :]
        k_real = None if self.k_real is None else self.k_real[..., rows, :]
        q, k = self.q[..., rows, :], self.k[..., rows, :]
        if not self.mapped:
            q, k = map_rows(self.q, rows, kernel, self.q_real), map_rows(self.k, rows, kernel, self.k_real)
        return FlowInputs(q, k, self.v[..., rows, :], q_real, k_real)

    def n_sinks(self) -> Tensor:
        """Number of real queries, at least 1: (B, 1, 1, 1), or a scalar tensor without a mask."""
        count = self.q.new_tensor(self.q.shape[-2]) if self.q_real is None else self.q_real.sum(-2, keepdim=True)
        return count.clamp_min(1)

    def n_sources(self) -> Tensor:
        """Number of real keys, at least 1: (B, 1, 1, 1), or a scalar tensor without a mask."""
        count = self.k.new_tensor(self.k.shape[-2]) if self.k_real is None else self.k_real.sum(-2, keepdim=True)
        return count.clamp_min(1)


def prepare(qkv: tuple[Tensor, ...], masks: tuple, kernel: str, *, dtype: torch.dtype, mapped: bool = True):
    """Cast q, k, v to `dtype`, apply the feature map (unless `mapped` is False) and zero padded tokens.

    masks: (query_padding_mask, key_padding_mask), each (B, N) bool or None. Padded values are zeroed either way
    (0 * NaN padding would poison the flow sums). Returns `FlowInputs`.
    """
    q, k, v = (t.to(dtype) for t in qkv)
    q_real, k_real = (real_token_weights(mask, q) for mask in masks)
    if k_real is not None:
        v = v * k_real
    if mapped:
        q, k = feature_map(q, kernel), feature_map(k, kernel)
        q = q if q_real is None else q * q_real
        k = k if k_real is None else k * k_real
    return FlowInputs(q, k, v, q_real, k_real, mapped)
